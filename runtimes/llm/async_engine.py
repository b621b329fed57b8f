"""An Engine driven by a background thread, with an async generate() for the event loop.

    engine = AsyncEngine(TorchEngine(checkpoint, config))
    async for output in engine.generate(request):      # RequestOutputs until finished
        ...
    engine.shutdown()

The engine's steps run in one dedicated thread (torch releases the GIL in its kernels),
so the event loop stays free to serve gRPC while the model computes. Requests and
cancellations cross over under a lock and are applied at the next step boundary; outputs
cross back with one call_soon_threadsafe per event loop per step.

Cancellation: when the consumer of generate() goes away — the task is cancelled (the
gRPC call was), or the iterator is closed before the end — the request is aborted and
its KV cache freed at the next step boundary (a few milliseconds at most).
When the consumer reads more slowly than tokens come, generate() merges what has piled
up into one output, so a slow client costs one message per read, not per token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator

from modelgw.runtimes.llm.engine import Engine, EngineFigures, GenerationRequest, RequestOutput

log = logging.getLogger(__name__)


class EngineStopped(Exception):
    """The engine was shut down."""


def merge(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one."""
    return RequestOutput(
        request_id=first.request_id,
        text=first.text + later.text,
        token_ids=first.token_ids + later.token_ids,
        logprobs=None if first.logprobs is None else first.logprobs + (later.logprobs or []),
        top_logprobs=None if first.top_logprobs is None else first.top_logprobs + (later.top_logprobs or []),
        finished=later.finished,
        finish_reason=later.finish_reason,
        prompt_tokens=later.prompt_tokens,
        completion_tokens=later.completion_tokens,
    )


class AsyncEngine:
    def __init__(self, engine: Engine, name: str = "llm") -> None:
        self.engine = engine
        self.name = name
        self._wake = threading.Condition()
        self._added: list[GenerationRequest] = []
        self._aborted: list[str] = []
        self._stopping = False
        # request id -> (its event loop, its queue of RequestOutput | Exception)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name=f"llm-engine-{name}", daemon=True)
        self._thread.start()

    # -- the event loop's side

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; the last one has finished=True."""
        queue: asyncio.Queue = asyncio.Queue()
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"request id '{request_id}' is already in use")
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            with self._wake:
                if self._stopping:
                    raise EngineStopped(f"model '{self.name}' is shutting down")
                self._added.append(request)
                self._wake.notify()
            while True:
                output = await queue.get()
                while not isinstance(output, Exception) and not output.finished and not queue.empty():
                    following = queue.get_nowait()
                    if isinstance(following, Exception):
                        queue.put_nowait(following)  # deliver what we have first
                        break
                    output = merge(output, following)
                if isinstance(output, Exception):
                    finished = True
                    raise output
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it is freed at the next step boundary."""
        with self._wake:
            self._aborted.append(request_id)
            self._wake.notify()

    def figures(self) -> EngineFigures:
        figures = self.engine.figures()
        queued = len(self._added)  # accepted, not yet seen by the engine thread
        if queued:
            return EngineFigures(figures.waiting + queued, figures.running, figures.kv_cache_usage)
        return figures

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the thread: requests still running end with finish_reason 'cancelled'.
        False if the thread is still busy after `timeout` seconds."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("model '%s': the engine thread did not stop within %.0fs", self.name, timeout)
            return False
        return True

    # -- the engine thread

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not (self._added or self._aborted or self._stopping or engine.has_unfinished()):
                    self._wake.wait()
                added, self._added = self._added, []
                aborted, self._aborted = self._aborted, []
                stopping = self._stopping
            outputs: list[RequestOutput] = []
            for request in added:
                try:
                    engine.add_request(request)
                except Exception as exc:  # refused (does not fit, queue full): tell that request only
                    self._deliver([(request.request_id, exc)])
            for request_id in aborted:
                output = engine.abort(request_id)
                if output is not None:
                    outputs.append(output)
            if stopping:
                outputs.extend(engine.abort_all())
                self._deliver([(o.request_id, o) for o in outputs])
                for request in self._drain_added():
                    self._deliver([(request.request_id, EngineStopped(f"model '{self.name}' is shutting down"))])
                return
            if engine.has_unfinished():
                try:
                    outputs.extend(engine.step())
                except Exception as exc:  # a failed step fails its requests, never the thread
                    log.exception("model '%s': engine step failed", self.name)
                    failed = engine.abort_all("error")
                    error = RuntimeError(f"the engine failed: {type(exc).__name__}: {exc}")
                    self._deliver([(o.request_id, error) for o in failed])
            if outputs:
                self._deliver([(o.request_id, o) for o in outputs])

    def _drain_added(self) -> list[GenerationRequest]:
        with self._wake:
            added, self._added = self._added, []
        return added

    def _deliver(self, items: list[tuple[str, RequestOutput | Exception]]) -> None:
        """Hand outputs to their requests' queues: one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = defaultdict(list)
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop[stream[0]].append((stream[1], item))
        for loop, entries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, entries)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass


def _put_all(entries: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in entries:
        queue.put_nowait(item)
