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

Triton's extensions: ModelConfig (the configuration derived from what the model declares:
datatypes, dims without the batch dim, max_batch_size, the dynamic batching settings in
effect, image formats, labels files), ModelStatistics (per served version: counts and
durations, runtimes/statistics.py), and classification: a requested output with the
parameter `classification` = k is answered with its top k per batch row as BYTES
"value:index[:label]", as Triton formats them; where that cannot apply (not a numeric
output, k < 1) the request is refused with INVALID_ARGUMENT, never answered raw.

Health: service "" and "inference.GRPCInferenceService" are SERVING while the server is
ready; each model name is a service of its own, SERVING while a version of it is READY.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

import modelgw
from modelgw.errors import ErrorInterceptor, internal_message, stream_message
from modelgw.keepalive import KEEPALIVE, Keepalive
from modelgw.oip.codec import TensorError, add_output, decode_request_inputs, parameters_dict, set_parameter
from modelgw.oip.protocol import ENABLE_EMPTY_FINAL_RESPONSE, FINAL_RESPONSE, MAX_MESSAGE_BYTES
from modelgw.oip.triton import CLASSIFIABLE, CLASSIFICATION, config_data_type
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.runtimes.batching import QUEUE_SECONDS, DynamicBatcher
from modelgw.runtimes.errors import InferenceError, InvalidInput, ModelLoadError
from modelgw.runtimes.model import REQUEST_METADATA, Tensors
from modelgw.runtimes.repository import ModelRepository, ModelState, ServedModel
from modelgw.runtimes.statistics import Statistics
from modelgw.runtimes.storage import local_path

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


Classes = Mapping[str, int]  # output name -> the k of its top-k classification
_NO_CLASSES: Classes = MappingProxyType({})


def _prepare(
    served: ServedModel, request: pb.ModelInferRequest
) -> tuple[Tensors, Mapping[str, Any], tuple[str, ...], int, Classes]:
    """Validate and decode a request: (inputs, parameters, output names, batch rows,
    classification outputs)."""
    rows = served.validator.check_inputs(request.inputs)
    classes = _NO_CLASSES
    if request.outputs:
        names = tuple(o.name for o in request.outputs)
        served.validator.check_outputs(names)
        if any(CLASSIFICATION in o.parameters for o in request.outputs):
            classes = _classes(served, request)
    else:
        names = served.output_names
    return decode_request_inputs(request), _parameters(request), names, rows, classes


def _classes(served: ServedModel, request: pb.ModelInferRequest) -> dict[str, int]:
    """The outputs asked for as top-k classes; InvalidInput where that cannot apply."""
    classes: dict[str, int] = {}
    for output in request.outputs:
        if CLASSIFICATION not in output.parameters:
            continue
        param = output.parameters[CLASSIFICATION]
        kind = param.WhichOneof("parameter_choice")
        k = getattr(param, kind) if kind in ("int64_param", "uint64_param") else None
        if k is None or k < 1:
            raise InvalidInput(
                f"output '{output.name}': parameter '{CLASSIFICATION}' (class_count) must be an integer >= 1"
            )
        datatype = served.output_datatypes.get(output.name)
        if datatype is not None and datatype not in CLASSIFIABLE:
            raise InvalidInput(
                f"output '{output.name}' of model '{served.name}' is {datatype}: class_count needs a numeric "
                f"output ({', '.join(sorted(CLASSIFIABLE))}); class result not available for output due to "
                f"unsupported type '{datatype}'"
            )
        classes[output.name] = int(k)
    return classes


def _label_path(served: ServedModel, filename: str) -> Path:
    """A labels file named by a model: absolute, or beside the model (its artifact's
    directory, else its class's source file's)."""
    path = Path(filename)
    if path.is_absolute():
        return path
    uri = served.model.uri  # the artifact as the model sees it (a python-kind class has none)
    if uri:
        try:
            base = local_path(uri)
            return (base if base.is_dir() else base.parent) / path
        except (ModelLoadError, OSError):
            pass  # not a local artifact: beside the class then
    try:
        return Path(inspect.getfile(type(served.model))).parent / path
    except (OSError, TypeError):
        return path


_LABELS: dict[tuple[str, str, str, str], list[str]] = {}


def _labels(served: ServedModel, output: str) -> list[str]:
    """The classification labels of an output (empty when the model declares none)."""
    filename = served.model.label_files.get(output)
    if not filename:
        return []
    key = (served.name, served.version, served.uri, filename)
    labels = _LABELS.get(key)
    if labels is None:
        path = _label_path(served, filename)
        try:
            labels = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InferenceError(f"model '{served.name}': labels file of output '{output}' ({path}): {exc}") from exc
        _LABELS[key] = labels
    return labels


def _top_k(served: ServedModel, name: str, array: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification of an output: per batch row (the whole tensor for a model
    without batching), the k largest values as b"value:index[:label]", largest first;
    values as C's %f for floats, integers as they are."""
    if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and array.dtype.itemsize < 4):  # FP16: as Triton
        raise InvalidInput(
            f"output '{name}' of model '{served.name}' is {array.dtype}: class result not available for "
            "output due to unsupported type"
        )
    batched = served.metadata.max_batch_size > 0 and array.ndim > 0
    rows = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
    labels = _labels(served, name)
    count = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], count), dtype=object)
    for r, row in enumerate(rows):
        order = np.argsort(-row.astype(np.float64), kind="stable")[:count]
        for c, index in enumerate(order):
            value = row[index]
            text = f"{value:f}" if array.dtype.kind == "f" else str(int(value))
            entry = f"{text}:{index}" + (f":{labels[index]}" if index < len(labels) else "")
            out[r, c] = entry.encode("utf-8")
    return out if batched else out.reshape(count)


def _fill(response: pb.ModelInferResponse, served: ServedModel, outputs: Tensors, names: tuple[str, ...],
          classes: Classes = _NO_CLASSES) -> None:
    """Add the wanted outputs as raw contents (all returned ones if the model declares none),
    those asked for as classes as their top k."""
    datatypes = served.output_datatypes
    for name in names or outputs:
        array = outputs.get(name)
        if array is None:
            raise InferenceError(f"model '{served.name}' returned no output '{name}'")
        datatype = datatypes.get(name)
        if name in classes:
            array, datatype = _top_k(served, name, np.asarray(array), classes[name]), "BYTES"
        try:
            add_output(response, name, array, datatype)
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
                     names: tuple[str, ...], final: bool, classes: Classes = _NO_CLASSES) -> pb.ModelStreamInferResponse:
    message = pb.ModelStreamInferResponse()
    response = message.infer_response
    response.model_name = served.name
    response.model_version = served.version
    response.id = request.id
    if outputs is not None:
        _fill(response, served, outputs, names, classes)
    response.parameters[FINAL_RESPONSE].bool_param = final
    return message


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """An error on a stream: the message starts with the gRPC status name (as the gateway's
    do) and the response names the request, so a client can tell which one failed."""
    response = pb.ModelStreamInferResponse(error_message=message)
    response.infer_response.model_name = request.model_name
    response.infer_response.id = request.id
    return response


def model_config(served: ServedModel, backend: str) -> pb.ModelConfig:
    """Triton's ModelConfig of a served version, from what it declares and how it is served:
    dims leave out the batch dim when max_batch_size > 0 (as Triton's do); the dynamic
    batching settings are the batcher's in effect (the registry's limits or the model's)."""
    metadata = served.metadata
    model = served.model
    batch = metadata.max_batch_size > 0
    config = pb.ModelConfig(name=served.name, platform=metadata.platform, backend=backend,
                            max_batch_size=metadata.max_batch_size)
    known = pb.ModelInput.Format.DESCRIPTOR.values_by_name
    formats = {k: known[f"FORMAT_{v.upper()}"].number for k, v in model.input_formats.items() if f"FORMAT_{v.upper()}" in known}
    for spec in metadata.inputs:
        config.input.add(
            name=spec.name, data_type=config_data_type(spec.datatype), format=formats.get(spec.name, 0),
            dims=spec.shape[1:] if batch else spec.shape, optional=spec.optional,
        )
    for spec in metadata.outputs:
        label = model.label_files.get(spec.name, "")
        config.output.add(name=spec.name, data_type=config_data_type(spec.datatype),
                          dims=spec.shape[1:] if batch else spec.shape, label_filename=Path(label).name if label else "")
    if isinstance(served.runner, DynamicBatcher):
        config.dynamic_batching.max_queue_delay_microseconds = int(served.runner.config.max_queue_delay * 1e6)
    return config


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The OIP RPCs over a repository. `ready` is the server's readiness flag."""

    def __init__(self, repository: ModelRepository, name: str = "modelgw") -> None:
        self.repository = repository
        self.ready = False
        self.statistics = Statistics()
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

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self.repository.get(request.name, request.version),
                                                          self.repository.kind))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        """Every served version's figures; one model's (all its versions, or one) when named."""
        if request.name:
            self.repository.get(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as for inference
        served = [s for s in self.repository.served()
                  if (not request.name or s.name == request.name) and (not request.version or s.version == request.version)]
        return pb.ModelStatisticsResponse(model_stats=[self.statistics.message(s) for s in served])

    # -- inference

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        REQUEST_METADATA.set(context.invocation_metadata() or ())  # for request_metadata() in predict
        served = self.repository.get(request.model_name, request.model_version)
        stats = self.statistics.of(served.name, served.version)
        started = time.perf_counter()
        try:
            if not served.can_predict:
                raise InvalidInput(f"model '{served.name}' streams its responses; call ModelStreamInfer")
            inputs, parameters, names, rows, classes = _prepare(served, request)
            prepared = time.perf_counter()
            outputs = await self._predict(served, inputs, parameters, rows)
            predicted = time.perf_counter()
            response = pb.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
            _fill(response, served, outputs, names, classes)
        except BaseException:
            stats.failed(time.perf_counter() - started)
            raise
        done = time.perf_counter()
        queue = QUEUE_SECONDS.get() if not served.async_predict else 0.0
        stats.succeeded(rows, done - started, queue, prepared - started, predicted - prepared - queue, done - predicted)
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
        stats = None
        started = time.perf_counter()
        try:
            served = self.repository.get(request.model_name, request.model_version)
            stats = self.statistics.of(served.name, served.version)
            inputs, parameters, names, rows, classes = _prepare(served, request)
            prepared = time.perf_counter()
            if not served.streaming:
                outputs = await self._predict(served, inputs, parameters, rows)
                predicted = time.perf_counter()
                emit(_stream_response(served, request, outputs, names, final=True, classes=classes))
                done = time.perf_counter()
                queue = QUEUE_SECONDS.get() if not served.async_predict else 0.0
                stats.succeeded(rows, done - started, queue, prepared - started, predicted - prepared - queue,
                                done - predicted)
                return
            empty_final = (request.parameters[ENABLE_EMPTY_FINAL_RESPONSE].bool_param
                           if ENABLE_EMPTY_FINAL_RESPONSE in request.parameters else False)
            served.streams += 1
            try:
                held: Tensors | None = None
                async for outputs in self._generate(served, inputs, parameters):
                    if empty_final:
                        emit(_stream_response(served, request, outputs, names, final=False, classes=classes))
                    else:
                        if held is not None:
                            emit(_stream_response(served, request, held, names, final=False, classes=classes))
                    held = outputs
                final = _stream_response(served, request, None if empty_final else held, names, final=True,
                                         classes=classes)
                if empty_final:  # the final response carries the last one's parameters too
                    _set_response_parameters(final.infer_response, held)
                emit(final)
                done = time.perf_counter()
                stats.executions += 1
                stats.succeeded(rows, done - started, 0.0, prepared - started, done - prepared, 0.0)
            finally:
                served.streams -= 1
        except (InferenceError, TensorError) as exc:
            if stats is not None:
                stats.failed(time.perf_counter() - started)
            emit(_stream_error(request, stream_message(exc.code, str(exc))))
        except asyncio.CancelledError:
            if stats is not None:
                stats.failed(time.perf_counter() - started)
            raise
        except Exception as exc:
            if stats is not None:
                stats.failed(time.perf_counter() - started)
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
        self.statistics.of(served.name, served.version).executions += 1  # no runner counts these
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
