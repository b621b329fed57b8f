"""Tensor descriptors the protocol refuses, end to end through a real gateway and a real
runtime: a shape with more dimensions than MAX_SHAPE_DIMS (REST and gRPC, unary and
stream), and one input carrying its data twice (REST binary data plus JSON `data`; gRPC
raw_input_contents plus typed contents). Each is 400 / INVALID_ARGUMENT naming the tensor,
never a message so long that it outgrows gRPC's metadata limit."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from gateway_helpers import Fleet, GatewayProcess, http_request, model_spec, runtime_spec, wait_model_ready

from modelgw.oip.protocol import MAX_SHAPE_DIMS
from modelgw.protos import inference_pb2 as pb
from modelgw.protos import inference_pb2_grpc as pb_grpc

MODEL = "typed"  # x FP32 [-1, 2], n INT64 [-1] -> y = x * 2, m = n + 1
MANY_DIMS = [1] * 10_000
X = np.array([[1, 2], [3, 4]], dtype=np.float32)
N = np.array([5, 6], dtype=np.int64)


@pytest.fixture(scope="module")
def gateway(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("oip-input-limits")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(
            runtime_spec("py", "python", ["python"]),
            model_spec(MODEL, "py", "python", {"1": "tests.gateway_models:Typed"}),
        )
        gateway = fleet.gateway()
        fleet.replica("py", "python")
        wait_model_ready(gateway.grpc_url, MODEL, what=f"(logs in {root})")
        yield gateway
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def post(gateway: GatewayProcess, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    status, raw, _ = http_request("POST", f"{gateway.base}/v2/models/{MODEL}/infer", body, headers or {})
    return status, json.loads(raw)


def grpc_request(x_shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=x_shape)
    request.inputs.add(name="n", datatype="INT64", shape=[2])
    request.raw_input_contents.extend([X.tobytes(), N.tobytes()])
    return request


def assert_names_x_and_the_limit(message: str) -> None:
    assert "'x'" in message and "10000 dimensions" in message and f"at most {MAX_SHAPE_DIMS}" in message, message[:300]
    assert len(message) < 500, f"{len(message)} characters: {message[:300]}"


# -- shape dims -------------------------------------------------------------------------------


def test_rest_shape_with_too_many_dims_is_400_naming_the_tensor(gateway: GatewayProcess) -> None:
    body = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": MANY_DIMS, "data": [1.0]},
        {"name": "n", "datatype": "INT64", "shape": [2], "data": [5, 6]},
    ]}
    status, answer = post(gateway, json.dumps(body).encode())
    assert status == 400, (status, str(answer)[:300])
    assert_names_x_and_the_limit(answer["error"])


def test_grpc_shape_with_too_many_dims_is_invalid_argument_naming_the_tensor(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(grpc_request(MANY_DIMS), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details()[:300])
    assert_names_x_and_the_limit(info.value.details())


def test_stream_shape_with_too_many_dims_is_answered_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    good = grpc_request([2, 2])
    good.id = "good"
    responses = list(stub.ModelStreamInfer(iter([grpc_request(MANY_DIMS), good]), timeout=30))
    (bad,) = [r for r in responses if r.error_message]
    (answer,) = [r for r in responses if not r.error_message]
    assert bad.error_message.startswith("INVALID_ARGUMENT"), bad.error_message[:300]
    assert_names_x_and_the_limit(bad.error_message)
    assert answer.infer_response.id == "good"


def test_the_most_dims_allowed_reach_the_model(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    # within the bound, the runtime's own check answers (the model's shape is [-1, 2])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(grpc_request([1] * MAX_SHAPE_DIMS), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in info.value.details() and "expected [-1, 2]" in info.value.details(), info.value.details()


# -- one input's data given twice ------------------------------------------------------------


def test_rest_binary_data_and_json_data_for_one_input_is_400_naming_it(gateway: GatewayProcess) -> None:
    header = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[9, 9], [9, 9]],
         "parameters": {"binary_data_size": X.nbytes}},
        {"name": "n", "datatype": "INT64", "shape": [2], "data": [5, 6]},
    ]}).encode()
    status, answer = post(gateway, header + X.tobytes(), {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400, (status, answer)
    assert "'x'" in answer["error"] and "binary_data_size" in answer["error"] and "'data'" in answer["error"], answer


def test_grpc_raw_and_typed_contents_for_one_input_is_invalid_argument_naming_it(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = grpc_request([2, 2])
    request.inputs[0].contents.fp32_contents.extend([9, 9, 9, 9])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "'x'" in info.value.details() and "raw_input_contents" in info.value.details(), info.value.details()
