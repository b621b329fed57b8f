"""The pytorch runtime kind, end to end: a tiny module saved here as TorchScript (with a
JSON sidecar; FP32, INT64, FP16 and BYTES as List[str]) and as a torch.export .pt2 program
(signature read from the program), served by a real `modelgw runtime serve --kind pytorch`
process, checked with unmodified tritonclient against the saved files run directly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_helpers import BAD_REQUESTS, Runtime, assert_same, check_bad_request, expect_error, infer_inputs, outputs_of


def numeric(x: torch.Tensor, ids: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    return x @ weight + bias, ids * 3 + ids.sum(dim=1, keepdim=True), h * h + h


class Numeric(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(3, generator=generator))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, h: torch.Tensor):
        return numeric(x, ids, h, self.weight, self.bias)


class WithText(Numeric):
    """TorchScript takes BYTES as List[str] and returns List[str] as BYTES."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, h: torch.Tensor, text: list[str]):  # type: ignore[override]
        y, ids_out, h_out = numeric(x, ids, h, self.weight, self.bias)
        shouted: list[str] = []
        for word in text:
            shouted.append(word.upper() + "!")
        return y, ids_out, h_out, shouted


# TorchScript is what the pytorch kind serves, deprecated upstream or not
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

NUMERIC_OUTPUTS = ["y", "ids_out", "h_out"]
PT2_OUTPUTS = ["output_0", "output_1", "output_2"]
SIDECAR = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
        {"name": "h", "datatype": "FP16", "shape": [-1, 2]},
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
    ],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "ids_out", "datatype": "INT64", "shape": [-1, 3]},
        {"name": "h_out", "datatype": "FP16", "shape": [-1, 2]},
        {"name": "text_out", "datatype": "BYTES", "shape": [-1]},
    ],
    "max_batch_size": 8,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pytorch-models")
    torch.manual_seed(0)
    scripted = root / "mixed.pt"
    torch.jit.save(torch.jit.script(WithText().eval()), str(scripted))
    (root / "mixed.json").write_text(json.dumps(SIDECAR))

    example = (torch.randn(2, 4), torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 2, dtype=torch.float16))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Numeric().eval(), example, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    exported_dir = root / "exported"
    exported_dir.mkdir()
    torch.export.save(program, str(exported_dir / "model.pt2"))
    return {"torchscript": scripted, "exported": exported_dir / "model.pt2"}


@pytest.fixture(scope="module")
def runtime(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    log = tmp_path_factory.mktemp("pytorch-runtime") / "runtime.log"
    server = Runtime(
        log, "--kind", "pytorch",
        "--model", f"scripted={models['torchscript']}",
        "--model", f"exported={models['exported'].parent.as_uri()}",  # file:// URI of a directory
        "--option", "threads=1",
    )
    yield server
    assert server.stop() == 0, server.output()


def mixed_inputs(rows: int, seed: int = 0, text: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, (rows, 3)).astype(np.int64),
        "h": rng.standard_normal((rows, 2)).astype(np.float16),
    }
    if text:
        inputs["text"] = np.array([f"tok {seed}-{i} é".encode() for i in range(rows)], dtype=object)
    return inputs


def run_torchscript(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    module = torch.jit.load(str(path))
    with torch.inference_mode():
        y, ids_out, h_out, text_out = module(
            torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["ids"]), torch.from_numpy(inputs["h"]),
            [t.decode() for t in inputs["text"]],
        )
    return {"y": y.numpy(), "ids_out": ids_out.numpy(), "h_out": h_out.numpy(),
            "text_out": np.array([t.encode() for t in text_out], dtype=object)}


def run_exported(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    module = torch.export.load(str(path)).module()
    with torch.inference_mode():
        outputs = module(*(torch.from_numpy(inputs[n]) for n in ("x", "ids", "h")))
    return {name: t.numpy() for name, t in zip(PT2_OUTPUTS, outputs, strict=True)}


def test_readiness(runtime: Runtime) -> None:
    assert runtime.client.is_server_live() and runtime.client.is_server_ready()
    assert runtime.client.is_model_ready("scripted") and runtime.client.is_model_ready("exported")


def test_torchscript_metadata_comes_from_the_sidecar(runtime: Runtime) -> None:
    metadata = runtime.client.get_model_metadata("scripted", as_json=True)
    assert metadata["platform"] == "pytorch_libtorch"
    tensors = lambda ts: [{**t, "shape": [int(d) for d in t["shape"]]} for t in ts]  # noqa: E731
    assert tensors(metadata["inputs"]) == SIDECAR["inputs"]
    assert tensors(metadata["outputs"]) == SIDECAR["outputs"]


def test_exported_metadata_comes_from_the_program(runtime: Runtime) -> None:
    assert runtime.client.get_server_metadata(as_json=True)["name"] == "modelgw"
    metadata = runtime.client.get_model_metadata("exported", as_json=True)
    assert metadata["platform"] == "pytorch_export"
    tensors = lambda ts: [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in ts]  # noqa: E731
    assert tensors(metadata["inputs"]) == [("x", "FP32", [-1, 4]), ("ids", "INT64", [-1, 3]), ("h", "FP16", [-1, 2])]
    assert tensors(metadata["outputs"]) == [
        ("output_0", "FP32", [-1, 3]), ("output_1", "INT64", [-1, 3]), ("output_2", "FP16", [-1, 2]),
    ]


def test_torchscript_infer_fp32_int64_fp16_bytes(runtime: Runtime, models: dict[str, Path]) -> None:
    inputs = mixed_inputs(3, seed=1)
    result = runtime.client.infer("scripted", infer_inputs(inputs))
    assert_same(outputs_of(result, [*NUMERIC_OUTPUTS, "text_out"]), run_torchscript(models["torchscript"], inputs))


def test_exported_infer_fp32_int64_fp16(runtime: Runtime, models: dict[str, Path]) -> None:
    inputs = mixed_inputs(5, seed=2, text=False)
    result = runtime.client.infer("exported", infer_inputs(inputs))
    assert_same(outputs_of(result, PT2_OUTPUTS), run_exported(models["exported"], inputs))


def test_unknown_model_is_not_found(runtime: Runtime) -> None:
    expect_error(lambda: runtime.client.infer("no-such-model", infer_inputs(mixed_inputs(1))), "NOT_FOUND")


@pytest.mark.parametrize("case", BAD_REQUESTS)
@pytest.mark.parametrize("model", ["scripted", "exported"])
def test_bad_request_is_invalid_argument(runtime: Runtime, models: dict[str, Path], model: str, case: str) -> None:
    if model == "scripted":
        good = mixed_inputs(2, seed=3)
        expected = run_torchscript(models["torchscript"], good)
    else:
        good = mixed_inputs(2, seed=3, text=False)
        expected = run_exported(models["exported"], good)
    check_bad_request(runtime.client, model, case, good, "x", expected)
