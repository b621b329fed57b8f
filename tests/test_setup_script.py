"""scripts/setup.sh picks the torch build a machine should get: the CUDA build from PyPI
only where an NVIDIA GPU is present, else PyTorch's CPU-only index, else (that index
unreachable, as on machines that reach only PyPI) pip as configured. `--torch-plan` runs
that decision alone, with a fake `nvidia-smi` on PATH and the index served on loopback."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelgw.net import free_port

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(
    Path("/proc/driver/nvidia/version").exists(), reason="this machine has an NVIDIA driver: the GPU branch is always taken"
)


def plan(tmp_path: Path, nvidia_smi_exit: int | None, index: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.unlink(missing_ok=True)
    if nvidia_smi_exit is not None:
        fake.write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\nexit {nvidia_smi_exit}\n")
        fake.chmod(0o755)
    # PATH without any real nvidia-smi: our bin, then the system's basic tools
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "TORCH_CPU_INDEX": index, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SETUP), "--torch-plan"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def cpu_index() -> Iterator[str]:
    """A loopback stand-in for the CPU wheel index: answers 200 for /torch/."""

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    finally:
        server.shutdown()


def test_a_machine_with_an_nvidia_gpu_gets_the_cuda_build(tmp_path: Path, cpu_index: str) -> None:
    assert plan(tmp_path, 0, cpu_index) == "cuda"


def test_a_machine_without_a_gpu_gets_the_cpu_index(tmp_path: Path, cpu_index: str) -> None:
    assert plan(tmp_path, None, cpu_index) == "cpu-index"
    # an nvidia-smi that finds no GPU (a driver-less container) counts as no GPU
    assert plan(tmp_path, 9, cpu_index) == "cpu-index"


def test_an_unreachable_cpu_index_falls_back_to_pip_as_configured(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/whl/cpu"  # nothing listens there
    assert plan(tmp_path, None, closed) == "configured"


def test_the_readme_test_command_shows_skip_reasons() -> None:
    """`-ra` lives in the pytest config, so the README's command, CI and a bare pytest
    print the same summary of skips and failures."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "-ra" in config["tool"]["pytest"]["ini_options"]["addopts"].split()
