"""Run a local single-member etcd (the `etcd` binary from Debian's etcd-server package).

Used by `modelgw up` and by the tests: a real etcd on loopback with its own data dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from modelgw.net import free_port, port_free
from modelgw.process import tied_to_this_process


class LocalEtcd:
    """A supervised etcd process. `endpoint` is "127.0.0.1:PORT" once started."""

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        binary: str = "etcd",
        die_with_parent: bool = False,
    ) -> None:
        found = shutil.which(binary)
        if not found:
            raise FileNotFoundError(
                f"'{binary}' is not on PATH; install it with: apt-get install -y etcd-server"
            )
        self.binary = found
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="modelgw-etcd-"))
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        # SIGTERM etcd when this process dies, even by SIGKILL (modelgw.process); call
        # start() from the main thread then, as the death signal follows the thread
        self.die_with_parent = die_with_parent

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = 30.0) -> LocalEtcd:
        """Start etcd and wait until it answers healthy. OSError when one of its ports is
        taken, RuntimeError when it exits, TimeoutError when it never gets healthy."""
        for port, what in ((self.client_port, "client"), (self.peer_port, "peer")):
            if not port_free(self.host, port):
                raise OSError(f"etcd's {what} port {self.host}:{port} is already in use")
        client = f"http://{self.endpoint}"
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            self.binary,
            "--name", "modelgw",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"modelgw={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "error",
            "--logger", "zap",
        ]
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        if self.die_with_parent:
            args, env = tied_to_this_process(args, env)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_healthy(timeout)
        return self

    def healthy(self) -> bool:
        """Whether an etcd answers healthy on this client port now."""
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as resp:
                return resp.status == 200 and b"true" in resp.read()
        except OSError:
            return False

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with code {self.process.returncode}; see {self.log_path}"
                )
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd did not become healthy on {self.endpoint}")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        """Stop etcd (SIGTERM, or SIGKILL when kill=True); the data dir is kept."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): its sockets stay open but nothing answers, and its leases
        keep running out as wall-clock time passes, like a member stuck on a disk or a VM
        paused; resume() thaws it."""
        assert self.process is not None, "start() first"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw an etcd frozen by pause() (SIGCONT)."""
        assert self.process is not None, "start() first"
        self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> None:
        """Start again on the same ports and data dir (e.g. after stop() in a test)."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
