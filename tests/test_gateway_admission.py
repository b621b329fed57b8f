"""The proxy's one admission path (gateway/proxy.py), at unit level: a stream opened with
`proxy.stream()` is counted against the in-flight caps and on its replica's outstanding
requests while it is open, and released exactly once however it ends (an error, a
cancel, an error the frontend answered itself), with one count in the request metrics.

The routing table and the proxy are the real ones; the replicas are two endpoint records
for one in-process runtime server, so the upstream calls are real gRPC streams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from modelgw.gateway.errors import GatewayError
from modelgw.gateway.metrics import REGISTRY
from modelgw.gateway.proxy import Proxy
from modelgw.gateway.routing import Replica, RoutingTable
from modelgw.gateway.upstream import UpstreamPool
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import registry_pb2 as rpb
from modelgw.runtimes.repository import ModelRepository
from modelgw.runtimes.server import RuntimeServer

PROTOCOL = "unit"
REPLICAS = 2


@pytest.fixture
async def runtime() -> AsyncIterator[str]:
    """The address of a running runtime server (it serves no model: the streams opened
    here stay open until the proxy cancels them)."""
    repository = ModelRepository("python")
    server = RuntimeServer(repository)
    await server.start()
    await server.set_ready(True)
    try:
        yield server.address
    finally:
        await server.stop(0)


@pytest.fixture
def model() -> str:
    """A model name of this test's own: the request metrics are process-wide."""
    return f"m-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def proxy(runtime: str, model: str) -> AsyncIterator[Proxy]:
    table = RoutingTable()
    spec = rpb.ModelSpec(name=model)
    spec.versions.add(version="1", uri="unused", format="python", runtime="py")
    spec.limits.max_in_flight = 3
    endpoints = {}
    for i in range(REPLICAS):
        endpoint = rpb.Endpoint(runtime="py", instance=f"py-{i}", address=runtime, ready=True)
        endpoint.models.add(name=model, version="1", state=rpb.LoadedModel.READY)
        endpoints[f"py/py-{i}"] = endpoint
    unserved = rpb.ModelSpec(name=f"{model}-unserved")  # no replica runs its runtime
    unserved.versions.add(version="1", uri="unused", format="python", runtime="none")
    table.update([spec, unserved], endpoints)
    pool = UpstreamPool()
    try:
        yield Proxy(table, pool)
    finally:
        await pool.close()


def replicas(proxy: Proxy) -> list[Replica]:
    return list(proxy.table.replicas.values())


def counted(model: str, status: str) -> float:
    """modelgw_requests_total of `model` (this test's protocol) with `status`."""
    labels = {"model": model, "version": "1", "runtime": "py", "protocol": PROTOCOL, "status": status}
    return REGISTRY.get_sample_value("modelgw_requests_total", labels) or 0.0


def assert_released(proxy: Proxy, model: str) -> None:
    assert proxy.in_flight == 0
    assert proxy.in_flight_by_model[model] == 0
    assert REGISTRY.get_sample_value("modelgw_in_flight_requests", {"model": model}) == 0
    assert [r.outstanding for r in replicas(proxy)] == [0] * REPLICAS


async def test_an_open_stream_is_counted_and_an_error_releases_it_once(proxy: Proxy, model: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), proxy.stream(model, "", metadata=[], protocol=PROTOCOL) as stream:
        assert (proxy.in_flight, proxy.in_flight_by_model[model]) == (1, 1)
        assert stream.replica is not None and stream.replica.outstanding == 1
        assert stream.version == "1" and stream.runtime == "py"  # as the traffic split chose
        raise RuntimeError("boom")
    assert_released(proxy, model)
    assert await stream.call.code() == grpc.StatusCode.CANCELLED  # the runtime stops working on it
    assert counted(model, "UNKNOWN") == 1
    # releasing again (a frontend's cleanup after the context's) changes nothing
    stream.release()
    stream.release(GatewayError(grpc.StatusCode.INTERNAL, "again"))
    assert_released(proxy, model)
    assert counted(model, "UNKNOWN") == 1 and counted(model, "INTERNAL") == 0 and counted(model, "OK") == 0


async def test_a_cancelled_stream_is_released_and_counted_as_cancelled(proxy: Proxy, model: str) -> None:
    opened = asyncio.Event()

    async def relay() -> None:
        with proxy.stream(model, "", metadata=[], protocol=PROTOCOL):
            opened.set()
            await asyncio.sleep(3600)  # a long generation

    task = asyncio.create_task(relay())
    await opened.wait()
    assert proxy.in_flight == 1 and sum(r.outstanding for r in replicas(proxy)) == 1
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_released(proxy, model)
    assert counted(model, "CANCELLED") == 1 and counted(model, "OK") == 0


async def test_a_stream_relayed_by_a_generator_that_is_closed_counts_as_cancelled(proxy: Proxy, model: str) -> None:
    """What gRPC does to a streaming handler whose client stopped reading: aclose()."""

    async def relay() -> AsyncIterator[bytes]:
        with proxy.stream(model, "", metadata=[], protocol=PROTOCOL):
            while True:
                yield b"a token"

    responses = relay()
    assert await anext(responses) == b"a token"
    await responses.aclose()
    assert_released(proxy, model)
    assert counted(model, "CANCELLED") == 1 and counted(model, "UNKNOWN") == 0


async def test_a_status_set_by_the_frontend_is_the_one_counted(proxy: Proxy, model: str) -> None:
    with proxy.stream(model, "", metadata=[], protocol=PROTOCOL) as stream:
        stream.status = "UNAVAILABLE"  # an error the frontend sent on as an event, then returned
    assert_released(proxy, model)
    assert counted(model, "UNAVAILABLE") == 1 and counted(model, "OK") == 0
    with proxy.stream(model, "", metadata=[], protocol=PROTOCOL):
        pass
    assert counted(model, "OK") == 1


async def test_a_stream_that_cannot_be_opened_holds_nothing(proxy: Proxy, model: str) -> None:
    unserved = f"{model}-unserved"
    with pytest.raises(GatewayError) as caught:
        proxy.stream(unserved, "", metadata=[], protocol=PROTOCOL)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert proxy.in_flight == 0 and proxy.in_flight_by_model[unserved] == 0
    # counted once, under the version asked for (none: no replica was there to choose)
    labels = {"model": unserved, "version": "", "runtime": "", "protocol": PROTOCOL, "status": "UNAVAILABLE"}
    assert REGISTRY.get_sample_value("modelgw_requests_total", labels) == 1
    with pytest.raises(GatewayError) as caught:
        proxy.stream("no-such-model", "", metadata=[], protocol=PROTOCOL)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_open_streams_spread_over_the_replicas_and_share_the_caps_with_unary(proxy: Proxy, model: str) -> None:
    streams = [proxy.stream(model, "", metadata=[], protocol=PROTOCOL) for _ in range(3)]
    try:
        # power of two choices sees the streams: never all three on one replica
        assert sorted(r.outstanding for r in replicas(proxy)) == [1, 2]
        # the model's cap (3) holds streams and unary calls together
        with pytest.raises(GatewayError) as caught:
            proxy.stream(model, "", metadata=[], protocol=PROTOCOL)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        request = pb.ModelReadyRequest(name=model).SerializeToString()
        with pytest.raises(GatewayError) as caught:
            await proxy.unary("model_ready", request, model, "", metadata=[], protocol=PROTOCOL)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for stream in streams:
            stream.release()
    assert_released(proxy, model)
    assert counted(model, "OK") == 3
    # released, the slots serve a unary call again (counted once, on its replica while it ran)
    answer = await proxy.unary("model_ready", request, model, "", metadata=[], protocol=PROTOCOL)
    assert pb.ModelReadyResponse.FromString(answer).ready is False  # the runtime does not serve it
    assert_released(proxy, model)
    assert counted(model, "OK") == 4
