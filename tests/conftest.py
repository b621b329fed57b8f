"""Shared fixtures: a real etcd on a free loopback port, ports, process helpers, and torch on one thread."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelgw.registry.etcd_server import LocalEtcd

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[LocalEtcd]:
    """One real etcd for the session; tests isolate themselves with `etcd_prefix`."""
    with LocalEtcd() as server:
        yield server


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix of this test's own, so tests sharing the session's etcd never meet."""
    return f"/modelgw-test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[LocalEtcd]:
    """An etcd of this test's own, for tests that stop, restart or compact it."""
    server = LocalEtcd(data_dir=tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`):
    the test machines' cores are shared, and tiny models gain nothing from more."""
    import torch  # here, not at the top: most test modules never load torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def modelgw_command(*args: str) -> list[str]:
    """argv that runs the modelgw CLI with this interpreter (works without the venv's bin)."""
    return [sys.executable, "-m", "modelgw", *args]


def spawn(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a modelgw subcommand as a real process, output to `log` (or inherited)."""
    out = open(log, "ab") if log else None  # noqa: SIM115 (handed to the child process)
    return subprocess.Popen(
        modelgw_command(*args),
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
