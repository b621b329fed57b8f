"""The runtime's gRPC server: inference.GRPCInferenceService (KServe OIP v2 + Triton's
ModelStreamInfer) and grpc.health.v1, over a ModelRepository.

    repo = ModelRepository(kind="pytorch")
    server = RuntimeServer(repo, port=8001)
    await server.start()
    await repo.load("m", "1", "/models/m.pt")
    await server.set_ready(True)
    ...
    await server.stop(grace=30)      # stop accepting, drain in-flight, unload

Status codes: unknown model/version -> NOT_FOUND; model loading/failed/unloading ->
UNAVAILABLE; a request that does not fit the model's metadata -> INVALID_ARGUMENT naming
the tensor; a model that raises -> INTERNAL with its message. Handlers raise the SDK's
errors (runtimes/errors.py, each with its `code`); the server's ErrorInterceptor answers,
messages bounded to fit gRPC's trailers. Outputs travel as raw_output_contents, like Triton.

Streaming (Triton semantics): each request on a ModelStreamInfer stream is answered
independently (several may run at once). A streaming model's generate() responses are
each sent as a ModelStreamInferResponse with parameter triton_final_response=false, and
the stream learns that a request is done from a response flagged true: the client asked
for `triton_enable_empty_final_response` -> an empty flagged response follows the last
one (each response leaves as soon as it exists); otherwise the last response itself is
flagged (so it is held back until the generator ends). A non-streaming model answers
with one flagged response. A request that fails gets one response whose error_message is
"<gRPC status name>: <message>" (e.g. "INVALID_ARGUMENT: ...", the unary status's text after
the name) and whose infer_response names the request (model_name, id); the stream stays open.

Health: service "" and "inference.GRPCInferenceService" are SERVING while the server is
ready; each model name is a service of its own, SERVING while a version of it is READY.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

import modelgw
from modelgw.errors import ErrorInterceptor, internal_message, stream_message
from modelgw.keepalive import KEEPALIVE, Keepalive
from modelgw.oip.codec import TensorError, add_output, decode_request_inputs, parameters_dict, set_parameter
from modelgw.oip.protocol import ENABLE_EMPTY_FINAL_RESPONSE, FINAL_RESPONSE, MAX_MESSAGE_BYTES
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.runtimes.errors import InferenceError, InvalidInput
from modelgw.runtimes.model import REQUEST_METADATA, Tensors
from modelgw.runtimes.repository import ModelRepository, ModelState, ServedModel

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"

_NO_PARAMETERS: Mapping[str, Any] = MappingProxyType({})
_DONE = object()
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _parameters(request: pb.ModelInferRequest) -> Mapping[str, Any]:
    """The request's parameters for the model, without Triton's protocol flags."""
    if not request.parameters:
        return _NO_PARAMETERS
    return {k: v for k, v in parameters_dict(request.parameters).items() if not k.startswith("triton_")}


def _prepare(served: ServedModel, request: pb.ModelInferRequest) -> tuple[Tensors, Mapping[str, Any], tuple[str, ...], int]:
    """Validate and decode a request: (inputs, parameters, output names, batch rows)."""
    rows = served.validator.check_inputs(request.inputs)
    if request.outputs:
        names = tuple(o.name for o in request.outputs)
        served.validator.check_outputs(names)
    else:
        names = served.output_names
    return decode_request_inputs(request), _parameters(request), names, rows


def _fill(response: pb.ModelInferResponse, served: ServedModel, outputs: Tensors, names: tuple[str, ...]) -> None:
    """Add the wanted outputs as raw contents (all returned ones if the model declares none)."""
    datatypes = served.output_datatypes
    for name in names or outputs:
        array = outputs.get(name)
        if array is None:
            raise InferenceError(f"model '{served.name}' returned no output '{name}'")
        try:
            add_output(response, name, array, datatypes.get(name))
        except (TensorError, TypeError, ValueError) as exc:
            raise InferenceError(f"model '{served.name}' returned a bad output '{name}': {exc}") from exc
    _set_response_parameters(response, outputs)


def _set_response_parameters(response: pb.ModelInferResponse, outputs: Tensors | None) -> None:
    """Response parameters a model returns as `outputs.parameters` (a dict subclass with
    that attribute, e.g. the LLM runtime's token counts and finish reason)."""
    parameters = getattr(outputs, "parameters", None)
    if parameters:
        for key, value in parameters.items():
            set_parameter(response.parameters, key, value)


def _stream_response(served: ServedModel, request: pb.ModelInferRequest, outputs: Tensors | None,
                     names: tuple[str, ...], final: bool) -> pb.ModelStreamInferResponse:
    message = pb.ModelStreamInferResponse()
    response = message.infer_response
    response.model_name = served.name
    response.model_version = served.version
    response.id = request.id
    if outputs is not None:
        _fill(response, served, outputs, names)
    response.parameters[FINAL_RESPONSE].bool_param = final
    return message


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """An error on a stream: the message starts with the gRPC status name (as the gateway's
    do) and the response names the request, so a client can tell which one failed."""
    response = pb.ModelStreamInferResponse(error_message=message)
    response.infer_response.model_name = request.model_name
    response.infer_response.id = request.id
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The OIP RPCs over a repository. `ready` is the server's readiness flag."""

    def __init__(self, repository: ModelRepository, name: str = "modelgw") -> None:
        self.repository = repository
        self.ready = False
        self._metadata = pb.ServerMetadataResponse(name=name, version=modelgw.__version__)
        self._live = pb.ServerLiveResponse(live=True)

    # -- server and model state

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return self._live

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return self._metadata

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self.ready and self.repository.is_ready(request.name, request.version)
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        served = self.repository.get(request.name, request.version)
        metadata = served.metadata
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=served.name,
            versions=self.repository.versions(served.name),
            platform=metadata.platform,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in metadata.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in metadata.outputs],
        )

    # -- inference

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        REQUEST_METADATA.set(context.invocation_metadata() or ())  # for request_metadata() in predict
        served = self.repository.get(request.model_name, request.model_version)
        if not served.can_predict:
            raise InvalidInput(f"model '{served.name}' streams its responses; call ModelStreamInfer")
        inputs, parameters, names, rows = _prepare(served, request)
        outputs = await self._predict(served, inputs, parameters, rows)
        response = pb.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
        _fill(response, served, outputs, names)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        REQUEST_METADATA.set(context.invocation_metadata() or ())  # inherited by the tasks below
        reader = asyncio.create_task(self._read_stream(request_iterator, responses.put_nowait))
        try:
            while (message := await responses.get()) is not None:
                yield message
        finally:
            if not reader.done():
                reader.cancel()

    async def _read_stream(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                           emit: Callable[[pb.ModelStreamInferResponse | None], None]) -> None:
        """Answer each request of a stream in its own task; None marks the end."""
        tasks: set[asyncio.Task] = set()
        try:
            async for request in request_iterator:
                task = asyncio.create_task(self._answer_on_stream(request, emit))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(list(tasks))
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        except Exception:  # the client's half of the stream broke: nothing more to read
            log.debug("stream read ended", exc_info=True)
            for task in tasks:
                task.cancel()
        finally:
            emit(None)

    async def _answer_on_stream(self, request: pb.ModelInferRequest,
                                emit: Callable[[pb.ModelStreamInferResponse], None]) -> None:
        try:
            served = self.repository.get(request.model_name, request.model_version)
            inputs, parameters, names, rows = _prepare(served, request)
            if not served.streaming:
                outputs = await self._predict(served, inputs, parameters, rows)
                emit(_stream_response(served, request, outputs, names, final=True))
                return
            empty_final = (request.parameters[ENABLE_EMPTY_FINAL_RESPONSE].bool_param
                           if ENABLE_EMPTY_FINAL_RESPONSE in request.parameters else False)
            served.streams += 1
            try:
                held: Tensors | None = None
                async for outputs in self._generate(served, inputs, parameters):
                    if empty_final:
                        emit(_stream_response(served, request, outputs, names, final=False))
                    else:
                        if held is not None:
                            emit(_stream_response(served, request, held, names, final=False))
                    held = outputs
                final = _stream_response(served, request, None if empty_final else held, names, final=True)
                if empty_final:  # the final response carries the last one's parameters too
                    _set_response_parameters(final.infer_response, held)
                emit(final)
            finally:
                served.streams -= 1
        except (InferenceError, TensorError) as exc:
            emit(_stream_error(request, stream_message(exc.code, str(exc))))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("stream request for model '%s' failed", request.model_name)
            emit(_stream_error(request, stream_message(grpc.StatusCode.INTERNAL, internal_message(exc))))

    async def _predict(self, served: ServedModel, inputs: Tensors, parameters: Mapping[str, Any], rows: int) -> Tensors:
        """One request's outputs from predict: through the model's runner (thread pool,
        batching), or awaited on the loop for an `async def predict`."""
        if served.async_predict:
            return await self._predict_async(served, inputs, parameters)
        return await served.runner.submit(inputs, parameters, rows)

    async def _predict_async(self, served: ServedModel, inputs: Tensors, parameters: Mapping[str, Any]) -> Tensors:
        """An `async def predict` (e.g. the LLM runtime, which awaits its engine) runs on the
        event loop, unbatched; counted like a stream while it runs. If the call is
        cancelled, so is the predict coroutine."""
        served.streams += 1
        try:
            outputs = await served.model.predict(inputs, parameters)
        except (InferenceError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("model '%s': predict failed", served.name)
            raise InferenceError(f"model '{served.name}' failed: {type(exc).__name__}: {exc}") from exc
        finally:
            served.streams -= 1
        if not isinstance(outputs, Mapping):
            raise InferenceError(f"model '{served.name}' returned {type(outputs).__name__} from predict, "
                                 "expected a dict of output name -> array")
        return outputs

    async def _generate(self, served: ServedModel, inputs: Tensors,
                        parameters: Mapping[str, Any]) -> AsyncIterator[Tensors]:
        """The model's responses, from an async generator or a plain one (run in the pool)."""
        name = served.name
        try:
            generated = served.model.generate(inputs, parameters)
            if hasattr(generated, "__anext__"):
                async for outputs in generated:
                    yield outputs
            elif isinstance(generated, Iterator):
                loop = asyncio.get_running_loop()
                executor = self.repository.executor
                while (outputs := await loop.run_in_executor(executor, next, generated, _DONE)) is not _DONE:
                    yield outputs
            else:
                raise InferenceError(f"model '{name}': generate returned {type(generated).__name__}, not a generator")
        except (InferenceError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            log.exception("model '%s': generate failed", name)
            raise InferenceError(f"model '{name}' failed: {type(exc).__name__}: {exc}") from exc


class RuntimeServer:
    """A runtime process's gRPC server; owns nothing but the server and its health state."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        name: str = "modelgw",
        keepalive: Keepalive = KEEPALIVE,
    ) -> None:
        self.repository = repository
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.keepalive = keepalive
        self.servicer = InferenceServicer(repository, name)
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.servicer.ready

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Listen (live, not yet ready); return the bound port. OSError if it cannot bind."""
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],  # what a handler raises -> its status (modelgw/errors.py)
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared silently
                # the gateway's channels ping while idle; refused, they would be closed
                # (GOAWAY too_many_pings) after a few intervals without traffic
                *self.keepalive.server_options(),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot listen on {self.address}")
        self.port = bound
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _NOT_SERVING)
        await server.start()
        self._server = server
        self._health_task = asyncio.create_task(self._mirror_model_health())
        return bound

    async def set_ready(self, ready: bool = True) -> None:
        self.servicer.ready = ready
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _SERVING if ready else _NOT_SERVING)

    def load_figures(self) -> list:
        """Per served model: queue depth, in-flight requests, predict calls."""
        return self.repository.load_figures()

    def extra_load_figures(self, load: Any) -> None:
        """Model-level figures for the endpoint record (registration.py calls this): every
        served model with an `add_load_figures(load)` hook (the LLM runtime: queued and
        running sequences, KV-cache use) adds its own to the LoadFigures message."""
        for served in self.repository.served():
            hook = getattr(served.model, "add_load_figures", None)
            if hook is not None:
                hook(load)

    async def stop(self, grace: float | None = 30.0) -> None:
        """Graceful shutdown: not ready, refuse new RPCs, let in-flight ones finish (up to
        `grace` seconds), then unload every model."""
        self.servicer.ready = False
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_task is not None:
            self._health_task.cancel()
        await self.repository.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _mirror_model_health(self) -> None:
        """Each model name is a health service: SERVING while one of its versions is READY."""
        async for status in self.repository.watch():
            if status.state in (ModelState.READY, ModelState.UNLOADING, ModelState.UNLOADED, ModelState.FAILED):
                serving = self.repository.is_ready(status.name)
                await self.health.set(status.name, _SERVING if serving else _NOT_SERVING)
