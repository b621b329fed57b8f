"""Unmodified tritonclient (grpc and http) through the gateway: readiness, metadata and
inference on models served by two runtime kinds (pytorch and onnx) registered in the
registry, streaming through ModelStreamInfer, and the request metrics that follow.

Everything is real: an etcd, runtime processes that register themselves in it, and a
`modelgw gateway` process routing by what it reads there."""

from __future__ import annotations

import asyncio
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from gateway_helpers import Fleet, GatewayProcess, metric_value, model_spec, runtime_spec, wait_model_ready
from gateway_models import (
    ONNX_OUTPUTS,
    TORCH_OUTPUTS,
    TORCH_SIGNATURE,
    assert_outputs,
    build_onnx,
    build_torchscript,
    onnx_inputs,
    run_onnx,
    run_torchscript,
    torch_inputs,
)
from runtime_helpers import expect_error
from tritonclient.utils import np_to_triton_dtype

from modelgw.runtimes.examples.streaming import WordStream

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

TORCH_MODEL, ONNX_MODEL, STREAM_MODEL = "tiny-torch", "tiny-onnx", "words"


class Deployment:
    def __init__(self, gateway: GatewayProcess, files: dict[str, Path]) -> None:
        self.gateway = gateway
        self.files = files
        self.grpc = triton.InferenceServerClient(gateway.grpc_url)
        self.http = triton_http.InferenceServerClient(gateway.http_url)

    def expected(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if model == TORCH_MODEL:
            return run_torchscript(self.files["torch"], inputs)
        return run_onnx(self.files["onnx"], inputs)


@pytest.fixture(scope="module")
def deployment(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("gateway-clients")
    files = {"torch": build_torchscript(root), "onnx": build_onnx(root)}
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(
            runtime_spec("torch", "pytorch", ["torchscript"]),
            runtime_spec("onnx", "onnx", ["onnx"]),
            runtime_spec("py", "python", ["python"]),
            model_spec(TORCH_MODEL, "torch", "torchscript", {"1": str(files["torch"])}),
            model_spec(ONNX_MODEL, "onnx", "onnx", {"1": files["onnx"].as_uri()}),
            model_spec(STREAM_MODEL, "py", "python", {"1": "modelgw.runtimes.examples.streaming:WordStream"}),
        )
        gateway = fleet.gateway()
        fleet.replica("torch", "pytorch", "--option", "threads=1")
        fleet.replica("onnx", "onnx", "--option", "threads=1")
        fleet.replica("py", "python")
        for model in (TORCH_MODEL, ONNX_MODEL, STREAM_MODEL):
            wait_model_ready(gateway.grpc_url, model, what=f"(logs in {root})")
        deployment = Deployment(gateway, files)
        yield deployment
        deployment.grpc.close()
        deployment.http.close()
    finally:
        fleet.close()


def grpc_inputs(arrays: dict[str, np.ndarray]) -> list[triton.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def http_inputs(arrays: dict[str, np.ndarray], binary: bool) -> list[triton_http.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton_http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def model_inputs(model: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    return torch_inputs(rows, seed) if model == TORCH_MODEL else onnx_inputs(rows, seed)


OUTPUTS = {TORCH_MODEL: TORCH_OUTPUTS, ONNX_MODEL: ONNX_OUTPUTS}


# -- readiness and metadata ---------------------------------------------------------------


def test_server_liveness_readiness_and_metadata(deployment: Deployment) -> None:
    for client in (deployment.grpc, deployment.http):
        assert client.is_server_live()
        assert client.is_server_ready()
    grpc_meta = deployment.grpc.get_server_metadata(as_json=True)
    http_meta = deployment.http.get_server_metadata()
    assert grpc_meta["name"] == http_meta["name"] == "modelgw"
    assert grpc_meta["version"] == http_meta["version"]
    assert "binary_tensor_data" in http_meta["extensions"] and "streaming" in grpc_meta["extensions"]


def test_model_readiness(deployment: Deployment) -> None:
    for client in (deployment.grpc, deployment.http):
        for model in (TORCH_MODEL, ONNX_MODEL, STREAM_MODEL):
            assert client.is_model_ready(model), model
            assert client.is_model_ready(model, "1"), model
        assert not client.is_model_ready(TORCH_MODEL, "9")
        assert not client.is_model_ready("no-such-model")


def _tensors(tensors: list[dict]) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in tensors]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_model_metadata_of_both_runtime_kinds(deployment: Deployment, protocol: str) -> None:
    client = deployment.grpc if protocol == "grpc" else deployment.http
    get = (lambda *a: client.get_model_metadata(*a, as_json=True)) if protocol == "grpc" else client.get_model_metadata

    torch_meta = get(TORCH_MODEL)
    assert torch_meta["name"] == TORCH_MODEL and torch_meta["versions"] == ["1"]
    assert torch_meta["platform"] == "pytorch_libtorch"
    assert _tensors(torch_meta["inputs"]) == _tensors(TORCH_SIGNATURE["inputs"])
    assert _tensors(torch_meta["outputs"]) == _tensors(TORCH_SIGNATURE["outputs"])

    onnx_meta = get(ONNX_MODEL, "1")
    assert onnx_meta["name"] == ONNX_MODEL and onnx_meta["platform"] == "onnxruntime_onnx"
    assert _tensors(onnx_meta["inputs"]) == [("x", "FP32", [-1, 4]), ("h", "FP16", [-1, 2]), ("text", "BYTES", [-1])]
    assert _tensors(onnx_meta["outputs"]) == [("y", "FP32", [-1, 3]), ("h_out", "FP16", [-1, 2]), ("text_out", "BYTES", [-1])]


def test_unknown_model_metadata_is_not_found(deployment: Deployment) -> None:
    message = expect_error(lambda: deployment.grpc.get_model_metadata("no-such-model"), "NOT_FOUND")
    assert "no-such-model" in message
    with pytest.raises(Exception) as info:
        deployment.http.get_model_metadata("no-such-model")
    assert "no-such-model" in str(info.value)


# -- inference ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [TORCH_MODEL, ONNX_MODEL])
def test_grpc_infer_matches_the_model_run_directly(deployment: Deployment, model: str) -> None:
    inputs = model_inputs(model, 3, seed=1)
    requested = [triton.InferRequestedOutput(name) for name in OUTPUTS[model]]
    result = deployment.grpc.infer(model, grpc_inputs(inputs), outputs=requested, request_id="req-7")
    response = result.get_response()
    assert response.id == "req-7" and response.model_name == model and response.model_version == "1"
    assert_outputs({n: result.as_numpy(n) for n in OUTPUTS[model]}, deployment.expected(model, inputs))


@pytest.mark.parametrize("model", [TORCH_MODEL, ONNX_MODEL])
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_http_infer_json_and_binary_tensors(deployment: Deployment, model: str, binary_in: bool, binary_out: bool) -> None:
    inputs = model_inputs(model, 2, seed=2 + binary_in + 2 * binary_out)
    requested = [triton_http.InferRequestedOutput(name, binary_data=binary_out) for name in OUTPUTS[model]]
    result = deployment.http.infer(model, http_inputs(inputs, binary_in), outputs=requested, request_id="h-1")
    response = result.get_response()
    assert response["id"] == "h-1" and response["model_name"] == model and response["model_version"] == "1"
    for output in response["outputs"]:
        # binary outputs carry their size and no JSON data; JSON ones the other way round
        assert ("binary_data_size" in output.get("parameters", {})) is binary_out, output
        assert ("data" in output) is not binary_out, output
    assert_outputs({n: result.as_numpy(n) for n in OUTPUTS[model]}, deployment.expected(model, inputs))


def test_http_infer_of_a_pinned_version(deployment: Deployment) -> None:
    inputs = model_inputs(ONNX_MODEL, 1, seed=9)
    result = deployment.http.infer(ONNX_MODEL, http_inputs(inputs, True), model_version="1")
    assert result.get_response()["model_version"] == "1"
    assert_outputs({n: result.as_numpy(n) for n in ONNX_OUTPUTS}, deployment.expected(ONNX_MODEL, inputs))


def test_runtime_validation_errors_pass_through(deployment: Deployment) -> None:
    bad = model_inputs(TORCH_MODEL, 2, seed=3)
    del bad["ids"]
    message = expect_error(lambda: deployment.grpc.infer(TORCH_MODEL, grpc_inputs(bad)), "INVALID_ARGUMENT")
    assert "'ids'" in message
    with pytest.raises(Exception) as info:
        deployment.http.infer(TORCH_MODEL, http_inputs(bad, False))
    assert "'ids'" in str(info.value)


# -- streaming ----------------------------------------------------------------------------


async def _generate_directly(text: str) -> list[dict]:
    model = WordStream(STREAM_MODEL)
    inputs = {"text": np.array([text.encode()], dtype=object)}
    return [{k: v.tolist() for k, v in out.items()} async for out in model.generate(inputs, {})]


def _collect(responses: queue.Queue, request_id: str) -> list[tuple[bool, dict]]:
    """(final flag, outputs) of every response to one request, up to the final one."""
    collected = []
    while True:
        result, error = responses.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        assert response.id == request_id
        final = response.parameters["triton_final_response"].bool_param
        collected.append((final, {o.name: result.as_numpy(o.name).tolist() for o in response.outputs}))
        if final:
            return collected


def test_streaming_through_model_stream_infer(deployment: Deployment) -> None:
    text = "streams pass through the gateway"
    expected = asyncio.run(_generate_directly(text))
    assert len(expected) == 5
    before = deployment.gateway.metrics()
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(deployment.gateway.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(
            STREAM_MODEL, grpc_inputs({"text": np.array([text.encode()], dtype=object)}), request_id="s-1"
        )
        words = _collect(responses, "s-1")
        # a unary model on the same stream: one response, flagged final
        inputs = model_inputs(TORCH_MODEL, 1, seed=4)
        client.async_stream_infer(TORCH_MODEL, grpc_inputs(inputs), request_id="s-2")
        unary = _collect(responses, "s-2")
    finally:
        client.stop_stream()
        client.close()
    assert [flag for flag, _ in words] == [False] * 4 + [True]
    assert [outputs for _, outputs in words] == expected
    assert len(unary) == 1
    expected_unary = deployment.expected(TORCH_MODEL, inputs)
    assert np.allclose(unary[0][1]["y"], expected_unary["y"], rtol=1e-5, atol=1e-6)

    # each model's upstream stream is counted once, and leaves the in-flight gauge, when
    # the client's stream has ended (the gateway notices that asynchronously: poll)
    def settled() -> bool:
        after = deployment.gateway.metrics()
        for model in (STREAM_MODEL, TORCH_MODEL):
            labels = dict(model=model, protocol="grpc-stream", status="OK")
            counted = metric_value(after, "modelgw_requests_total", **labels)
            counted -= metric_value(before, "modelgw_requests_total", **labels)
            assert counted <= 1, model
            if counted != 1 or metric_value(after, "modelgw_in_flight_requests", model=model) != 0:
                return False
        return True

    deadline = time.monotonic() + 30
    while not settled():
        assert time.monotonic() < deadline, "stream requests were not counted (or not released)"
        time.sleep(0.1)


def test_streaming_errors_are_reported_on_the_stream(deployment: Deployment) -> None:
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(deployment.gateway.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("no-such-model", grpc_inputs({"text": np.array([b"a b"], dtype=object)}))
        result, error = responses.get(timeout=30)
        assert result is None and "no-such-model" in str(error)
        # the stream is still usable
        client.async_stream_infer(
            STREAM_MODEL, grpc_inputs({"text": np.array([b"still here"], dtype=object)}), request_id="s-3"
        )
        assert [flag for flag, _ in _collect(responses, "s-3")] == [False, True]
    finally:
        client.stop_stream()
        client.close()


# -- metrics ------------------------------------------------------------------------------


def test_request_metrics_by_model_version_runtime_and_status(deployment: Deployment) -> None:
    labels = {"model": ONNX_MODEL, "version": "1", "runtime": "onnx"}
    before = deployment.gateway.metrics()
    inputs = model_inputs(ONNX_MODEL, 1, seed=5)
    for _ in range(3):
        deployment.grpc.infer(ONNX_MODEL, grpc_inputs(inputs))
    for _ in range(2):
        deployment.http.infer(ONNX_MODEL, http_inputs(inputs, True))
    bad = dict(inputs)
    del bad["h"]
    expect_error(lambda: deployment.grpc.infer(ONNX_MODEL, grpc_inputs(bad)), "INVALID_ARGUMENT")
    after = deployment.gateway.metrics()

    def delta(**extra: str) -> float:
        name = "modelgw_requests_total"
        return metric_value(after, name, **labels, **extra) - metric_value(before, name, **labels, **extra)

    assert delta(status="OK", protocol="grpc") == 3
    assert delta(status="OK", protocol="rest") == 2
    assert delta(status="INVALID_ARGUMENT") == 1
    assert metric_value(after, "modelgw_request_duration_seconds_count", **labels, status="OK") >= 5
    assert "modelgw_in_flight_requests" in after
