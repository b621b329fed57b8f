"""Models as jobs: a table in, predictions out, resumable and exactly once.

    outcome = await run_job(spec)                            # standalone (`modelgw job run -f`)
    outcome = await run_job(spec, store=store)               # status written to the registry
    outcome.phase, outcome.status, outcome.exit_code

How a job runs (`modelgw job run`):
- The input (pipelines/tables.py) is read in chunks of batch_size rows; each chunk is one
  `infer_rows` call of pipelines/caller.py, with up to `parallelism` of them in flight.
- Results are committed in input order, in parts of whole chunks (PART_ROWS rows, or
  what PART_SECONDS brought):
  the part's outputs (`part-<first row>.<ext>`, the row id and each output) and, if any
  row of it failed, its failures (`failures-<first row>.<ext>`, row id, row, error), each
  written atomically (temp file, fsync, rename); then the checkpoint
  (`_checkpoint.json`: the parts so far and the input position they cover, with the
  running counts) is replaced atomically. A part counts once the checkpoint lists it.
- On start, a checkpoint found in output_uri is resumed: input it covers is skipped,
  temp files and parts it does not list (written just before a crash) are removed. So a
  job killed at any moment and started again ends with every input row exactly once in
  the listed parts: as a scored row of a part file or as a failure. A checkpoint from
  another input (path, size or modification time changed) is refused, not mixed in.
- A row the model rejects, or that cannot be read or converted, is a failure with its
  row id and error; past `max_failed_rows` failures the job stops as FAILED.
- Status: with a registry, JobStatus progress is written (update_job_status, our fields
  only: the reconciler owns attempts, backend and observed_revision) at most every
  STATUS_INTERVAL seconds and at the end. Progress shows as a tqdm bar when stderr is a
  terminal, otherwise as a log line every LOG_INTERVAL seconds.

Exit codes (`JobOutcome.exit_code`): 0 succeeded; 1 failed for good (phase FAILED: bad
spec or input, the model not found or refusing every call, too many failed rows); 3
interrupted or the model unreachable past the caller's retries (phase left RUNNING: a
restart resumes, which is what the local and Kubernetes backends do).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from modelgw.pipelines.caller import CallError, LocalModel, ModelCaller, open_caller
from modelgw.pipelines.tables import (
    FORMAT_NAMES,
    PARQUET,
    TEMP_PREFIX,
    Chunk,
    Position,
    TableError,
    data_path,
    open_table,
    table_format,
    write_atomic,
    write_part,
)
from modelgw.protos import registry_pb2 as rpb

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256  # JobSpec.batch_size 0
DEFAULT_PARALLELISM = 4   # JobSpec.parallelism 0
# A part is committed when it holds PART_ROWS rows or PART_SECONDS after the last commit,
# whichever comes first: each commit costs fsyncs and renames (~ms) and a file, and a kill
# loses the uncommitted work, so a fast job writes parts of many rows and a slow one
# (an LLM at a few rows/s) still loses at most seconds
PART_ROWS = 16384
PART_SECONDS = 10.0
CHECKPOINT = "_checkpoint.json"
STATUS_FAILURES = 100      # failures kept in JobStatus (the failures parts hold them all)
STATUS_INTERVAL = 1.0      # seconds between status writes
LOG_INTERVAL = 10.0        # seconds between progress log lines (no terminal)

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_RETRY = 0, 1, 3
PHASE = rpb.JobStatus


class JobError(Exception):
    """The job cannot run as specified; `code` is the gRPC status, the message says what to fix."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class JobOutcome:
    phase: int
    status: rpb.JobStatus
    exit_code: int


# ------------------------------------------------------------------ the checkpoint


@dataclass
class Part:
    file: str
    start: int
    end: int
    scored: int
    failed: int
    failures_file: str = ""


@dataclass
class Checkpoint:
    """What output_uri durably holds: the parts, the input position they cover, counts."""

    job: str
    input: str
    input_size: int
    input_mtime_ns: int
    format: str
    rows_total: int
    position: Position = field(default_factory=Position)
    parts: list[Part] = field(default_factory=list)
    rows_scored: int = 0
    rows_failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first STATUS_FAILURES
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def rows_done(self) -> int:
        return self.rows_scored + self.rows_failed

    def to_json(self) -> bytes:
        data = {
            "job": self.job, "input": self.input, "input_size": self.input_size, "input_mtime_ns": self.input_mtime_ns,
            "format": self.format, "rows_total": self.rows_total,
            "position": {"row": self.position.row, "offset": self.position.offset, "line": self.position.line},
            "parts": [vars(p) for p in self.parts],
            "rows_scored": self.rows_scored, "rows_failed": self.rows_failed, "failures": self.failures,
            "started_at": self.started_at, "finished_at": self.finished_at,
        }
        return json.dumps(data, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: Path) -> Checkpoint:
        try:
            data = json.loads(raw)
            position = Position(**data.pop("position"))
            parts = [Part(**p) for p in data.pop("parts")]
            return cls(**data, position=position, parts=parts)
        except (ValueError, TypeError, KeyError) as exc:
            raise JobError(f"'{where}' is not a job checkpoint ({exc}); remove it (and the output parts) to start over",
                           grpc.StatusCode.FAILED_PRECONDITION) from None

    def save(self, directory: Path) -> None:
        raw = self.to_json()
        write_atomic(directory / CHECKPOINT, lambda f: f.write(raw))


def _input_stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _resume(directory: Path, fresh: Checkpoint) -> Checkpoint:
    """The checkpoint to continue from (the fresh one when there is none), with the
    directory cleaned of temp files and of parts the checkpoint does not list."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT
    checkpoint = fresh
    if path.exists():
        checkpoint = Checkpoint.from_json(path.read_bytes(), path)
        if (checkpoint.input, checkpoint.input_size, checkpoint.input_mtime_ns) != (
                fresh.input, fresh.input_size, fresh.input_mtime_ns):
            raise JobError(
                f"output '{directory}' holds a checkpoint of another input ({checkpoint.input}, {checkpoint.input_size} "
                f"bytes) than '{fresh.input}' ({fresh.input_size} bytes, or it changed since): use another output_uri, "
                "or empty this one to start over", grpc.StatusCode.FAILED_PRECONDITION)
    listed = {CHECKPOINT, *(p.file for p in checkpoint.parts), *(p.failures_file for p in checkpoint.parts if p.failures_file)}
    for entry in directory.iterdir():
        if entry.name.startswith(TEMP_PREFIX) or (
                entry.name.startswith(("part-", "failures-")) and entry.name not in listed):
            log.info("removing %s: not covered by the checkpoint (written by a run that stopped)", entry.name)
            entry.unlink()
    return checkpoint


# ------------------------------------------------------------------ progress


class Progress:
    """A tqdm bar on a terminal; periodic log lines otherwise."""

    def __init__(self, name: str, total: int, done: int, show: bool) -> None:
        self.name = name
        self.total = total
        self.done = done
        self._start_done = done
        self._started = time.monotonic()
        self._logged = self._started
        self._bar: Any = None
        self._logging = contextlib.ExitStack()
        if show and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, initial=done, unit="rows", unit_scale=True, desc=name, dynamic_ncols=True)
            self._logging.enter_context(logging_redirect_tqdm())  # log lines above the bar, not through it

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def advance(self, rows: int, failed: int) -> None:
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
            if failed:
                self._bar.set_postfix(failed=failed, refresh=False)
            return
        now = time.monotonic()
        if now - self._logged >= LOG_INTERVAL:
            self._logged = now
            rate = self.rate
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("job %s: %d/%d rows (%.1f%%), %d failed, %.0f rows/s, ETA %s", self.name, self.done, self.total,
                     100.0 * self.done / max(self.total, 1), failed, rate,
                     f"{eta:.0f} s" if eta != float("inf") else "unknown")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._logging.close()


# ------------------------------------------------------------------ the job


StatusSink = Callable[[Callable[[rpb.JobStatus], None]], Awaitable[Any]]


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class Job:
    """One run of a job: from the checkpoint (or the start) to the end of the input."""

    def __init__(self, spec: rpb.JobSpec, caller: ModelCaller, status_sink: StatusSink | None = None,
                 show_progress: bool = True) -> None:
        self.spec = spec
        self.caller = caller
        self.status_sink = status_sink
        self.show_progress = show_progress
        self.batch_size = spec.batch_size or DEFAULT_BATCH_SIZE
        self.parallelism = spec.parallelism or DEFAULT_PARALLELISM
        self.input = data_path(spec.input_uri)
        self.output = data_path(spec.output_uri)
        self.format = table_format(spec.format, self.input)
        self.id_name = spec.id_column or "row"
        self._last_status = 0.0
        self._last_commit = time.monotonic()
        self.phase = PHASE.RUNNING
        self.message = ""

    async def mapping(self) -> dict[str, str]:
        """Model input -> column: JobSpec.inputs, by default every input by its own name."""
        names = [t.name for t in await self.caller.inputs()]
        mapping = dict(self.spec.inputs)
        unknown = [name for name in mapping if names and name not in names]
        if unknown:
            raise JobError(f"jobs/{self.spec.name}: inputs: model '{self.spec.model.model}' has no input '{unknown[0]}'; "
                           f"its inputs are: {', '.join(names)}")
        if not mapping:
            if not names:
                raise JobError(f"jobs/{self.spec.name}: model '{self.spec.model.model}' declares no inputs; "
                               "set the job's inputs (model input name -> column)")
            mapping = {name: name for name in names}
        return mapping

    async def run(self) -> JobOutcome:
        mapping = await self.mapping()
        try:
            reader = open_table(self.input, self.format, mapping, self.spec.id_column)
        except TableError as exc:
            raise JobError(f"jobs/{self.spec.name}: {exc}") from None
        size, mtime = _input_stamp(self.input)
        fresh = Checkpoint(self.spec.name, str(self.input.resolve()), size, mtime, FORMAT_NAMES[self.format], 0,
                           started_at=time.time())
        checkpoint = await asyncio.to_thread(_resume, self.output, fresh)
        if checkpoint is fresh:
            checkpoint.rows_total = await asyncio.to_thread(reader.count_rows)
        self.checkpoint = checkpoint
        if checkpoint.finished_at:
            log.info("job %s finished before (%d rows, %d failed): nothing to do", self.spec.name,
                     checkpoint.rows_done, checkpoint.rows_failed)
            return await self._finish(PHASE.SUCCEEDED, "")
        if checkpoint.position.row:
            log.info("job %s: resuming at row %d of %d (%d parts written)", self.spec.name, checkpoint.position.row,
                     checkpoint.rows_total, len(checkpoint.parts))
        progress = Progress(self.spec.name, checkpoint.rows_total, checkpoint.rows_done, self.show_progress)
        self.progress = progress
        await self._report(force=True)
        try:
            limit_hit = await self._score_all(reader.chunks(checkpoint.position, self.batch_size))
        finally:
            progress.close()
        if limit_hit:
            return await self._finish(PHASE.FAILED, limit_hit)
        checkpoint.finished_at = time.time()
        await asyncio.to_thread(checkpoint.save, self.output)
        return await self._finish(PHASE.SUCCEEDED, "")

    async def _score_all(self, chunks: Iterator[Chunk]) -> str:
        """Score every chunk, `parallelism` in flight, committing parts in input order.
        Returns why the job must stop as FAILED (the failure limit), or ""."""
        in_flight: deque[tuple[Chunk, asyncio.Task]] = deque()
        part: list[tuple[Chunk, list]] = []
        part_rows = max(self.batch_size, PART_ROWS // self.batch_size * self.batch_size)
        try:
            for chunk in chunks:
                while len(in_flight) >= self.parallelism:
                    if await self._collect(in_flight.popleft(), part, part_rows):
                        return self._limit_message()
                in_flight.append((chunk, asyncio.create_task(self._score(chunk))))
            while in_flight:
                if await self._collect(in_flight.popleft(), part, part_rows):
                    return self._limit_message()
            if part:
                await self._commit(part)
                if self._over_limit():
                    return self._limit_message()
            return ""
        finally:
            for _, task in in_flight:
                task.cancel()
            for _, task in in_flight:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _collect(self, item: tuple[Chunk, asyncio.Task], part: list[tuple[Chunk, list]], part_rows: int) -> bool:
        """Add a scored chunk to the part; commit the part when full. True: over the limit."""
        chunk, task = item
        part.append((chunk, await task))
        due = time.monotonic() - self._last_commit >= PART_SECONDS
        if due or sum(len(c.rows) for c, _ in part) >= part_rows:
            await self._commit(part)
            part.clear()
            return self._over_limit()
        return False

    async def _score(self, chunk: Chunk) -> list:
        """(outputs | None, error | None) per row of the chunk."""
        valid = [i for i, row in enumerate(chunk.rows) if row is not None]
        results: list[tuple[dict | None, str | None]] = [(None, chunk.errors.get(i)) for i in range(len(chunk.rows))]
        if valid:
            rows = [chunk.rows[i] for i in valid]
            scored = await self.caller.infer_rows(rows, ids=[str(chunk.ids[i]) for i in valid])
            for i, result in zip(valid, scored, strict=True):
                results[i] = (result.outputs, result.error)
        return results

    def _over_limit(self) -> bool:
        limit = self.spec.max_failed_rows if self.spec.HasField("max_failed_rows") else None
        return limit is not None and self.checkpoint.rows_failed > limit

    def _limit_message(self) -> str:
        return (f"{self.checkpoint.rows_failed} rows failed, more than max_failed_rows ({self.spec.max_failed_rows}); "
                f"first: {self.checkpoint.failures[0]['error'] if self.checkpoint.failures else '?'}")

    async def _commit(self, part: list[tuple[Chunk, list]]) -> None:
        """Write one part (and its failures), then the checkpoint that lists them."""
        checkpoint = self.checkpoint
        start = part[0][0].start
        ext = FORMAT_NAMES[self.format]
        ids: list[Any] = []
        outputs: dict[str, list[Any]] = {}
        failures: list[dict[str, Any]] = []
        for chunk, results in part:
            for i, (values, error) in enumerate(results):
                if values is None:
                    failures.append({"row_id": chunk.ids[i], "row": chunk.start + i,
                                     "error": error or "no outputs and no error"})
                    continue
                ids.append(chunk.ids[i])
                for name, value in values.items():
                    outputs.setdefault(name, []).append(value)
        end = part[-1][0].end
        name = f"part-{start:012d}.{ext}"
        failures_name = f"failures-{start:012d}.{ext}" if failures else ""

        def write() -> None:
            write_part(self.output / name, self.format, self.id_name, ids, outputs)
            if failures:
                write_part(self.output / failures_name, self.format, self.id_name, [f["row_id"] for f in failures],
                           {"row": [f["row"] for f in failures], "error": [f["error"] for f in failures]})
            checkpoint.parts.append(Part(name, start, end.row, len(ids), len(failures), failures_name))
            checkpoint.position = end
            checkpoint.rows_scored += len(ids)
            checkpoint.rows_failed += len(failures)
            room = STATUS_FAILURES - len(checkpoint.failures)
            checkpoint.failures.extend({**f, "row_id": str(f["row_id"])} for f in failures[:max(room, 0)])
            checkpoint.save(self.output)

        await asyncio.to_thread(write)
        self._last_commit = time.monotonic()
        self.progress.advance(len(ids) + len(failures), checkpoint.rows_failed)
        await self._report()

    # -- status

    def status(self) -> rpb.JobStatus:
        c = self.checkpoint
        status = rpb.JobStatus(name=self.spec.name, phase=self.phase, rows_done=c.rows_done, rows_total=c.rows_total,
                               rows_failed=c.rows_failed, message=self.message)
        progress = getattr(self, "progress", None)
        status.rows_per_second = progress.rate if progress is not None else 0.0
        status.started_at.CopyFrom(_timestamp(c.started_at))
        if c.finished_at and self.phase in (PHASE.SUCCEEDED, PHASE.FAILED):
            status.finished_at.CopyFrom(_timestamp(c.finished_at))
        for f in c.failures:
            status.failures.add(row_id=str(f["row_id"]), row=int(f["row"]), error=f["error"])
        status.updated_at.CopyFrom(_timestamp(time.time()))
        return status

    async def _report(self, force: bool = False) -> None:
        if self.status_sink is None:
            return
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_INTERVAL:
            return
        self._last_status = now
        await self._write(self.status())

    async def _write(self, status: rpb.JobStatus, final: bool = False) -> None:
        from modelgw.registry.errors import NotFoundError, RegistryError

        assert self.status_sink is not None
        try:
            await write_status(self.status_sink, status)
        except NotFoundError:
            if not final:
                raise JobError(f"jobs/{self.spec.name} was deleted while it ran; stopping",
                               grpc.StatusCode.NOT_FOUND) from None
        except RegistryError as exc:  # etcd away: the job goes on, the next write catches up
            log.warning("job %s: status not written: %s", self.spec.name, exc)

    async def _finish(self, phase: int, message: str) -> JobOutcome:
        self.phase, self.message = phase, message
        if phase == PHASE.FAILED and not self.checkpoint.finished_at:
            self.checkpoint.finished_at = time.time()
        status = self.status()
        if self.status_sink is not None:
            await self._write(status, final=True)
        c = self.checkpoint
        log.info("job %s %s: %d rows scored, %d failed, of %d%s", self.spec.name, PHASE.Phase.Name(phase).lower(),
                 c.rows_scored, c.rows_failed, c.rows_total, f": {message}" if message else "")
        return JobOutcome(phase, status, EXIT_SUCCEEDED if phase == PHASE.SUCCEEDED else EXIT_FAILED)


# the JobStatus fields the job process owns; the reconciler owns the others
_OWN_FIELDS = ("phase", "rows_done", "rows_total", "rows_failed", "rows_per_second", "started_at", "finished_at",
               "failures", "message", "updated_at")


async def write_status(sink: StatusSink, status: rpb.JobStatus) -> None:
    """Write our fields of `status` through update_job_status-style `sink(mutate)`."""
    def mutate(current: rpb.JobStatus) -> None:
        current.name = status.name
        for name in _OWN_FIELDS:
            current.ClearField(name)
        for descriptor, value in status.ListFields():
            if descriptor.name in _OWN_FIELDS:
                if descriptor.label == descriptor.LABEL_REPEATED:
                    getattr(current, descriptor.name).extend(value)
                elif descriptor.message_type is not None:
                    getattr(current, descriptor.name).CopyFrom(value)
                else:
                    setattr(current, descriptor.name, value)

    await sink(mutate)


async def run_job(spec: rpb.JobSpec, *, store: Any = None, report_status: bool = True,
                  local: LocalModel | None = None, show_progress: bool = True) -> JobOutcome:
    """Run a job to its end. `store` (a RegistryStore): an IN_PROCESS model is resolved
    from it and, with report_status, the job's status written there. Raises nothing for the job's own failures: they are
    the outcome (FAILED, or exit code 3 for a restart to resume)."""
    sink: StatusSink | None = None
    if store is not None and report_status:
        name = spec.name

        async def sink(mutate: Callable[[rpb.JobStatus], None]) -> Any:
            return await store.update_job_status(name, mutate)

    def failed(message: str, exit_code: int = EXIT_FAILED) -> JobOutcome:
        status = rpb.JobStatus(name=spec.name, phase=PHASE.FAILED if exit_code == EXIT_FAILED else PHASE.RUNNING,
                               message=message)
        status.updated_at.CopyFrom(_timestamp(time.time()))
        if exit_code == EXIT_FAILED:
            status.finished_at.CopyFrom(_timestamp(time.time()))
        return JobOutcome(status.phase, status, exit_code)

    async def report(outcome: JobOutcome) -> JobOutcome:
        log.error("job %s: %s", spec.name, outcome.status.message)
        if sink is not None:
            status = outcome.status

            def keep_progress(current: rpb.JobStatus) -> None:
                current.name = status.name
                current.phase = status.phase
                current.message = status.message
                current.updated_at.CopyFrom(status.updated_at)
                if status.HasField("finished_at"):
                    current.finished_at.CopyFrom(status.finished_at)

            with contextlib.suppress(Exception):  # the outcome stands even if etcd is away
                await sink(keep_progress)
        return outcome

    try:
        caller = await open_caller(spec.model, local=local, store=store)
    except CallError as exc:
        transient = exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return await report(failed(f"calling the model: {exc}", EXIT_RETRY if transient else EXIT_FAILED))
    try:
        job = Job(spec, caller, sink, show_progress)
        return await job.run()
    except (JobError, TableError) as exc:
        return await report(failed(str(exc)))
    except OSError as exc:  # the input or output directory: unreadable, unwritable, full
        return await report(failed(f"{exc.filename or 'output'}: {exc.strerror or exc}"))
    except CallError as exc:
        transient = exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
        return await report(failed(f"calling the model: {exc}", EXIT_RETRY if transient else EXIT_FAILED))
    finally:
        await caller.aclose()


def output_parts(output_uri: str) -> tuple[list[str], list[str], int]:
    """(part files, failures files, format) a finished or running job's checkpoint lists."""
    directory = data_path(output_uri)
    path = directory / CHECKPOINT
    checkpoint = Checkpoint.from_json(path.read_bytes(), path)
    fmt = PARQUET if checkpoint.format == "parquet" else rpb.JobSpec.JSONL
    return ([p.file for p in checkpoint.parts], [p.failures_file for p in checkpoint.parts if p.failures_file], fmt)
