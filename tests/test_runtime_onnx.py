"""The onnx runtime kind, end to end: a tiny ONNX graph built here (FP32, INT64, FP16 and
string tensors), served by a real `modelgw runtime serve --kind onnx` process, checked with
unmodified tritonclient against onnxruntime run directly in the test process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_helpers import BAD_REQUESTS, Runtime, assert_same, check_bad_request, expect_error, infer_inputs, outputs_of

OUTPUTS = ["y", "ids_out", "h_out", "text_out"]


def build_model(path: Path) -> None:
    """y = x @ W + b; ids_out = ids * 3 + rowsum(ids); h_out = h * h + h; text_out = upper(text).
    Dim 0 is the symbolic batch "N"."""
    rng = np.random.default_rng(11)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    three = numpy_helper.from_array(np.array(3, dtype=np.int64), "three")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
        helper.make_node("Mul", ["ids", "three"], ["ids3"]),
        helper.make_node("ReduceSum", ["ids", "axes"], ["idsum"], keepdims=1),
        helper.make_node("Add", ["ids3", "idsum"], ["ids_out"]),
        helper.make_node("Mul", ["h", "h"], ["hh"]),
        helper.make_node("Add", ["hh", "h"], ["h_out"]),
        helper.make_node("StringNormalizer", ["text"], ["text_out"], case_change_action="UPPER", locale="C.UTF-8"),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["N", 2]),
            helper.make_tensor_value_info("text", TensorProto.STRING, ["N"]),
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT16, ["N", 2]),
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["N"]),
        ],
        initializer=[weight, bias, three, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx-model") / "mixed.onnx"
    build_model(path)
    return path


@pytest.fixture(scope="module")
def runtime(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    log = tmp_path_factory.mktemp("onnx-runtime") / "runtime.log"
    server = Runtime(
        log, "--kind", "onnx",
        "--model", f"mixed={model_path.as_uri()}",           # file:// URI
        "--model", f"fromdir:2={model_path.parent}",          # a directory with one .onnx
        "--max-batch-size", "8", "--option", "threads=1",
    )
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def session(model_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def mixed_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, (rows, 3)).astype(np.int64),
        "h": rng.standard_normal((rows, 2)).astype(np.float16),
        "text": np.array([f"word {seed}-{i}".encode() for i in range(rows)], dtype=object),
    }


def run_directly(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {**inputs, "text": np.array([t.decode() for t in inputs["text"]], dtype=object)}
    return dict(zip(OUTPUTS, session.run(OUTPUTS, feed), strict=True))


def test_readiness(runtime: Runtime) -> None:
    assert runtime.client.is_server_live() and runtime.client.is_server_ready()
    assert runtime.client.is_model_ready("mixed") and runtime.client.is_model_ready("fromdir", "2")
    assert not runtime.client.is_model_ready("fromdir", "1")


def test_metadata_comes_from_the_graph(runtime: Runtime) -> None:
    assert runtime.client.get_server_metadata(as_json=True)["name"] == "modelgw"
    metadata = runtime.client.get_model_metadata("fromdir", as_json=True)
    assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["2"]
    tensors = lambda ts: {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in ts}  # noqa: E731
    assert tensors(metadata["inputs"]) == {
        "x": ("FP32", [-1, 4]), "ids": ("INT64", [-1, 3]), "h": ("FP16", [-1, 2]), "text": ("BYTES", [-1]),
    }
    assert tensors(metadata["outputs"]) == {
        "y": ("FP32", [-1, 3]), "ids_out": ("INT64", [-1, 3]), "h_out": ("FP16", [-1, 2]), "text_out": ("BYTES", [-1]),
    }


@pytest.mark.parametrize("model", ["mixed", "fromdir"])
def test_infer_fp32_int64_fp16_bytes(runtime: Runtime, session: ort.InferenceSession, model: str) -> None:
    inputs = mixed_inputs(3, seed=1)
    result = runtime.client.infer(model, infer_inputs(inputs))
    assert_same(outputs_of(result, OUTPUTS), run_directly(session, inputs))


def test_unknown_model_is_not_found(runtime: Runtime) -> None:
    expect_error(lambda: runtime.client.infer("no-such-model", infer_inputs(mixed_inputs(1))), "NOT_FOUND")


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_invalid_argument(runtime: Runtime, session: ort.InferenceSession, case: str) -> None:
    good = mixed_inputs(2, seed=3)
    check_bad_request(runtime.client, "mixed", case, good, "x", run_directly(session, good))


def test_batch_above_max_batch_size_is_invalid_argument(runtime: Runtime) -> None:
    message = expect_error(lambda: runtime.client.infer("fromdir", infer_inputs(mixed_inputs(9))), "INVALID_ARGUMENT")
    assert "batch size 9" in message
