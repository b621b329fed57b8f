"""Bad input at the gateway gets the right status and a message a person can act on, and
never takes the gateway down: malformed and mistyped REST bodies, bodies over the limit,
bad binary-extension headers, unknown models and versions, malformed protobuf on gRPC, a
model with no ready replica; then a hypothesis fuzz over REST bodies (no 5xx, still
serving afterwards)."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from gateway_helpers import Fleet, GatewayProcess, http_get, http_request, model_spec, runtime_spec, wait_model_ready
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelgw.protos import inference_pb2 as pb

MAX_MESSAGE_BYTES = 64 * 1024
MODEL = "typed"  # x FP32 [-1, 2], n INT64 [-1] -> y = x * 2, m = n + 1


@pytest.fixture(scope="module")
def gateway(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("gateway-bad-input")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(
            runtime_spec("py", "python", ["python"]),
            runtime_spec("idle", "python", ["python"]),  # no replica will ever run
            model_spec(MODEL, "py", "python", {"1": "tests.gateway_models:Typed"}),
            model_spec("stranded", "idle", "python", {"1": "tests.gateway_models:Typed"}),
        )
        gateway = fleet.gateway("--max-message-bytes", str(MAX_MESSAGE_BYTES))
        fleet.replica("py", "python")
        wait_model_ready(gateway.grpc_url, MODEL, what=f"(logs in {root})")
        yield gateway
    finally:
        fleet.close()


GOOD = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
        {"name": "n", "datatype": "INT64", "shape": [2], "data": [5, 6]},
    ]
}


def post(gateway: GatewayProcess, body: bytes, headers: dict[str, str] | None = None, model: str = MODEL) -> tuple[int, dict]:
    status, raw, response_headers = http_request(
        "POST", f"{gateway.base}/v2/models/{model}/infer", body, {"Content-Type": "application/json", **(headers or {})}
    )
    if status != 200:
        # every error is JSON with a message
        assert response_headers.get("Content-Type", "").startswith("application/json"), (status, raw[:200])
    return status, json.loads(raw) if raw and status != 200 else {}


def assert_good_request_works(gateway: GatewayProcess) -> None:
    status, raw, _ = http_request("POST", f"{gateway.base}/v2/models/{MODEL}/infer", json.dumps(GOOD).encode())
    assert status == 200, raw[:300]
    outputs = {o["name"]: o["data"] for o in json.loads(raw)["outputs"]}
    assert outputs == {"y": [2.0, 4.0, 6.0, 8.0], "m": [6, 7]}


def with_input(index: int, **changes: object) -> bytes:
    document = json.loads(json.dumps(GOOD))
    document["inputs"][index].update(changes)
    return json.dumps(document).encode()


# (case, body, expected status, fragments the error message must contain)
REST_CASES = [
    ("malformed JSON", b'{"inputs": [', 400, ["not valid JSON"]),
    ("not UTF-8", b'{"inputs": "\xff\xfe"}', 400, ["not valid JSON"]),
    ("JSON array, not an object", b"[1, 2, 3]", 400, ["JSON object"]),
    ("JSON string, not an object", b'"infer me"', 400, ["JSON object"]),
    ("empty body", b"", 400, ["not valid JSON"]),
    ("no inputs", b"{}", 400, ["'inputs'"]),
    ("inputs not a list", b'{"inputs": {"x": 1}}', 400, ["'inputs'"]),
    ("input not an object", b'{"inputs": [5]}', 400, ["inputs[0]"]),
    ("input without a name", b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', 400, ["'name'"]),
    ("unknown datatype", with_input(0, datatype="FP33"), 400, ["'x'", "FP33"]),
    ("shape not a list", with_input(0, shape="2x2"), 400, ["'x'", "shape"]),
    ("negative dimension", with_input(0, shape=[-2, 2]), 400, ["'x'", "negative"]),
    ("dimension too large", with_input(0, shape=[2**70, 2]), 400, ["'x'", "shape"]),
    ("too few elements for the shape", with_input(0, data=[1, 2, 3]), 400, ["'x'", "4 elements"]),
    ("ragged data", with_input(0, data=[[1, 2], [3]]), 400, ["'x'", "ragged"]),
    ("strings for FP32", with_input(0, data=[["a", "b"], ["c", "d"]]), 400, ["'x'", "numbers"]),
    ("floats for INT64", with_input(1, data=[1.5, 2.5]), 400, ["'n'", "integers"]),
    ("INT64 out of range", with_input(1, data=[2**63, 1]), 400, ["'n'", "range"]),
    ("no data", with_input(1, data=None) .replace(b', "data": null', b""), 400, ["'n'", "data"]),
    ("wrong datatype for the model", with_input(1, datatype="INT32"), 400, ["'n'", "INT64"]),
    ("wrong shape for the model", with_input(0, shape=[4], data=[1, 2, 3, 4]), 400, ["'x'"]),
    ("missing input", json.dumps({"inputs": GOOD["inputs"][:1]}).encode(), 400, ["'n'"]),
    ("unknown output", json.dumps({**GOOD, "outputs": [{"name": "nope"}]}).encode(), 400, ["'nope'"]),
    ("parameters not an object", json.dumps({**GOOD, "parameters": [1]}).encode(), 400, ["parameters"]),
    ("parameter out of range", json.dumps({**GOOD, "parameters": {"k": 2**65}}).encode(), 400, ["'k'"]),
    ("lone surrogate in BYTES data", json.dumps({"inputs": [
        {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]}).encode(), 400, ["'s'", "Unicode"]),
    ("lone surrogate in a name", json.dumps({"inputs": [
        {"name": "\udcff", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode(), 400, ["Unicode"]),
    ("lone surrogate in the id", json.dumps({**GOOD, "id": "\ud800"}).encode(), 400, ["'id'", "Unicode"]),
    ("nesting deeper than any tensor", b'{"inputs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, ["nested"]),
]


@pytest.mark.parametrize("case, body, status, fragments", REST_CASES, ids=[c[0] for c in REST_CASES])
def test_bad_rest_bodies(gateway: GatewayProcess, case: str, body: bytes, status: int, fragments: list[str]) -> None:
    got, answer = post(gateway, body)
    assert got == status, (got, answer)
    for fragment in fragments:
        assert fragment in answer["error"], answer


def test_body_over_the_limit_is_413(gateway: GatewayProcess) -> None:
    rows = MAX_MESSAGE_BYTES // 8 + 1
    body = with_input(0, shape=[rows, 2], data=[[1.0, 2.0]] * rows)
    assert len(body) > MAX_MESSAGE_BYTES
    status, answer = post(gateway, body)
    assert status == 413 and str(MAX_MESSAGE_BYTES) in answer["error"], answer
    assert_good_request_works(gateway)


def binary_body(x: np.ndarray, n: np.ndarray, sizes: tuple[int, int] | None = None, tail: bytes = b"") -> tuple[bytes, int]:
    """A binary-extension body: JSON header, then x's and n's raw bytes."""
    raw_x, raw_n = x.tobytes(), n.tobytes()
    sizes = sizes or (len(raw_x), len(raw_n))
    header = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": sizes[0]}},
        {"name": "n", "datatype": "INT64", "shape": list(n.shape), "parameters": {"binary_data_size": sizes[1]}},
    ]}).encode()
    return header + raw_x + raw_n + tail, len(header)


X = np.array([[1, 2], [3, 4]], dtype=np.float32)
N = np.array([5, 6], dtype=np.int64)


def test_binary_extension_works(gateway: GatewayProcess) -> None:
    body, length = binary_body(X, N)
    status, raw, _ = http_request(
        "POST", f"{gateway.base}/v2/models/{MODEL}/infer", body, {"Inference-Header-Content-Length": str(length)}
    )
    assert status == 200, raw[:300]
    assert {o["name"]: o["data"] for o in json.loads(raw)["outputs"]} == {"y": [2.0, 4.0, 6.0, 8.0], "m": [6, 7]}


def _binary_cases() -> list[tuple[str, bytes, str, list[str]]]:
    body, length = binary_body(X, N)
    short, short_length = binary_body(X, N, sizes=(16, 64))
    odd, odd_length = binary_body(X, N, sizes=(12, 20))
    extra, extra_length = binary_body(X, N, tail=b"\0\0\0\0")
    return [
        ("header length not an integer", body, "twelve", ["Inference-Header-Content-Length", "integer"]),
        ("header length a float", body, "12.5", ["Inference-Header-Content-Length", "integer"]),
        ("header length negative", body, "-1", ["Inference-Header-Content-Length"]),
        ("header length beyond the body", body, str(len(body) + 1), ["Inference-Header-Content-Length", str(len(body))]),
        ("header length inside the JSON", body, str(length - 5), ["not valid JSON"]),
        ("header length far too large", body, "9" * 40, ["Inference-Header-Content-Length"]),
        ("binary_data_size beyond the body", short, str(short_length), ["'n'", "binary_data_size"]),
        ("binary_data_size not the tensor's size", odd, str(odd_length), ["'x'", "16"]),
        ("binary bytes left over", extra, str(extra_length), ["4 bytes"]),
    ]


BINARY_CASES = _binary_cases()


@pytest.mark.parametrize("case, body, length, fragments", BINARY_CASES, ids=[c[0] for c in BINARY_CASES])
def test_bad_binary_extension(gateway: GatewayProcess, case: str, body: bytes, length: str, fragments: list[str]) -> None:
    status, answer = post(gateway, body, {"Inference-Header-Content-Length": length})
    assert status == 400, (status, answer)
    for fragment in fragments:
        assert fragment in answer["error"], answer


def test_unknown_model_version_and_path(gateway: GatewayProcess) -> None:
    body = json.dumps(GOOD).encode()
    status, answer = post(gateway, body, model="no-such-model")
    assert status == 404 and "unknown model 'no-such-model'" in answer["error"], answer
    status, raw, _ = http_request("POST", f"{gateway.base}/v2/models/{MODEL}/versions/7/infer", body)
    assert status == 404 and "no version '7'" in json.loads(raw)["error"], raw
    status, raw, _ = http_request("GET", f"{gateway.base}/v2/models/no-such-model/ready")
    assert status == 404 and "no-such-model" in json.loads(raw)["error"], raw
    status, raw, _ = http_request("GET", f"{gateway.base}/v2/nowhere")
    assert status == 404 and "/v2/nowhere" in json.loads(raw)["error"], raw
    status, raw, _ = http_request("GET", f"{gateway.base}/v2/models/{MODEL}/infer")
    assert status == 405 and json.loads(raw)["error"], raw


def test_model_with_no_ready_replica_is_503_saying_why(gateway: GatewayProcess) -> None:
    status, answer = post(gateway, json.dumps(GOOD).encode(), model="stranded")
    assert status == 503, answer
    assert "no ready replica" in answer["error"] and "'idle'" in answer["error"], answer
    status, raw, _ = http_request("GET", f"{gateway.base}/v2/models/stranded/ready")
    assert status == 503 and json.loads(raw)["ready"] is False


# -- gRPC -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        yield channel


def raw_call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError | bytes:
    """Send bytes as they are (no serializer), return the response bytes or the error."""
    call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
    try:
        return call(payload, timeout=10)
    except grpc.RpcError as err:
        return err


def good_request(model: str = MODEL) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    request.inputs.add(name="n", datatype="INT64", shape=[2])
    request.raw_input_contents.extend([X.tobytes(), N.tobytes()])
    return request


# (case, bytes, methods for which they are malformed)
ALL_METHODS = ("ModelInfer", "ModelMetadata", "ModelReady")
MALFORMED = [
    ("truncated varint", b"\xff\xff\xff", ALL_METHODS),
    ("length past the end", b"\x0a\x40typed", ALL_METHODS),
    ("field number zero", b"\x02\x00", ALL_METHODS),
    ("wire type 7", b"\x0f", ALL_METHODS),
    ("name not UTF-8", b"\x0a\x02\xff\xfe", ALL_METHODS),
    ("truncated message", good_request().SerializeToString()[:-3], ALL_METHODS),
    # well-formed at the top level, broken inside a tensor (for the metadata and
    # readiness requests field 3 is an unknown field, which protobuf skips: valid there)
    ("garbage inside a tensor", b"\x0a\x05typed\x1a\x03\xff\xff\xff", ("ModelInfer",)),
    ("tensor name not UTF-8", b"\x0a\x05typed\x1a\x04\x0a\x02\xff\xfe", ("ModelInfer",)),
]


@pytest.mark.parametrize(
    "method, case, payload",
    [(m, case, payload) for case, payload, methods in MALFORMED for m in methods],
    ids=[f"{m}-{case}" for case, _, methods in MALFORMED for m in methods],
)
def test_malformed_protobuf_is_invalid_argument(channel: grpc.Channel, method: str, case: str, payload: bytes) -> None:
    error = raw_call(channel, method, payload)
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details(), "no message"


def test_malformed_message_on_a_stream_is_answered_and_the_stream_goes_on(channel: grpc.Channel) -> None:
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    good = good_request()
    good.id = "good-1"
    unknown = good_request("no-such-model")
    unknown.id = "lost-1"
    payloads = [b"\x0a\x05typed\x1a\x03\xff\xff\xff", unknown.SerializeToString(), good.SerializeToString()]
    responses = [pb.ModelStreamInferResponse.FromString(r) for r in stream(iter(payloads), timeout=30)]
    assert len(responses) == 3, responses
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 2
    assert any("INVALID_ARGUMENT" in e.error_message and "malformed" in e.error_message for e in errors), errors
    assert any("NOT_FOUND" in e.error_message and e.infer_response.id == "lost-1" for e in errors), errors
    (answer,) = [r.infer_response for r in responses if not r.error_message]
    assert answer.id == "good-1" and answer.parameters["triton_final_response"].bool_param
    m = np.frombuffer(answer.raw_output_contents[[o.name for o in answer.outputs].index("m")], dtype=np.int64)
    assert m.tolist() == [6, 7]


def test_grpc_unknown_model_is_not_found_and_no_model_name_is_invalid(channel: grpc.Channel) -> None:
    error = raw_call(channel, "ModelInfer", good_request("no-such-model").SerializeToString())
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in error.details()
    error = raw_call(channel, "ModelInfer", good_request("").SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in error.details()
    reply = raw_call(channel, "ModelInfer", good_request().SerializeToString())
    response = pb.ModelInferResponse.FromString(reply)
    assert response.model_name == MODEL and response.model_version == "1"


def test_grpc_model_with_no_ready_replica_is_unavailable_saying_why(channel: grpc.Channel) -> None:
    error = raw_call(channel, "ModelInfer", good_request("stranded").SerializeToString())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "no ready replica" in error.details() and "'idle'" in error.details()


def test_grpc_message_over_the_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    request = good_request()
    request.raw_input_contents.append(b"\0" * (MAX_MESSAGE_BYTES + 1))
    error = raw_call(channel, "ModelInfer", request.SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())


# -- fuzzing -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
# element values per datatype, in range and out of it, plus anything JSON
ELEMENTS = {
    "BOOL": st.booleans(),
    "INT8": st.integers(-200, 200),
    "INT64": st.integers(-(2**64), 2**64),
    "UINT64": st.integers(-5, 2**65),
    "FP16": st.floats(width=16, allow_nan=False) | st.floats(-1e6, 1e6),
    "FP32": st.floats(width=32, allow_nan=False) | st.integers(-(2**40), 2**40),
    "FP64": st.floats(allow_nan=False, allow_infinity=False),
    "BF16": st.floats(width=32, allow_nan=False),
    "BYTES": st.text(max_size=6),
}


def _nest(flat: list, shape: list[int]) -> list:
    """flat data as nested lists of `shape` (JSON allows either)."""
    for dim in reversed(shape[1:]):
        if dim:
            flat = [flat[i : i + dim] for i in range(0, len(flat), dim)]
    return flat


@st.composite
def well_formed_tensor(draw: st.DrawFn) -> dict:
    """A tensor whose data matches its shape and datatype (now and then off by a little),
    named like the model's inputs or not: these reach the codec's and the runtime's checks."""
    name = draw(st.sampled_from(["x", "n", "x", "n", "z"]))
    datatype = draw(st.sampled_from(["FP32", "INT64"] * 3 + sorted(ELEMENTS)))
    shape = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    count = math.prod(shape) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    elements = ELEMENTS[datatype] | json_values if draw(st.booleans()) and draw(st.booleans()) else ELEMENTS[datatype]
    flat = draw(st.lists(elements, min_size=max(count, 0), max_size=max(count, 0)))
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": _nest(flat, shape) if draw(st.booleans()) else flat}
    if draw(st.booleans()) and draw(st.booleans()):
        tensor["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_size", "k"]), json_values, max_size=2))
    return tensor


noisy_tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "n", "z", ""]), "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "fp32", ""])},
    optional={
        "shape": st.lists(st.integers(-2, 4), max_size=3) | json_values,
        "data": json_values,
        "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "binary_data", "k"]), json_values, max_size=2),
    },
)
infer_like = st.fixed_dictionaries(
    {"inputs": st.lists(well_formed_tensor() | well_formed_tensor() | noisy_tensor, min_size=1, max_size=3) | json_values},
    optional={
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "m", "q"])}, optional={
            "parameters": st.dictionaries(st.sampled_from(["binary_data", "classification"]), json_values, max_size=2)}),
            max_size=3) | json_values,
        "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "k"]), json_values, max_size=2),
        "id": st.text(max_size=8) | json_values,
    },
)


@st.composite
def near_good_request(draw: st.DrawFn) -> dict:
    """x and n of the model with random batch sizes and values: mostly valid, so the fuzz
    also reaches the runtime and the response path (binary outputs included)."""
    rows_x, rows_n = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    x = draw(st.lists(ELEMENTS["FP32"], min_size=rows_x * 2, max_size=rows_x * 2))
    n = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=rows_n, max_size=rows_n))
    document = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [rows_x, 2], "data": x},
        {"name": "n", "datatype": "INT64", "shape": [rows_n], "data": n},
    ]}
    if draw(st.booleans()):
        document["outputs"] = [{"name": o, "parameters": {"binary_data": draw(st.booleans())}} for o in draw(
            st.lists(st.sampled_from(["y", "m"]), unique=True, max_size=2))]
    return document


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(document=json_values | infer_like | near_good_request())
def test_fuzz_json_documents_never_5xx(gateway: GatewayProcess, document: object) -> None:
    status, answer = post(gateway, json.dumps(document).encode())
    assert status < 500, (document, answer)


@FUZZ
@given(
    body=st.binary(max_size=512),
    header=st.none() | st.integers(-5, 600).map(str) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6),
)
def test_fuzz_bytes_never_5xx(gateway: GatewayProcess, body: bytes, header: str | None) -> None:
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    status, answer = post(gateway, body, headers)
    assert status < 500, (body, header, answer)


def test_unparsable_http_is_400_without_a_traceback_in_the_log(gateway: GatewayProcess) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
            "Inference-Header-Content-Length: 3\x1d\r\nContent-Length: 2\r\n\r\n{}".encode()
        )
        reply = sock.recv(4096)
    assert reply.split(b" ")[1] == b"400", reply[:200]
    assert_good_request_works(gateway)


@FUZZ
@given(document=infer_like, tail=st.binary(max_size=64))
def test_fuzz_binary_bodies_never_5xx(gateway: GatewayProcess, document: dict, tail: bytes) -> None:
    header = json.dumps(document).encode()
    status, answer = post(gateway, header + tail, {"Inference-Header-Content-Length": str(len(header))})
    assert status < 500, (document, tail, answer)


def test_gateway_still_serves_after_the_fuzzing(gateway: GatewayProcess, channel: grpc.Channel) -> None:
    assert gateway.process.poll() is None, gateway.output()
    assert http_get(f"{gateway.base}/v2/health/live")[0] == 200
    assert_good_request_works(gateway)
    reply = raw_call(channel, "ModelInfer", good_request().SerializeToString())
    assert isinstance(reply, bytes)
    assert "Traceback" not in gateway.output(), gateway.output()[-3000:]
