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

from modelgw.net import free_port


class LocalEtcd:
    """A supervised etcd process. `endpoint` is "127.0.0.1:PORT" once started."""

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        binary: str = "etcd",
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

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> "LocalEtcd":
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
        ]  # fmt: skip
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
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
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self, timeout: float = 30.0) -> None:
        """Start again on the same ports and data dir (e.g. after stop() in a test)."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "LocalEtcd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
