"""Helpers for the runtime acceptance tests: a real `modelgw runtime serve` process with
an unmodified tritonclient, and the bad requests every runtime kind must refuse."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import spawn
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from modelgw.net import free_port

BAD_REQUESTS = ("wrong_datatype", "wrong_shape", "missing_input", "wrong_element_count")


class Runtime:
    """A runtime process on a free loopback port and a tritonclient talking to it."""

    def __init__(self, log: Path, *args: str, timeout: float = 90.0) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = log
        self.process = spawn("runtime", "serve", "--port", str(self.port), *args, log=log)
        self.client = triton.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"runtime exited with {self.process.returncode}:\n{self.output()}")
            try:
                if self.client.is_server_ready():
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"runtime not ready after {timeout:.0f}s:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        """SIGTERM, wait for the drain; kill if it hangs. Returns the exit code."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[triton.InferInput]:
    """tritonclient inputs (raw contents) for numpy arrays; BYTES for object arrays."""
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def outputs_of(result: triton.InferResult, names: list[str]) -> dict[str, np.ndarray]:
    return {name: result.as_numpy(name) for name in names}


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, want in expected.items():
        got = actual[name]
        assert got is not None, f"output '{name}' missing"
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if want.dtype == object:
            assert [bytes(v) for v in got.reshape(-1)] == [
                v if isinstance(v, bytes) else str(v).encode() for v in want.reshape(-1)
            ], name
        else:
            assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def bad_request(case: str, good: dict[str, np.ndarray], target: str) -> list[triton.InferInput]:
    """Inputs that break the model's metadata in one way, at input `target`."""
    arrays = dict(good)
    if case == "missing_input":
        del arrays[target]
        return infer_inputs(arrays)
    if case == "wrong_datatype":
        array = arrays[target]
        arrays[target] = array.astype(np.float64 if array.dtype != np.float64 else np.float32)
        return infer_inputs(arrays)
    if case == "wrong_shape":
        arrays[target] = arrays[target][..., np.newaxis]  # one dimension too many
        return infer_inputs(arrays)
    if case == "wrong_element_count":
        array = arrays[target]
        arrays[target] = array.reshape(-1)[:-1]  # one element short ...
        inputs = infer_inputs(arrays)
        next(t for t in inputs if t.name() == target).set_shape(list(array.shape))  # ... for this shape
        return inputs
    raise ValueError(case)


def expect_error(call: Callable[[], object], code: str) -> str:
    """Run a tritonclient call that must fail with gRPC status `code`; its message."""
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}", (info.value.status(), info.value.message())
    return info.value.message()


def check_bad_request(client: triton.InferenceServerClient, model: str, case: str,
                      good: dict[str, np.ndarray], target: str, expected: dict[str, np.ndarray]) -> None:
    """The bad request gets INVALID_ARGUMENT naming `target`; a good one still works."""
    message = expect_error(lambda: client.infer(model, bad_request(case, good, target)), "INVALID_ARGUMENT")
    assert f"'{target}'" in message, message
    result = client.infer(model, infer_inputs(good))
    assert_same(outputs_of(result, list(expected)), expected)
