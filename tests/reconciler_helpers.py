"""Helpers for the reconciler and endpoint-registration tests: real `modelgw` processes in
their own process groups (so that every replica they fork dies with the test, pass or
fail), replica processes found by their command line, registry reads, and polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class Process:
    """A `python -m modelgw ...` process in a session of its own (its replicas join its
    process group), output to `log`."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self.args = args
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "modelgw", *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
            )
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.popen.wait(timeout)

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait (a clean stop); SIGKILL the whole group if it hangs."""
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill_group()
        return self.popen.returncode

    def kill_group(self) -> None:
        """SIGKILL the process and everything left in its process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


class Processes:
    """Processes a test starts; `cleanup()` (from a fixture finalizer) ends them all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    def start(self, name: str, *args: str) -> Process:
        process = Process(self.directory / f"{name}.log", *args)
        self.started.append(process)
        return process

    def reconciler(self, name: str, etcd: str, prefix: str, *, lease_ttl: int = 3, resync: float = 1.0) -> Process:
        return self.start(
            name, "reconcile", "--etcd", etcd, "--prefix", prefix,
            "--identity", name, "--lease-ttl", str(lease_ttl), "--resync-seconds", str(resync),
            "--data-dir", str(self.directory / name),
        )

    def runtime(self, name: str, etcd: str, prefix: str, runtime: str, *extra: str, lease_ttl: int = 3) -> Process:
        """A runtime replica started by hand (no reconciler), registering as `name`."""
        return self.start(
            name, "runtime", "serve", "--kind", "python", "--port", "0", "--registry", etcd, "--prefix", prefix,
            "--runtime", runtime, "--instance", name, "--lease-ttl", str(lease_ttl), *extra,
        )

    def cleanup(self) -> None:
        for process in self.started:
            process.kill_group()

    def logs(self) -> str:
        """Every log of this test (reconcilers and their replicas), for failure messages."""
        parts = []
        for path in sorted(self.directory.rglob("*.log")):
            parts.append(f"==== {path.relative_to(self.directory)}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def replica_processes(prefix: str, registry: str | None = None) -> dict[str, int]:
    """{instance: pid} of the live `modelgw runtime serve` processes registering under
    `prefix` (and with the etcd endpoint `registry`, when given: two suites on one machine
    may use the same prefix against different etcds), read from /proc (a zombie has no
    command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in argv and "--instance" in argv and _option(argv, "--prefix") == prefix and (
            registry is None or _option(argv, "--registry") == registry
        ):
            found[_option(argv, "--instance")] = int(entry)
    return found


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def until(check: Callable[[], Awaitable[T] | T], what: str, timeout: float = 60.0, every: float = 0.2,
                logs: Callable[[], str] | None = None) -> T:
    """Poll check() until it returns something truthy and return that: a bound on the
    wait (generous, for a loaded CI machine), never a timing assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:.0f}s" + (f"\n{logs()}" if logs else ""))
        await asyncio.sleep(every)


async def endpoints(store: RegistryStore, runtime: str) -> dict[str, rpb.Endpoint]:
    return {e.instance: e for e in (await store.list_endpoints(runtime)).endpoints}


def model_states(endpoint: rpb.Endpoint) -> dict[tuple[str, str], str]:
    return {(m.name, m.version): rpb.LoadedModel.State.Name(m.state) for m in endpoint.models}


async def ready_endpoints(store: RegistryStore, runtime: str, model: tuple[str, str] | None = None) -> dict[str, rpb.Endpoint]:
    """The ready endpoints of a runtime (with `model` READY on them, when given)."""
    return {
        name: e for name, e in (await endpoints(store, runtime)).items()
        if e.ready and (model is None or model_states(e).get(model) == "READY")
    }


async def key_info(store: RegistryStore, key: bytes):
    """The etcd KeyValue at `key` (mod_revision, lease, ...), or None."""
    response = await store.etcd.range(key)
    return response.kvs[0] if response.kvs else None


def write_affine_models(path: Path, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A python-kind model file: for each name, a class computing y = x @ w + b (FP32,
    4 features in, 3 out, batched) with the given w and b, for the test to check against."""
    classes = []
    for name, (w, b) in weights.items():
        classes.append(textwrap.dedent(f"""
            class {name}(Model):
                inputs = [TensorSpec("x", "FP32", [-1, 4])]
                outputs = [TensorSpec("y", "FP32", [-1, 3])]
                max_batch_size = 8

                def load(self):
                    self.w = np.array({w.tolist()!r}, dtype=np.float32)
                    self.b = np.array({b.tolist()!r}, dtype=np.float32)

                def predict(self, inputs, parameters):
                    return {{"y": inputs["x"] @ self.w + self.b}}
        """))
    path.write_text("import numpy as np\nfrom modelgw.runtimes.model import Model, TensorSpec\n" + "".join(classes))
    return path


def affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Wait for processes to exit; the ones still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]
