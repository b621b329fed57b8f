"""The local backend: each runtime replica is a supervised process on this machine.

A replica runs `modelgw runtime serve --registry ...` on a free loopback port and
registers itself in etcd; the supervisor restarts it with exponential backoff when it
exits, under a new instance name (as a new pod would be), so the dead one's endpoint
record expires with its lease. Replicas die with the reconciler that started them
(PR_SET_PDEATHSIG, see modelgw.process), so a standby that takes over never finds orphans competing with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from modelgw.net import free_port
from modelgw.process import PARENT_PID_ENV
from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import Workload

log = logging.getLogger(__name__)

class Replica:
    """One slot of a runtime: a process, restarted whenever it exits until stopped."""

    def __init__(self, group: "ProcessGroup", slot: int) -> None:
        self.group = group
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.instance = ""
        self.restarts = 0
        self.recent_crashes: list[float] = []
        self.last_exit: int | None = None
        self.stopping = False
        self.task = asyncio.get_running_loop().create_task(self._supervise(), name=f"replica-{group.spec.name}-{slot}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self.stopping:
            self.instance = f"{self.group.spec.name}-{self.slot}-{secrets.token_hex(3)}"
            started = time.monotonic()
            try:
                self.process = await self.group.backend.spawn(self.group.spec, self.instance)
            except OSError as exc:
                log.error("runtime %s: cannot start replica %d: %s", self.group.spec.name, self.slot, exc)
                code = -1
            else:
                code = await self.process.wait()
            if self.stopping:
                return
            self.last_exit = code
            self.restarts += 1
            now = time.monotonic()
            self.recent_crashes = [t for t in self.recent_crashes if now - t < 120] + [now]
            if now - started > 60:
                backoff = 0.5  # it ran for a while: this is a fresh failure, not a crash loop
            log.warning(
                "runtime %s: replica %s exited with code %s; restarting in %.1fs",
                self.group.spec.name, self.instance, code, backoff,
            )  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def stop(self, grace: float) -> None:
        """SIGTERM (the runtime drains and deregisters), SIGKILL after `grace` seconds."""
        self.stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("replica %s did not stop within %.0fs; killing it", self.instance, grace)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class ProcessGroup:
    def __init__(self, backend: "LocalBackend", spec: rpb.RuntimeSpec, spec_hash: str) -> None:
        self.backend = backend
        self.spec = spec
        self.spec_hash = spec_hash
        self.replicas: list[Replica] = []

    async def scale(self, count: int) -> None:
        while len(self.replicas) < count:
            self.replicas.append(Replica(self, len(self.replicas)))
        surplus, self.replicas = self.replicas[count:], self.replicas[:count]
        await asyncio.gather(*(r.stop(self.backend.stop_grace) for r in surplus))

    def workload(self) -> Workload:
        problems = []
        for r in self.replicas:
            if len(r.recent_crashes) >= 3:
                problems.append(
                    f"replica {r.slot} keeps crashing (last exit code {r.last_exit}, "
                    f"{len(r.recent_crashes)} exits in 2 minutes); see {self.backend.log_path(r.instance)}"
                )
        return Workload(
            runtime=self.spec.name,
            spec_hash=self.spec_hash,
            replicas=len(self.replicas),
            running=sum(1 for r in self.replicas if r.running),
            restarts=sum(r.restarts for r in self.replicas),
            problems=problems,
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

    def argv(self, spec: rpb.RuntimeSpec, instance: str, port: int) -> list[str]:
        """The replica's command line. A spec's own `command` may use the placeholders
        {python} {host} {port} {etcd} {prefix} {runtime} {instance} {kind}."""
        values = dict(
            python=self.python, host=self.host, port=port, etcd=self.etcd, prefix=self.prefix,
            runtime=spec.name, instance=instance, kind=spec.kind,
        )  # fmt: skip
        if spec.command:
            return [part.format(**values) for part in spec.command]
        argv = [
            self.python, "-m", "modelgw", "runtime", "serve",
            "--kind", spec.kind,
            "--host", self.host,
            "--port", str(port),
            "--registry", self.etcd,
            "--prefix", self.prefix,
            "--runtime", spec.name,
            "--instance", instance,
            "--lease-ttl", str(self.lease_ttl),
        ]  # fmt: skip
        for key, value in sorted(spec.options.items()):
            argv += ["--option", f"{key}={value}"]
        return argv

    async def spawn(self, spec: rpb.RuntimeSpec, instance: str) -> asyncio.subprocess.Process:
        port = free_port(self.host)
        argv = self.argv(spec, instance, port)
        # the replica arms PR_SET_PDEATHSIG itself (modelgw.process): it dies with us
        env = {**os.environ, **dict(spec.env), PARENT_PID_ENV: str(os.getpid())}
        with open(self.log_path(instance), "ab") as out:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        log.info("runtime %s: started replica %s (pid %d, port %d)", spec.name, instance, process.pid, port)
        return process

    async def observe(self) -> dict[str, Workload]:
        return {name: group.workload() for name, group in self.groups.items()}

    async def ensure(self, spec: rpb.RuntimeSpec, spec_hash: str) -> None:
        group = self.groups.get(spec.name)
        if group is not None and group.spec_hash != spec_hash:
            # a changed spec needs new processes: replace the whole group
            await group.scale(0)
            group = None
        if group is None:
            copy = rpb.RuntimeSpec()
            copy.CopyFrom(spec)
            group = self.groups[spec.name] = ProcessGroup(self, copy, spec_hash)
        await group.scale(spec.replicas)

    async def remove(self, runtime: str) -> None:
        group = self.groups.pop(runtime, None)
        if group is not None:
            await group.scale(0)

    async def close(self) -> None:
        await asyncio.gather(*(self.remove(name) for name in list(self.groups)))
