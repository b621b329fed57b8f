"""Python-kind models for the runtime tests, served by real runtime processes as
`tests.runtime_models:Name` (the runtime's working directory is the repository root) and
run directly in the test process to compute the expected outputs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from modelgw.runtimes.model import Model, TensorSpec


class Mixed(Model):
    """FP32, INT64, FP16 and BYTES in and out, row by row; `call` tells each row which
    predict call served it (1, 2, ...), so tests can count batches without timing."""

    inputs = [
        TensorSpec("x", "FP32", [-1, 4]),
        TensorSpec("ids", "INT64", [-1, 3]),
        TensorSpec("h", "FP16", [-1, 2]),
        TensorSpec("text", "BYTES", [-1]),
    ]
    outputs = [
        TensorSpec("y", "FP32", [-1, 3]),
        TensorSpec("ids_out", "INT64", [-1, 3]),
        TensorSpec("h_out", "FP16", [-1, 2]),
        TensorSpec("text_out", "BYTES", [-1]),
        TensorSpec("call", "INT64", [-1]),
    ]
    max_batch_size = 64
    predict_delay = 0.0  # seconds each predict call takes, so that requests pile up

    def load(self) -> None:
        rng = np.random.default_rng(int(self.options.get("seed", 7)))
        self.weight = rng.standard_normal((4, 3)).astype(np.float32)
        self.bias = rng.standard_normal(3).astype(np.float32)
        self.calls = 0
        self._lock = threading.Lock()

    def predict(self, inputs, parameters):
        if parameters.get("fail"):
            raise RuntimeError("asked to fail by the request")
        with self._lock:
            self.calls += 1
            call = self.calls
        if self.predict_delay:
            time.sleep(self.predict_delay)
        ids = inputs["ids"]
        text = inputs["text"]
        return {
            "y": inputs["x"] @ self.weight + self.bias,
            "ids_out": ids * 3 + ids.sum(axis=1, keepdims=True),
            "h_out": inputs["h"] * inputs["h"] + inputs["h"],
            "text_out": np.array([t.upper() + b"!" for t in text.reshape(-1)], dtype=object),
            "call": np.full(len(ids), call, dtype=np.int64),
        }


class BatchProbe(Mixed):
    """Mixed, slow enough that concurrent requests queue while a batch runs."""

    predict_delay = 0.2


class Sleeper(Model):
    """Echoes x after touching the file named by parameter `marker` and sleeping
    `seconds`: a request that is observably in flight, for shutdown tests."""

    inputs = [TensorSpec("x", "FP32", [-1])]
    outputs = [TensorSpec("y", "FP32", [-1])]

    def predict(self, inputs, parameters):
        Path(parameters["marker"]).touch()
        time.sleep(float(parameters.get("seconds", 1.0)))
        return {"y": inputs["x"] + 1}


class Countdown(Model):
    """A streaming model with a plain (blocking) generator: n, n-1, ..., 1."""

    inputs = [TensorSpec("n", "INT64", [1])]
    outputs = [TensorSpec("count", "INT64", [1])]

    def generate(self, inputs, parameters):
        for value in range(int(inputs["n"][0]), 0, -1):
            yield {"count": np.array([value], dtype=np.int64)}
