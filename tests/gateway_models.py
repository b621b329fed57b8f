"""Models for the gateway tests.

- build_torchscript / build_onnx: tiny models saved to disk (TorchScript with its JSON
  signature sidecar; an ONNX graph), and run_* to compute expected outputs in the test
  process. torch and onnx are imported inside the functions so that python-kind runtimes
  importing this module for the classes below stay light.
- Python-kind classes served by runtime processes as `tests.gateway_models:Name` (the
  runtime's working directory is the repository root).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from modelgw.runtimes.model import Model, TensorSpec

# -- a TorchScript model (FP32, INT64 and BYTES in and out) ------------------------------

TORCH_SIGNATURE = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
    ],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "ids_out", "datatype": "INT64", "shape": [-1, 3]},
        {"name": "text_out", "datatype": "BYTES", "shape": [-1]},
    ],
    "max_batch_size": 8,
}
TORCH_OUTPUTS = [t["name"] for t in TORCH_SIGNATURE["outputs"]]


def build_torchscript(directory: Path) -> Path:
    """y = x @ W + b; ids_out = ids * 3 + rowsum(ids); text_out = upper(text) + "!"."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(3)
            self.weight = torch.nn.Parameter(torch.randn(4, 3, generator=generator))
            self.bias = torch.nn.Parameter(torch.randn(3, generator=generator))

        def forward(self, x: torch.Tensor, ids: torch.Tensor, text: list[str]):
            shouted: list[str] = []
            for word in text:
                shouted.append(word.upper() + "!")
            return x @ self.weight + self.bias, ids * 3 + ids.sum(dim=1, keepdim=True), shouted

    path = directory / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny().eval()), str(path))
    (directory / "tiny.json").write_text(json.dumps(TORCH_SIGNATURE))
    return path


def run_torchscript(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    module = torch.jit.load(str(path))
    with torch.inference_mode():
        y, ids_out, text_out = module(
            torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["ids"]), [t.decode() for t in inputs["text"]]
        )
    return {"y": y.numpy(), "ids_out": ids_out.numpy(), "text_out": np.array([t.encode() for t in text_out], dtype=object)}


def torch_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, (rows, 3)).astype(np.int64),
        "text": np.array([f"word {seed}-{i} é".encode() for i in range(rows)], dtype=object),
    }


# -- an ONNX model (FP32, FP16 and strings in and out) ------------------------------------

ONNX_OUTPUTS = ["y", "h_out", "text_out"]


def build_onnx(directory: Path) -> Path:
    """y = x @ W + b; h_out = h * h + h; text_out = upper(text). Dim 0 is the batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(17)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
        helper.make_node("Mul", ["h", "h"], ["hh"]),
        helper.make_node("Add", ["hh", "h"], ["h_out"]),
        helper.make_node("StringNormalizer", ["text"], ["text_out"], case_change_action="UPPER", locale="C.UTF-8"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["N", 2]),
            helper.make_tensor_value_info("text", TensorProto.STRING, ["N"]),
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT16, ["N", 2]),
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["N"]),
        ],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = directory / "tiny.onnx"
    onnx.save(model, path)
    return path


def run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {**inputs, "text": np.array([t.decode() for t in inputs["text"]], dtype=object)}
    y, h_out, text_out = session.run(ONNX_OUTPUTS, feed)
    return {"y": y, "h_out": h_out, "text_out": np.array([t.encode() for t in text_out], dtype=object)}


def onnx_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "h": rng.standard_normal((rows, 2)).astype(np.float16),
        "text": np.array([f"mot {seed}-{i} ü".encode() for i in range(rows)], dtype=object),
    }


def assert_outputs(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same names, shapes, dtypes and values; BYTES compared as bytes (tritonclient http
    hands JSON strings back as str)."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, want in expected.items():
        got = actual[name]
        assert got is not None, f"output '{name}' missing"
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if want.dtype == object:
            as_bytes = [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)]
            assert as_bytes == list(want.reshape(-1)), name
        else:
            assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


# -- python-kind models -------------------------------------------------------------------


class Echo(Model):
    """y = x + 1, plus `pid` (the serving process): cheap, for load and failover tests."""

    inputs = [TensorSpec("x", "FP32", [-1])]
    outputs = [TensorSpec("y", "FP32", [-1]), TensorSpec("pid", "INT64", [1])]

    def predict(self, inputs, parameters):
        return {"y": inputs["x"] + 1, "pid": np.array([os.getpid()], dtype=np.int64)}


class Slow(Model):
    """y = x + 1 after sleeping `seconds` (a request parameter) and touching the file named
    by the `marker` parameter first: a request that is observably in flight."""

    inputs = [TensorSpec("x", "FP32", [-1])]
    outputs = [TensorSpec("y", "FP32", [-1])]

    def predict(self, inputs, parameters):
        if "marker" in parameters:
            Path(parameters["marker"]).touch()
        time.sleep(float(parameters.get("seconds", 1.0)))
        return {"y": inputs["x"] + 1}


class Typed(Model):
    """Two inputs of different datatypes, for bad-input tests: y = x * 2, m = n + 1."""

    inputs = [TensorSpec("x", "FP32", [-1, 2]), TensorSpec("n", "INT64", [-1])]
    outputs = [TensorSpec("y", "FP32", [-1, 2]), TensorSpec("m", "INT64", [-1])]

    def predict(self, inputs, parameters):
        return {"y": inputs["x"] * 2, "m": inputs["n"] + 1}
