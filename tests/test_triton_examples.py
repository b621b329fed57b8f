"""Triton's own client examples (github.com/triton-inference-server/client,
src/python/examples), run unmodified against the gateway serving Triton's QA models as
python-kind models (tests/triton_qa_models.py).

The examples are not part of this repository and nothing is downloaded here: the test
runs only when TRITON_CLIENT_EXAMPLES names a checkout's examples directory, e.g.

    git clone --depth 1 https://github.com/triton-inference-server/client /tmp/triton-client
    pip install --target /tmp/example-deps pillow      # the image examples import PIL
    TRITON_CLIENT_EXAMPLES=/tmp/triton-client/src/python/examples \\
    TRITON_EXAMPLES_PYTHONPATH=/tmp/example-deps \\
        .venv/bin/python -m pytest -q tests/test_triton_examples.py

The examples call localhost:8000 (HTTP) and localhost:8001 (gRPC), some with no way to say
otherwise, so the gateway listens there: the test is skipped when those ports are taken.
An example passes when it exits 0 (grpc_explicit_int_content_client.py exits 1 after
printing its PASS line: for it, the line counts). The ones expected to fail are listed
below with the reason; they are strict xfails, so the list stays true.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from gateway_helpers import Fleet, wait_model_ready
from triton_qa_models import QA_MODELS, qa_specs

from modelgw.net import port_free

EXAMPLES = os.environ.get("TRITON_CLIENT_EXAMPLES", "")
EXTRA_PATH = os.environ.get("TRITON_EXAMPLES_PYTHONPATH", "")

pytestmark = pytest.mark.skipif(
    not EXAMPLES, reason="set TRITON_CLIENT_EXAMPLES to Triton's src/python/examples (see the module docstring)"
)

# They need shared memory, which cannot work through a network gateway (the gateway and
# the runtimes cannot map the client's memory): not run.
SHARED_MEMORY = {
    "simple_grpc_shm_client.py", "simple_grpc_shm_string_client.py", "simple_grpc_cudashm_client.py",
    "simple_http_shm_client.py", "simple_http_shm_string_client.py", "simple_http_cudashm_client.py",
    "reuse_infer_objects_client.py",
}

IMAGE_ARGS = ["-m", "densenet_onnx", "-c", "3", "-s", "INCEPTION"]
ARGS: dict[str, list[str]] = {
    # over gRPC: its HTTP path imports attrdict, which no longer imports on Python >= 3.10
    "image_client.py": [*IMAGE_ARGS, "-i", "grpc", "-u", "localhost:8001"],
    "grpc_image_client.py": IMAGE_ARGS,
    "ensemble_image_client.py": ["-c", "3"],
    "memory_growth_test.py": ["-r", "20"],
}
# these read an image file (or a folder of them) after their flags
TAKES_IMAGE = {"image_client.py", "grpc_image_client.py", "ensemble_image_client.py"}

EXPECTED_FAILURES = {
    "simple_grpc_health_metadata.py": "checks that the server's name is 'triton'; modelgw does not pretend to be Triton",
    "simple_http_health_metadata.py": "checks that the server's name is 'triton'; modelgw does not pretend to be Triton",
    "simple_grpc_model_control.py": (
        "expects exactly 8 models in the repository index (the QA set here has 9), then StatusCode.INTERNAL "
        "and 'failed to poll from model repository' for a file override, which the gateway (it holds no "
        "model files) refuses as INVALID_ARGUMENT"
    ),
    "simple_http_model_control.py": (
        "expects exactly 7 models in the repository index (its gRPC twin expects 8); the QA set here has 9"
    ),
}

# they change what the repository serves (unload, config overrides): the registry is put
# back as it was after them, as a fresh server would be
CHANGE_THE_REPOSITORY = {"simple_grpc_model_control.py", "simple_http_model_control.py"}

PASS_LINE = {"grpc_explicit_int_content_client.py": "PASS: explicit int"}


def example_names() -> list[str]:
    if not EXAMPLES:
        return []
    return sorted(p.name for p in Path(EXAMPLES).glob("*.py") if p.name not in SHARED_MEMORY)


@pytest.fixture(scope="module")
def fleet(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not (port_free("127.0.0.1", 8000) and port_free("127.0.0.1", 8001)):
        pytest.skip("the examples call localhost:8000/8001, and a server listens there")
    root = tmp_path_factory.mktemp("triton-examples")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(*qa_specs("py"))
        served = fleet.gateway(grpc_port=8001, http_port=8000)
        fleet.replica("py", "python")
        for model in QA_MODELS:
            wait_model_ready(served.grpc_url, model, what=f"(logs in {root})")
        yield fleet
    finally:
        fleet.close()


def restore(fleet: Fleet) -> None:
    """The QA models' records as first written, each served again (Triton's load waits)."""
    fleet.apply(*qa_specs("py"))
    client = triton.InferenceServerClient(fleet.gateways[0].grpc_url)
    try:
        for model in QA_MODELS:
            client.load_model(model)
    finally:
        client.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG for the image examples, written with PIL where the examples run."""
    path = tmp_path_factory.mktemp("image") / "mug.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    code = "import sys, numpy as np; from PIL import Image; Image.fromarray(np.load(sys.argv[1])).save(sys.argv[2])"
    raw = path.with_suffix(".npy")
    np.save(raw, pixels)
    result = subprocess.run([sys.executable, "-c", code, str(raw), str(path)], env=example_env(), capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"PIL is not importable where the examples run: {result.stderr.decode()[-300:]}")
    return path


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    if EXTRA_PATH:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (EXTRA_PATH, env.get("PYTHONPATH", "")) if p)
    return env


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=EXPECTED_FAILURES[name], strict=True))
        if name in EXPECTED_FAILURES else name
        for name in example_names()
    ],
)
def test_example_runs_unmodified(fleet: Fleet, image: Path, script: str, tmp_path: Path) -> None:
    argv = [sys.executable, str(Path(EXAMPLES) / script), *ARGS.get(script, [])]
    if script in TAKES_IMAGE:
        argv.append(str(image))
    try:
        result = subprocess.run(argv, env=example_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path)
    finally:
        if script in CHANGE_THE_REPOSITORY:
            restore(fleet)
    output = result.stdout + result.stderr
    passed = PASS_LINE[script] in output if script in PASS_LINE else result.returncode == 0
    assert passed, f"{script} exited {result.returncode}:\n{output[-3000:]}"
