"""Third-party OIP servers for the attach tests, each in a virtualenv of its own, and the
`modelgw runtime attach` process beside them: KServe's Python ModelServer, and Triton
itself (the tritonserver binary that the nvidia-pytriton wheel on PyPI ships, run here
directly on a model repository of python-backend models, CPU only).

    python = third_party_venv(KSERVE)         # built once, then reused (a few seconds)
    server = KServeServer(python, ["double"], log)   # tests/kserve_server.py, ready
    adapter = AttachProcess(etcd, prefix, "ks", server.grpc_url, log)

The virtualenvs live in the checkout (.venv-kserve, .venv-pytriton; git ignores them) and
are built on first use with pip from PyPI, as bench/runtime_throughput.py builds KServe's:
kserve 0.21.0 took 58 s and nvidia-pytriton 0.7.0 35 s on a 2-core machine with a cold
pip cache, nothing later (a marker file names the package spec they were built with; a
different spec rebuilds). Their packages must never meet modelgw's venv: KServe and
tritonclient pin protobuf and grpcio in ways ours do not.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from conftest import REPO, spawn
from gateway_helpers import stop_process, wait_until

from modelgw.net import free_port
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class ThirdParty:
    venv: Path
    packages: tuple[str, ...]
    check: str  # python code that must run in the venv once it is built


KSERVE = ThirdParty(REPO / ".venv-kserve", ("kserve==0.21.0",), "import kserve")
PYTRITON = ThirdParty(REPO / ".venv-pytriton", ("nvidia-pytriton==0.7.0",), "import pytriton")
MARKER = ".modelgw-built"
KSERVE_SERVER = REPO / "tests" / "kserve_server.py"


def third_party_venv(what: ThirdParty) -> Path:
    """The venv's python, building the venv first if it is missing or was built otherwise."""
    python = what.venv / "bin" / "python"
    spec = " ".join(what.packages)
    marker = what.venv / MARKER
    lock_path = what.venv.with_name(what.venv.name + ".lock")
    with open(lock_path, "w") as lock:  # another pytest run may be building it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == spec and python.exists():
            return python
        shutil.rmtree(what.venv, ignore_errors=True)
        started = time.monotonic()
        for command in ([sys.executable, "-m", "venv", str(what.venv)],
                        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *what.packages],
                        [str(python), "-c", what.check]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building {what.venv} failed at {command}:\n{result.stdout}\n{result.stderr}")
        marker.write_text(spec)
        print(f"built {what.venv} ({spec}) in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return python


def server_ready(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        try:
            return pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=2).ready
        except grpc.RpcError:
            return False


class ServerProcess:
    """A third-party server process; `grpc_url` once ServerReady says ready."""

    def __init__(self, argv: Sequence[str], log: Path, grpc_port: int, timeout: float = 90.0,
                 env: dict[str, str] | None = None) -> None:
        self.grpc_port = grpc_port
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.log = log
        out = open(log, "ab")  # noqa: SIM115 (handed to the child process)
        self.process = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        try:
            wait_until(self._ready, timeout, f"{argv[0]} not ready:\n{self.output()}")
        except BaseException:
            self.kill()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
        return server_ready(self.grpc_url)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def stop(self) -> int:
        return stop_process(self.process)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class KServeServer(ServerProcess):
    """KServe's ModelServer serving tests/kserve_server.py's Double models (y = x * 2)."""

    def __init__(self, python: Path, models: Sequence[str], log: Path) -> None:
        port = free_port()
        argv = [str(python), str(KSERVE_SERVER), "--grpc-port", str(port), "--http-port", str(free_port())]
        for model in models:
            argv += ["--model", model]
        super().__init__(argv, log, port)


class AttachProcess:
    """`modelgw runtime attach` for one server."""

    def __init__(self, etcd: str, prefix: str, runtime: str, target: str, log: Path, *extra: str,
                 lease_ttl: int = 5) -> None:
        self.instance = f"{runtime}-{uuid.uuid4().hex[:6]}"
        self.log = log
        self.process = spawn(
            "runtime", "attach", "--target", target, "--runtime", runtime, "--etcd", etcd, "--prefix", prefix,
            "--instance", self.instance, "--lease-ttl", str(lease_ttl), "--poll-interval", "0.5", *extra,
            log=log,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def stop(self) -> int:
        return stop_process(self.process)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- Triton: the real tritonserver binary that the nvidia-pytriton wheel ships ---------------

TRITON_PYTHON_MODEL = '''
import os
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    """y = x * FACTOR, plus pid: a Triton python-backend model written for the attach tests."""

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = pb_utils.Tensor("y", (x * FACTOR).astype(np.float32))
            pid = pb_utils.Tensor("pid", np.array([os.getpid()], dtype=np.int64))
            responses.append(pb_utils.InferenceResponse([y, pid]))
        return responses
'''

TRITON_CONFIG = """backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "pid" data_type: TYPE_INT64 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def triton_repository(root: Path, factors: dict[str, int]) -> Path:
    """A Triton model repository of python-backend models {name: y = x * factor}, version 1."""
    for name, factor in factors.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(TRITON_CONFIG)
        (root / name / "1" / "model.py").write_text(TRITON_PYTHON_MODEL.replace("FACTOR", str(factor)))
    return root


class TritonServer(ServerProcess):
    """tritonserver from PyTriton's wheel (Triton 2.51 with its python backend, CPU only),
    --model-control-mode=explicit with `load` loaded at start; metrics on `metrics_url`."""

    def __init__(self, python: Path, repository: Path, load: Sequence[str], work: Path, log: Path) -> None:
        site = Path(subprocess.run([str(python), "-c", "import pytriton, pathlib; "
                                    "print(pathlib.Path(pytriton.__file__).parent.parent)"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        dist = site / "pytriton" / "tritonserver"
        # the python backend wants its stub beside it, for the Python it embeds (what
        # PyTriton itself does before it starts the server)
        backends = work / "backends"
        shutil.copytree(dist / "backends", backends)
        version = subprocess.run([str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
        grpc_port, metrics_port = free_port(), free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        argv = [
            str(dist / "bin" / "tritonserver"), f"--model-repository={repository}",
            f"--backend-directory={backends}", "--model-control-mode=explicit",
            *[f"--load-model={name}" for name in load],
            f"--grpc-port={grpc_port}", f"--http-port={free_port()}", f"--metrics-port={metrics_port}",
        ]
        env = {**os.environ, "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"),
               "PATH": f"{python.parent}:{os.environ['PATH']}"}
        super().__init__(argv, log, grpc_port, env=env)
