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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from modelgw.net import free_port
from modelgw.process import PARENT_PID_ENV, python_module
from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import Workload, custom_command, spec_hash

log = logging.getLogger(__name__)

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
        while not self.stopping:
            self.instance = f"{name}-{self.slot}-{secrets.token_hex(3)}"
            started = time.monotonic()
            try:
                process = await self.group.backend.spawn(self.spec, self.instance)
            except (OSError, ValueError) as exc:
                log.error("runtime %s: cannot start replica %d: %s", name, self.slot, exc)
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
            self.restarts += 1
            now = time.monotonic()
            self.recent_crashes = [t for t in self.recent_crashes if now - t < 120] + [now]
            if now - started > 60:
                backoff = 0.5  # it ran for a while: this is a fresh failure, not a crash loop
            log.warning(
                "runtime %s: replica %s exited with code %s; restarting in %.1fs (log: %s)",
                name, self.instance, code, backoff, self.group.backend.log_path(self.instance),
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
    rolls, the outdated ones still serving until new ones are ready."""

    def __init__(self, backend: LocalBackend, spec: rpb.RuntimeSpec, spec_hash: str) -> None:
        self.backend = backend
        self.spec = spec
        self.spec_hash = spec_hash
        self.replicas: list[Replica] = []
        self.outdated: list[Replica] = []
        self.outdated_hash = ""  # the spec hash the outdated replicas run (the last one rolled from)
        self._slots = 0

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

    async def spawn(self, spec: rpb.RuntimeSpec, instance: str) -> asyncio.subprocess.Process:
        # `modelgw runtime serve` binds any free port itself and registers it (no race for
        # a port picked here); a custom command gets a port that is free right now
        port = free_port(self.host) if spec.command else 0
        argv = self.argv(spec, instance, port)
        # the replica arms PR_SET_PDEATHSIG itself (modelgw.process): it dies with us
        env = {**os.environ, **dict(spec.env), PARENT_PID_ENV: str(os.getpid())}
        out = os.open(self.log_path(instance), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        finally:
            os.close(out)  # the child has its own copy
        log.info("runtime %s: started replica %s (pid %d)", spec.name, instance, process.pid)
        return process

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
        await asyncio.gather(*(self.remove(name) for name in list(self.groups)))
