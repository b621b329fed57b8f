"""What travels from a client's request to the runtime besides the message: the forwarded
headers and the deadline. One module for the three frontends (gRPC, OIP REST, OpenAI),
which are peers over the proxy and never import each other for these.

    metadata, request_id = outbound_metadata(context.invocation_metadata(), subject)   # gRPC
    metadata, request_id = outbound_metadata(forwarded_headers(request), subject)     # HTTP
    proxy.unary(..., metadata=metadata, timeout=grpc_timeout(context))  # or http_timeout(request)

The header names are the protocol's (modelgw/oip/protocol.py). A client's deadline is what
it asked for; request_timeout() combines it with the model's own limit.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from aiohttp import web

from modelgw.oip.protocol import (
    GRPC_TIMEOUT_HEADER,
    PROPAGATED_HEADERS,
    REQUEST_ID_HEADER,
    SUBJECT_HEADER,
    TIMEOUT_HEADER,
)

if TYPE_CHECKING:
    from modelgw.gateway.routing import ModelRoute

# -- request ids and headers -----------------------------------------------------------------

# Request ids for requests that come without one: a random per-process prefix and a
# counter, unique across gateway replicas and ten times cheaper than uuid4 per request.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


def outbound_metadata(
    incoming: Sequence[tuple[str, str | bytes]] | None, subject: str | None
) -> tuple[list[tuple[str, str]], str]:
    """Metadata for the runtime and the request id: the propagated headers as they came
    (a request id made here when the client sent none) and the verified subject. A
    client's own subject header is dropped: only the gateway sets it."""
    out: list[tuple[str, str]] = []
    request_id = ""
    for key, value in incoming or ():
        if key in PROPAGATED_HEADERS and isinstance(value, str):
            out.append((key, value))
            if key == REQUEST_ID_HEADER:
                request_id = value
    if not request_id:
        request_id = new_request_id()
        out.append((REQUEST_ID_HEADER, request_id))
    if subject:
        out.append((SUBJECT_HEADER, subject))
    return out, request_id


def forwarded_headers(request: web.Request) -> list[tuple[str, str]]:
    """An HTTP request's headers that travel on to the runtime, as outbound_metadata()
    takes them (HTTP header names are case-insensitive; the protocol's are lower-case)."""
    return [(key, value) for key in PROPAGATED_HEADERS for value in request.headers.getall(key, ())]


# -- deadlines -----------------------------------------------------------------------------

# grpc-timeout units (the gRPC over HTTP/2 spec): hours, minutes, seconds, milli-, micro-, nanoseconds
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def http_timeout(request: web.Request) -> float | None:
    """An HTTP client's deadline in seconds: `x-modelgw-timeout: 2.5` or, as gRPC writes it,
    `grpc-timeout: 2500m`. A value that is neither is ignored (the model's timeout applies)."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value:
        try:
            seconds = float(value)
            return seconds if seconds > 0 else None
        except ValueError:
            return None
    value = request.headers.get(GRPC_TIMEOUT_HEADER, "")
    # at most 8 digits and a unit, as the spec allows
    if 2 <= len(value) <= 9 and value[:-1].isdigit() and value[-1] in _GRPC_TIMEOUT_UNITS:
        return int(value[:-1]) * _GRPC_TIMEOUT_UNITS[value[-1]] or None
    return None


def grpc_timeout(context: grpc.aio.ServicerContext) -> float | None:
    """A gRPC client's deadline: the seconds left of it, None when it set none."""
    return context.time_remaining()


def request_timeout(route: ModelRoute | None, client_timeout: float | None) -> float | None:
    """The smaller of the client's and the model's timeouts; None when neither is set (a
    unary call then gets the proxy's default, a stream none: its client ends it)."""
    model_timeout = route.spec.limits.timeout_seconds if route else 0.0
    if client_timeout and model_timeout:
        return min(client_timeout, model_timeout)
    return client_timeout or model_timeout or None
