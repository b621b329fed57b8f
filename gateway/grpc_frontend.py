"""The gateway's gRPC frontend: inference.GRPCInferenceService, forwarding by bytes.

ServerLive, ServerReady and ServerMetadata are answered here. ModelMetadata, ModelReady,
ModelInfer and ModelStreamInfer are routed to a runtime replica without being decoded:
the routing fields are read off the wire (gateway/wire.py) and the bytes forwarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from modelgw import __version__
from modelgw.gateway.errors import GatewayError
from modelgw.gateway.proxy import STICKY_HEADER, Proxy
from modelgw.gateway.wire import WireError, routing_fields, with_version
from modelgw.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
EXTENSIONS = ["model_repository(read-only)", "binary_tensor_data", "streaming", "traffic_split"]

# (context, model name) -> the verified subject, raising GatewayError when refused
Authorizer = Callable[[grpc.aio.ServicerContext, str], "asyncio.Future[str | None] | str | None"]


def _sticky_key(metadata: dict[str, str]) -> str | None:
    return metadata.get(STICKY_HEADER)


class InferenceFrontend:
    """Handlers for inference.GRPCInferenceService on the gateway's gRPC server."""

    def __init__(self, proxy: Proxy, is_ready: Callable[[], bool], authorize: Authorizer | None = None) -> None:
        self.proxy = proxy
        self.is_ready = is_ready
        self.authorize = authorize

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
            },
        )

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

    async def _prepare(self, payload: bytes, context: grpc.aio.ServicerContext) -> tuple[str, str, list, dict]:
        try:
            model, version = routing_fields(payload)
        except WireError as err:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {err}") from None
        if not model:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "the request names no model (field model_name/name is empty)")
        incoming = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        subject = None
        if self.authorize is not None:
            subject = self.authorize(context, model)
            if asyncio.iscoroutine(subject):
                subject = await subject
        metadata, _ = Proxy.outbound_metadata(context.invocation_metadata(), subject)
        return model, version, metadata, incoming

    async def _forward(self, method: str, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        model, version, metadata, incoming = await self._prepare(payload, context)
        return await self.proxy.unary(
            method,
            payload,
            model,
            version,
            metadata=metadata,
            timeout=context.time_remaining(),
            sticky_key=_sticky_key(incoming),
        )

    async def model_infer(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._forward("model_infer", payload, context)
        except GatewayError as err:
            await context.abort(err.code, err.message)

    async def model_metadata(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._forward("model_metadata", payload, context)
        except GatewayError as err:
            await context.abort(err.code, err.message)

    async def model_ready(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._forward("model_ready", payload, context)
        except GatewayError as err:
            if err.code == grpc.StatusCode.UNAVAILABLE:
                # a known model with no ready replica is "not ready", not an error
                return pb.ModelReadyResponse(ready=False).SerializeToString()
            await context.abort(err.code, err.message)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Forward a stream of requests; requests for different models go to different
        replicas over one upstream stream each, and their responses are merged."""
        out: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        # (model, requested version) -> (upstream call, version it serves)
        calls: dict[tuple[str, str], tuple[grpc.aio.StreamStreamCall, str]] = {}
        readers: list[asyncio.Task] = []

        async def error(message: str) -> None:
            await out.put(pb.ModelStreamInferResponse(error_message=message).SerializeToString())

        async def read_upstream(call: grpc.aio.StreamStreamCall) -> None:
            try:
                async for response in call:
                    await out.put(response)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    await error(f"{err.code().name}: {err.details()}")

        async def read_client() -> None:
            try:
                async for payload in requests:
                    try:
                        model, version, metadata, incoming = await self._prepare(payload, context)
                        entry = calls.get((model, version))
                        if entry is None:
                            upstream, _, chosen = self.proxy.open_stream(
                                model, version, metadata=metadata, sticky_key=_sticky_key(incoming)
                            )
                            entry = calls[(model, version)] = (upstream.model_stream_infer(metadata=metadata), chosen)
                            readers.append(asyncio.create_task(read_upstream(entry[0])))
                        call, chosen = entry
                        await call.write(payload if version else with_version(payload, chosen))
                    except GatewayError as err:
                        await error(f"{err.code.name}: {err.message}")
                for call, _ in calls.values():
                    await call.done_writing()
                await asyncio.gather(*readers)
            finally:
                await out.put(None)

        feeder = asyncio.create_task(read_client())
        try:
            while (item := await out.get()) is not None:
                yield item
            await feeder
        finally:
            feeder.cancel()
            for call, _ in calls.values():
                call.cancel()
            for task in readers:
                task.cancel()
