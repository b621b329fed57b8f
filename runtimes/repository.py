"""The model repository: which models (name + version) this runtime serves, and their state.

Models load and unload at runtime through an async API, so that the CLI loads the models
it was given and the endpoint registration (registration.py) loads what etcd assigns:

    repo = ModelRepository(kind="onnx")
    await repo.load("resnet", "2", "file:///models/resnet/2")
    served = repo.get("resnet")            # hot path: a dict lookup; newest READY version
    async for status in repo.watch():     # LOADING / READY / FAILED / UNLOADING / UNLOADED
        ...
    await repo.unload("resnet", "2")      # stop routing, drain in-flight, unload

A request without a version gets the default version: the highest numeric READY version,
else the most recently loaded one. Loading a (name, version) that is already served
replaces it once the new one is READY; the old one keeps serving until then.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import itertools
import logging
import os
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from modelgw.errors import unknown_model_message, unknown_version_message
from modelgw.runtimes.batching import BatchingConfig, DirectRunner, DynamicBatcher, Runner
from modelgw.runtimes.errors import InferenceError, ModelLoadError, ModelNotFound, ModelNotReady
from modelgw.runtimes.kinds import resolve_kind
from modelgw.runtimes.model import Model, ModelMetadata
from modelgw.runtimes.validation import RequestValidator

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"
    UNLOADED = "UNLOADED"


@dataclass(frozen=True)
class ModelStatus:
    name: str
    version: str
    state: ModelState
    message: str = ""
    uri: str = ""


@dataclass(frozen=True)
class ModelLoad:
    """Load figures of one served model (registration.py publishes them in the endpoint record)."""

    name: str
    version: str
    queue_depth: int
    in_flight: int
    predict_calls: int


class ServedModel:
    """A READY model as the server uses it on every request."""

    __slots__ = ("_seq", "async_predict", "can_predict", "metadata", "model", "name", "output_datatypes",
                 "output_names", "runner", "streaming", "streams", "uri", "validator", "version")

    def __init__(self, model: Model, uri: str, metadata: ModelMetadata, runner: Runner, seq: int) -> None:
        self.name = model.name
        self.version = model.version
        self.uri = uri
        self.model = model
        self.metadata = metadata
        self.validator = RequestValidator(model.name, metadata)
        self.runner = runner
        self.streaming = model.streaming
        self.can_predict = model.has_predict
        self.async_predict = inspect.iscoroutinefunction(model.predict)  # awaited on the loop, unbatched
        self.output_datatypes = {s.name: s.datatype for s in metadata.outputs}
        self.output_names = tuple(self.output_datatypes)
        self.streams = 0  # generate() calls in progress (predict calls are the runner's)
        self._seq = seq

    @property
    def busy(self) -> int:
        """Requests not yet answered: queued, in predict, or streaming."""
        return self.runner.queue_depth + self.runner.in_flight + self.streams

    def order_key(self) -> tuple[int, int, int]:
        """Highest numeric version first, then the latest loaded."""
        if self.version.isdigit():
            return (1, int(self.version), self._seq)
        return (0, 0, self._seq)


def check_batching(metadata: ModelMetadata) -> None:
    """Dynamic batching concatenates along dim 0, so dim 0 must be variable everywhere."""
    if metadata.max_batch_size <= 0:
        return
    if not metadata.inputs:
        raise ModelLoadError("dynamic batching needs the model to declare its inputs")
    for role, specs in (("input", metadata.inputs), ("output", metadata.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] != -1:
                raise ModelLoadError(
                    f"max batch size {metadata.max_batch_size} needs dim 0 of every input and output "
                    f"to be the batch (-1), but {role} '{spec.name}' has shape {list(spec.shape)}; "
                    "use max batch size 0 for this model"
                )


class ModelRepository:
    """Loads, serves and unloads models; publishes their state changes."""

    def __init__(
        self,
        kind: str = "python",
        *,
        executor: ThreadPoolExecutor | None = None,
        workers: int | None = None,
        max_batch_size: int | None = None,
        max_queue_delay: float = 0.0,
        max_concurrent_batches: int = 1,
        options: Mapping[str, str] | None = None,
        drain_timeout: float = 30.0,
        inline_predict_below: float = 0.0002,
    ) -> None:
        """kind: the default runtime kind; max_batch_size: overrides what models declare
        (None: keep theirs); max_queue_delay: seconds; options: defaults for every model."""
        self.kind = kind
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(
            max_workers=workers or min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="predict"
        )
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_concurrent_batches = max_concurrent_batches
        self.options = dict(options or {})
        self.drain_timeout = drain_timeout
        self.inline_predict_below = inline_predict_below
        self._ready: dict[tuple[str, str], ServedModel] = {}
        self._default: dict[str, ServedModel] = {}
        self._status: dict[tuple[str, str], ModelStatus] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._watchers: set[asyncio.Queue[ModelStatus]] = set()
        self._seq = itertools.count()

    # -- hot path

    def get(self, name: str, version: str = "") -> ServedModel:
        """The READY model for a request; ModelNotFound / ModelNotReady otherwise."""
        served = self._ready.get((name, version)) if version else self._default.get(name)
        if served is not None:
            return served
        raise self._why_missing(name, version)

    def _why_missing(self, name: str, version: str) -> InferenceError:
        if version:
            status = self._status.get((name, version))
            if status is None:
                known = self.versions(name, ready_only=False)
                if known:
                    return ModelNotFound(unknown_version_message(
                        name, version, f"model '{name}' has no version '{version}'; versions: {', '.join(known)}"
                    ))
        else:
            candidates = [s for (n, _), s in self._status.items() if n == name]
            status = candidates[-1] if candidates else None
        if status is None:
            served = ", ".join(sorted({n for n, _ in self._status})) or "none"
            return ModelNotFound(unknown_model_message(name, f"model '{name}' is not served here; models served: {served}"))
        what = f"model '{name}' version '{status.version}'"
        if status.state is ModelState.FAILED:
            return ModelNotReady(f"{what} failed to load: {status.message}")
        return ModelNotReady(f"{what} is {status.state.value.lower()}, not ready")

    def is_ready(self, name: str, version: str = "") -> bool:
        return ((name, version) in self._ready) if version else (name in self._default)

    # -- queries

    def versions(self, name: str, *, ready_only: bool = True) -> list[str]:
        keys = self._ready if ready_only else self._status
        return sorted((v for n, v in keys if n == name), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))

    def statuses(self) -> list[ModelStatus]:
        return list(self._status.values())

    def served(self) -> list[ServedModel]:
        return list(self._ready.values())

    def load_figures(self) -> list[ModelLoad]:
        return [
            ModelLoad(s.name, s.version, s.runner.queue_depth, s.runner.in_flight + s.streams,
                      s.runner.predict_calls)
            for s in self._ready.values()
        ]

    async def watch(self) -> AsyncIterator[ModelStatus]:
        """Every current status, then every change, until the consumer stops iterating."""
        queue: asyncio.Queue[ModelStatus] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            for status in list(self._status.values()):
                yield status
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    # -- load / unload

    async def load(
        self,
        name: str,
        version: str = "1",
        uri: str = "",
        options: Mapping[str, str] | None = None,
        *,
        kind: str | None = None,
        max_batch_size: int | None = None,
        max_queue_delay: float | None = None,
    ) -> ServedModel:
        """Load (or replace) a model version; ModelLoadError with the reason if it fails."""
        key = (name, version)
        async with self._lock(key):
            previous = self._ready.get(key)
            self._publish(ModelStatus(name, version, ModelState.LOADING, uri=uri))
            try:
                served = await self._build(name, version, uri, options, kind, max_batch_size, max_queue_delay)
            except Exception as exc:
                message = str(exc) if isinstance(exc, (ModelLoadError, ValueError)) else f"{type(exc).__name__}: {exc}"
                if previous is not None:  # the old one keeps serving
                    self._publish(ModelStatus(name, version, ModelState.READY,
                                              f"reload from {uri} failed: {message}", previous.uri))
                else:
                    self._publish(ModelStatus(name, version, ModelState.FAILED, message, uri))
                raise ModelLoadError(f"model '{name}' version '{version}': {message}") from exc
            self._ready[key] = served
            self._choose_default(name)
            self._publish(ModelStatus(name, version, ModelState.READY, served.model.status_message, uri))
            log.info("model '%s' version '%s' is ready (%s)", name, version, served.metadata.platform)
            if previous is not None:
                await self._retire(previous)
            return served

    async def _build(self, name: str, version: str, uri: str, options: Mapping[str, str] | None,
                     kind: str | None, max_batch_size: int | None, max_queue_delay: float | None) -> ServedModel:
        factory = resolve_kind(kind or self.kind)
        model = factory(name, version, uri, {**self.options, **(options or {})})
        try:
            await asyncio.to_thread(model.load)
            if max_batch_size is None:
                max_batch_size = self.max_batch_size
            if max_batch_size is not None:
                model.max_batch_size = max_batch_size
            metadata = model.metadata
            check_batching(metadata)
        except BaseException:
            await asyncio.to_thread(_unload_quietly, model)
            raise
        runner: Runner
        if metadata.max_batch_size > 0:
            delay = self.max_queue_delay if max_queue_delay is None else max_queue_delay
            runner = DynamicBatcher(name, model.predict, self.executor,
                                    BatchingConfig(metadata.max_batch_size, delay, self.max_concurrent_batches))
        else:
            runner = DirectRunner(name, model.predict, self.executor, self.inline_predict_below)
        return ServedModel(model, uri, metadata, runner, next(self._seq))

    async def unload(self, name: str, version: str | None = None) -> None:
        """Unload one version, or every version of `name`; in-flight requests finish first."""
        versions = [version] if version else self.versions(name, ready_only=False)
        if not versions or (version and (name, version) not in self._status):
            raise ModelNotFound(f"model '{name}'{f' version {version!r}' if version else ''} is not loaded")
        for v in versions:
            key = (name, v)
            async with self._lock(key):
                served = self._ready.pop(key, None)
                if served is not None:
                    self._choose_default(name)
                    self._publish(ModelStatus(name, v, ModelState.UNLOADING, uri=served.uri))
                    await self._retire(served)
                self._publish(ModelStatus(name, v, ModelState.UNLOADED))

    async def close(self) -> None:
        """Unload everything (at shutdown) and stop the thread pool if it is ours."""
        for name in sorted({n for n, _ in self._status}):
            await self.unload(name)
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _retire(self, served: ServedModel) -> None:
        """Wait for its requests to finish (up to drain_timeout), then free it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        # polled: a retire is rare, while an event set by every request's end would cost each request
        while served.busy and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if served.busy:
            log.warning("model '%s' version '%s': unloading with %d requests unanswered",
                        served.name, served.version, served.busy)
        await served.runner.close()
        await asyncio.to_thread(_unload_quietly, served.model)

    # -- bookkeeping

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _choose_default(self, name: str) -> None:
        candidates = [s for (n, _), s in self._ready.items() if n == name]
        if candidates:
            self._default[name] = max(candidates, key=ServedModel.order_key)
        else:
            self._default.pop(name, None)

    def _publish(self, status: ModelStatus) -> None:
        key = (status.name, status.version)
        if status.state is ModelState.UNLOADED:
            self._status.pop(key, None)
        else:
            self._status[key] = status
        for queue in self._watchers:
            queue.put_nowait(status)


def _unload_quietly(model: Model) -> None:
    try:
        model.unload()
    except Exception:
        log.exception("model '%s': unload failed", model.name)
