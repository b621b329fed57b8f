"""Helpers for the job tests: a small TorchScript model and its direct run (the expected
predictions, from the same weights), input tables, `modelgw job run` as a real process,
the registry's Job records, and reading a job's output back through its checkpoint.

The python-kind classes at the bottom are served in process (IN_PROCESS jobs) or by
runtime replicas as `tests.job_helpers:Name` (the processes' working directory is the
repository root)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from modelgw.pipelines.jobs import output_parts
from modelgw.pipelines.tables import read_output
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore
from modelgw.runtimes.errors import InvalidInput
from modelgw.runtimes.model import REQUEST_METADATA, Model, TensorSpec

FEATURES = 8
MLP_SIGNATURE = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, FEATURES]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "label", "datatype": "INT64", "shape": [-1]}],
}


def build_mlp(directory: Path) -> Path:
    """A TorchScript MLP: scores = relu(x W1 + b1) W2 + b2, label = argmax(scores). No
    max_batch_size: each request is one predict call of the rows it carries."""
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(13)
            self.w1 = torch.nn.Parameter(torch.randn(FEATURES, 16, generator=generator))
            self.b1 = torch.nn.Parameter(torch.randn(16, generator=generator))
            self.w2 = torch.nn.Parameter(torch.randn(16, 3, generator=generator))
            self.b2 = torch.nn.Parameter(torch.randn(3, generator=generator))

        def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores = torch.relu(features @ self.w1 + self.b1) @ self.w2 + self.b2
            return scores, scores.argmax(dim=1)

    path = directory / "mlp.pt"
    torch.jit.save(torch.jit.script(Mlp().eval()), str(path))
    (directory / "mlp.json").write_text(json.dumps(MLP_SIGNATURE))
    return path


def run_mlp(path: Path, features: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The model run directly on the same rows, in the job's batches (a matmul's float
    rounding may depend on how many rows it multiplies at once, so the batches match)."""
    import torch

    torch.set_num_threads(1)  # as the runtime replica runs (--option threads=1)
    module = torch.jit.load(str(path))
    scores, labels = [], []
    with torch.inference_mode():
        for start in range(0, len(features), batch):
            s, label = module(torch.from_numpy(features[start:start + batch]))
            scores.append(s.numpy())
            labels.append(label.numpy())
    return np.concatenate(scores), np.concatenate(labels)


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def row_ids(rows: int) -> np.ndarray:
    """Ids that are not row numbers, so a test tells the id column from the position."""
    return np.arange(rows, dtype=np.int64) * 7 + 1000


def write_parquet(path: Path, ids: np.ndarray, values: np.ndarray, row_group_size: int = 10_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    pq.write_table(pa.table({"id": pa.array(ids), "x": column}), path, row_group_size=row_group_size)


def job_spec(name: str, input_path: Path, output: Path, *, gateway: str = "", mode: int = rpb.ModelCall.GATEWAY,
             model: str = "mlp", **fields: Any) -> rpb.JobSpec:
    spec = rpb.JobSpec(name=name, input_uri=str(input_path), output_uri=str(output), **fields)
    spec.model.model = model
    spec.model.mode = mode
    if gateway:
        spec.model.gateway = gateway
    return spec


def write_job_file(path: Path, spec: rpb.JobSpec) -> Path:
    from google.protobuf.json_format import MessageToDict

    path.write_text(json.dumps({"kind": "Job", "spec": MessageToDict(spec, preserving_proto_field_name=True)}))
    return path


def start_job(log: Path, *args: str) -> subprocess.Popen:
    """`modelgw job run ARGS` as a real process, output to `log`."""
    from conftest import spawn  # here: runtime and job processes import this module without tests/ on their path

    return spawn("job", "run", "--no-progress", *args, log=log)


def run_job(log: Path, *args: str, timeout: float = 240.0) -> int:
    process = start_job(log, *args)
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def results(output: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scored records, failure records) of the parts the job's checkpoint lists."""
    parts, failures, fmt = output_parts(str(output))
    return read_output(output, parts, fmt), read_output(output, failures, fmt)


def apply_job(etcd: str, prefix: str, spec: rpb.JobSpec) -> None:
    async def run() -> None:
        async with RegistryStore(etcd, prefix=prefix) as store:
            await store.apply_job(spec)

    asyncio.run(run())


def job_status(etcd: str, prefix: str, name: str) -> rpb.JobStatus:
    async def run() -> rpb.JobStatus:
        async with RegistryStore(etcd, prefix=prefix) as store:
            return (await store.get_job(name)).status

    return asyncio.run(run())


# -- python-kind models -------------------------------------------------------------------


class Picky(Model):
    """y = 2x, but the whole request is refused (INVALID_ARGUMENT) when any row has a
    negative x[0]: the job must find those rows by bisection and score the rest."""

    inputs = [TensorSpec("x", "FP32", [-1, 2])]
    outputs = [TensorSpec("y", "FP32", [-1, 2])]

    def predict(self, inputs, parameters):
        x = inputs["x"]
        bad = np.flatnonzero(x[:, 0] < 0)
        if bad.size:
            raise InvalidInput(f"x[0] must not be negative (got {x[bad[0], 0]:g})")
        return {"y": x * 2}


class Small(Model):
    """y = x + 1, with a max batch size of 8: larger requests are refused by the runtime."""

    inputs = [TensorSpec("x", "FP32", [-1, 2])]
    outputs = [TensorSpec("y", "FP32", [-1, 2])]
    max_batch_size = 8

    def predict(self, inputs, parameters):
        return {"y": inputs["x"] + 1}


class Subjects(Model):
    """Each row's output is the caller the gateway verified (x-modelgw-subject)."""

    inputs = [TensorSpec("x", "FP32", [-1])]
    outputs = [TensorSpec("subject", "BYTES", [-1])]

    def predict(self, inputs, parameters):
        subject = next((v for k, v in REQUEST_METADATA.get() if k == "x-modelgw-subject"), "")
        return {"subject": np.array([subject.encode()] * len(inputs["x"]), dtype=object)}
