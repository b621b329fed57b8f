"""Two replicas under steady load, one SIGKILLed: unary requests see no error (the gateway
retries on the other replica), the dead one is ejected at once and leaves the routing
table when its lease expires, after which it is never tried again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from gateway_helpers import Fleet, GatewayProcess, RuntimeReplica, metric_value, model_spec, runtime_spec, wait_model_ready

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc

MODEL = "steady"
LEASE_TTL = 3


@dataclass
class Deployment:
    gateway: GatewayProcess
    replicas: list[RuntimeReplica]


@pytest.fixture(scope="module")
def deployment(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("gateway-failover")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(
            runtime_spec("py", "python", ["python"]),
            model_spec(MODEL, "py", "python", {"1": "tests.gateway_models:Echo"}),
        )
        gateway = fleet.gateway()
        replicas = [fleet.replica("py", "python", lease_ttl=LEASE_TTL) for _ in range(2)]
        wait_model_ready(gateway.grpc_url, MODEL, what=f"(logs in {root})")
        yield Deployment(gateway, replicas)
    finally:
        fleet.close()


@dataclass
class Load:
    """Requests of a bounded pool of workers: who served each, and every error."""

    served_by: list[tuple[float, int]] = field(default_factory=list)  # (time.monotonic(), pid)
    errors: list[str] = field(default_factory=list)


async def steady_load(url: str, load: Load, stop: asyncio.Event, workers: int = 4) -> None:
    message = pb.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="x", datatype="FP32", shape=[2])
    message.raw_input_contents.append(np.array([1.0, 2.0], dtype=np.float32).tobytes())
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            while not stop.is_set():
                try:
                    response = await stub.ModelInfer(message, timeout=30)
                except grpc.aio.AioRpcError as err:
                    load.errors.append(f"{err.code().name}: {err.details()}")
                    continue
                pid = np.frombuffer(response.raw_output_contents[1], dtype=np.int64)[0]
                load.served_by.append((time.monotonic(), int(pid)))

        await asyncio.gather(*(worker() for _ in range(workers)))


async def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def test_sigkilled_replica_causes_no_client_errors_and_is_dropped(deployment: Deployment) -> None:
    gateway = deployment.gateway
    victim, survivor = deployment.replicas
    load, stop = Load(), asyncio.Event()
    running = asyncio.create_task(steady_load(gateway.grpc_url, load, stop))
    try:
        # both replicas take traffic before the kill
        both = {victim.process.pid, survivor.process.pid}
        await wait_for(lambda: {pid for _, pid in load.served_by} >= both, 30, "both replicas never served")
        before = gateway.metrics()

        victim.kill()
        killed_at = time.monotonic()
        # the endpoint record goes with the lease, and the gateway drops the replica
        await wait_for(
            lambda: metric_value(gateway.metrics(), "modelgw_replicas") == 1,
            LEASE_TTL + 30, "the dead replica never left the routing table",
        )
        dropped = gateway.metrics()
        served_before_drop = len(load.served_by)

        # from now on the dead replica is never tried: no retries, no ejections
        await asyncio.sleep(2.0)
        stop.set()
        await running
    finally:
        stop.set()
        await asyncio.gather(running, return_exceptions=True)
    after = gateway.metrics()

    assert load.errors == [], load.errors[:5]
    served_after_kill = [pid for at, pid in load.served_by if at > killed_at + 0.5]
    assert served_after_kill and set(served_after_kill) == {survivor.process.pid}
    assert len(load.served_by) > served_before_drop, "no load after the replica was dropped"

    labels = {"runtime": "py"}
    ejections = metric_value(dropped, "modelgw_replica_ejections_total", **labels)
    assert ejections - metric_value(before, "modelgw_replica_ejections_total", **labels) >= 1
    assert metric_value(dropped, "modelgw_retries_total", model=MODEL) > metric_value(before, "modelgw_retries_total", model=MODEL)
    assert metric_value(after, "modelgw_replica_ejections_total", **labels) == ejections
    assert metric_value(after, "modelgw_retries_total", model=MODEL) == metric_value(dropped, "modelgw_retries_total", model=MODEL)
    assert metric_value(after, "modelgw_requests_total", model=MODEL, status="OK") >= len(load.served_by)
