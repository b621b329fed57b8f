"""Runtime kinds as an extension point, end to end: a tiny kind installed out of tree (a
module and its `*.dist-info` with an entry point in `modelgw.runtime_kinds`) is accepted by
the registry, started by the local reconciler, served by `modelgw runtime serve` and
reached through the gateway with unmodified tritonclient. A kind that is not installed
where the runtime runs is refused at start with one line, and the reconciler's status says
why."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import REPO, modelgw_command
from gateway_helpers import GatewayProcess, wait_model_ready
from reconciler_helpers import Processes, until
from runtime_helpers import infer_inputs

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

KIND = "tinyscale"
FORMAT = "tiny-factor"

KIND_MODULE = '''\
"""An out-of-tree runtime kind: the model file holds a number; y = x * that number."""

import numpy as np

from modelgw.runtimes.model import Model, TensorSpec
from modelgw.runtimes.storage import local_path


class TinyScale(Model):
    inputs = [TensorSpec("x", "FP32", [-1, -1])]
    outputs = [TensorSpec("y", "FP32", [-1, -1])]
    max_batch_size = 8

    def load(self):
        self.factor = np.float32(local_path(self.uri).read_text())

    def predict(self, inputs, parameters):
        return {"y": inputs["x"] * self.factor}
'''


def install_kind(site: Path) -> Path:
    """A distribution `modelgw-tinyscale` in `site` (a directory for PYTHONPATH), declaring
    the kind as an entry point, as `pip install` of a platform team's package would."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "modelgw_tinyscale.py").write_text(KIND_MODULE)
    dist_info = site / "modelgw_tinyscale-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: modelgw-tinyscale\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[modelgw.runtime_kinds]\n{KIND} = modelgw_tinyscale:TinyScale\n")
    return site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return install_kind(tmp_path / "site")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


def run_modelgw(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        modelgw_command(*args), capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_serve_help_lists_the_installed_kinds(site: Path) -> None:
    help_text = run_modelgw("runtime", "serve", "--help", env={"PYTHONPATH": str(site)}).stdout
    kinds_line = " ".join(help_text.split())  # argparse wraps the help text
    assert f"runtime kind, one of: llm, onnx, python, pytorch, {KIND}" in kinds_line, help_text


def test_a_runtime_of_an_unknown_kind_exits_with_one_line(tmp_path: Path) -> None:
    done = run_modelgw("runtime", "serve", "--kind", "nosuchkind", "--port", "0", "--model", f"m={tmp_path}")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "modelgw runtime: error: unknown runtime kind 'nosuchkind' (not built in, and no installed package "
        "declares it as a 'modelgw.runtime_kinds' entry point); installed kinds: llm, onnx, python, pytorch"
    ], done.stderr


async def test_an_out_of_tree_kind_is_registered_reconciled_and_served(
    etcd_server, site: Path, tmp_path: Path, processes: Processes
) -> None:
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    factor_file = tmp_path / "model" / "factor.txt"
    factor_file.parent.mkdir()
    factor_file.write_text("3")
    runtime = rpb.RuntimeSpec(name="tiny", kind=KIND, model_formats=[FORMAT], replicas=1)
    # the kind is installed only where the runtime runs: this test's PYTHONPATH reaches
    # the replica through the runtime's env, not the reconciler's or the gateway's
    runtime.env["PYTHONPATH"] = str(site)
    model = rpb.ModelSpec(name="tripler")
    model.versions.add(version="1", uri=f"file://{factor_file}", format=FORMAT, runtime="tiny")
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await store.apply_runtime(runtime)
        await store.apply_model(model)

    processes.reconciler("reconciler", etcd_server.endpoint, prefix)
    gateway = GatewayProcess(etcd_server.endpoint, prefix, tmp_path / "gateway.log")
    try:
        wait_model_ready(gateway.grpc_url, "tripler", timeout=120, what=processes.logs())
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        with triton.InferenceServerClient(gateway.grpc_url) as client:
            y = client.infer("tripler", infer_inputs({"x": x})).as_numpy("y")
        np.testing.assert_array_equal(y, x * 3)
    finally:
        gateway.kill()


async def test_the_reconciler_status_says_why_a_kind_cannot_start(etcd_server, processes: Processes) -> None:
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        # the registry accepts any kind name: it cannot know what the runtime's machine has installed
        await store.apply_runtime(rpb.RuntimeSpec(name="ghost", kind="nosuchkind", model_formats=["x"], replicas=1))
        processes.reconciler("reconciler", etcd_server.endpoint, prefix)

        async def degraded() -> rpb.Condition | None:
            status = await store.get_runtime_status("ghost")
            condition = {c.type: c for c in status.conditions}.get("Degraded") if status else None
            return condition if condition is not None and condition.status == "True" else None

        condition = await until(degraded, "ghost reported as degraded", timeout=90, logs=processes.logs)
        assert "keeps crashing (last exit code 1" in condition.message
        assert "unknown runtime kind 'nosuchkind'" in condition.message, condition.message
        assert ".log" in condition.message  # where to read more

