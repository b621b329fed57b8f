"""The python runtime kind, end to end: a real `modelgw runtime serve --kind python`
process, unmodified tritonclient as the client, user classes named by import path."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import spawn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from runtime_helpers import (
    BAD_REQUESTS,
    Runtime,
    assert_same,
    check_bad_request,
    expect_error,
    infer_inputs,
    outputs_of,
)
from runtime_models import Countdown, Mixed

from modelgw.net import free_port
from modelgw.runtimes.examples.streaming import WordStream

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = ["y", "ids_out", "h_out", "text_out"]
MAX_MESSAGE_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    log = tmp_path_factory.mktemp("python-runtime") / "runtime.log"
    server = Runtime(
        log, "--kind", "python",
        "--model", "mixed=tests.runtime_models:Mixed",
        "--model", f"probe={REPO / 'tests' / 'runtime_models.py'}:BatchProbe",  # file-path form
        "--model", "words=modelgw.runtimes.examples.streaming:WordStream",
        "--model", "countdown=tests.runtime_models:Countdown",
        "--max-queue-delay-ms", "20",
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
    )
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def reference() -> Mixed:
    """The same model class, run directly in the test process."""
    model = Mixed("mixed")
    model.load()
    return model


def mixed_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, (rows, 3)).astype(np.int64),
        "h": rng.standard_normal((rows, 2)).astype(np.float16),
        "text": np.array([f"row {seed}-{i} ü".encode() for i in range(rows)], dtype=object),
    }


def expected_outputs(reference: Mixed, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    outputs = reference.predict(inputs, {})
    return {name: outputs[name] for name in OUTPUTS}


def test_server_and_model_readiness(runtime: Runtime) -> None:
    client = runtime.client
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in ("mixed", "probe", "words"):
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    assert not client.is_model_ready("mixed", "9")
    assert not client.is_model_ready("no-such-model")


def test_server_and_model_metadata(runtime: Runtime) -> None:
    server = runtime.client.get_server_metadata(as_json=True)
    assert server["name"] == "modelgw" and server["version"]
    metadata = runtime.client.get_model_metadata("mixed", as_json=True)
    assert metadata["name"] == "mixed"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "python"
    spec = lambda tensors: [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in tensors]  # noqa: E731
    assert spec(metadata["inputs"]) == [(s.name, s.datatype, list(s.shape)) for s in Mixed.inputs]
    assert spec(metadata["outputs"]) == [(s.name, s.datatype, list(s.shape)) for s in Mixed.outputs]


def test_infer_fp32_int64_fp16_bytes(runtime: Runtime, reference: Mixed) -> None:
    inputs = mixed_inputs(3, seed=1)
    requested = [triton.InferRequestedOutput(name) for name in OUTPUTS]
    result = runtime.client.infer("mixed", infer_inputs(inputs), outputs=requested, request_id="req-1")
    assert result.get_response().id == "req-1"
    assert_same(outputs_of(result, OUTPUTS), expected_outputs(reference, inputs))


def test_requested_outputs_filter_the_response(runtime: Runtime, reference: Mixed) -> None:
    inputs = mixed_inputs(2, seed=2)
    result = runtime.client.infer("mixed", infer_inputs(inputs), outputs=[triton.InferRequestedOutput("h_out")])
    assert [o.name for o in result.get_response().outputs] == ["h_out"]
    assert_same(outputs_of(result, ["h_out"]), {"h_out": expected_outputs(reference, inputs)["h_out"]})
    message = expect_error(
        lambda: runtime.client.infer("mixed", infer_inputs(inputs), outputs=[triton.InferRequestedOutput("nope")]),
        "INVALID_ARGUMENT",
    )
    assert "'nope'" in message


def test_unknown_model_is_not_found(runtime: Runtime) -> None:
    inputs = infer_inputs(mixed_inputs(1))
    message = expect_error(lambda: runtime.client.infer("no-such-model", inputs), "NOT_FOUND")
    assert "no-such-model" in message
    expect_error(lambda: runtime.client.infer("mixed", inputs, model_version="9"), "NOT_FOUND")
    expect_error(lambda: runtime.client.get_model_metadata("no-such-model"), "NOT_FOUND")


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_invalid_argument(runtime: Runtime, reference: Mixed, case: str) -> None:
    good = mixed_inputs(2, seed=3)
    check_bad_request(runtime.client, "mixed", case, good, "x", expected_outputs(reference, good))


def test_bad_bytes_tensor_is_invalid_argument(runtime: Runtime) -> None:
    good = mixed_inputs(2, seed=4)
    good["text"] = np.array([b"only one row"], dtype=object)  # batch sizes disagree
    message = expect_error(lambda: runtime.client.infer("mixed", infer_inputs(good)), "INVALID_ARGUMENT")
    assert "'text'" in message


def test_model_failure_fails_the_request_not_the_server(runtime: Runtime, reference: Mixed) -> None:
    inputs = mixed_inputs(2, seed=5)
    message = expect_error(
        lambda: runtime.client.infer("mixed", infer_inputs(inputs), parameters={"fail": True}), "INTERNAL"
    )
    assert "asked to fail" in message and "mixed" in message
    result = runtime.client.infer("mixed", infer_inputs(inputs))
    assert_same(outputs_of(result, OUTPUTS), expected_outputs(reference, inputs))


def test_dynamic_batching_merges_concurrent_requests(runtime: Runtime, reference: Mixed) -> None:
    """32 concurrent requests of 1-3 rows: fewer predict calls than requests, and every
    caller gets exactly its own rows (checked against the model run directly)."""
    requests = {i: mixed_inputs(1 + i % 3, seed=100 + i) for i in range(32)}
    results: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(runtime.url)
    try:
        for i, inputs in requests.items():
            client.async_infer(
                "probe", infer_inputs(inputs), request_id=str(i),
                callback=lambda result, error, i=i: results.put((i, result, error)),
            )
        answers = [results.get(timeout=60) for _ in requests]
    finally:
        client.close()
    calls = set()
    for i, result, error in answers:
        assert error is None, error
        assert result.get_response().id == str(i)
        assert_same(outputs_of(result, OUTPUTS), expected_outputs(reference, requests[i]))
        call = result.as_numpy("call")
        assert len(set(call.tolist())) == 1  # one request's rows come from one predict call
        calls.add(int(call[0]))
    assert len(calls) < len(requests), f"{len(calls)} predict calls for {len(requests)} requests"


def test_stream_yields_several_responses_then_a_final_one(runtime: Runtime) -> None:
    text = "the quick brown fox jumps"
    inputs = {"text": np.array([text.encode()], dtype=object)}
    expected = asyncio.run(_generate_directly(inputs))
    assert len(expected) == 5

    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(runtime.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("words", infer_inputs(inputs), request_id="held",
                                  enable_empty_final_response=False)
        held = _collect(responses)
        client.async_stream_infer("words", infer_inputs(inputs), request_id="empty",
                                  enable_empty_final_response=True)
        empty = _collect(responses)
    finally:
        client.stop_stream()
        client.close()

    # without empty final responses the last data response carries the flag
    assert [flag for _, flag, _ in held] == [False] * 4 + [True]
    assert [outputs for _, _, outputs in held] == expected
    # with them, every data response is unflagged and an empty flagged one closes the request
    assert [flag for _, flag, _ in empty] == [False] * 5 + [True]
    assert [outputs for _, _, outputs in empty[:-1]] == expected
    assert empty[-1][2] == {}
    assert {rid for rid, _, _ in held} == {"held"} and {rid for rid, _, _ in empty} == {"empty"}


def test_stream_from_a_plain_generator(runtime: Runtime) -> None:
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(runtime.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("countdown", infer_inputs({"n": np.array([4], dtype=np.int64)}), request_id="c")
        collected = _collect(responses)
    finally:
        client.stop_stream()
        client.close()
    direct = [o["count"].tolist() for o in Countdown("countdown").generate({"n": np.array([4])}, {})]
    assert [outputs["count"] for _, _, outputs in collected] == direct
    assert [flag for _, flag, _ in collected] == [False] * (len(direct) - 1) + [True]


def test_stream_errors_do_not_close_the_stream(runtime: Runtime, reference: Mixed) -> None:
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(runtime.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("no-such-model", infer_inputs(mixed_inputs(1)))
        result, error = responses.get(timeout=30)
        assert result is None and "no-such-model" in str(error)
        bad = mixed_inputs(1)
        del bad["ids"]
        client.async_stream_infer("mixed", infer_inputs(bad))
        result, error = responses.get(timeout=30)
        assert result is None and "'ids'" in str(error)
        # a non-streaming model on the stream: one response, flagged final
        inputs = mixed_inputs(2, seed=6)
        client.async_stream_infer("mixed", infer_inputs(inputs), request_id="ok")
        result, error = responses.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        assert response.id == "ok" and response.parameters["triton_final_response"].bool_param
        assert_same(outputs_of(result, OUTPUTS), expected_outputs(reference, inputs))
    finally:
        client.stop_stream()
        client.close()


def test_message_above_the_size_limit_is_refused(runtime: Runtime, reference: Mixed) -> None:
    inputs = mixed_inputs(1)
    inputs["text"] = np.array([b"z" * (MAX_MESSAGE_BYTES + 1)], dtype=object)
    expect_error(lambda: runtime.client.infer("mixed", infer_inputs(inputs)), "RESOURCE_EXHAUSTED")
    inputs["text"] = np.array([b"z" * (MAX_MESSAGE_BYTES // 2)], dtype=object)  # within the limit
    result = runtime.client.infer("mixed", infer_inputs(inputs), outputs=[triton.InferRequestedOutput("text_out")])
    assert result.as_numpy("text_out")[0] == b"Z" * (MAX_MESSAGE_BYTES // 2) + b"!"


def test_streaming_model_on_unary_infer_is_refused(runtime: Runtime) -> None:
    inputs = infer_inputs({"text": np.array([b"a b"], dtype=object)})
    message = expect_error(lambda: runtime.client.infer("words", inputs), "INVALID_ARGUMENT")
    assert "ModelStreamInfer" in message


def test_grpc_health_check(runtime: Runtime) -> None:
    with grpc.insecure_channel(runtime.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "inference.GRPCInferenceService", "mixed", "words"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "kind, model, needle",
    [
        ("python", "m=tests.runtime_models:NoSuchClass", "NoSuchClass"),
        ("python", "m=no_such_module_xyz:Model", "no_such_module_xyz"),
        ("python", "m=modelgw.runtimes.model:TensorSpec", "not a subclass"),
        ("onnx", "m=/no/such/dir/model.onnx", "/no/such/dir/model.onnx"),
        ("onnx", "m=s3://bucket/model.onnx", "unsupported URI scheme 's3'"),
        ("tensorflow", "m=/tmp", "unknown runtime kind 'tensorflow'"),
    ],
)
def test_unloadable_model_exits_with_one_clear_error(tmp_path: Path, kind: str, model: str, needle: str) -> None:
    log = tmp_path / "runtime.log"
    process = spawn("runtime", "serve", "--kind", kind, "--model", model, "--port", str(free_port()), log=log)
    assert process.wait(timeout=60) != 0
    output = log.read_text()
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and needle in errors[0], output
    assert "Traceback" not in output


# -- helpers


async def _generate_directly(inputs: dict[str, np.ndarray]) -> list[dict[str, list]]:
    model = WordStream("words")
    model.load()
    return [{name: a.tolist() for name, a in outputs.items()} async for outputs in model.generate(inputs, {})]


def _collect(responses: queue.Queue) -> list[tuple[str, bool, dict[str, list]]]:
    """Responses of one stream request up to its final one: (id, final flag, outputs)."""
    collected = []
    while True:
        result, error = responses.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        outputs = {o.name: result.as_numpy(o.name).tolist() for o in response.outputs}
        collected.append((response.id, final, outputs))
        if final:
            return collected

