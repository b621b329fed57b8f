"""Triton's QA and example models, written as python-kind models, for the tests that run
unmodified Triton client code against the gateway (tests/test_triton_*.py).

Each class reproduces the behaviour Triton's example clients check (names, datatypes,
shapes and answers as in Triton's model repositories), not the implementation:

- `simple` (Simple): INT32 INPUT0, INPUT1 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference
- `simple_int8` (SimpleInt8): the same on INT8
- `simple_string` (SimpleString): the same on BYTES holding decimal integers
- `simple_identity` (SimpleIdentity): BYTES INPUT0 -> OUTPUT0 unchanged
- `custom_identity_int32` (CustomIdentityInt32): INT32 INPUT0 -> OUTPUT0 unchanged
- `simple_sequence` (SimpleSequence): a sequence model: OUTPUT = INPUT, plus 1 on the
  request that starts its sequence (the `sequence_id` / `sequence_start` / `sequence_end`
  parameters Triton's clients send); state per sequence id
- `repeat_int32` (RepeatInt32): decoupled: one response per element of IN (OUT, IDX), each
  after DELAY[i] milliseconds
- `densenet_onnx` (DenseNet): an image classifier's interface (FP32 data_0 [3, 224, 224],
  NCHW, output fc6_1 [1000] with a labels file): deterministic scores from the pixels,
  not a trained network
- `preprocess_inception_ensemble` (InceptionEnsemble): stands in for Triton's ensemble of
  JPEG decoding and an image network: BYTES INPUT [-1, 1] -> FP32 OUTPUT [-1, 1001], with
  labels; scores derived from the image bytes

    modelgw runtime serve --kind python --model simple=tests/triton_qa_models.py:Simple
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelgw.runtimes.model import Model, TensorSpec

HERE = Path(__file__).resolve().parent
DENSENET_LABELS = "densenet_labels.txt"


class Simple(Model):
    inputs = [TensorSpec("INPUT0", "INT32", [-1, 16]), TensorSpec("INPUT1", "INT32", [-1, 16])]
    outputs = [TensorSpec("OUTPUT0", "INT32", [-1, 16]), TensorSpec("OUTPUT1", "INT32", [-1, 16])]
    max_batch_size = 8

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}


class SimpleInt8(Simple):
    inputs = [TensorSpec("INPUT0", "INT8", [-1, 16]), TensorSpec("INPUT1", "INT8", [-1, 16])]
    outputs = [TensorSpec("OUTPUT0", "INT8", [-1, 16]), TensorSpec("OUTPUT1", "INT8", [-1, 16])]


class SimpleString(Model):
    inputs = [TensorSpec("INPUT0", "BYTES", [-1, 16]), TensorSpec("INPUT1", "BYTES", [-1, 16])]
    outputs = [TensorSpec("OUTPUT0", "BYTES", [-1, 16]), TensorSpec("OUTPUT1", "BYTES", [-1, 16])]
    max_batch_size = 8

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        a = np.vectorize(int, otypes=[np.int64])(inputs["INPUT0"])
        b = np.vectorize(int, otypes=[np.int64])(inputs["INPUT1"])
        text = np.vectorize(lambda v: str(v).encode(), otypes=[object])
        return {"OUTPUT0": text(a + b), "OUTPUT1": text(a - b)}


class SimpleIdentity(Model):
    inputs = [TensorSpec("INPUT0", "BYTES", [-1, -1])]
    outputs = [TensorSpec("OUTPUT0", "BYTES", [-1, -1])]
    max_batch_size = 8

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"]}


class CustomIdentityInt32(Model):
    inputs = [TensorSpec("INPUT0", "INT32", [-1, -1])]
    outputs = [TensorSpec("OUTPUT0", "INT32", [-1, -1])]
    max_batch_size = 8

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": np.array(inputs["INPUT0"])}


class SimpleSequence(Model):
    """Sequence requests carry their sequence's id; one replica serves a sequence here
    (the tests run one), so the state lives in this process."""

    inputs = [TensorSpec("INPUT", "INT32", [-1, 1])]
    outputs = [TensorSpec("OUTPUT", "INT32", [-1, 1])]
    max_batch_size = 8

    def load(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Any] = set()

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        sequence = parameters.get("sequence_id")
        start = bool(parameters.get("sequence_start"))
        with self._lock:
            if start:
                self._open.add(sequence)
            if parameters.get("sequence_end"):
                self._open.discard(sequence)
        value = inputs["INPUT"].astype(np.int32)
        return {"OUTPUT": value + 1 if start else value.copy()}


class RepeatInt32(Model):
    inputs = [
        TensorSpec("IN", "INT32", [-1]),
        TensorSpec("DELAY", "UINT32", [-1]),
        TensorSpec("WAIT", "UINT32", [1]),
    ]
    outputs = [TensorSpec("OUT", "INT32", [1]), TensorSpec("IDX", "UINT32", [1])]

    def generate(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        values, delays = inputs["IN"], inputs["DELAY"]
        for i, value in enumerate(values):
            time.sleep(float(delays[i] if i < len(delays) else 0) / 1000.0)
            yield {"OUT": np.array([value], dtype=np.int32), "IDX": np.array([i], dtype=np.uint32)}


class DenseNet(Model):
    platform = "onnxruntime_onnx"
    inputs = [TensorSpec("data_0", "FP32", [3, 224, 224])]
    outputs = [TensorSpec("fc6_1", "FP32", [1000])]
    input_formats = {"data_0": "NCHW"}

    def load(self) -> None:
        self.label_files = {"fc6_1": labels_file(DENSENET_LABELS, 1000)}

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        pixels = inputs["data_0"].astype(np.float64)
        # a fixed projection of the channel means: the same image, the same classes
        means = pixels.reshape(3, -1).mean(axis=1)
        scores = np.sin(np.arange(1000) * (1.0 + means[0]) + means[1] * 7.0 + means[2] * 13.0)
        return {"fc6_1": scores.astype(np.float32)}


class InceptionEnsemble(Model):
    """Stands in for Triton's preprocess_inception_ensemble (JPEG decoding, then an
    image network): encoded image bytes in, 1001 scores out, derived from the bytes."""

    inputs = [TensorSpec("INPUT", "BYTES", [-1, 1])]
    outputs = [TensorSpec("OUTPUT", "FP32", [-1, 1001])]
    max_batch_size = 8

    def load(self) -> None:
        self.label_files = {"OUTPUT": labels_file("inception_labels.txt", 1001)}

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        rows = []
        for encoded in inputs["INPUT"].reshape(-1):
            seed = int.from_bytes(hashlib.sha256(bytes(encoded)).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).random(1001, dtype=np.float32))
        return {"OUTPUT": np.stack(rows)}


class RelativeLabels(Model):
    """Not a Triton model: a classifier whose labels file is named relative to its
    artifact (serve it with `--option class=...` and the artifact directory as its URI)."""

    inputs = [TensorSpec("x", "FP32", [4])]
    outputs = [TensorSpec("y", "FP32", [4])]
    label_files = {"y": "labels.txt"}

    def predict(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"y": np.array(inputs["x"])}


def labels_file(name: str, count: int) -> str:
    """A labels file ("CLASS_<i>", one a line) where this process keeps temporary files (the
    test tree stays clean); a real model ships one beside its weights."""
    path = Path(tempfile.mkdtemp(prefix="qa-labels-")) / name
    path.write_text("".join(f"CLASS_{i}\n" for i in range(count)))
    return str(path)


# model name -> class name here, as tests register them
QA_MODELS = {
    "simple": "Simple",
    "simple_int8": "SimpleInt8",
    "simple_string": "SimpleString",
    "simple_identity": "SimpleIdentity",
    "custom_identity_int32": "CustomIdentityInt32",
    "simple_sequence": "SimpleSequence",
    "repeat_int32": "RepeatInt32",
    "densenet_onnx": "DenseNet",
    "preprocess_inception_ensemble": "InceptionEnsemble",
}


def qa_specs(runtime: str = "py") -> list:
    """The registry records serving every model above on one python runtime."""
    from gateway_helpers import model_spec, runtime_spec

    source = Path(__file__).resolve()
    specs: list = [runtime_spec(runtime, "python", ["python"])]
    for name, cls in QA_MODELS.items():
        specs.append(model_spec(name, runtime, "python", {"1": f"{source}:{cls}"}))
    return specs
