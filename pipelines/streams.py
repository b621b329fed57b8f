"""`modelgw stream run`: a model on a stream. It consumes a Kafka topic (a consumer group)
or a NATS JetStream subject (a durable pull consumer), batches messages into infer calls,
publishes each result to the sink and acknowledges the source message after that.

    modelgw stream run -f stream.yaml [--etcd HOST:PORT]          # a Stream document
    modelgw stream run -f stream.yaml --model-uri URI --runtime-kind KIND   # IN_PROCESS, no registry
    modelgw stream run --name fraud --etcd HOST:PORT [--prefix P] [--replica K]

Messages. A source message's value is a JSON object mapping the model's input names to
one row's values (the row form of JSONL jobs): {"x": [1.0, 2.0, 3.0]}. Its result is a
JSON object mapping output names to values, {"y": [0.5, 0.25]}, published:
- keyed by the source message: the Kafka record key (none when the source had none); on
  NATS the source's Nats-Msg-Id, else "stream/sequence", in the header `modelgw-key`;
- with where it came from in headers: modelgw-source-topic, -partition and -offset
  (Kafka) or modelgw-source-topic (the subject), -stream and -sequence (NATS), after the
  source message's own headers (passed on; NATS' own Nats-* headers excepted);
- in the order the replica read the messages (batches infer concurrently, publish in turn).

Dead letters. A message that is not a JSON object, whose values do not fit the model's
inputs, that the model rejects (INVALID_ARGUMENT), or that alone makes the model fail
(INTERNAL, UNKNOWN: a batch failing so is split until the message to blame is found) goes
to the dead-letter destination unchanged (same key, value and headers, so it can be
replayed once fixed) with `modelgw-error` (the message a person acts on) and
`modelgw-error-code` (INVALID_ARGUMENT, INTERNAL, ...) headers and the provenance
headers; then it is acknowledged. Without a dead-letter destination such a message is
logged and acknowledged. (A runtime that batches dynamically, max_batch_size > 0, now
fails every request merged into a predict call that raises, so a bad message can take
good ones of concurrent calls with it into the dead letter; runtimes/batching.py's to fix.)
Other failures are nobody's row: the model not found, forbidden,
unreachable after the caller's retries. The batch is then retried with backoff for as
long as it takes, and nothing is acknowledged meanwhile (the lag shows it).

Delivery. At least once: a source message is acknowledged (Kafka: its offset committed,
JetStream: acked) only after its result or dead letter is stored by the broker. A
replica killed in between leaves its messages unacknowledged and they are consumed again
(Kafka: by the partition's next owner, from the last commit; JetStream: after ack_wait,
30 s by default). Where it is exactly once:
- a NATS sink: each result is published with Nats-Msg-Id = "<stream name>/<source id>",
  so JetStream drops the second copy of a redelivered message's result when it arrives
  inside the sink stream's duplicate window (2 minutes by default; ack_wait is 30 s, so a
  redelivery after a crash arrives well inside it). Exactly once in the sink, then, when
  the model is deterministic and the window is not shortened below ack_wait;
- a Kafka sink: not exactly once. Without transactions (which Tansu does not implement)
  a replica killed between publishing and committing publishes those results again.
  Consumers of the sink deduplicate by the provenance headers (topic, partition, offset).

Backpressure. At most max_in_flight messages are read and not yet acknowledged per
replica; the reader stops reading while that many are in flight. A batch leaves when it
holds batch_size messages or max_batch_delay_ms after its first message arrived.

Shutdown. SIGTERM (or SIGINT): stop reading, finish the messages in flight (infer,
publish, acknowledge), leave the group / close, exit 0. Messages still unfinished after
--drain-seconds are left unacknowledged (consumed again later) and the exit is still 0.

Observability. --metrics-port serves /metrics (Prometheus: messages processed and failed,
consumer lag, batch sizes, infer and end-to-end latency, messages in flight) and /healthz
(200 once consuming). Run with --name, the replica adds its counts to the stream's status
(messages_processed, messages_failed) and writes the group's consumer_lag, every
--status-seconds and once more when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from modelgw.pipelines.brokers import Outgoing, Received, Sink, Source, open_sink, open_source
from modelgw.pipelines.caller import CallError, LocalModel, ModelCaller, RowResult, open_caller
from modelgw.pipelines.tables import jsonable
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.keys import DEFAULT_PREFIX
from modelgw.registry.validation import DEFAULT_STREAM_BATCH_SIZE, DEFAULT_STREAM_MAX_IN_FLIGHT, check_stream
from modelgw.tasks import OutageLog, guard, stop_tasks

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_DELAY_MS = 5.0
POLL_SECONDS = 0.5  # a reader with nothing to read looks at the stop flag this often
DEFAULT_DRAIN_SECONDS = 30.0
DEFAULT_STATUS_SECONDS = 5.0
LAG_SECONDS = 2.0  # how often the consumer lag is read (one broker round trip or a few)
MAX_BACKOFF_SECONDS = 30.0

ERROR_HEADER = "modelgw-error"
ERROR_CODE_HEADER = "modelgw-error-code"

# statuses after which a batch is split to find the message to blame: the model failed on
# what it was given. Every other status is the call's, not a message's (see the docstring).
BLAMED = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.OUT_OF_RANGE})


class Metrics:
    """A stream replica's Prometheus metrics, in a registry of its own."""

    def __init__(self, stream: str) -> None:
        self.registry = CollectorRegistry()
        labels = ("stream",)
        self.messages = Counter("modelgw_stream_messages_total",
                                "Source messages acknowledged, by outcome (processed: result published; failed: dead "
                                "letter)", ("stream", "outcome"), registry=self.registry)
        self.redelivered = Counter("modelgw_stream_redelivered_total",
                                   "Messages the broker delivered more than once (JetStream's count)", labels,
                                   registry=self.registry)
        self.lag = Gauge("modelgw_stream_consumer_lag",
                         "Source messages the group has not acknowledged (-1: unknown)", labels, registry=self.registry)
        self.in_flight = Gauge("modelgw_stream_in_flight", "Messages read and not yet acknowledged", labels,
                               registry=self.registry)
        self.batch_size = Histogram("modelgw_stream_batch_size", "Messages per batch", labels,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry)
        seconds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.infer_seconds = Histogram("modelgw_stream_infer_seconds", "Infer calls of a batch", labels,
                                       buckets=seconds, registry=self.registry)
        self.latency = Histogram("modelgw_stream_message_seconds", "From read to acknowledged, per message", labels,
                                 buckets=seconds, registry=self.registry)
        self.stream = stream

    def count(self, outcome: str, n: int = 1) -> None:
        if n:
            self.messages.labels(self.stream, outcome).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Settings:
    batch_size: int
    max_in_flight: int
    max_batch_delay: float  # seconds
    drain_seconds: float = DEFAULT_DRAIN_SECONDS

    @classmethod
    def of(cls, spec: rpb.StreamSpec, drain_seconds: float = DEFAULT_DRAIN_SECONDS) -> Settings:
        delay_ms = spec.max_batch_delay_ms or DEFAULT_MAX_BATCH_DELAY_MS
        return cls(spec.batch_size or DEFAULT_STREAM_BATCH_SIZE, spec.max_in_flight or DEFAULT_STREAM_MAX_IN_FLIGHT,
                   delay_ms / 1000.0, drain_seconds)


@dataclass
class _Failure:
    message: Received
    code: str
    error: str


class StreamRunner:
    """Consume, batch, infer, publish, acknowledge (see the module docstring). The caller,
    source and sinks are started by the caller of run(); run() returns after a drain."""

    def __init__(self, spec: rpb.StreamSpec, caller: ModelCaller, source: Source, sink: Sink,
                 dead_letter: Sink | None, settings: Settings, metrics: Metrics) -> None:
        self.spec = spec
        self.caller = caller
        self.source = source
        self.sink = sink
        self.dead_letter = dead_letter
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0
        self.processed = 0  # acknowledged with a result published
        self.failed = 0  # acknowledged with a dead letter (or, without one, a log line)
        self.consuming = False
        self._room = asyncio.Event()  # set while fewer than max_in_flight are in flight
        self._room.set()
        self._tasks: set[asyncio.Task] = set()
        self._tail: asyncio.Future | None = None  # the previous batch's turn to publish has passed
        self._stopping = asyncio.Event()
        self._call_outage = OutageLog(log, f"stream {spec.name}: model '{spec.model.model}'")
        self._publish_outage = OutageLog(log, f"stream {spec.name}: publish")
        self._receive_outage = OutageLog(log, f"stream {spec.name}: receive")

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain: finish what is in flight, up to
        settings.drain_seconds; what is unfinished then stays unacknowledged."""
        reader = asyncio.get_running_loop().create_task(self._read(stop))
        waiter = asyncio.get_running_loop().create_task(stop.wait())
        try:
            await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # the reader died: say why
        finally:
            self._stopping.set()
            await stop_tasks(waiter)
            # the reader notices the stop within POLL_SECONDS; it is not cancelled, so no
            # message it has fetched is dropped between the broker and a batch
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(reader), POLL_SECONDS * 4)
            await stop_tasks(reader)
            await self._drain()

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("stream %s: draining %d messages in flight", self.spec.name, self.in_flight)
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_seconds)
        if pending:
            log.warning("stream %s: %d messages unfinished after %g s: left unacknowledged, to be consumed again",
                        self.spec.name, self.in_flight, self.settings.drain_seconds)
            await stop_tasks(*pending)

    async def _read(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        size, limit = self.settings.batch_size, self.settings.max_in_flight
        self.consuming = True
        while not stop.is_set():
            if self.in_flight >= limit:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), POLL_SECONDS)
                continue
            room = limit - self.in_flight
            batch = await self._receive(min(size, room), POLL_SECONDS)
            if not batch:
                continue
            # a batch waits up to max_batch_delay after its first message for company
            leaves_at = loop.time() + self.settings.max_batch_delay
            while len(batch) < min(size, room) and not stop.is_set():
                left = leaves_at - loop.time()
                if left <= 0:
                    break
                batch.extend(await self._receive(min(size, room) - len(batch), left))
            self._dispatch(batch)

    async def _receive(self, count: int, timeout: float) -> list[Received]:
        """What the source has, or [] while it is away (the client reconnects by itself;
        the stream waits, it does not die of a broker restart)."""
        try:
            batch = await self.source.receive(count, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # each client raises its own classes: waited out alike
            self._receive_outage.failed(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(min(max(timeout, 0.1), POLL_SECONDS))
            return []
        self._receive_outage.recovered()
        return batch

    def _dispatch(self, batch: list[Received]) -> None:
        self.in_flight += len(batch)
        self.metrics.in_flight.labels(self.spec.name).set(self.in_flight)
        self.metrics.batch_size.labels(self.spec.name).observe(len(batch))
        redelivered = sum(1 for m in batch if m.deliveries > 1)
        if redelivered:
            self.metrics.redelivered.labels(self.spec.name).inc(redelivered)
        if self.in_flight >= self.settings.max_in_flight:
            self._room.clear()
        # batches publish in the order they were read: each waits for the one before
        previous, turn = self._tail, asyncio.get_running_loop().create_future()
        self._tail = turn
        task = asyncio.get_running_loop().create_task(self._handle(batch, previous, turn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        guard(task, f"stream {self.spec.name}: a batch", log)

    async def _handle(self, batch: list[Received], previous: asyncio.Future | None, turn: asyncio.Future) -> None:
        started = time.monotonic()
        try:
            results, failures = await self._score(batch)
            if previous is not None:
                await asyncio.shield(previous)
            await self._publish(self.sink, results)
            if failures:
                await self._dead_letter(failures)
            await self._ack(batch)
            self.processed += len(results)
            self.failed += len(failures)
            self.metrics.count("processed", len(results))
            self.metrics.count("failed", len(failures))
            elapsed = time.monotonic() - started
            for _ in batch:
                self.metrics.latency.labels(self.spec.name).observe(elapsed)
        finally:
            # a batch given up on (drain timeout) still lets the next ones publish: its own
            # messages stay unacknowledged, and Kafka commits never pass them
            if not turn.done():
                turn.set_result(None)
            self.in_flight -= len(batch)
            self.metrics.in_flight.labels(self.spec.name).set(self.in_flight)
            if self.in_flight < self.settings.max_in_flight:
                self._room.set()

    async def _score(self, batch: list[Received]) -> tuple[list[Outgoing], list[_Failure]]:
        failures: list[_Failure] = []
        rows: list[dict[str, Any]] = []
        parsed: list[Received] = []
        for m in batch:
            row, problem = parse_message(m.value)
            if problem is not None:
                failures.append(_Failure(m, grpc.StatusCode.INVALID_ARGUMENT.name, f"message {m.id}: {problem}"))
            else:
                rows.append(row)
                parsed.append(m)
        results: list[Outgoing] = []
        if rows:
            scored = await self._infer(parsed, rows)
            for m, (result, code) in zip(parsed, scored, strict=True):
                if result.outputs is not None:
                    results.append(self._result(m, result.outputs))
                else:
                    failures.append(_Failure(m, code, result.error or "no outputs"))
        return results, failures

    async def _infer(self, messages: list[Received], rows: list[dict[str, Any]]) -> list[tuple[RowResult, str]]:
        """(RowResult, error code) per row. A call that fails with a status that blames
        what it was sent is split until the message to blame is found; any other failure
        is retried, with backoff, until it works or the replica stops."""
        ids = [m.id for m in messages]
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                results = await self.caller.infer_rows(rows, ids=ids)
            except CallError as exc:
                self.metrics.infer_seconds.labels(self.spec.name).observe(time.monotonic() - started)
                if exc.code in BLAMED:
                    if len(rows) == 1:
                        return [(RowResult(error=f"message {ids[0]}: {exc}"), exc.code.name)]
                    half = len(rows) // 2
                    first = await self._infer(messages[:half], rows[:half])
                    return first + await self._infer(messages[half:], rows[half:])
                self._call_outage.failed(exc, f"retrying the batch ({len(rows)} messages) until it works")
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            self.metrics.infer_seconds.labels(self.spec.name).observe(time.monotonic() - started)
            self._call_outage.recovered()
            # a row's own error: it did not fit the model's inputs or the model rejected it
            return [(r, grpc.StatusCode.INVALID_ARGUMENT.name) for r in results]

    def _result(self, m: Received, outputs: dict[str, Any]) -> Outgoing:
        value = json.dumps({name: jsonable(v) for name, v in outputs.items()}, separators=(",", ":"))
        return Outgoing(key=m.key, value=value.encode(), headers=[*m.headers, *m.provenance],
                        dedup_id=f"{self.spec.name}/{m.id}")

    async def _dead_letter(self, failures: list[_Failure]) -> None:
        if self.dead_letter is None:
            for f in failures:
                log.warning("stream %s: %s: %s (no dead-letter destination: acknowledged and dropped)",
                            self.spec.name, f.code, f.error)
            return
        letters = [
            Outgoing(
                key=f.message.key,
                value=f.message.value,
                headers=[*f.message.headers, *f.message.provenance,
                         (ERROR_HEADER, f.error.encode()), (ERROR_CODE_HEADER, f.code.encode())],
                dedup_id=f"{self.spec.name}/dead/{f.message.id}",
            )
            for f in failures
        ]
        await self._publish(self.dead_letter, letters)

    async def _publish(self, sink: Sink, messages: list[Outgoing]) -> None:
        """Publish until the broker has stored them all (a sink that is away is waited
        for: the messages stay unacknowledged meanwhile)."""
        if not messages:
            return
        delay = 0.2
        while True:
            try:
                await sink.publish(messages)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # each client raises its own classes; all mean "try again"
                self._publish_outage.failed(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            self._publish_outage.recovered()
            return

    async def _ack(self, batch: list[Received]) -> None:
        try:
            await self.source.ack(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an ack lost is a redelivery: at least once holds
            log.warning("stream %s: acknowledging %d messages failed (%s): they will be consumed again",
                        self.spec.name, len(batch), exc)


def parse_message(value: bytes) -> tuple[dict[str, Any], str | None]:
    """A message's row (model input name -> value), or why it is not one."""
    try:
        row = json.loads(value)
    except UnicodeDecodeError:
        return {}, "the value is not UTF-8 text; expected a JSON object mapping the model's input names to values"
    except json.JSONDecodeError as exc:
        return {}, (f"the value is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); expected a JSON "
                    "object mapping the model's input names to values")
    if not isinstance(row, dict):
        return {}, (f"the value is a JSON {type(row).__name__}, not an object; expected a JSON object mapping the "
                    "model's input names to values")
    return row, None


# ---------------------------------------------------------------- the process


class _Status:
    """Adds this replica's counts to the stream's status and writes the lag, every
    `every` seconds (update_stream_status: concurrent replicas never lose each other's)."""

    def __init__(self, store: Any, name: str, runner: StreamRunner, every: float) -> None:
        self.store = store
        self.name = name
        self.runner = runner
        self.every = every
        self.written = (0, 0)  # (processed, failed) already added to the record
        self.lag: int | None = None
        self.outage = OutageLog(log, f"stream {name}: status write")

    async def write(self) -> None:
        processed, failed = self.runner.processed, self.runner.failed
        add_processed, add_failed = processed - self.written[0], failed - self.written[1]
        lag = -1 if self.lag is None else self.lag

        def mutate(status: rpb.StreamStatus) -> None:
            # runs on the status as read, once per attempt: adding the deltas stays right
            status.messages_processed += add_processed
            status.messages_failed += add_failed
            status.consumer_lag = lag
            status.updated_at.GetCurrentTime()

        await self.store.update_stream_status(self.name, mutate)
        self.written = (processed, failed)

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.write()
            except Exception as exc:  # etcd away or the stream deleted: the stream goes on
                self.outage.failed(exc)
            else:
                self.outage.recovered()


async def _lag_loop(runner: StreamRunner, status: _Status | None) -> None:
    gauge = runner.metrics.lag.labels(runner.spec.name)
    gauge.set(-1)
    while True:
        lag = await runner.source.lag()
        gauge.set(-1 if lag is None else lag)
        if status is not None:
            status.lag = lag
        await asyncio.sleep(LAG_SECONDS)


async def _serve_metrics(runner: StreamRunner, host: str, port: int) -> Any:
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=runner.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        if runner.consuming:
            return web.Response(text="consuming\n")
        return web.Response(status=503, text="starting\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    site_runner = web.AppRunner(app, access_log=None)
    await site_runner.setup()
    site = web.TCPSite(site_runner, host, port)
    await site.start()
    log.info("stream %s: metrics on http://%s:%d/metrics", runner.spec.name, host, port)
    return site_runner


async def _until_started(what: str, end: Source | Sink, stop: asyncio.Event) -> bool:
    """Start `end` until it works (a broker that is not up yet); False if stopped first."""
    outage = OutageLog(log, what)
    delay = 0.5
    while not stop.is_set():
        try:
            await end.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # each client raises its own classes: retried alike
            outage.failed(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await end.close()  # what the failed start opened
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
            continue
        outage.recovered("started")
        return True
    return False


async def run_stream(spec: rpb.StreamSpec, *, stop: asyncio.Event, store: Any = None, status_name: str | None = None,
                     replica: int = 0, metrics_host: str = "0.0.0.0", metrics_port: int | None = None,
                     drain_seconds: float = DEFAULT_DRAIN_SECONDS, status_seconds: float = DEFAULT_STATUS_SECONDS,
                     local: LocalModel | None = None, caller: ModelCaller | None = None) -> None:
    """Run one replica of `spec` until `stop` is set, then drain and return. An
    IN_PROCESS model is `local`, else resolved in `store` (a RegistryStore), which also
    takes the status of the stream `status_name`. `caller`: one already open (kept open)."""
    check_stream(spec)
    client_id = f"modelgw-stream-{spec.name}-{replica}"
    own_caller = caller is None
    if caller is None:
        caller = await open_caller(spec.model, local=local, store=store)
    source = open_source(spec.source, client_id=client_id)
    sink = open_sink(spec.sink, spec.source, client_id=f"{client_id}-sink")
    dead_letter = (open_sink(spec.dead_letter, spec.source, client_id=f"{client_id}-dead-letter")
                   if spec.HasField("dead_letter") and spec.dead_letter.topic else None)
    runner = StreamRunner(spec, caller, source, sink, dead_letter, Settings.of(spec, drain_seconds), Metrics(spec.name))
    status = _Status(store, status_name, runner, status_seconds) if store is not None and status_name else None
    site = await _serve_metrics(runner, metrics_host, metrics_port) if metrics_port is not None else None
    background: list[asyncio.Task] = []
    started: list[Source | Sink] = []
    try:
        for what, end in (("sink", sink), ("dead letter", dead_letter), ("source", source)):
            if end is None:
                continue
            if not await _until_started(f"stream {spec.name}: {what}", end, stop):
                return
            started.append(end)
        loop = asyncio.get_running_loop()
        background.append(guard(loop.create_task(_lag_loop(runner, status)), f"stream {spec.name}: lag", log))
        if status is not None:
            background.append(guard(loop.create_task(status.loop()), f"stream {spec.name}: status", log))
        log.info("stream %s: replica %d consuming %s (batch %d, max in flight %d)", spec.name, replica,
                 spec.source.topic, runner.settings.batch_size, runner.settings.max_in_flight)
        await runner.run(stop)
    finally:
        await stop_tasks(*background)
        if status is not None and source in started:
            # the lag after the drain's commits (the running figure is up to LAG_SECONDS old)
            with contextlib.suppress(Exception):
                status.lag = await source.lag()
        # the source first: a Kafka consumer leaves its group, a NATS one unsubscribes
        for end in reversed(started):
            with contextlib.suppress(Exception):
                await end.close()
        if status is not None:
            try:
                await status.write()
            except Exception as exc:  # the counts are lost for the record only: the metrics had them
                log.warning("stream %s: last status write failed: %s", spec.name, exc)
        if site is not None:
            await site.cleanup()
        if own_caller:
            await caller.aclose()
        log.info("stream %s: replica %d stopped (%d processed, %d failed)", spec.name, replica, runner.processed,
                 runner.failed)


# ---------------------------------------------------------------- the command


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`modelgw stream run`'s arguments (pipelines/cli.py owns the `stream` group)."""
    parser.add_argument("-f", "--file", help="a file holding the Stream document (as for `modelgw apply -f`)")
    parser.add_argument("--name", help="the stream to run: the one in the registry, or which of the file's streams")
    parser.add_argument("--etcd", help="the registry's etcd (host:port): the stream, IN_PROCESS models, the status")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="registry key prefix (default %(default)s)")
    parser.add_argument("--model-uri", default="", help="IN_PROCESS without a registry: the model version's URI")
    parser.add_argument("--runtime-kind", default="", help="IN_PROCESS without a registry: its runtime kind (python, ...)")
    parser.add_argument("--replica", type=int, default=0, help="this replica's number (0, 1, ...): names its clients")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="where /metrics and /healthz listen")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve /metrics and /healthz on this port")
    parser.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS,
                        help="on SIGTERM, how long messages in flight are given to finish")
    parser.add_argument("--status-seconds", type=float, default=DEFAULT_STATUS_SECONDS,
                        help="with --name and --etcd: how often the stream's status is written")
    parser.set_defaults(func=main)


def load_spec_file(path: str, name: str | None) -> rpb.StreamSpec:
    """The Stream document of a file (the one named `name` when it holds several)."""
    from modelgw.registry.errors import ValidationError
    from modelgw.registry.files import parse_documents

    text = Path(path).read_text(encoding="utf-8")
    streams = [d.spec for d in parse_documents(text, path) if d.kind == "Stream"]
    if name:
        streams = [s for s in streams if s.name == name]
    if len(streams) != 1:
        named = f" named {name!r}" if name else ""
        found = "no Stream document" if not streams else f"{len(streams)} Stream documents"
        raise ValidationError(f"{path}: {found}{named}; expected one (pick one with --name)")
    spec: rpb.StreamSpec = streams[0]
    return spec


def main(args: argparse.Namespace) -> int:
    from modelgw.registry.errors import RegistryError

    if not args.file and not (args.name and args.etcd):
        raise SystemExit("modelgw stream run: give -f FILE, or --name NAME with --etcd HOST:PORT")
    try:
        return asyncio.run(_main(args))
    except (RegistryError, CallError, OSError) as exc:
        log.error("stream %s: %s", args.name or args.file, exc)
        return 1


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = None
    if args.etcd:
        from modelgw.registry.store import RegistryStore

        store = RegistryStore(args.etcd, prefix=args.prefix)
    try:
        if args.file:
            spec = load_spec_file(args.file, args.name)
        else:
            assert store is not None  # main() requires --etcd with --name
            spec = (await store.get_stream(args.name)).spec
        local = None
        if spec.model.mode == rpb.ModelCall.IN_PROCESS and (args.model_uri or args.runtime_kind):
            if not (args.model_uri and args.runtime_kind):
                raise SystemExit("modelgw stream run: --model-uri and --runtime-kind go together")
            local = LocalModel(spec.model.model, spec.model.version or "1", args.runtime_kind, args.model_uri)
        # from a file the registry only resolves an IN_PROCESS model: the status is written
        # only for a stream read from it
        await run_stream(
            spec, stop=stop, store=store, status_name=spec.name if (store is not None and not args.file) else None,
            local=local,
            replica=args.replica, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
            drain_seconds=args.drain_seconds, status_seconds=args.status_seconds,
        )
    finally:
        if store is not None:
            await store.close()
    return 0
