"""Traffic split between versions: 90/10 over 2000 requests lands within 3 points of the
weights; requests carrying a session key (`x-modelgw-session`) always land on one version;
an explicit version wins over the split."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from gateway_helpers import Fleet, GatewayProcess, http_json, model_spec, runtime_spec, wait_model_ready

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc

MODEL = "split"


@pytest.fixture(scope="module")
def gateway(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("gateway-traffic")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        echo = "tests.gateway_models:Echo"
        fleet.apply(
            runtime_spec("py", "python", ["python"]),
            model_spec(MODEL, "py", "python", {"1": echo, "2": echo}, traffic={"1": 90, "2": 10}),
        )
        gateway = fleet.gateway()
        fleet.replica("py", "python")
        for version in ("1", "2"):
            wait_model_ready(gateway.grpc_url, MODEL, version=version, what=f"(logs in {root})")
        yield gateway
    finally:
        fleet.close()


def request(version: str = "") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=MODEL, model_version=version)
    message.inputs.add(name="x", datatype="FP32", shape=[1])
    message.raw_input_contents.append(np.array([1.0], dtype=np.float32).tobytes())
    return message


async def versions_served(
    url: str, count: int, concurrency: int = 16, version: str = "", session: str | None = None
) -> collections.Counter[str]:
    """The model_version of `count` responses, `concurrency` requests at a time."""
    served: collections.Counter[str] = collections.Counter()
    metadata = (("x-modelgw-session", session),) if session is not None else None
    message = request(version)
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        remaining = iter(range(count))

        async def worker() -> None:
            for _ in remaining:
                response = await stub.ModelInfer(message, metadata=metadata, timeout=30)
                served[response.model_version] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


async def test_90_10_split_over_2000_requests(gateway: GatewayProcess) -> None:
    served = await versions_served(gateway.grpc_url, 2000, concurrency=32)
    assert sum(served.values()) == 2000 and set(served) <= {"1", "2"}, served
    share = served["2"] / 2000
    assert abs(share - 0.10) <= 0.03, served


async def test_sticky_sessions_always_land_on_one_version(gateway: GatewayProcess) -> None:
    sessions = [f"user-{i}" for i in range(60)]
    per_session = await asyncio.gather(
        *(versions_served(gateway.grpc_url, 8, concurrency=2, session=s) for s in sessions)
    )
    chosen = {}
    for session, served in zip(sessions, per_session, strict=True):
        assert sum(served.values()) == 8
        assert len(served) == 1, (session, served)
        chosen[session] = next(iter(served))
    # the sessions are spread over both versions, not all pinned to one
    assert set(chosen.values()) == {"1", "2"}, chosen
    # the same session key over REST lands on the same version as over gRPC
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    for session in sessions[:10]:
        for _ in range(3):
            status, answer = http_json(
                "POST", f"{gateway.base}/v2/models/{MODEL}/infer", body, headers={"x-modelgw-session": session}
            )
            assert status == 200, answer
            assert answer["model_version"] == chosen[session], (session, answer)


async def test_an_explicit_version_wins_over_the_split(gateway: GatewayProcess) -> None:
    served = await versions_served(gateway.grpc_url, 100, version="2")
    assert served == {"2": 100}
    served = await versions_served(gateway.grpc_url, 100, version="1", session="user-0")
    assert served == {"1": 100}
