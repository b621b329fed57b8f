"""The local backend: each runtime replica is a supervised process on this machine.

A replica runs `modelgw runtime serve --registry ...` on a free loopback port and
registers itself in etcd (its address is in its endpoint record, its output in
<log dir>/<instance>.log); the supervisor restarts it with exponential backoff when it
exits, under a new instance name (as a new pod would be), so the dead one's endpoint
record expires with its lease. Replicas die with the reconciler that started them
(PR_SET_PDEATHSIG, see modelgw.process), so a standby that takes over never finds
orphans competing with it.

A spec change rolls, as a Deployment with maxSurge 1 and maxUnavailable 0 does: one new
replica is started; once its endpoint is ready, one outdated replica is stopped; repeat.
The registry keeps serving from the outdated replicas until new ones are ready. Each step
is taken by an ensure() call (the core calls it on every pass while observe() reports the
outdated spec hash, and a pass runs whenever an endpoint's readiness changes).

Jobs and streams use the same supervision (a ProcessGroup given a Supervision: how its
processes start, whether one comes back after it exits): a stream is `replicas` processes
of `modelgw stream run`, always restarted, rolled like a runtime's (a consumer is ready
while its process is alive); a job is one `modelgw job run` process (LocalJob), restarted
after a crash up to its backoff limit and then FAILED, and left to end when it exits 0 or
gives up by itself (backend.JOB_EXIT_FAILED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelgw.net import free_port
from modelgw.process import PARENT_PID_ENV, python_module
from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import (
    JOB_EXIT_FAILED,
    JobWorkload,
    Workload,
    backoff_limit,
    custom_command,
    spec_hash,
    stream_replicas,
)
from modelgw.registry.validation import EXTERNAL_KIND, external_port

log = logging.getLogger(__name__)


def _always(replica: Replica, code: int) -> bool:
    return True


@dataclass(frozen=True)
class Supervision:
    """What a ProcessGroup's processes are: `what` names them in logs and instance names
    ("runtime", "stream", "job"); `spawn` starts one for a replica; `restart(replica,
    exit code)` says whether it comes back (always, for runtimes and streams)."""

    what: str
    spawn: Callable[[Replica], Awaitable[asyncio.subprocess.Process]]
    restart: Callable[[Replica, int], bool] = _always


class Replica:
    """One slot of a runtime: a process, restarted whenever it exits, until stopped.

    Only the supervising task starts and ends processes; stop() asks it to and waits, so
    a stop that comes while a restart is under way cannot leave a process behind."""

    def __init__(self, group: ProcessGroup, slot: int) -> None:
        self.group = group
        self.slot = slot
        # the spec it runs, kept when the group moves on to a new one (it is then outdated
        # and restarts, if it crashes, as what it was until the roll stops it)
        self.spec = group.spec
        self.process: asyncio.subprocess.Process | None = None
        self.instance = ""
        self.restarts = 0
        self.recent_crashes: list[float] = []
        self.last_exit: int | None = None
        self.last_error = ""  # why the last start failed, if it did
        self.finished = False  # its group's restart policy let it end (a job done or out of retries)
        self.starts = 0
        self.grace = group.backend.stop_grace
        self._stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._supervise(), name=f"replica-{group.spec.name}-{slot}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _supervise(self) -> None:
        backoff = 0.5
        name = self.spec.name
        what = self.group.what
        while not self.stopping:
            self.instance = f"{self.group.instance_prefix}{name}-{self.slot}-{secrets.token_hex(3)}"
            self.starts += 1
            started = time.monotonic()
            try:
                process = await self.group.spawn(self)
            except (OSError, ValueError) as exc:
                log.error("%s %s: cannot start replica %d: %s", what, name, self.slot, exc)
                code, self.last_error = -1, f"cannot start: {exc}"
            else:
                self.process = process
                code = await self._run(process)
                # its last words (a runtime's one error line: an unknown kind, a bad
                # flag), so that the status says why, not only where to look
                self.last_error = self.group.backend.last_output_line(self.instance) if code else ""
            if self.stopping:
                return
            self.last_exit = code
            if not self.group.restart(self, code):
                self.finished = True
                return
            self.restarts += 1
            now = time.monotonic()
            self.recent_crashes = [t for t in self.recent_crashes if now - t < 120] + [now]
            if now - started > 60:
                backoff = 0.5  # it ran for a while: this is a fresh failure, not a crash loop
            log.warning(
                "%s %s: replica %s exited with code %s; restarting in %.1fs (log: %s)",
                what, name, self.instance, code, backoff, self.group.backend.log_path(self.instance),
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, 30.0)

    async def _run(self, process: asyncio.subprocess.Process) -> int:
        """Wait for the process to exit; when asked to stop first, SIGTERM it (the runtime
        drains and deregisters) and SIGKILL it after the grace period. Its exit code."""
        exited = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not exited.done():
            log.info("runtime %s: stopping replica %s (pid %d)", self.spec.name, self.instance, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(exited), self.grace)
            except TimeoutError:
                log.warning("replica %s did not stop within %.0fs; killing it", self.instance, self.grace)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        return await exited

    async def stop(self, grace: float) -> None:
        """Stop the replica for good (SIGTERM, SIGKILL after `grace` seconds) and wait."""
        self.grace = grace
        self._stop.set()
        await self.task


class ProcessGroup:
    """A runtime's replicas: those running its current spec, and while a spec change
    rolls, the outdated ones still serving until new ones are ready. A stream's consumers
    and a job's one process are groups too, given by `supervision` (how they start, when
    they come back); a runtime's replicas are the default."""

    def __init__(
        self, backend: LocalBackend, spec: Any, spec_hash: str, supervision: Supervision | None = None
    ) -> None:
        self.backend = backend
        self.spec = spec  # an rpb.RuntimeSpec, or the StreamSpec / JobSpec of `supervision`
        self.spec_hash = spec_hash
        self.supervision = supervision or Supervision("runtime", lambda r: backend.spawn(r.spec, r.instance))
        self.what = self.supervision.what
        self.instance_prefix = "" if self.what == "runtime" else f"{self.what}-"
        self.replicas: list[Replica] = []
        self.outdated: list[Replica] = []
        self.outdated_hash = ""  # the spec hash the outdated replicas run (the last one rolled from)
        self._slots = 0

    async def spawn(self, replica: Replica) -> asyncio.subprocess.Process:
        return await self.supervision.spawn(replica)

    def restart(self, replica: Replica, code: int) -> bool:
        return self.supervision.restart(replica, code)

    def _start(self) -> Replica:
        # slots count up across rolls, so that an outdated and a new replica never share a name
        replica = Replica(self, self._slots)
        self._slots += 1
        return replica

    def change_spec(self, spec: rpb.RuntimeSpec, spec_hash: str) -> None:
        """Make `spec` the one new replicas run; every current replica becomes outdated
        (replaced by roll())."""
        self.outdated += self.replicas
        self.outdated_hash, self.replicas = self.spec_hash, []
        self.spec, self.spec_hash = spec, spec_hash

    async def roll(self, count: int, ready: frozenset[str]) -> None:
        """One step towards `count` replicas of the current spec, never fewer than `count`
        ready (maxUnavailable 0) nor more than count + 1 processes (maxSurge 1) while
        outdated replicas remain. `ready`: the instances whose endpoints are ready now."""
        if not self.outdated:
            await self.scale(count)
            return
        new_ready = sum(1 for r in self.replicas if r.running and r.instance in ready)
        # keep as many ready outdated replicas as the new ones still lack; an outdated
        # replica that is not ready serves nothing and goes at once
        needed = max(0, count - new_ready)
        serving = [r for r in self.outdated if r.running and r.instance in ready]
        keep = serving[:needed]
        retire = [r for r in self.outdated if r not in keep]
        surplus, self.replicas = self.replicas[count:], self.replicas[:count]
        self.outdated = keep
        # stopped before the next one starts: a draining process still holds its memory
        # (a GPU's, perhaps), so it counts against the surge until it has exited
        await asyncio.gather(*(r.stop(self.backend.stop_grace) for r in retire + surplus))
        while len(self.replicas) < count and len(self.replicas) + len(self.outdated) < count + 1:
            self.replicas.append(self._start())

    async def scale(self, count: int) -> None:
        """Exactly `count` replicas of the current spec, now; outdated ones are stopped."""
        while len(self.replicas) < count:
            self.replicas.append(self._start())
        surplus, self.replicas = self.outdated + self.replicas[count:], self.replicas[:count]
        self.outdated = []
        await asyncio.gather(*(r.stop(self.backend.stop_grace) for r in surplus))

    def workload(self) -> Workload:
        everyone = self.replicas + self.outdated
        problems = []
        for r in everyone:
            if len(r.recent_crashes) >= 3:
                where = f"see {self.backend.log_path(r.instance)}"
                why = f"{r.last_error}; {where}" if r.last_error else where
                problems.append(
                    f"replica {r.slot} keeps crashing (last exit code {r.last_exit}, "
                    f"{len(r.recent_crashes)} exits in 2 minutes); {why}"
                )
        return Workload(
            runtime=self.spec.name,
            # while outdated replicas remain the roll is not done: reporting their hash
            # makes the core call ensure() again, which takes the next step
            spec_hash=self.outdated_hash if self.outdated else self.spec_hash,
            replicas=len(self.replicas),
            running=sum(1 for r in everyone if r.running),
            restarts=sum(r.restarts for r in everyone),
            problems=problems,
            instances=frozenset(r.instance for r in everyone if r.running),
        )


class LocalJob:
    """A job as a ProcessGroup of one: `modelgw job run` restarted after a crash (an exit
    code other than 0 and JOB_EXIT_FAILED, a signal, a failed start) with the replicas'
    backoff, at most backoff_limit times; it ends for good when the process exits 0 or
    JOB_EXIT_FAILED (it gave up by itself) or the retries are used up. `attempts_before`:
    the starts the job's status counted before this one took over (a new leader carries on
    counting, and gives the job its full backoff again)."""

    def __init__(self, backend: LocalBackend, spec: rpb.JobSpec, spec_hash: str, attempts_before: int) -> None:
        self.limit = backoff_limit(spec)
        self.attempts_before = attempts_before
        self.group = ProcessGroup(backend, spec, spec_hash, Supervision("job", backend.spawn_job, self._restart))

    @property
    def spec_hash(self) -> str:
        return self.group.spec_hash

    def _restart(self, replica: Replica, code: int) -> bool:
        return code not in (0, JOB_EXIT_FAILED) and replica.restarts < self.limit

    def workload(self) -> JobWorkload:
        name = self.group.spec.name
        replica = self.group.replicas[0] if self.group.replicas else None
        if replica is None:
            return JobWorkload(job=name, spec_hash=self.spec_hash, attempts=self.attempts_before)
        attempts = self.attempts_before + replica.starts
        workload = JobWorkload(job=name, spec_hash=self.spec_hash, attempts=attempts, active=not replica.finished)
        why = replica.last_error or f"see {self.group.backend.log_path(replica.instance)}"
        if replica.finished and replica.last_exit == 0:
            workload.outcome = rpb.JobStatus.SUCCEEDED
        elif replica.finished and replica.last_exit == JOB_EXIT_FAILED:
            workload.outcome = rpb.JobStatus.FAILED
            workload.message = f"the job process gave up (exit code {replica.last_exit}): {why}"
        elif replica.finished:
            workload.outcome = rpb.JobStatus.FAILED
            workload.message = (
                f"the job process failed {replica.restarts + 1} times, past its backoff_limit of {self.limit} "
                f"restarts; the last exit code was {replica.last_exit}: {why}"
            )
        elif replica.restarts:
            workload.message = (
                f"the job process exited with code {replica.last_exit} ({why}); restarted, "
                f"{replica.restarts} of {self.limit} restarts used"
            )
        return workload


class LocalBackend:
    name = "local"

    def __init__(
        self,
        etcd: str,
        prefix: str,
        *,
        log_dir: str | os.PathLike,
        host: str = "127.0.0.1",
        lease_ttl: int = 10,
        stop_grace: float = 15.0,
        python: str = sys.executable,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.host = host
        self.lease_ttl = lease_ttl
        self.stop_grace = stop_grace
        self.python = python
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.groups: dict[str, ProcessGroup] = {}
        self.jobs: dict[str, LocalJob] = {}
        self.streams: dict[str, ProcessGroup] = {}

    def log_path(self, instance: str) -> Path:
        return self.log_dir / f"{instance}.log"

    def last_output_line(self, instance: str, limit: int = 300) -> str:
        """The last non-empty line a replica wrote (at most `limit` characters), or ""."""
        try:
            with open(self.log_path(instance), "rb") as log_file:
                log_file.seek(0, os.SEEK_END)
                log_file.seek(max(0, log_file.tell() - 4096))
                tail = log_file.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return lines[-1][:limit] if lines else ""

    def argv(self, spec: rpb.RuntimeSpec, instance: str, port: int) -> list[str]:
        """The replica's command line. A spec's own `command` may use the placeholders
        {python} {host} {port} {etcd} {prefix} {runtime} {instance} {kind}."""
        values = dict(
            python=self.python, host=self.host, port=port, etcd=self.etcd, prefix=self.prefix,
            runtime=spec.name, instance=instance, kind=spec.kind,
        )
        if spec.kind == EXTERNAL_KIND:
            return self.external_argv(spec, values)
        if spec.command:
            return custom_command(spec, values)
        argv = [
            *python_module("modelgw", self.python), "runtime", "serve",
            "--kind", spec.kind,
            "--host", self.host,
            "--port", str(port),
            "--registry", self.etcd,
            "--prefix", self.prefix,
            "--runtime", spec.name,
            "--instance", instance,
            "--lease-ttl", str(self.lease_ttl),
            # drain within the time we give it before SIGKILL
            "--drain-timeout", f"{max(1.0, self.stop_grace - 2):g}",
        ]
        for key, value in sorted(spec.options.items()):
            argv += ["--option", f"{key}={value}"]
        return argv

    def external_argv(self, spec: rpb.RuntimeSpec, values: Mapping[str, object]) -> list[str]:
        """A replica of kind external: `modelgw runtime attach`, which runs the spec's
        command (the server) as its child, waits for it to be ready, registers it, and
        stops it after withdrawing. The server listens on {port}, a free port, when its
        command says so; else on options.port (then one replica per machine)."""
        uses_port = any("{port}" in part for part in spec.command)
        port = values["port"] if uses_port else external_port(spec)
        return [
            *python_module("modelgw", self.python), "runtime", "attach",
            "--target", f"{self.host}:{port}",
            "--runtime", spec.name,
            "--etcd", self.etcd,
            "--prefix", self.prefix,
            "--instance", str(values["instance"]),
            "--lease-ttl", str(self.lease_ttl),
            "--stop-grace", f"{max(1.0, self.stop_grace - 2):g}",
            "--", *custom_command(spec, values),
        ]

    async def spawn(self, spec: rpb.RuntimeSpec, instance: str) -> asyncio.subprocess.Process:
        # `modelgw runtime serve` binds any free port itself and registers it (no race for
        # a port picked here); a custom command gets a port that is free right now
        port = free_port(self.host) if spec.command else 0
        argv = self.argv(spec, instance, port)
        process = await self.exec(argv, spec.env, instance)
        log.info("runtime %s: started replica %s (pid %d)", spec.name, instance, process.pid)
        return process

    async def exec(self, argv: list[str], env: Mapping[str, str], instance: str) -> asyncio.subprocess.Process:
        """Start a supervised process: `env` over ours, output to log_path(instance)."""
        # the replica arms PR_SET_PDEATHSIG itself (modelgw.process): it dies with us
        environment = {**os.environ, **dict(env), PARENT_PID_ENV: str(os.getpid())}
        out = os.open(self.log_path(instance), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            return await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=environment,
            )
        finally:
            os.close(out)  # the child has its own copy

    async def observe(self) -> dict[str, Workload]:
        return {name: group.workload() for name, group in self.groups.items()}

    def workload_hash(self, spec: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec]) -> str:
        # replicas load and unload models as the registry says: only the spec needs new processes
        return spec_hash(spec)

    async def ensure(
        self, spec: rpb.RuntimeSpec, spec_hash: str, models: Sequence[rpb.ModelSpec], ready: frozenset[str]
    ) -> None:
        copy = rpb.RuntimeSpec()
        copy.CopyFrom(spec)
        group = self.groups.get(spec.name)
        if group is None:
            group = self.groups[spec.name] = ProcessGroup(self, copy, spec_hash)
        elif group.spec_hash != spec_hash:
            log.info("runtime %s: spec changed, rolling its replicas one at a time", spec.name)
            group.change_spec(copy, spec_hash)
        await group.roll(spec.replicas, ready)

    async def follow(self, wake: Callable[[], None]) -> None:
        # a crashed replica is restarted by its supervisor; the core's resync passes see it
        await asyncio.Event().wait()

    async def remove(self, runtime: str) -> None:
        group = self.groups.pop(runtime, None)
        if group is not None:
            await group.scale(0)

    async def close(self) -> None:
        await asyncio.gather(*(self.remove(name) for name in list(self.groups)), self.close_jobs_and_streams())

    # -- jobs and streams (issue 13): the same supervision as runtime replicas (Replica,
    # ProcessGroup), other processes:
    # - a job: `python -P -m modelgw job run --name N --etcd E --prefix P` (LocalJob);
    # - a stream: stream_replicas(spec) processes of `... modelgw stream run --name N --etcd E
    #   --prefix P --replica K` (K: the replica's slot, unique within the stream for as long
    #   as the reconciler runs), restarted whenever they exit, rolled one at a time on a spec
    #   change. A consumer counts as ready while its process is alive: the replicas register
    #   no endpoint, and what they consume is theirs to report (StreamStatus counts, lag).

    def job_argv(self, spec: rpb.JobSpec) -> list[str]:
        return [*python_module("modelgw", self.python), "job", "run",
                "--name", spec.name, "--etcd", self.etcd, "--prefix", self.prefix]

    def stream_argv(self, spec: rpb.StreamSpec, replica: int) -> list[str]:
        # each consumer serves /metrics and /healthz on a port of its own (its log says which)
        return [*python_module("modelgw", self.python), "stream", "run",
                "--name", spec.name, "--etcd", self.etcd, "--prefix", self.prefix, "--replica", str(replica),
                "--metrics-host", self.host, "--metrics-port", str(free_port(self.host))]

    async def spawn_job(self, replica: Replica) -> asyncio.subprocess.Process:
        process = await self.exec(self.job_argv(replica.spec), replica.spec.env, replica.instance)
        log.info("job %s: started %s (pid %d, attempt %d)", replica.spec.name, replica.instance, process.pid,
                 replica.starts)
        return process

    async def spawn_stream(self, replica: Replica) -> asyncio.subprocess.Process:
        process = await self.exec(self.stream_argv(replica.spec, replica.slot), replica.spec.env, replica.instance)
        log.info("stream %s: started replica %s (pid %d)", replica.spec.name, replica.instance, process.pid)
        return process

    # -- jobs

    async def observe_jobs(self) -> dict[str, JobWorkload]:
        return {name: job.workload() for name, job in self.jobs.items()}

    async def ensure_job(
        self, spec: rpb.JobSpec, spec_hash: str, attempts: int, models: Sequence[rpb.ModelSpec]
    ) -> None:
        job = self.jobs.get(spec.name)
        if job is not None and job.spec_hash == spec_hash:
            return
        if job is not None:
            log.info("job %s: spec changed, replacing its process", spec.name)
            await self.remove_job(spec.name)
        copy = rpb.JobSpec()
        copy.CopyFrom(spec)
        job = self.jobs[spec.name] = LocalJob(self, copy, spec_hash, attempts)
        await job.group.scale(1)

    async def remove_job(self, job: str) -> None:
        local = self.jobs.pop(job, None)
        if local is not None:
            await local.group.scale(0)

    # -- streams

    async def observe_streams(self) -> dict[str, Workload]:
        return {name: group.workload() for name, group in self.streams.items()}

    async def ensure_stream(self, spec: rpb.StreamSpec, spec_hash: str, models: Sequence[rpb.ModelSpec]) -> None:
        copy = rpb.StreamSpec()
        copy.CopyFrom(spec)
        group = self.streams.get(spec.name)
        if group is None:
            supervision = Supervision("stream", self.spawn_stream)
            group = self.streams[spec.name] = ProcessGroup(self, copy, spec_hash, supervision)
        elif group.spec_hash != spec_hash:
            log.info("stream %s: spec changed, rolling its replicas one at a time", spec.name)
            group.change_spec(copy, spec_hash)
        alive = frozenset(r.instance for r in group.replicas + group.outdated if r.running)
        await group.roll(stream_replicas(spec), alive)

    async def remove_stream(self, stream: str) -> None:
        group = self.streams.pop(stream, None)
        if group is not None:
            await group.scale(0)

    async def close_jobs_and_streams(self) -> None:
        await asyncio.gather(*(self.remove_job(name) for name in list(self.jobs)),
                             *(self.remove_stream(name) for name in list(self.streams)))
