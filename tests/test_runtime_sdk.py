"""The runtime SDK in process: dynamic batching, the model repository and request
validation, with real models and a real thread pool (what the registry will drive)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from modelgw.runtimes.batching import BatchingConfig, DirectRunner, DynamicBatcher
from modelgw.runtimes.errors import InferenceError, InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady
from modelgw.runtimes.model import Model, ModelMetadata, TensorSpec
from modelgw.runtimes.repository import ModelRepository, ModelState
from modelgw.runtimes.validation import RequestValidator


class Gate:
    """A predict function that records each batch and holds the first call until opened,
    so that later requests queue up deterministically (no sleeps)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.first_call = threading.Event()
        self.batches: list[int] = []

    def predict(self, inputs, parameters):
        self.batches.append(len(inputs["x"]))
        self.first_call.set()
        self.opened.wait(timeout=30)
        if parameters.get("fail"):
            raise ValueError("bad luck")
        return {"y": inputs["x"] * 2, "rows": np.full(len(inputs["x"]), len(inputs["x"]))}


@pytest.fixture
def executor():
    with ThreadPoolExecutor(4) as pool:
        yield pool


async def wait_until(condition, what: str) -> None:
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting until {what}")


async def test_direct_runner_inlines_fast_models_and_pools_slow_ones(executor) -> None:
    threads: list[str] = []

    def fast(inputs, parameters):
        threads.append(threading.current_thread().name)
        return {"y": inputs["x"] + 1}

    def slow(inputs, parameters):
        threads.append(threading.current_thread().name)
        threading.Event().wait(0.05)
        return {"y": inputs["x"] - 1}

    x = {"x": np.arange(3, dtype=np.float32)}
    # a generous threshold, so a loaded machine still counts `fast` as fast
    fast_runner = DirectRunner("fast", fast, executor, inline_below=0.01)
    for _ in range(5):
        np.testing.assert_array_equal((await fast_runner.submit(x, {}))["y"], x["x"] + 1)
    assert fast_runner.inline
    assert threads[0] != threading.current_thread().name  # first call measures in the pool
    assert threads[-1] == threading.current_thread().name  # then it runs on the loop

    threads.clear()
    slow_runner = DirectRunner("slow", slow, executor, inline_below=0.01)
    for _ in range(3):
        np.testing.assert_array_equal((await slow_runner.submit(x, {}))["y"], x["x"] - 1)
    assert not slow_runner.inline
    assert threading.current_thread().name not in threads

    never = DirectRunner("never", fast, executor, inline_below=0.0)
    for _ in range(3):
        await never.submit(x, {})
    assert not never.inline


async def test_batcher_merges_queued_requests_and_returns_each_its_rows(executor) -> None:
    gate = Gate()
    batcher = DynamicBatcher("m", gate.predict, executor, BatchingConfig(max_batch_size=16))
    first = asyncio.create_task(batcher.submit({"x": np.zeros((1, 2), np.float32)}, {}, 1))
    await wait_until(gate.first_call.is_set, "the first batch runs")
    requests = [np.full((1 + i % 3, 2), i, np.float32) for i in range(12)]
    tasks = [asyncio.create_task(batcher.submit({"x": x}, {}, len(x))) for x in requests]
    await wait_until(lambda: batcher.queue_depth == len(requests), "all requests queue")
    assert batcher.in_flight == 1
    gate.opened.set()
    results = await asyncio.gather(first, *tasks)
    for x, outputs in zip(requests, results[1:], strict=True):
        np.testing.assert_array_equal(outputs["y"], x * 2)
    # 24 queued rows in requests of 1-3 rows, at most 16 rows per call: 12 requests, 2 calls
    assert gate.batches == [1, 16, 8]
    assert batcher.predict_calls == len(gate.batches)
    await batcher.close()


async def test_batcher_never_merges_incompatible_requests(executor) -> None:
    gate = Gate()
    batcher = DynamicBatcher("m", gate.predict, executor, BatchingConfig(max_batch_size=64))
    first = asyncio.create_task(batcher.submit({"x": np.zeros((1, 2), np.float32)}, {}, 1))
    await wait_until(gate.first_call.is_set, "the first batch runs")
    narrow = [np.full((1, 2), i, np.float32) for i in range(4)]
    wide = [np.full((1, 3), i, np.float32) for i in range(4)]
    doubles = [np.full((1, 2), i, np.float64) for i in range(4)]
    mixed = [a for triple in zip(narrow, wide, doubles, strict=True) for a in triple]
    tasks = [asyncio.create_task(batcher.submit({"x": x}, {}, 1)) for x in mixed]
    await wait_until(lambda: batcher.queue_depth == len(mixed), "all requests queue")
    gate.opened.set()
    results = await asyncio.gather(*tasks, first)
    for x, outputs in zip(mixed, results[:-1], strict=True):  # the last is `first`
        np.testing.assert_array_equal(outputs["y"], x * 2)
        assert outputs["y"].dtype == x.dtype
        assert outputs["rows"].tolist() == [4]  # merged with exactly its 3 look-alikes
    assert gate.batches == [1, 4, 4, 4]
    await batcher.close()


async def test_batch_failure_fails_that_batch_only(executor) -> None:
    gate = Gate()
    batcher = DynamicBatcher("m", gate.predict, executor, BatchingConfig(max_batch_size=8))
    first = asyncio.create_task(batcher.submit({"x": np.zeros((1, 2), np.float32)}, {}, 1))
    await wait_until(gate.first_call.is_set, "the first batch runs")
    failing = [asyncio.create_task(batcher.submit({"x": np.ones((1, 2), np.float32)}, {"fail": True}, 1))
               for _ in range(3)]
    fine = [asyncio.create_task(batcher.submit({"x": np.ones((1, 2), np.float32)}, {}, 1)) for _ in range(3)]
    await wait_until(lambda: batcher.queue_depth == 6, "all requests queue")
    gate.opened.set()
    for task in failing:
        with pytest.raises(InferenceError, match="model 'm' failed: ValueError: bad luck"):
            await task
    for task in [first, *fine]:
        assert (await task)["y"].shape == (1, 2)
    # and the batcher still works afterwards
    assert (await batcher.submit({"x": np.ones((2, 2), np.float32)}, {}, 2))["y"].tolist() == [[2, 2], [2, 2]]
    await batcher.close()


async def test_a_request_that_fails_a_merged_batch_fails_alone(executor) -> None:
    def predict(inputs, parameters):
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": inputs["x"] * 2}

    batcher = DynamicBatcher("m", predict, executor, BatchingConfig(max_batch_size=16, max_queue_delay=0.5))
    values = [1.0, -1.0, 2.0, 3.0]
    tasks = [asyncio.create_task(batcher.submit({"x": np.full((1, 2), v, np.float32)}, {}, 1)) for v in values]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], InferenceError) and "negative input" in str(results[1])
    for value, result in zip(values, results, strict=True):
        if value >= 0:
            assert not isinstance(result, BaseException), result
            assert result["y"].tolist() == [[value * 2, value * 2]]
    await batcher.close()


async def test_batcher_reports_a_model_that_breaks_the_batch_dimension(executor) -> None:
    def predict(inputs, parameters):
        return {"y": inputs["x"][:1]}  # one row, whatever the batch

    batcher = DynamicBatcher("m", predict, executor, BatchingConfig(max_batch_size=8, max_queue_delay=0.5))
    tasks = [asyncio.create_task(batcher.submit({"x": np.ones((1, 2), np.float32)}, {}, 1)) for _ in range(3)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, InferenceError)]
    assert errors and "dim 0 must be the batch" in str(errors[0])
    await batcher.close()


# -- repository


class Doubler(Model):
    inputs = [TensorSpec("x", "FP32", [-1, 2])]
    outputs = [TensorSpec("y", "FP32", [-1, 2])]

    def load(self) -> None:
        if self.options.get("broken"):
            raise RuntimeError("weights are corrupt")
        self.factor = float(self.options.get("factor", 2))
        self.release = threading.Event()
        self.started = threading.Event()
        self.unloaded = False

    def predict(self, inputs, parameters):
        if parameters.get("hold"):
            self.started.set()
            self.release.wait(timeout=30)
        return {"y": inputs["x"] * self.factor}

    def unload(self) -> None:
        self.unloaded = True


DOUBLER = f"{__name__}:Doubler"


async def test_repository_versions_states_and_default_version() -> None:
    repo = ModelRepository("python")
    changes: list[tuple[str, str, ModelState]] = []

    async def record() -> None:
        async for status in repo.watch():
            changes.append((status.name, status.version, status.state))

    watcher = asyncio.create_task(record())
    await asyncio.sleep(0)
    try:
        await repo.load("m", "1", DOUBLER, {"factor": "2"})
        await repo.load("m", "10", DOUBLER, {"factor": "10"})
        await repo.load("m", "9", DOUBLER, {"factor": "9"})
        x = np.ones((1, 2), np.float32)
        assert repo.get("m").version == "10"  # the highest numeric version, not the latest loaded
        assert (await repo.get("m", "9").runner.submit({"x": x}, {}, 1))["y"].tolist() == [[9, 9]]
        assert repo.versions("m") == ["1", "9", "10"]

        with pytest.raises(ModelLoadError, match="weights are corrupt"):
            await repo.load("m", "11", DOUBLER, {"broken": "1"})
        with pytest.raises(ModelNotReady, match=r"failed to load: .*weights are corrupt"):
            repo.get("m", "11")
        assert repo.get("m").version == "10"
        with pytest.raises(ModelNotFound, match="versions: 1, 9, 10, 11"):
            repo.get("m", "12")
        with pytest.raises(ModelNotFound, match="'other' is not served here"):
            repo.get("other")

        ten = repo.get("m", "10").model
        await repo.unload("m", "10")
        assert ten.unloaded and repo.get("m").version == "9"
        await repo.unload("m")
        with pytest.raises(ModelNotFound):
            repo.get("m")
        await asyncio.sleep(0)
        assert (("m", "1", ModelState.LOADING) in changes and ("m", "1", ModelState.READY) in changes
                and ("m", "11", ModelState.FAILED) in changes and ("m", "10", ModelState.UNLOADING) in changes
                and ("m", "10", ModelState.UNLOADED) in changes)
        assert repo.statuses() == []
    finally:
        watcher.cancel()
        await repo.close()


async def test_unload_drains_in_flight_requests() -> None:
    repo = ModelRepository("python")
    try:
        served = await repo.load("m", "1", DOUBLER)
        model = served.model
        request = asyncio.create_task(served.runner.submit({"x": np.ones((1, 2), np.float32)}, {"hold": True}, 1))
        await wait_until(model.started.is_set, "the request is inside predict")
        unloading = asyncio.create_task(repo.unload("m"))
        await wait_until(lambda: not repo.is_ready("m"), "the model stops taking requests")
        with pytest.raises(ModelNotReady, match="unloading"):
            repo.get("m")
        assert not unloading.done() and not model.unloaded  # still waiting for the request
        model.release.set()
        assert (await request)["y"].tolist() == [[2, 2]]
        await unloading
        assert model.unloaded
    finally:
        await repo.close()


async def test_reload_replaces_a_version_in_place() -> None:
    repo = ModelRepository("python")
    try:
        old = await repo.load("m", "1", DOUBLER, {"factor": "2"})
        new = await repo.load("m", "1", DOUBLER, {"factor": "3"})
        assert repo.get("m") is new and old.model.unloaded
        with pytest.raises(ModelLoadError):
            await repo.load("m", "1", DOUBLER, {"broken": "1"})
        assert repo.get("m") is new  # a failed reload leaves the serving version alone
    finally:
        await repo.close()


class FixedBatch(Doubler):
    inputs = [TensorSpec("x", "FP32", [1, 2])]


async def test_batching_needs_a_variable_batch_dimension() -> None:
    repo = ModelRepository("python")
    try:
        with pytest.raises(ModelLoadError, match="input 'x' has shape \\[1, 2\\]"):
            await repo.load("m", "1", f"{__name__}:FixedBatch", max_batch_size=4)
        assert (await repo.load("m", "1", f"{__name__}:FixedBatch")).metadata.max_batch_size == 0
    finally:
        await repo.close()


async def test_unknown_kind_and_bad_uri_are_load_errors() -> None:
    repo = ModelRepository("onnx")
    try:
        with pytest.raises(ModelLoadError, match="unknown runtime kind 'tensorflow'"):
            await repo.load("m", "1", "/x", kind="tensorflow")
        with pytest.raises(ModelLoadError, match="no such file"):
            await repo.load("m", "1", "/no/such/model.onnx")
        with pytest.raises(ModelLoadError, match="unsupported URI scheme 's3'"):
            await repo.load("m", "1", "s3://bucket/model.onnx")
    finally:
        await repo.close()


# -- validation


def tensor(name: str, datatype: str, shape: list[int]) -> SimpleNamespace:
    return SimpleNamespace(name=name, datatype=datatype, shape=shape)


VALIDATOR = RequestValidator("m", ModelMetadata(
    inputs=(TensorSpec("x", "FP32", [-1, 4]), TensorSpec("ids", "INT64", [-1, -1])),
    outputs=(TensorSpec("y", "FP32", [-1]),),
    max_batch_size=8,
))


@pytest.mark.parametrize(
    "tensors, needle",
    [
        ([tensor("x", "FP32", [2, 4]), tensor("ids", "INT64", [2, 3]), tensor("z", "FP32", [2])], "input 'z' is unknown"),
        ([tensor("x", "FP32", [2, 4])], "input 'ids' is missing"),
        ([tensor("x", "FP64", [2, 4]), tensor("ids", "INT64", [2, 3])], "input 'x' of model 'm' has datatype FP64, expected FP32"),
        (
            [tensor("x", "FP32", [2, 5]), tensor("ids", "INT64", [2, 3])],
            "input 'x' of model 'm' has shape [2, 5], expected [-1, 4]",
        ),
        ([tensor("x", "FP32", [4]), tensor("ids", "INT64", [2, 3])], "input 'x' of model 'm' has shape [4]"),
        ([tensor("x", "FP32", [2, 4]), tensor("ids", "INT64", [3, 3])], "input 'ids' of model 'm' has batch size 3"),
        ([tensor("x", "FP32", [9, 4]), tensor("ids", "INT64", [9, 3])], "batch size 9 (dim 0 of input 'x') is outside 1..8"),
    ],
)
def test_validation_names_the_tensor(tensors: list, needle: str) -> None:
    with pytest.raises(InvalidInput) as info:
        VALIDATOR.check_inputs(tensors)
    assert needle in str(info.value)


def test_validation_accepts_variable_dims_and_checks_requested_outputs() -> None:
    assert VALIDATOR.check_inputs([tensor("ids", "INT64", [3, 7]), tensor("x", "FP32", [3, 4])]) == 3
    VALIDATOR.check_outputs(["y"])
    with pytest.raises(InvalidInput, match="requested output 'q' is unknown"):
        VALIDATOR.check_outputs(["q"])
