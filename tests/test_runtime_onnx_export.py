"""A model exported the way users export one, torch.onnx.export's default (dynamo) path,
served by the `onnx` kind: the export needs onnxscript (part of the `onnx` extra), and the
runtime serves the graph it writes (named tensors, a dynamic batch dim, weights in an
external-data file beside the .onnx) with the answers torch gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import Runtime, infer_inputs

torch = pytest.importorskip("torch")
# torch's exporter itself uses an API torch deprecated (not ours to mend)
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


class Scorer(torch.nn.Module):
    """Two inputs (one batched), two outputs: the shape of a typical served model."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(self.linear(x) * scale, dim=-1), x.sum(dim=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Scorer]:
    torch.manual_seed(0)
    model = Scorer().eval()
    path = tmp_path_factory.mktemp("onnx-export") / "scorer.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model, (torch.randn(2, 4), torch.ones(1)), str(path),
        input_names=["x", "scale"], output_names=["probabilities", "total"],
        dynamic_shapes=({0: batch}, None),
    )
    return path, model


@pytest.fixture(scope="module")
def runtime(exported: tuple[Path, Scorer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    path, _ = exported
    log = tmp_path_factory.mktemp("onnx-export-runtime") / "runtime.log"
    server = Runtime(
        log, "--kind", "onnx",
        "--model", f"scorer={path.as_uri()}",
        "--model", f"fromdir={path.parent}",  # the directory: the .onnx beside its weights file
        "--option", "threads=1",
    )
    yield server
    assert server.stop() == 0, server.output()


def test_metadata_comes_from_the_exported_graph(runtime: Runtime) -> None:
    metadata = runtime.client.get_model_metadata("scorer", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("x", "FP32", ["-1", "4"]), ("scale", "FP32", ["1"])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("probabilities", "FP32", ["-1", "3"]), ("total", "FP32", ["-1"])
    ]


@pytest.mark.parametrize("model", ["scorer", "fromdir"])
@pytest.mark.parametrize("rows", [1, 5])
def test_serves_what_torch_computes(runtime: Runtime, exported: tuple[Path, Scorer], model: str, rows: int) -> None:
    _, module = exported
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, (1,)).astype(np.float32)
    result = runtime.client.infer(model, infer_inputs({"x": x, "scale": scale}))
    with torch.inference_mode():
        probabilities, total = module(torch.from_numpy(x), torch.from_numpy(scale))
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("total"), total.numpy(), rtol=1e-5, atol=1e-5)
