"""Errors on gRPC, declared once: every server (gateway, runtime, registry) answers what a
handler raises with the error's own status and a message bounded to fit gRPC's metadata
limits; an unexpected exception is INTERNAL; the RegistryService's admin check refuses
with UNAUTHENTICATED / PERMISSION_DENIED, for unary calls and streams alike.

Real servers in-process (a real etcd, a real runtime repository, the real gateway), real
grpc.aio clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from modelgw.errors import MAX_ERROR_MESSAGE_BYTES, ErrorInterceptor
from modelgw.gateway.app import Gateway, GatewayConfig
from modelgw.gateway.auth.config import AuthConfig, IssuerConfig
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.protos import registry_pb2 as rpb
from modelgw.protos import registry_pb2_grpc as rpb_grpc
from modelgw.registry.errors import CURRENT_REVISION_METADATA, ConflictError, LeaseNotFoundError
from modelgw.registry.service import start_server
from modelgw.registry.store import RegistryStore
from modelgw.runtimes.model import Model, TensorSpec
from modelgw.runtimes.repository import ModelRepository
from modelgw.runtimes.server import RuntimeServer

LONG_NAME = "m" * 100_000  # a model name that, echoed in an error, is far over gRPC's 16 KiB hard limit


class Exploding(Model):
    """predict raises an exception with a huge message: a model's bug."""

    inputs = [TensorSpec("x", "FP32", [-1])]
    outputs = [TensorSpec("y", "FP32", [-1])]

    def predict(self, inputs, parameters):
        raise RuntimeError("boom " * 50_000)


EXPLODING = f"{__name__}:Exploding"


def assert_bounded(error: grpc.aio.AioRpcError, code: grpc.StatusCode) -> str:
    details = error.details() or ""
    assert error.code() == code, (error.code(), details[:200])
    assert len(details.encode()) <= MAX_ERROR_MESSAGE_BYTES, len(details)
    return details


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def infer_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    return request


# -- the runtime ------------------------------------------------------------------------------


@pytest.fixture
async def runtime() -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    repo = ModelRepository("python")
    server = RuntimeServer(repo)
    await server.start()
    await repo.load("exploding", "1", EXPLODING)
    await server.set_ready(True)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await server.stop(0)


async def test_runtime_over_long_model_name_is_not_found_with_a_bounded_message(runtime) -> None:
    error = await rpc_error(runtime.ModelInfer(infer_request(LONG_NAME)))
    assert "mmmm" in assert_bounded(error, grpc.StatusCode.NOT_FOUND)
    error = await rpc_error(runtime.ModelMetadata(pb.ModelMetadataRequest(name=LONG_NAME)))
    assert_bounded(error, grpc.StatusCode.NOT_FOUND)


async def test_runtime_model_that_raises_is_internal_with_a_bounded_message(runtime) -> None:
    error = await rpc_error(runtime.ModelInfer(infer_request("exploding")))
    assert "RuntimeError: boom" in assert_bounded(error, grpc.StatusCode.INTERNAL)
    # and the server goes on serving
    assert (await runtime.ModelReady(pb.ModelReadyRequest(name="exploding"))).ready


async def test_runtime_stream_errors_are_bounded_too(runtime) -> None:
    call = runtime.ModelStreamInfer()
    await call.write(infer_request(LONG_NAME))
    await call.done_writing()
    response = await call.read()
    assert response.error_message.startswith("NOT_FOUND: ")
    assert len(response.error_message.encode()) <= MAX_ERROR_MESSAGE_BYTES


# -- the registry ---------------------------------------------------------------------------


@pytest.fixture
async def registry(etcd_server, etcd_prefix) -> AsyncIterator[rpb_grpc.RegistryServiceStub]:
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        server, port = await start_server(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield rpb_grpc.RegistryServiceStub(channel)
        finally:
            await server.stop(0)


async def test_registry_over_long_name_gets_its_code_with_a_bounded_message(registry) -> None:
    error = await rpc_error(registry.GetModel(rpb.GetRequest(name=LONG_NAME)))
    assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), error.code()
    assert_bounded(error, error.code())
    error = await rpc_error(registry.DeleteRuntime(rpb.DeleteRequest(name=LONG_NAME)))
    assert error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_bounded(error, error.code())


# -- the interceptor itself, on a server of its own ---------------------------------------------


async def _unexpected(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise KeyError("k" * 100_000)


async def _conflict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ConflictError("models/m: at revision 7, not 3", current_revision=7)


async def _lease_gone(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise LeaseNotFoundError("lease 12 expired")


async def _fails_mid_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise ValueError("v" * 100_000)


async def _writes_then_fails(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"written")
    raise ConflictError("stale", current_revision=5)


@pytest.fixture
async def intercepted() -> AsyncIterator[grpc.aio.Channel]:
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Unexpected": unary(_unexpected),
        "Conflict": unary(_conflict),
        "LeaseGone": unary(_lease_gone),
        "FailsMidStream": grpc.unary_stream_rpc_method_handler(_fails_mid_stream),
        "WritesThenFails": grpc.unary_stream_rpc_method_handler(_writes_then_fails),
    }
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Errors", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


async def test_an_unexpected_exception_is_internal_with_a_bounded_message(intercepted, caplog) -> None:
    error = await rpc_error(intercepted.unary_unary("/test.Errors/Unexpected")(b""))
    assert assert_bounded(error, grpc.StatusCode.INTERNAL).startswith("internal error: KeyError: 'kkk")
    assert any(r.exc_info and "/test.Errors/Unexpected" in r.getMessage() for r in caplog.records)  # logged, with its traceback


async def test_a_registry_error_gets_its_code_and_trailers(intercepted) -> None:
    error = await rpc_error(intercepted.unary_unary("/test.Errors/Conflict")(b""))
    assert error.code() == grpc.StatusCode.ABORTED and "revision 7" in (error.details() or "")
    assert dict(error.trailing_metadata() or ())[CURRENT_REVISION_METADATA] == "7"
    error = await rpc_error(intercepted.unary_unary("/test.Errors/LeaseGone")(b""))
    assert error.code() == grpc.StatusCode.NOT_FOUND  # a subclass inherits its parent's code


async def test_stream_handlers_are_answered_too(intercepted) -> None:
    call = intercepted.unary_stream("/test.Errors/FailsMidStream")(b"")
    assert await call.read() == b"first"
    error = await rpc_error(call.read())
    assert assert_bounded(error, grpc.StatusCode.INTERNAL).startswith("internal error: ValueError")
    call = intercepted.unary_stream("/test.Errors/WritesThenFails")(b"")
    assert await call.read() == b"written"
    error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.ABORTED


# -- the gateway --------------------------------------------------------------------------------


async def _gateway(etcd: str, prefix: str, **config) -> Gateway:
    gateway = Gateway(GatewayConfig(etcd=etcd, prefix=prefix, host="127.0.0.1", http_port=0, grpc_port=0, **config))
    await gateway.start()
    await gateway.wait_synced(30)
    return gateway


async def test_gateway_over_long_model_name_is_not_found_with_a_bounded_message(etcd_server, etcd_prefix) -> None:
    gateway = await _gateway(etcd_server.endpoint, etcd_prefix, insecure_no_auth=True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            error = await rpc_error(stub.ModelInfer(infer_request(LONG_NAME)))
            assert "mmmm" in assert_bounded(error, grpc.StatusCode.NOT_FOUND)
            error = await rpc_error(stub.ModelMetadata(pb.ModelMetadataRequest(name=LONG_NAME)))
            assert_bounded(error, grpc.StatusCode.NOT_FOUND)
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name=LONG_NAME))).ready
            error = await rpc_error(stub.ModelInfer(pb.ModelInferRequest()))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "names no model" in (error.details() or "")
    finally:
        await gateway.stop(0)


async def test_gateway_registry_service_needs_the_admin_scope(etcd_server, etcd_prefix) -> None:
    from auth_helpers import ADMIN_SCOPE, AUDIENCE, Issuer

    with Issuer() as issuer:
        key = issuer.new_key()
        auth = AuthConfig(issuers=(IssuerConfig(issuer=issuer.url, audiences=(AUDIENCE,)),), admin_scope=ADMIN_SCOPE)
        gateway = await _gateway(etcd_server.endpoint, etcd_prefix, auth=auth)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                stub = rpb_grpc.RegistryServiceStub(channel)
                error = await rpc_error(stub.ListModels(rpb.ListRequest()))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "no bearer token" in (error.details() or "")
                error = await rpc_error(stub.Watch(rpb.WatchRequest()).read())
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                user = (("authorization", f"Bearer {issuer.token(key, scope='infer:read')}"),)
                error = await rpc_error(stub.GetModel(rpb.GetRequest(name="m"), metadata=user))
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED and ADMIN_SCOPE in (error.details() or "")
                error = await rpc_error(stub.Watch(rpb.WatchRequest(), metadata=user).read())
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                admin = (("authorization", f"Bearer {issuer.token(key, scope=ADMIN_SCOPE)}"),)
                error = await rpc_error(stub.GetModel(rpb.GetRequest(name="m"), metadata=admin))
                assert error.code() == grpc.StatusCode.NOT_FOUND  # let in: the registry answers
                # inference is not behind the admin check
                health = await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
                assert health.live
        finally:
            await gateway.stop(0)

