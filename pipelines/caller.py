"""How a job or a stream calls its model: rows in, one result per row out.

    caller = await open_caller(spec.model)                 # a registry_pb2.ModelCall
    for tensor in await caller.inputs():                   # TensorMeta(name, datatype, shape)
        ...
    results = await caller.infer_rows(rows, ids=row_ids)   # one RowResult per row, in order
    await caller.aclose()

A row is a dict of model input name -> that row's value *without* the batch dimension
(a number, a list, a nested list, a numpy array, a str/bytes for BYTES). The rows of one
call are encoded with modelgw.oip.codec into batched ModelInferRequests (dim 0 is the
batch: every input's dim 0 must be -1), and each answer is split back into rows:
`RowResult.outputs` maps output name -> that row's numpy array (0-d for a scalar),
`RowResult.error` says why that row has no outputs. Exactly one of them is set.

Failures, and whose they are:
- a row whose value does not fit the model's metadata (datatype, shape, missing input)
  fails alone, before anything is sent, with a message naming the row and the input;
- rows of one call whose inner shapes differ (a -1 dim past the batch) go as separate
  requests, one per shape;
- a request the model rejects with INVALID_ARGUMENT is bisected until the rows it
  rejects are found: they fail with the model's message, the others are scored. When
  every row of a rejected batch passes in smaller batches, the batch was too big for the
  model (its max batch size): later calls are split to the size that worked;
- UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried with exponential
  backoff for up to `retry_seconds`; UNAUTHENTICATED once after rereading the token.
  Past that, or for any other status (NOT_FOUND, PERMISSION_DENIED, INTERNAL, ...),
  infer_rows raises CallError: the call as a whole cannot succeed and no row is to blame.

Modes (ModelCall.mode):
- GATEWAY (the default): gRPC ModelInfer to `gateway` (default 127.0.0.1:8001) with
  `authorization: Bearer <token>` from `token_file`, reread whenever the file changes (a
  rotated Kubernetes secret); no file: no header (a gateway with auth off).
- IN_PROCESS: the model version is loaded in this process by its runtime kind's model
  class (modelgw.runtimes.kinds), served by the runtime's own repository and servicer, so
  validation, decoding and predict are exactly a runtime replica's. Which kind, URI and
  options: a LocalModel, given or resolved from the registry (resolve_local_model: the
  version the call names, else the one the traffic split favours, its runtime's kind and
  options).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from modelgw.keepalive import KEEPALIVE
from modelgw.oip.codec import NUMPY_DTYPES, TensorError, add_input, datatype_of, decode_response_outputs
from modelgw.oip.protocol import MAX_MESSAGE_BYTES
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.protos import registry_pb2 as rpb

log = logging.getLogger(__name__)

DEFAULT_GATEWAY = "127.0.0.1:8001"
DEFAULT_TIMEOUT = 30.0
# how long transient statuses are retried before the call fails as a whole: long enough
# to ride out a replica restart or a rolling update, short enough that a job whose gateway
# is gone fails (and is restarted by its backend) instead of hanging
DEFAULT_RETRY_SECONDS = 120.0

RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One input or output as ModelMetadata declares it (shape with the batch dim; -1: any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class RowResult:
    """One row's outputs (output name -> array, without the batch dim), or why it has none."""

    outputs: dict[str, np.ndarray | list] | None = None
    error: str | None = None


class CallError(Exception):
    """The model cannot be called at all (not found, forbidden, down past the retries):
    no row is to blame. `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class LocalModel:
    """What IN_PROCESS mode loads: a model version, its runtime kind, URI and options."""

    name: str
    version: str
    kind: str
    uri: str
    options: Mapping[str, str] = field(default_factory=dict)


class _Transport(Protocol):
    """Where requests go: the gateway over gRPC, or a repository in this process. Both
    raise _Failed with the status a runtime would answer."""

    async def metadata(self, model: str, version: str) -> pb.ModelMetadataResponse: ...
    async def infer(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse: ...
    async def aclose(self) -> None: ...


class _Failed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ gateway


class _TokenFile:
    """The bearer token in a file, reread when it changes: its inode (a Kubernetes secret
    volume swaps in a new file), mtime or size."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def metadata(self, force: bool = False) -> tuple[tuple[str, str], ...]:
        if not self.path:
            return ()
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise CallError(grpc.StatusCode.UNAUTHENTICATED, f"token file '{self.path}': {exc.strerror}") from None
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if force or stamp != self._stamp:
            with open(self.path, encoding="utf-8") as f:
                token = f.read().strip()
            if not token:
                raise CallError(grpc.StatusCode.UNAUTHENTICATED, f"token file '{self.path}' is empty")
            self._metadata = (("authorization", f"Bearer {token}"),)
            self._stamp = stamp
        return self._metadata


class _GatewayTransport:
    def __init__(self, call: rpb.ModelCall) -> None:
        self.address = call.gateway or DEFAULT_GATEWAY
        # in a Kubernetes pod the token secret is mounted where MODELGW_TOKEN_FILE says (kube_objects.py)
        self.token = _TokenFile(call.token_file or os.environ.get("MODELGW_TOKEN_FILE", ""))
        self._channel = grpc.aio.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *KEEPALIVE.channel_options(),
            ],
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def _unary(self, method: Any, request: Any, timeout: float) -> Any:
        retried_auth = False
        while True:
            try:
                return await method(request, metadata=self.token.metadata(force=retried_auth), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and self.token.path and not retried_auth:
                    retried_auth = True  # the token may have rotated under us: reread it once
                    continue
                raise _Failed(code, exc.details() or code.name) from None

    async def metadata(self, model: str, version: str) -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=model, version=version)
        response: pb.ModelMetadataResponse = await self._unary(self._stub.ModelMetadata, request, DEFAULT_TIMEOUT)
        return response

    async def infer(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        response: pb.ModelInferResponse = await self._unary(self._stub.ModelInfer, request, timeout)
        return response

    async def aclose(self) -> None:
        await self._channel.close()


# ------------------------------------------------------------------ in process


class _LocalContext:
    """The part of a grpc.aio servicer context the runtime's servicer reads."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class _InProcessTransport:
    """A runtime's own repository and servicer, called without a network in between."""

    def __init__(self, local: LocalModel) -> None:
        # imported here: a gateway-mode job never pays for the runtime SDK (or torch)
        from modelgw.runtimes.repository import ModelRepository
        from modelgw.runtimes.server import InferenceServicer

        self.local = local
        self.repository = ModelRepository(kind=local.kind)
        self.servicer = InferenceServicer(self.repository)
        self.servicer.ready = True
        self._context = _LocalContext()

    async def load(self) -> None:
        from modelgw.runtimes.errors import ModelLoadError

        local = self.local
        try:
            await self.repository.load(local.name, local.version, local.uri, local.options, kind=local.kind)
        except ModelLoadError as exc:
            raise CallError(grpc.StatusCode.FAILED_PRECONDITION, f"in-process model: {exc}") from None

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, self._context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = getattr(exc, "code", None)  # the SDK's errors and TensorError carry their status
            if not isinstance(code, grpc.StatusCode):
                log.exception("in-process model '%s' failed", self.local.name)
                code = grpc.StatusCode.INTERNAL
            raise _Failed(code, str(exc)) from None

    async def metadata(self, model: str, version: str) -> pb.ModelMetadataResponse:
        response: pb.ModelMetadataResponse = await self._call(
            self.servicer.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))
        return response

    async def infer(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        try:
            response: pb.ModelInferResponse = await asyncio.wait_for(self._call(self.servicer.ModelInfer, request), timeout)
        except TimeoutError:
            raise _Failed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s") from None
        return response

    async def aclose(self) -> None:
        await self.repository.close()


async def resolve_local_model(store: Any, call: rpb.ModelCall) -> LocalModel:
    """The LocalModel an IN_PROCESS call loads, read from the registry (a RecordStore):
    the call's version, else the version the traffic split gives the most (all traffic
    to the last listed one when there is no split), and its runtime's kind and options."""
    spec = (await store.get_model(call.model)).spec
    if not spec.versions:
        raise CallError(grpc.StatusCode.FAILED_PRECONDITION, f"models/{call.model} has no versions")
    by_version = {v.version: v for v in spec.versions}
    if call.version:
        chosen = by_version.get(call.version)
        if chosen is None:
            raise CallError(grpc.StatusCode.NOT_FOUND,
                            f"models/{call.model} has no version '{call.version}'; versions: {', '.join(by_version)}")
    elif spec.traffic:
        chosen = by_version[max(spec.traffic, key=lambda v: spec.traffic[v])]
    else:
        chosen = spec.versions[-1]
    runtime = (await store.get_runtime(chosen.runtime)).spec
    return LocalModel(call.model, chosen.version, runtime.kind, chosen.uri, dict(runtime.options))


# ------------------------------------------------------------------ rows <-> tensors


def _inner_shape_error(spec: TensorMeta, shape: tuple[int, ...]) -> str | None:
    expected = spec.shape[1:]
    if len(shape) != len(expected) or any(e != -1 and e != d for e, d in zip(expected, shape, strict=True)):
        return f"has shape {list(shape)}, expected {list(expected)} (-1: any size; the batch dim excluded)"
    return None


def _to_array(spec: TensorMeta, value: Any) -> np.ndarray:
    """One row's value as an array of the input's datatype; ValueError saying why not."""
    if value is None:
        raise ValueError("is missing (null)")
    if spec.datatype == "BYTES":
        array = np.asarray(value, dtype=object)
        for item in array.reshape(-1):
            if not isinstance(item, (str, bytes, bytearray)):
                raise ValueError(f"holds a {type(item).__name__}; BYTES inputs take strings or bytes")
        return array
    array = np.asarray(value)
    kind = array.dtype.kind
    target = NUMPY_DTYPES[spec.datatype]
    if kind not in "biuf":
        shown = type(value).__name__ if kind != "O" else "values of mixed types or ragged lists"
        raise ValueError(f"holds {shown}, not numbers for {spec.datatype}")
    if target.kind == "b":
        if kind != "b" and not np.isin(array, (0, 1)).all():
            raise ValueError("holds values other than true/false for BOOL")
    elif target.kind in "iu":
        if kind == "f" and not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
            raise ValueError(f"holds a fractional or non-finite number for {spec.datatype}")
        if kind in "iuf" and array.size:
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(f"holds a value out of range for {spec.datatype}")
    return array.astype(target) if spec.datatype != "BF16" else array.astype(np.float32)


def _row_label(index: int, ids: Sequence[str] | None) -> str:
    return f"row {ids[index]}" if ids is not None else f"row {index}"


# ------------------------------------------------------------------ the caller


class ModelCaller:
    """Scores rows against one model (see the module docstring). Safe to use from several
    tasks at once: each infer_rows call is independent."""

    def __init__(self, call: rpb.ModelCall, transport: _Transport, metadata: pb.ModelMetadataResponse,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.call = call
        self._transport = transport
        self.retry_seconds = retry_seconds
        self.timeout = call.timeout_seconds or DEFAULT_TIMEOUT
        self._inputs = [TensorMeta(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs]
        self._outputs = [TensorMeta(t.name, t.datatype, tuple(t.shape)) for t in metadata.outputs]
        self._specs = {t.name: t for t in self._inputs}
        self._wanted = list(call.outputs)
        self.model_version = call.version
        # the most rows one request may carry, once a rejected batch showed the model's limit
        self.max_rows: int | None = None
        self.requests = 0  # ModelInfer calls sent (bisection and retries included)
        known = {t.name for t in self._outputs}
        unknown = [name for name in self._wanted if known and name not in known]
        if unknown:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"model '{call.model}' has no output '{unknown[0]}'; its outputs are: {', '.join(known)}")
        for spec in self._inputs:
            if not spec.shape or spec.shape[0] != -1:
                raise CallError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"input '{spec.name}' of model '{call.model}' has shape {list(spec.shape)}: rows are batched "
                    "along dim 0, which must be -1 (a model with a batch dimension)")

    async def inputs(self) -> list[TensorMeta]:
        return list(self._inputs)

    async def outputs(self) -> list[TensorMeta]:
        return list(self._outputs)

    async def infer_rows(self, rows: Sequence[Mapping[str, Any]], ids: Sequence[str] | None = None) -> list[RowResult]:
        """One RowResult per row, in order. `ids` (the rows' ids) only label error messages."""
        results: list[RowResult] = [RowResult() for _ in rows]
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, row in enumerate(rows):
            try:
                arrays = self._convert(row)
            except ValueError as exc:
                results[index].error = f"{_row_label(index, ids)}: {exc}"
                continue
            key = tuple((name, a.shape) for name, a in arrays.items())
            groups.setdefault(key, []).append((index, arrays))
        tasks = []
        for members in groups.values():
            step = self.max_rows or len(members)
            for start in range(0, len(members), step):
                tasks.append(self._score(members[start:start + step], results, ids))
        await asyncio.gather(*tasks)
        return results

    def _convert(self, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        if not self._specs:
            # a free-form model (a python class declaring no inputs): names and datatypes
            # as the row gives them
            return {name: np.asarray(value, dtype=object if isinstance(value, (str, bytes)) else None)
                    for name, value in row.items() if value is not None}
        for name, value in row.items():
            spec = self._specs.get(name)
            if spec is None:
                raise ValueError(f"input '{name}' is unknown to model '{self.call.model}'; "
                                 f"its inputs are: {', '.join(self._specs)}")
            if value is None:
                continue  # optional inputs may be left out; required ones are caught below
            try:
                array = _to_array(spec, value)
            except ValueError as exc:
                raise ValueError(f"input '{name}' {exc}") from None
            problem = _inner_shape_error(spec, array.shape)
            if problem:
                raise ValueError(f"input '{name}' {problem}")
            arrays[name] = array
        # ModelMetadata does not say which inputs are optional, so a row without some
        # input goes to the model (in a request of its own shape group), which names the
        # missing one if it is required; a row with none at all cannot be a request
        if not arrays and self._inputs:
            raise ValueError(f"input '{self._inputs[0].name}' is missing; model '{self.call.model}' takes: "
                             f"{', '.join(self._specs)}")
        return arrays

    def _request(self, members: Sequence[tuple[int, dict[str, np.ndarray]]]) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self.call.model, model_version=self.model_version)
        for name, first in members[0][1].items():
            spec = self._specs.get(name)
            datatype = spec.datatype if spec is not None else datatype_of(first)
            if datatype == "BYTES":
                batch = np.empty((len(members), *first.shape), dtype=object)
                for i, (_, arrays) in enumerate(members):
                    batch[i] = arrays[name]
            else:
                batch = np.stack([arrays[name] for _, arrays in members])
            add_input(request, name, batch, datatype)
        for name in self._wanted:
            request.outputs.add(name=name)
        return request

    async def _score(self, members: list[tuple[int, dict[str, np.ndarray]]], results: list[RowResult],
                     ids: Sequence[str] | None) -> None:
        """Score rows that share their shapes; bisect when the model rejects the batch."""
        try:
            response = await self._infer(self._request(members))
        except _Failed as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise CallError(exc.code, f"model '{self.call.model}': {exc.code.name}: {exc}") from None
            if len(members) == 1:
                index = members[0][0]
                results[index].error = f"{_row_label(index, ids)}: {exc}"
                return
            half = len(members) // 2
            await asyncio.gather(self._score(members[:half], results, ids), self._score(members[half:], results, ids))
            worked = len(members) - half
            # every row passed in smaller batches: this batch was too big for the model
            if all(results[i].error is None for i, _ in members) and (self.max_rows or worked + 1) > worked:
                self.max_rows = worked
                log.info("model '%s' rejects %d rows at once; sending at most %d per call",
                         self.call.model, len(members), self.max_rows)
            return
        self._split(response, members, results, ids)

    def _split(self, response: pb.ModelInferResponse, members: Sequence[tuple[int, dict[str, np.ndarray]]],
               results: list[RowResult], ids: Sequence[str] | None) -> None:
        count = len(members)
        try:
            outputs = decode_response_outputs(response)
        except TensorError as exc:
            raise CallError(grpc.StatusCode.INTERNAL, f"model '{self.call.model}' answered a malformed response: {exc}") from None
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != count:
                raise CallError(
                    grpc.StatusCode.INTERNAL,
                    f"model '{self.call.model}' returned output '{name}' with shape {list(array.shape)} "
                    f"for {count} rows; job outputs need dim 0 to be the batch")
        for position, (index, _) in enumerate(members):
            results[index].outputs = {name: array[position, ...] for name, array in outputs.items()}  # 0-d for scalars

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """ModelInfer, retrying transient statuses with exponential backoff and jitter."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_seconds
        delay = 0.1
        while True:
            self.requests += 1
            try:
                return await self._transport.infer(request, self.timeout)
            except _Failed as exc:
                if exc.code not in RETRIED or loop.time() + delay > give_up:
                    if exc.code in RETRIED:
                        raise CallError(exc.code, f"model '{self.call.model}': {exc.code.name} for "
                                                  f"{self.retry_seconds:g} s: {exc}") from None
                    raise
                log.warning("model '%s': %s (%s); retrying in %.1f s", self.call.model, exc.code.name, exc, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)

    async def aclose(self) -> None:
        await self._transport.aclose()


async def open_caller(call: rpb.ModelCall, *, local: LocalModel | None = None, store: Any = None,
                      retry_seconds: float = DEFAULT_RETRY_SECONDS) -> ModelCaller:
    """A ModelCaller for `call`, its model's metadata read (and, IN_PROCESS, the model
    loaded). IN_PROCESS needs `local`, or `store` (a RecordStore) to resolve it from.
    Raises CallError when the model cannot be reached, found or loaded."""
    if not call.model:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "model call: 'model' is empty; name the model to call")
    transport: _Transport
    if call.mode == rpb.ModelCall.IN_PROCESS:
        if local is None:
            if store is None:
                raise CallError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model '{call.model}': IN_PROCESS mode needs the registry (--etcd) to find the model's "
                                "URI and runtime kind, or them given directly")
            local = await resolve_local_model(store, call)
        in_process = _InProcessTransport(local)
        try:
            await in_process.load()
        except BaseException:
            await in_process.aclose()  # its thread pool
            raise
        transport = in_process
        call = _with_version(call, local.version)
    else:
        transport = _GatewayTransport(call)
    try:
        metadata = await _metadata(transport, call, retry_seconds)
        return ModelCaller(call, transport, metadata, retry_seconds)
    except BaseException:
        await transport.aclose()
        raise


def _with_version(call: rpb.ModelCall, version: str) -> rpb.ModelCall:
    pinned = rpb.ModelCall()
    pinned.CopyFrom(call)
    pinned.version = version
    return pinned


async def _metadata(transport: _Transport, call: rpb.ModelCall, retry_seconds: float) -> pb.ModelMetadataResponse:
    """The model's metadata, waiting out transient statuses (a gateway that is starting)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + retry_seconds
    delay = 0.1
    while True:
        try:
            return await transport.metadata(call.model, call.version)
        except _Failed as exc:
            if exc.code not in RETRIED or loop.time() + delay > give_up:
                version = f" version '{call.version}'" if call.version else ""
                raise CallError(exc.code, f"model '{call.model}'{version}: metadata: {exc.code.name}: {exc}") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
