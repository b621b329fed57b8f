"""Long ModelStreamInfer streams through the gateway spread over the model's replicas: a
stream counts on its replica's outstanding requests for as long as it runs, so the
replica choice (power of two choices on that count) sends the next one to the other
replica. Real processes: a `modelgw gateway`, two `modelgw runtime serve --kind llm`
replicas of one runtime with a tiny checkpoint written by `modelgw llm make-checkpoint`,
all registered in a real etcd; the streams are plain grpc.aio calls.

Where each stream went is read off the replicas' own endpoint records (sequences running
or queued in each engine), not off the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conftest import modelgw_command
from gateway_helpers import Fleet, GatewayProcess, metric_value, model_spec, runtime_spec, wait_model_ready, wait_until

from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

RUNTIME = "llm-spread"
MODEL = "tiny"
FORMAT = "hf-llama"
# streams opened one pair at a time: with the count, each pair lands one on each replica;
# blind to streams, the choice is a coin toss per stream (all pairs split: 1 in 2**PAIRS)
PAIRS = 5
# generations longer than the test (the tiny model makes well under a thousand tokens a
# second here): every stream runs until the test cancels it. The engine reserves cache
# blocks for prompt + max_tokens up front: each replica has room for every stream at once
# (2 * PAIRS * LONG tokens), so none waits for its first token whichever way they go
LONG = 12000
CONTEXT = 16384
KV_CACHE_MB = 64  # 128k tokens


@dataclass
class Stack:
    fleet: Fleet
    gateway: GatewayProcess


async def endpoints(store: RegistryStore) -> tuple[list[rpb.Endpoint], int]:
    """The replicas' endpoint records and the etcd revision they were read at."""
    listed = await store.list_endpoints()
    return [e for e in listed.endpoints if e.runtime == RUNTIME], listed.revision


async def loads(store: RegistryStore) -> dict[str, int]:
    """Sequences running or queued in each replica's engine, by instance."""
    return {e.instance: e.load.running + e.load.queue_depth for e in (await endpoints(store))[0]}


async def eventually(condition: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; AssertionError naming `what`
    and the last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f}s: {what}; last: {value!r}")
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, etcd_server) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway-streams")
    checkpoint = root / "tiny"
    made = subprocess.run(
        modelgw_command("llm", "make-checkpoint", str(checkpoint), "--layers", "2", "--hidden", "64",
                        "--max-position", str(CONTEXT), "--seed", "7"),
        capture_output=True, text=True, timeout=120,
    )
    assert made.returncode == 0, made.stderr
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(runtime_spec(RUNTIME, "llm", [FORMAT]), model_spec(MODEL, RUNTIME, FORMAT, {"1": str(checkpoint)}))
        for _ in range(2):
            fleet.replica(RUNTIME, "llm", "--option", "threads=1", "--option", f"max_num_seqs={2 * PAIRS}",
                          "--option", f"kv_cache_mb={KV_CACHE_MB}")
        gateway = fleet.gateway()
        wait_model_ready(gateway.grpc_url, MODEL, timeout=180, what=f"(logs in {root})")
        stack = Stack(fleet, gateway)

        yield stack
    finally:
        fleet.close()


def generation(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    prompt = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    prompt.contents.bytes_contents.append(b"The quick brown fox jumps over the lazy dog")
    request.parameters["max_tokens"].int64_param = LONG
    request.parameters["ignore_eos"].bool_param = True
    return request


async def drain(call: grpc.aio.StreamStreamCall) -> None:
    """Read a stream's responses as a client does, until it ends or is cancelled."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        while (response := await call.read()) is not grpc.aio.EOF:
            assert not response.error_message, response.error_message


async def test_long_grpc_streams_spread_over_both_replicas(stack: Stack) -> None:
    # grpc.aio calls all in this test's event loop: the library binds to one loop
    async with RegistryStore(stack.fleet.etcd, prefix=stack.fleet.prefix) as store:
        await spread_over_both_replicas(stack, store)


async def spread_over_both_replicas(stack: Stack, store: RegistryStore) -> None:
    def in_flight() -> float:
        return metric_value(stack.gateway.metrics(), "modelgw_in_flight_requests", model=MODEL)

    def cancelled() -> float:
        return metric_value(stack.gateway.metrics(), "modelgw_requests_total", model=MODEL, protocol="grpc-stream",
                            status="CANCELLED")

    async def both_ready() -> int | None:
        replicas, revision = await endpoints(store)
        ready = [e for e in replicas if e.ready and any(m.state == rpb.LoadedModel.READY for m in e.models)]
        return revision if len(ready) == 2 else None

    revision = await eventually(both_ready, 180, "two ready replicas")
    # the gateway routes by what it has read of the registry: up to that revision
    await asyncio.to_thread(
        wait_until, lambda: metric_value(stack.gateway.metrics(), "modelgw_registry_revision") >= revision, 30,
        "the gateway has seen both replicas",
    )
    assert sorted((await loads(store)).values()) == [0, 0]
    cancelled_before = cancelled()
    calls: list[grpc.aio.StreamStreamCall] = []
    readers: list[asyncio.Task] = []
    async with grpc.aio.insecure_channel(stack.gateway.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            for pair in range(1, PAIRS + 1):
                for _ in range(2):
                    call = stub.ModelStreamInfer()
                    calls.append(call)
                    await call.write(generation(f"s{len(calls)}"))
                    # a first token: the gateway has chosen this stream's replica
                    first = await asyncio.wait_for(call.read(), 60)
                    assert not first.error_message, first.error_message
                    readers.append(asyncio.create_task(drain(call)))

                async def all_started(expected: int = 2 * pair) -> dict[str, int] | None:
                    seen = await loads(store)
                    return seen if sum(seen.values()) == expected else None

                seen = await eventually(all_started, 60, f"{2 * pair} generations in the replicas' load figures")
                assert sorted(seen.values()) == [pair, pair], f"after {2 * pair} streams: {seen}"
            assert in_flight() == 2 * PAIRS  # one upstream stream each
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers)

    # cancelling a client's stream releases its upstream one: the runtimes stop generating
    async def stopped() -> bool:
        return sum((await loads(store)).values()) == 0

    await eventually(stopped, 60, "the cancelled generations stopped")
    await asyncio.to_thread(wait_until, lambda: in_flight() == 0, 30, "the gateway released every stream")
    counted = [line for line in stack.gateway.metrics().splitlines() if line.startswith("modelgw_requests_total{")]
    assert cancelled() == cancelled_before + 2 * PAIRS, counted  # each counted once, as cancelled
