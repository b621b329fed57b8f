"""REST clients give a deadline as x-modelgw-timeout (seconds) or in gRPC's own notation."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from modelgw.gateway.forwarding import http_timeout


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"x-modelgw-timeout": "2.5"}, 2.5),
        ({"grpc-timeout": "2500m"}, 2.5),
        ({"grpc-timeout": "10S"}, 10.0),
        ({"grpc-timeout": "1H"}, 3600.0),
        ({"grpc-timeout": "300u"}, 300e-6),
        ({"x-modelgw-timeout": "3", "grpc-timeout": "1S"}, 3.0),  # ours wins
        ({"grpc-timeout": "1.5"}, None),  # not gRPC's notation: ignored, the model's timeout applies
        ({"grpc-timeout": "123456789S"}, None),  # more than 8 digits
        ({"grpc-timeout": "0S"}, None),
        ({"x-modelgw-timeout": "soon"}, None),
        ({"x-modelgw-timeout": "-1"}, None),
        ({}, None),
    ],
)
def test_client_deadline_from_headers(headers: dict[str, str], seconds: float | None) -> None:
    got = http_timeout(make_mocked_request("POST", "/v2/models/m/infer", headers=headers))
    assert got == (pytest.approx(seconds) if seconds is not None else None)
