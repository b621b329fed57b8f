"""The gateway's gRPC frontend: inference.GRPCInferenceService, forwarding by bytes.

ServerLive, ServerReady and ServerMetadata are answered here. ModelMetadata, ModelConfig,
ModelReady, ModelInfer and ModelStreamInfer are routed to a runtime replica without being
decoded: the routing fields are read off the wire (gateway/wire.py) and the bytes forwarded.
ModelStatistics (summed over replicas), RepositoryIndex and RepositoryModelLoad/Unload
(admin callers; the registry is the repository) are Triton's extensions (gateway/triton.py);
the shared memory RPCs answer UNIMPLEMENTED, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from modelgw import __version__
from modelgw.gateway.errors import GatewayError
from modelgw.gateway.forwarding import grpc_timeout, outbound_metadata
from modelgw.gateway.proxy import Admission, Proxy
from modelgw.gateway.triton import SHARED_MEMORY_MESSAGE, TritonExtensions, allowed
from modelgw.gateway.wire import WireError, routing_fields, with_version
from modelgw.oip.protocol import EXTENSIONS, SESSION_HEADER
from modelgw.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"

# (context, model name) -> the verified subject, raising GatewayError when refused
Authorizer = Callable[[grpc.aio.ServicerContext, str], "asyncio.Future[str | None] | str | None"]
# (context, method) -> None, raising GatewayError when the caller is no admin
AdminAuthorizer = Callable[[grpc.aio.ServicerContext, str], Awaitable[None]]

SHARED_MEMORY_METHODS = (
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
)


class InferenceFrontend:
    """Handlers for inference.GRPCInferenceService on the gateway's gRPC server."""

    def __init__(
        self,
        proxy: Proxy,
        is_ready: Callable[[], bool],
        authorize: Authorizer | None = None,
        triton: TritonExtensions | None = None,
        authorize_admin: AdminAuthorizer | None = None,
    ) -> None:
        self.proxy = proxy
        self.is_ready = is_ready
        self.authorize = authorize
        self.triton = triton
        self.authorize_admin = authorize_admin

    def generic_handler(self) -> grpc.GenericRpcHandler:
        raw = dict(request_deserializer=None, response_serializer=None)
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "ServerLive": grpc.unary_unary_rpc_method_handler(
                    self.server_live,
                    request_deserializer=pb.ServerLiveRequest.FromString,
                    response_serializer=pb.ServerLiveResponse.SerializeToString,
                ),
                "ServerReady": grpc.unary_unary_rpc_method_handler(
                    self.server_ready,
                    request_deserializer=pb.ServerReadyRequest.FromString,
                    response_serializer=pb.ServerReadyResponse.SerializeToString,
                ),
                "ServerMetadata": grpc.unary_unary_rpc_method_handler(
                    self.server_metadata,
                    request_deserializer=pb.ServerMetadataRequest.FromString,
                    response_serializer=pb.ServerMetadataResponse.SerializeToString,
                ),
                "ModelReady": grpc.unary_unary_rpc_method_handler(self.model_ready, **raw),
                "ModelMetadata": grpc.unary_unary_rpc_method_handler(self.model_metadata, **raw),
                "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer, **raw),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer, **raw),
                "ModelConfig": grpc.unary_unary_rpc_method_handler(self.model_config, **raw),
                **self._extension_handlers(),
                **{
                    name: grpc.unary_unary_rpc_method_handler(self.shared_memory, **raw)
                    for name in SHARED_MEMORY_METHODS
                },
            },
        )

    def _extension_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        if self.triton is None:
            return {}
        handlers = {
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "RepositoryModelLoad": (self.repository_load, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
            "RepositoryModelUnload": (
                self.repository_unload, pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse
            ),
        }
        return {
            name: grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=request.FromString, response_serializer=response.SerializeToString
            )
            for name, (handler, request, response) in handlers.items()
        }

    # -- answered by the gateway ---------------------------------------------------------

    async def server_live(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="modelgw", version=__version__, extensions=EXTENSIONS)

    # -- routed ----------------------------------------------------------------------------

    async def _prepare(
        self, payload: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[str, str, list[tuple[str, str]], str | None]:
        """(model, version, metadata for the runtime, sticky session key) of a request."""
        try:
            model, version = routing_fields(payload)
        except WireError as err:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {err}") from None
        if not model:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "the request names no model (field model_name/name is empty)")
        incoming = context.invocation_metadata() or ()
        sticky = next((v for k, v in incoming if k == SESSION_HEADER and isinstance(v, str)), None)
        metadata, _ = outbound_metadata(incoming, await self._subject(context, model))
        return model, version, metadata, sticky

    async def _forward(self, method: str, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        model, version, metadata, sticky = await self._prepare(payload, context)
        return await self.proxy.unary(
            method,
            payload,
            model,
            version,
            metadata=metadata,
            timeout=grpc_timeout(context),
            sticky_key=sticky,
        )

    # a GatewayError raised here is answered by the server's ErrorInterceptor (modelgw/errors.py)

    async def model_infer(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._forward("model_infer", payload, context)

    async def model_metadata(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._forward("model_metadata", payload, context)

    async def model_config(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._forward("model_config", payload, context)

    async def shared_memory(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise GatewayError(grpc.StatusCode.UNIMPLEMENTED, SHARED_MEMORY_MESSAGE)

    # -- Triton's extensions (gateway/triton.py) ----------------------------------------------

    async def _subject(self, context: grpc.aio.ServicerContext, model: str) -> str | None:
        if self.authorize is None:
            return None
        subject = self.authorize(context, model)
        if inspect.isawaitable(subject):
            return await subject
        return subject

    async def _may_see(self, context: grpc.aio.ServicerContext, model: str) -> bool:
        """Whether the caller may use `model` (lists leave out the others)."""
        return await allowed(self._subject(context, model))

    def _extensions(self) -> TritonExtensions:
        if self.triton is None:  # not registered then; never reached
            raise GatewayError(grpc.StatusCode.UNIMPLEMENTED, "this gateway serves no Triton extensions")
        return self.triton

    async def model_statistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        subject = await self._subject(context, request.name) if request.name else None
        metadata, _ = outbound_metadata(context.invocation_metadata() or (), subject)
        return await self._extensions().statistics(
            request.name, request.version, metadata=metadata, timeout=grpc_timeout(context),
            may_see=lambda model: self._may_see(context, model),
        )

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = self._extensions().index(request.ready)
        visible = {m.name for m in index.models}
        hidden = {name for name in visible if not await self._may_see(context, name)}
        if hidden:
            kept = [m for m in index.models if m.name not in hidden]
            del index.models[:]
            index.models.extend(kept)
        return index

    async def _admin(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if self.authorize_admin is not None:
            await self.authorize_admin(context, method)

    async def repository_load(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._admin(context, "RepositoryModelLoad")
        parameters = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for k, v in request.parameters.items()}
        metadata, _ = outbound_metadata(context.invocation_metadata() or (), None)
        await self._extensions().load(request.model_name, parameters, metadata=metadata, timeout=grpc_timeout(context))
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._admin(context, "RepositoryModelUnload")
        await self._extensions().unload(request.model_name, timeout=grpc_timeout(context))
        return pb.RepositoryModelUnloadResponse()

    async def model_ready(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._forward("model_ready", payload, context)
        except GatewayError as err:
            if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                # an unknown model, or one with no ready replica, is "not ready", not an
                # error: what the runtimes (and Triton) answer, and what clients expect
                return pb.ModelReadyResponse(ready=False).SerializeToString()
            raise

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Forward a stream of requests; requests for different models go to different
        replicas over one upstream stream each, and their responses are merged.

        Unlike unary calls, each message is parsed before it is forwarded: one malformed
        message would otherwise break the upstream stream that other requests share. A
        request that fails is answered with an error response on the stream, which stays
        open for the next ones."""
        out: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        # (model, requested version) -> its upstream stream, admitted by the proxy: counted
        # against the in-flight caps, on its replica's outstanding requests (which the
        # replica choice reads) and once in the request metrics, until released
        streams: dict[tuple[str, str], Admission] = {}
        readers: list[asyncio.Task] = []

        async def error(message: str, request_id: str = "") -> None:
            response = pb.ModelStreamInferResponse(error_message=message)
            if request_id:
                response.infer_response.id = request_id
            await out.put(response.SerializeToString())

        async def read_upstream(stream: Admission) -> None:
            try:
                async for response in stream.call:
                    stream.response_received(response)  # LLM: usage, token timings, counts
                    await out.put(response)
            except grpc.aio.AioRpcError as err:
                stream.status = err.code().name
                if err.code() != grpc.StatusCode.CANCELLED:
                    await error(f"{err.code().name}: {err.details()}")
            # the replica's stream ended: off its counts now, not when the client's ends
            # (a reader cancelled with the client's stream leaves that to the handler)
            stream.release()

        def upstream_for(model: str, version: str, metadata: list, sticky: str | None) -> Admission:
            key = (model, version)
            stream = streams.get(key)
            if stream is not None and stream.call.done():
                del streams[key]  # that replica's stream ended (e.g. it died): a new one
                stream.release()
                stream = None
            if stream is None:
                # the client's deadline bounds its stream; the model's timeout is per
                # request, and a stream carries many
                stream = streams[key] = self.proxy.stream(
                    model, version, metadata=metadata, sticky_key=sticky, timeout=grpc_timeout(context),
                    protocol="grpc-stream",
                )
                readers.append(asyncio.create_task(read_upstream(stream)))
            return stream

        async def read_client() -> None:
            try:
                async for payload in requests:
                    try:
                        request_id = pb.ModelInferRequest.FromString(payload).id
                    except DecodeError as err:
                        await error(f"{grpc.StatusCode.INVALID_ARGUMENT.name}: malformed request message: {err}")
                        continue
                    try:
                        model, version, metadata, sticky = await self._prepare(payload, context)
                        stream = upstream_for(model, version, metadata, sticky)
                        stream.request_sent(request_id)  # LLM: counted on the replica, per-tenant limits
                        await stream.call.write(payload if version else with_version(payload, stream.version))
                    except GatewayError as err:
                        await error(f"{err.code.name}: {err.message}", request_id)
                    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
                        await error(f"UNAVAILABLE: the runtime's stream ended before this request: {err}", request_id)
                for stream in streams.values():
                    with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                        await stream.call.done_writing()
                await asyncio.gather(*readers)
            finally:
                await out.put(None)

        feeder = asyncio.create_task(read_client())
        ended: BaseException | None = None
        try:
            while (item := await out.get()) is not None:
                yield item
            await feeder
        except BaseException as exc:  # the client went away (CancelledError), or the gateway stops
            ended = exc
            raise
        finally:
            feeder.cancel()
            for task in readers:
                task.cancel()
            for stream in streams.values():
                # a stream still running when the client's ended counts with its reason
                stream.release(None if stream.call.done() else ended)
