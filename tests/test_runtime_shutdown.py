"""Graceful shutdown of a real runtime process: SIGTERM while a slow request is in flight
lets that request finish, then the process exits 0."""

from __future__ import annotations

import queue
import signal
import time
from pathlib import Path

import numpy as np
from runtime_helpers import Runtime, infer_inputs


def test_sigterm_drains_the_request_in_flight(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "runtime.log", "--kind", "python",
                      "--model", "sleeper=tests.runtime_models:Sleeper")
    marker = tmp_path / "predict-started"
    x = np.arange(5, dtype=np.float32)
    answers: queue.Queue = queue.Queue()
    try:
        runtime.client.async_infer(
            "sleeper", infer_inputs({"x": x}),
            callback=lambda result, error: answers.put((result, error)),
            parameters={"marker": str(marker), "seconds": 2},
        )
        deadline = time.monotonic() + 30
        while not marker.exists():  # the request is inside predict now
            assert time.monotonic() < deadline, runtime.output()
            assert runtime.process.poll() is None, runtime.output()
            time.sleep(0.02)
        runtime.process.send_signal(signal.SIGTERM)

        result, error = answers.get(timeout=60)
        assert error is None, f"{error}\n{runtime.output()}"
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
        assert runtime.process.wait(timeout=60) == 0, runtime.output()
        assert "shutting down" in runtime.output()
    finally:
        runtime.stop()


def test_sigterm_when_idle_exits_zero(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "runtime.log", "--kind", "python",
                      "--model", "scale=modelgw.runtimes.examples.scale:Scale")
    x = np.ones((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(runtime.client.infer("scale", infer_inputs({"x": x})).as_numpy("y"), x * 2)
    assert runtime.stop() == 0, runtime.output()

