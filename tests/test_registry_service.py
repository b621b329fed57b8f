"""RegistryService over real gRPC (generated stubs) on a real etcd: results and status codes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from modelgw.protos import registry_pb2 as rpb
from modelgw.protos import registry_pb2_grpc as rpb_grpc
from modelgw.registry.client import RegistryClient
from modelgw.registry.errors import ConflictError, IntegrityError, NotFoundError, UnavailableError, ValidationError
from modelgw.registry.service import CURRENT_REVISION_METADATA, start_server
from modelgw.registry.store import RegistryStore


def runtime(name: str = "torch") -> rpb.RuntimeSpec:
    return rpb.RuntimeSpec(name=name, kind="pytorch", model_formats=["torchscript"], replicas=1)


def model(name: str = "resnet", runtime_name: str = "torch") -> rpb.ModelSpec:
    return rpb.ModelSpec(
        name=name, versions=[rpb.ModelVersion(version="1", uri="/m/1", format="torchscript", runtime=runtime_name)]
    )


@pytest.fixture
async def served(etcd_server, etcd_prefix):
    """(stub, store) with a RegistryService on a free port over the session's etcd."""
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        server, port = await start_server(store)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield rpb_grpc.RegistryServiceStub(channel), store, port
        await server.stop(0)


async def code_of(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_apply_get_list_delete(served):
    stub, _, _ = served
    created = await stub.ApplyRuntime(rpb.ApplyRuntimeRequest(spec=runtime()))
    assert created.outcome == rpb.CREATED and created.record.revision > 0
    applied = await stub.ApplyModel(rpb.ApplyModelRequest(spec=model(), expected_revision=0))
    assert applied.outcome == rpb.CREATED
    got = await stub.GetModel(rpb.GetRequest(name="resnet"))
    assert got.spec == model() and got.revision == applied.record.revision
    listed = await stub.ListRuntimes(rpb.ListRequest())
    assert [r.spec.name for r in listed.runtimes] == ["torch"] and listed.revision >= created.record.revision
    assert [m.spec.name for m in (await stub.ListModels(rpb.ListRequest())).models] == ["resnet"]
    deleted = await stub.DeleteModel(rpb.DeleteRequest(name="resnet", expected_revision=got.revision))
    assert deleted.revision > got.revision
    await stub.DeleteRuntime(rpb.DeleteRequest(name="torch"))
    assert (await stub.ListRuntimes(rpb.ListRequest())).runtimes == []


async def test_status_codes(served):
    stub, _, _ = served
    error = await code_of(stub.ApplyRuntime(rpb.ApplyRuntimeRequest(spec=rpb.RuntimeSpec(name="torch", kind="Jax!"))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "runtimes/torch: kind: 'Jax!' is not a kind name" in error.details()
    assert "model_formats: at least one" in error.details()

    error = await code_of(stub.ApplyModel(rpb.ApplyModelRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec: required" in error.details()

    error = await code_of(stub.GetModel(rpb.GetRequest(name="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error.details() == "models/nope does not exist"

    error = await code_of(stub.ApplyModel(rpb.ApplyModelRequest(spec=model())))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "runtime 'torch' does not exist" in error.details()

    first = await stub.ApplyRuntime(rpb.ApplyRuntimeRequest(spec=runtime()))
    await stub.ApplyModel(rpb.ApplyModelRequest(spec=model()))
    error = await code_of(stub.DeleteRuntime(rpb.DeleteRequest(name="torch")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "used by models/resnet" in error.details()

    changed = runtime()
    changed.replicas = 4
    second = await stub.ApplyRuntime(rpb.ApplyRuntimeRequest(spec=changed, expected_revision=first.record.revision))
    changed.replicas = 5
    error = await code_of(
        stub.ApplyRuntime(rpb.ApplyRuntimeRequest(spec=changed, expected_revision=first.record.revision))
    )
    current = second.record.revision
    assert error.code() == grpc.StatusCode.ABORTED
    assert f"revision {current}" in error.details()
    assert dict(error.trailing_metadata())[CURRENT_REVISION_METADATA] == str(current)

    error = await code_of(stub.DeleteRuntime(rpb.DeleteRequest(name="torch", force=True, expected_revision=1)))
    assert error.code() == grpc.StatusCode.ABORTED

    error = await code_of(anext(aiter(stub.Watch(rpb.WatchRequest(start_revision=-1)))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unavailable_when_etcd_is_down():
    async with RegistryStore("127.0.0.1:1", timeout=2) as store:
        server, port = await start_server(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rpb_grpc.RegistryServiceStub(channel)
                error = await code_of(stub.ListModels(rpb.ListRequest()))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "etcd at 127.0.0.1:1 is unreachable" in error.details()
        finally:
            await server.stop(0)


async def test_list_endpoints(served):
    stub, store, _ = served
    lease = await store.grant_lease(ttl=10)
    await store.put_endpoint(rpb.Endpoint(runtime="torch", instance="t0", address="127.0.0.1:1"), lease)
    await store.put_endpoint(rpb.Endpoint(runtime="onnx", instance="o0", address="127.0.0.1:2"), lease)
    assert len((await stub.ListEndpoints(rpb.ListEndpointsRequest())).endpoints) == 2
    only = await stub.ListEndpoints(rpb.ListEndpointsRequest(runtime="onnx"))
    assert [e.instance for e in only.endpoints] == ["o0"]
    await lease.revoke()


async def test_watch_stream(served):
    stub, store, _ = served
    await store.apply_runtime(runtime())
    call = stub.Watch(rpb.WatchRequest())
    events = aiter(call)
    initial = await asyncio.wait_for(anext(events), 10)
    assert initial.type == rpb.WatchEvent.PUT and initial.runtime.name == "torch"
    applied = await store.apply_model(model())
    put = await asyncio.wait_for(anext(events), 10)
    assert put.model.name == "resnet" and put.revision == applied.record.revision
    deleted_at = await store.delete_model("resnet")
    gone = await asyncio.wait_for(anext(events), 10)
    assert gone.type == rpb.WatchEvent.DELETE and gone.revision == deleted_at and gone.key.endswith("models/resnet")
    call.cancel()

    # resuming from a revision replays what happened since
    replay = aiter(stub.Watch(rpb.WatchRequest(start_revision=applied.record.revision)))
    again = await asyncio.wait_for(anext(replay), 10)
    assert again.type == rpb.WatchEvent.PUT and again.model.name == "resnet"


async def test_watch_from_a_compacted_revision_is_out_of_range(etcd):
    async with RegistryStore(etcd.endpoint) as store:
        await store.apply_runtime(runtime())
        first = await store.apply_runtime(rpb.RuntimeSpec(name="b", kind="onnx", model_formats=["onnx"]))
        await store.apply_runtime(rpb.RuntimeSpec(name="c", kind="onnx", model_formats=["onnx"]))
        await store.etcd.compact(first.record.revision + 1)
        server, port = await start_server(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rpb_grpc.RegistryServiceStub(channel)
                error = await code_of(anext(aiter(stub.Watch(rpb.WatchRequest(start_revision=first.record.revision)))))
                assert error.code() == grpc.StatusCode.OUT_OF_RANGE
                assert "compacted" in error.details()
        finally:
            await server.stop(0)


async def test_client_maps_status_codes_back_to_registry_errors(served):
    _, _, port = served
    async with RegistryClient(f"127.0.0.1:{port}") as client:
        first = await client.apply_runtime(runtime())
        with pytest.raises(ConflictError) as caught:
            await client.apply_runtime(runtime(), expected_revision=0)
        assert caught.value.current_revision == first.record.revision
        with pytest.raises(ValidationError):
            await client.apply_model(rpb.ModelSpec(name="Bad"))
        with pytest.raises(NotFoundError):
            await client.get_runtime("nope")
        with pytest.raises(IntegrityError):
            await client.apply_model(model(runtime_name="missing"))
        assert (await client.get_runtime("torch")).spec == runtime()
    async with RegistryClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(UnavailableError, match=r"registry service at 127\.0\.0\.1:1 is unreachable"):
            await client.list_models()


async def test_concurrent_read_modify_write_over_grpc(served):
    """The acceptance check: 8 writers x 50 read-modify-write updates of one record over
    gRPC. Every update is kept (the count ends at 400); each lost race is ABORTED."""
    stub, _, _ = served
    await stub.ApplyRuntime(rpb.ApplyRuntimeRequest(spec=runtime()))
    counter = model()
    counter.labels["count"] = "0"
    await stub.ApplyModel(rpb.ApplyModelRequest(spec=counter))
    aborted = 0

    async def writer() -> None:
        nonlocal aborted
        for _ in range(50):
            while True:
                record = await stub.GetModel(rpb.GetRequest(name="resnet"))
                record.spec.labels["count"] = str(int(record.spec.labels["count"]) + 1)
                try:
                    await stub.ApplyModel(rpb.ApplyModelRequest(spec=record.spec, expected_revision=record.revision))
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.ABORTED, error
                    assert int(dict(error.trailing_metadata())[CURRENT_REVISION_METADATA]) > record.revision
                    aborted += 1

    await asyncio.gather(*(writer() for _ in range(8)))
    final = await stub.GetModel(rpb.GetRequest(name="resnet"))
    assert final.spec.labels["count"] == "400"
    assert aborted > 0
