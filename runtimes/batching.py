"""How requests reach a model's predict: one call per request, or dynamic batching.

`DirectRunner` (max_batch_size 0) runs each request as its own predict call in the thread
pool. `DynamicBatcher` merges concurrent requests into one predict call: requests queue
up, a worker takes as many compatible ones as fit in max_batch_size (waiting at most
max_queue_delay for more), concatenates them along dim 0, runs predict once in the
thread pool and hands each caller a view of exactly its own rows, in order. Requests
whose non-batch dims, datatypes or parameters differ are never merged. While a batch
runs, new requests queue, so batches form under load even with no delay configured.

Both expose `queue_depth` and `in_flight` (requests): load figures in the endpoint record,
and `predict_calls` (executions: a merged batch counts once). After `submit` returns,
`QUEUE_SECONDS` holds how long that request waited before its predict call started (the
queue time of the model statistics).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from modelgw.runtimes.errors import InferenceError, ModelNotReady
from modelgw.runtimes.model import Tensors

log = logging.getLogger(__name__)

Predict = Callable[[Tensors, Mapping[str, Any]], Tensors]

# set by submit() in the caller's context: seconds the request waited for its predict call
QUEUE_SECONDS: ContextVar[float] = ContextVar("modelgw_queue_seconds", default=0.0)


@dataclass(frozen=True)
class BatchingConfig:
    """max_batch_size rows per predict call; max_queue_delay seconds the oldest queued
    request may wait for company; max_concurrent_batches predict calls at once."""

    max_batch_size: int
    max_queue_delay: float = 0.0
    max_concurrent_batches: int = 1


class Runner(Protocol):
    queue_depth: int
    in_flight: int
    predict_calls: int

    async def submit(self, inputs: Tensors, parameters: Mapping[str, Any], rows: int) -> Tensors: ...

    async def close(self) -> None: ...


def call_predict(model_name: str, predict: Predict, inputs: Tensors, parameters: Mapping[str, Any]) -> Tensors:
    """Run predict and turn whatever it raises into an InferenceError that names the model."""
    try:
        outputs = predict(inputs, parameters)
    except InferenceError:
        raise
    except Exception as exc:  # model code: anything may come out; the server must stay up
        log.exception("model '%s': predict failed", model_name)
        raise InferenceError(f"model '{model_name}' failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(outputs, Mapping):
        raise InferenceError(
            f"model '{model_name}' returned {type(outputs).__name__} from predict, "
            "expected a dict of output name -> array"
        )
    return outputs


class DirectRunner:
    """No batching: each request is one predict call.

    Handing a call to the thread pool costs about 100 µs of scheduling, more than a small
    model's whole predict. So a model whose predict has been taking less than
    `inline_below` seconds (a moving average over every call) runs on the event loop
    itself; when it gets slower it goes back to the pool. 0 disables inlining.
    """

    def __init__(self, model_name: str, predict: Predict, executor: Executor, inline_below: float = 0.0) -> None:
        self._model = model_name
        self._predict = predict
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._inline_below = inline_below
        self._average = float("inf")  # seconds per predict, moving average; pool until known
        self.queue_depth = 0  # requests wait inside the executor; not observable here
        self.in_flight = 0
        self.predict_calls = 0

    def _timed(self, inputs: Tensors, parameters: Mapping[str, Any], started: list[float] | None = None) -> Tensors:
        began = time.perf_counter()
        if started is not None:
            started.append(began)  # when the pool got to it: the end of its queue time
        try:
            return call_predict(self._model, self._predict, inputs, parameters)
        finally:
            elapsed = time.perf_counter() - began
            average = self._average
            self._average = elapsed if average == float("inf") else 0.9 * average + 0.1 * elapsed

    @property
    def inline(self) -> bool:
        return self._average < self._inline_below

    async def submit(self, inputs: Tensors, parameters: Mapping[str, Any], rows: int = 1) -> Tensors:
        self.in_flight += 1
        self.predict_calls += 1
        try:
            if self._average < self._inline_below:
                QUEUE_SECONDS.set(0.0)
                return self._timed(inputs, parameters)
            # in the request's context: request_metadata() works in a pooled predict too
            call = contextvars.copy_context().run
            submitted = time.perf_counter()
            started: list[float] = []
            try:
                return await self._loop.run_in_executor(self._executor, call, self._timed, inputs, parameters, started)
            finally:
                QUEUE_SECONDS.set(started[0] - submitted if started else 0.0)
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        pass


class _Pending:
    __slots__ = ("arrival", "future", "inputs", "key", "parameters", "rows", "started")

    def __init__(self, inputs: Tensors, parameters: Mapping[str, Any], rows: int, key: Any,
                 future: asyncio.Future, arrival: float) -> None:
        self.inputs = inputs
        self.parameters = parameters
        self.rows = rows
        self.key = key
        self.future = future
        self.arrival = arrival
        self.started = arrival  # loop time its batch began; set by the worker


def _batch_key(inputs: Tensors, parameters: Mapping[str, Any]) -> Any:
    """Requests with equal keys can share a predict call: same names, dtypes, non-batch
    dims and parameters."""
    shapes = tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))
    if not parameters:
        return shapes
    return shapes, tuple(sorted(parameters.items()))


class DynamicBatcher:
    """Merges concurrent requests of one model into batched predict calls."""

    def __init__(self, model_name: str, predict: Predict, executor: Executor,
                 config: BatchingConfig) -> None:
        if config.max_batch_size < 1:
            raise ValueError("DynamicBatcher needs max_batch_size >= 1")
        self._model = model_name
        self._predict = predict
        self._executor = executor
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._closed = False
        self.in_flight = 0
        self.predict_calls = 0
        self._workers = [
            asyncio.create_task(self._work(), name=f"batcher:{model_name}")
            for _ in range(max(1, config.max_concurrent_batches))
        ]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def config(self) -> BatchingConfig:
        return self._config

    async def submit(self, inputs: Tensors, parameters: Mapping[str, Any], rows: int) -> Tensors:
        """Queue one request of `rows` rows (dim 0) and wait for its own outputs."""
        if self._closed:
            raise ModelNotReady(f"model '{self._model}' is unloading")
        future = self._loop.create_future()
        pending = _Pending(inputs, parameters, rows, _batch_key(inputs, parameters), future, self._loop.time())
        self._queue.append(pending)
        self._queued_rows += rows
        self._arrived.set()
        try:
            return await future
        finally:
            QUEUE_SECONDS.set(max(0.0, pending.started - pending.arrival))

    async def close(self) -> None:
        """Stop the workers; requests still queued fail with UNAVAILABLE."""
        self._closed = True
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ModelNotReady(f"model '{self._model}' is unloading"))
        self._queued_rows = 0

    # -- workers

    async def _work(self) -> None:
        while True:
            try:
                await self._wait_for_batch()
                batch = self._take_batch()
                if batch:
                    await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not silently stop the model
                log.exception("model '%s': batcher error", self._model)

    async def _wait_for_batch(self) -> None:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        delay = self._config.max_queue_delay
        if delay <= 0:
            return
        deadline = self._queue[0].arrival + delay
        while self._queued_rows < self._config.max_batch_size:
            self._arrived.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        """The oldest live request plus every later compatible one that fits, in order;
        the rest stay queued in their order."""
        queue = self._queue
        limit = self._config.max_batch_size
        batch: list[_Pending] = []
        skipped: list[_Pending] = []
        rows = 0
        key = None
        while queue and rows < limit:
            pending = queue.popleft()
            if pending.future.done():  # the caller went away (cancelled)
                self._queued_rows -= pending.rows
                continue
            if not batch:
                key = pending.key
            elif pending.key != key or rows + pending.rows > limit:
                skipped.append(pending)
                continue
            batch.append(pending)
            rows += pending.rows
            self._queued_rows -= pending.rows
        queue.extendleft(reversed(skipped))
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        self.in_flight += len(batch)
        self.predict_calls += 1
        now = self._loop.time()
        for pending in batch:
            pending.started = now
        try:
            results = await self._loop.run_in_executor(self._executor, self._run_batch, batch)
        except asyncio.CancelledError:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(ModelNotReady(f"model '{self._model}' is unloading"))
            raise
        except Exception as exc:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        else:
            for pending, outcome in zip(batch, results, strict=True):  # one outcome per request
                if pending.future.done():
                    continue
                if isinstance(outcome, Exception):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
        finally:
            self.in_flight -= len(batch)

    def _run_batch(self, batch: list[_Pending]) -> list[Tensors | Exception]:
        """In the thread pool: merge, predict once, split each output back by rows. When the
        merged predict raises, each request is run alone, so only the requests to blame fail,
        as they would without batching (one bad row must not fail its neighbours' requests: a
        stream's dead letter or a job's failures would hold good rows otherwise)."""
        if len(batch) > 1:
            names = batch[0].inputs.keys()
            merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in names}
            try:
                outputs = call_predict(self._model, self._predict, merged, batch[0].parameters)
            except InferenceError:
                self.predict_calls += len(batch)
            else:
                return list(self._split(batch, outputs))
        outcomes: list[Tensors | Exception] = []
        for pending in batch:
            try:
                outcomes.append(call_predict(self._model, self._predict, pending.inputs, pending.parameters))
            except InferenceError as exc:
                outcomes.append(exc)
        return outcomes

    def _split(self, batch: list[_Pending], outputs: Tensors) -> list[Tensors]:
        """Each request's rows of a merged call's outputs; a model that breaks the batch
        dimension fails the whole call (rerunning alone would hide that it cannot batch)."""
        total = sum(p.rows for p in batch)
        arrays: dict[str, np.ndarray] = {}
        for name, value in outputs.items():
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.ndim == 0 or array.shape[0] != total:
                raise InferenceError(
                    f"model '{self._model}' returned output '{name}' with shape "
                    f"{list(array.shape)} for a batch of {total} rows; dim 0 must be the batch"
                )
            arrays[name] = array
        results: list[Tensors] = []
        start = 0
        for pending in batch:
            stop = start + pending.rows
            results.append({name: array[start:stop] for name, array in arrays.items()})
            start = stop
        return results
