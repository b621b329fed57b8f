"""etcd stopped for 30 s under load: no failed request to models the gateway already knows
(nothing on the request path touches etcd); once etcd is back the gateway reads the
registry again and a newly applied model routes.

The runtimes lose etcd too and keep serving. Their endpoint leases (TTL 10 s) outlive the
outage: etcd extends every lease when it starts, so the records are still there after
the restart and the keep-alives resume.

etcd frozen (SIGSTOP) for longer than every lease TTL, with the reconciler running the
replicas: its clock runs on, so when it thaws every lease has expired, the election key
and the endpoint records with them. Still no failed request, during or after: the
reconciler keeps its replicas (nobody else leads) and wins the election again, the
replicas register again under new leases, and the gateway keeps routing to replicas that
answer while their records are briefly gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from gateway_helpers import (
    Fleet,
    GatewayProcess,
    apply,
    http_get,
    http_json,
    metric_value,
    model_spec,
    runtime_spec,
    wait_model_ready,
)
from reconciler_helpers import Processes, replica_processes, until

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.registry.store import RegistryStore

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 30
ECHO = "tests.gateway_models:Echo"


@dataclass
class Deployment:
    fleet: Fleet
    gateway: GatewayProcess


@pytest.fixture
def deployment(etcd, tmp_path: Path) -> Iterator[Deployment]:
    fleet = Fleet(etcd.endpoint, "/modelgw/v1/", tmp_path)
    try:
        fleet.apply(
            runtime_spec("py", "python", ["python"]),
            model_spec("known", "py", "python", {"1": ECHO}),
        )
        gateway = fleet.gateway()
        fleet.replica("py", "python", lease_ttl=10)
        wait_model_ready(gateway.grpc_url, "known", what=f"(logs in {tmp_path})")
        yield Deployment(fleet, gateway)
    finally:
        fleet.close()


@dataclass
class Tally:
    ok: list[float] = field(default_factory=list)  # time.monotonic() of each success
    errors: list[str] = field(default_factory=list)


async def grpc_load(url: str, tally: Tally, stop: asyncio.Event, workers: int = 3, model: str = "known") -> None:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="x", datatype="FP32", shape=[1])
    message.raw_input_contents.append(np.array([1.0], dtype=np.float32).tobytes())
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            while not stop.is_set():
                try:
                    await stub.ModelInfer(message, timeout=10)
                    tally.ok.append(time.monotonic())
                except grpc.aio.AioRpcError as err:
                    tally.errors.append(f"grpc {err.code().name}: {err.details()}")
                await asyncio.sleep(0.01)  # steady, not flat out: this runs for 30 s+

        await asyncio.gather(*(worker() for _ in range(workers)))


async def rest_load(base: str, tally: Tally, stop: asyncio.Event, model: str = "known") -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            try:
                async with session.post(f"{base}/v2/models/{model}/infer", json=body) as response:
                    if response.status == 200:
                        tally.ok.append(time.monotonic())
                    else:
                        tally.errors.append(f"rest {response.status}: {await response.text()}")
            except aiohttp.ClientError as err:
                tally.errors.append(f"rest {err!r}")
            await asyncio.sleep(0.01)


async def test_etcd_outage_under_load(deployment: Deployment, etcd) -> None:
    gateway = deployment.gateway
    metrics = lambda: asyncio.to_thread(gateway.metrics)  # noqa: E731
    full_reads = metric_value(await metrics(), "modelgw_registry_full_reads")
    tally, stop = Tally(), asyncio.Event()
    load = asyncio.gather(grpc_load(gateway.grpc_url, tally, stop), rest_load(gateway.base, tally, stop))
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(etcd.stop)
        down_at = time.monotonic()
        await asyncio.sleep(OUTAGE_SECONDS)

        # still down: the gateway knows it, stays ready, and admin writes fail clearly
        text = await metrics()
        assert metric_value(text, "modelgw_registry_connected") == 0
        assert (await asyncio.to_thread(http_get, f"{gateway.base}/v2/health/ready"))[0] == 200
        status, body = await asyncio.to_thread(
            http_json, "POST", f"{gateway.base}/admin/v1/models", model_spec_json("during")
        )
        assert status == 503 and body["error"], body
        up_at = time.monotonic()

        await asyncio.to_thread(etcd.start)
        deadline = time.monotonic() + 30
        while True:
            text = await metrics()
            if metric_value(text, "modelgw_registry_connected") == 1:
                break
            assert time.monotonic() < deadline, "the gateway never reconnected to etcd"
            await asyncio.sleep(0.2)
        assert metric_value(text, "modelgw_registry_full_reads") > full_reads  # it read the registry again
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await load

    assert tally.errors == [], tally.errors[:5]
    during = [t for t in tally.ok if down_at < t < up_at]
    assert len(during) > OUTAGE_SECONDS, f"only {len(during)} requests during the outage"

    # a model applied after the outage routes (the runtime loads it, the gateway sees it)
    status, body = await asyncio.to_thread(http_json, "POST", f"{gateway.base}/admin/v1/models", model_spec_json("after"))
    assert status == 201, body
    await asyncio.to_thread(wait_model_ready, gateway.grpc_url, "after", 60)
    status, body = await asyncio.to_thread(
        http_json, "POST", f"{gateway.base}/v2/models/after/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [41.0]}]},
    )
    assert status == 200 and body["outputs"][0]["data"] == [42.0], body


def model_spec_json(name: str) -> dict:
    return {"name": name, "versions": [{"version": "1", "uri": ECHO, "format": "python", "runtime": "py"}]}


PAUSE_SECONDS = 15
PAUSE_LEASE_TTL = 5  # the reconciler's election lease and its replicas' endpoint leases


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


async def test_etcd_frozen_longer_than_every_lease_under_load(etcd, processes: Processes, tmp_path: Path) -> None:
    prefix = "/modelgw/v1/"
    runtime = runtime_spec("py", "python", ["python"])
    runtime.replicas = 2
    await asyncio.to_thread(apply, etcd.endpoint, prefix, runtime, model_spec("known", "py", "python", {"1": ECHO}))
    reconciler = processes.reconciler("rec", etcd.endpoint, prefix, lease_ttl=PAUSE_LEASE_TTL, resync=1.0)
    gateway = await asyncio.to_thread(GatewayProcess, etcd.endpoint, prefix, tmp_path / "gateway.log")
    logs = lambda: processes.logs() + f"\n==== gateway\n{gateway.output()[-4000:]}"  # noqa: E731
    try:
        async with RegistryStore(etcd.endpoint, prefix=prefix) as store:

            async def serving() -> dict[str, int]:
                ready = {e.instance for e in (await store.list_endpoints("py")).endpoints if e.ready}
                pids = replica_processes(prefix, etcd.endpoint)
                return pids if len(ready) == 2 and set(pids) == ready else {}

            pids = await until(serving, "two replicas serve", timeout=120, logs=logs)
            await asyncio.to_thread(wait_model_ready, gateway.grpc_url, "known", 60)
            tally, stop = Tally(), asyncio.Event()
            load = asyncio.gather(grpc_load(gateway.grpc_url, tally, stop), rest_load(gateway.base, tally, stop))
            try:
                await asyncio.sleep(1.0)
                etcd.pause()
                try:
                    await asyncio.sleep(PAUSE_SECONDS)  # longer than every lease TTL
                finally:
                    etcd.resume()
                thawed_at = time.monotonic()
                # the reconciler leads again and the replicas are registered again
                await until(lambda: _leads(store, "rec"), "the reconciler leads again", timeout=60, logs=logs)
                await until(serving, "both replicas registered again", timeout=60, logs=logs)
                await asyncio.sleep(5.0)  # traffic goes on after the thaw
            finally:
                stop.set()
                await load
            assert tally.errors == [], f"{len(tally.errors)} failed: {tally.errors[:5]}\n{logs()}"
            assert [t for t in tally.ok if t > thawed_at + 4], "no successful request after the thaw"
            # the same replica processes, never stopped or restarted
            assert replica_processes(prefix, etcd.endpoint) == pids, logs()
            assert reconciler.alive()
    finally:
        gateway.kill()


async def _leads(store: RegistryStore, identity: str) -> bool:
    return await store.leader() == identity
