"""Triton's protocol extensions through the gateway, with unmodified tritonclient (grpc and
http): model configuration, statistics, classification, the model repository (index,
load, unload), shared memory refused, server metadata's extensions, and Triton's wording
on unknown models and versions.

Everything is real: an etcd, two python-kind runtime replicas serving Triton's QA models
(tests/triton_qa_models.py), registered in it, and a `modelgw gateway` process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from gateway_helpers import Fleet, GatewayProcess, http_json, http_request, wait_model_ready
from runtime_helpers import Runtime
from triton_qa_models import QA_MODELS, DenseNet, qa_specs
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from modelgw.oip.protocol import EXTENSIONS

RUNTIME = "py"


class QA:
    def __init__(self, gateway: GatewayProcess, fleet: Fleet) -> None:
        self.gateway = gateway
        self.fleet = fleet
        self.grpc = triton.InferenceServerClient(gateway.grpc_url)
        self.http = triton_http.InferenceServerClient(gateway.http_url)


@pytest.fixture(scope="module")
def qa(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QA]:
    root = tmp_path_factory.mktemp("triton-extensions")
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(*qa_specs(RUNTIME))
        gateway = fleet.gateway()
        fleet.replica(RUNTIME, "python")
        fleet.replica(RUNTIME, "python")  # two: statistics are summed over replicas
        for model in QA_MODELS:
            wait_model_ready(gateway.grpc_url, model, what=f"(logs in {root})")
        # both replicas serve every model before any test counts on it
        wait_replicas(gateway, 2)
        deployment = QA(gateway, fleet)
        yield deployment
        deployment.grpc.close()
        deployment.http.close()
    finally:
        fleet.close()


def wait_replicas(gateway: GatewayProcess, count: int) -> None:
    from gateway_helpers import wait_until

    def serving() -> bool:
        status, body = http_json("POST", f"{gateway.base}/v2/repository/index", {})
        return status == 200 and all(m["state"] == "READY" for m in body) and replica_count(gateway) >= count

    wait_until(serving, 60, "replicas not all ready")


def replica_count(gateway: GatewayProcess) -> int:
    status, body = http_json("GET", f"{gateway.base}/admin/v1/endpoints")
    return sum(1 for ep in body.get("endpoints", []) if ep.get("ready")) if status == 200 else 0


def simple_inputs(module, rows: int = 1, binary: bool = True) -> tuple[list, np.ndarray, np.ndarray]:
    a = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16)
    b = np.ones((rows, 16), dtype=np.int32)
    inputs = [module.InferInput("INPUT0", [rows, 16], "INT32"), module.InferInput("INPUT1", [rows, 16], "INT32")]
    for tensor, array in zip(inputs, (a, b), strict=True):
        if module is triton_http:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
    return inputs, a, b


def expect(call, grpc_code: str | None = None, http_status: int | None = None) -> str:
    """Run a tritonclient call that must fail; its message (and status checked)."""
    with pytest.raises(InferenceServerException) as info:
        call()
    status = info.value.status()
    if grpc_code is not None:
        assert status == f"StatusCode.{grpc_code}", (status, info.value.message())
    if http_status is not None:
        assert str(status) == str(http_status), (status, info.value.message())
    return info.value.message()


# -- server metadata ------------------------------------------------------------------------


def test_server_metadata_lists_exactly_the_served_extensions(qa: QA) -> None:
    grpc_meta = qa.grpc.get_server_metadata(as_json=True)
    http_meta = qa.http.get_server_metadata()
    assert grpc_meta["extensions"] == http_meta["extensions"] == EXTENSIONS
    for served in ("model_configuration", "statistics", "classification", "model_repository"):
        assert served in EXTENSIONS
    assert not any("shared_memory" in e for e in EXTENSIONS)
    assert "model_repository(read-only)" not in EXTENSIONS


# -- model configuration ------------------------------------------------------------------------


def test_model_config_over_grpc(qa: QA) -> None:
    config = qa.grpc.get_model_config("simple").config
    assert config.name == "simple"
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT0", triton.model_config_pb2.TYPE_INT32, [16]),
        ("INPUT1", triton.model_config_pb2.TYPE_INT32, [16]),
    ]
    assert [o.name for o in config.output] == ["OUTPUT0", "OUTPUT1"]
    assert config.HasField("dynamic_batching")
    strings = qa.grpc.get_model_config("simple_string", "1").config
    assert strings.input[0].data_type == triton.model_config_pb2.TYPE_STRING
    image = qa.grpc.get_model_config("densenet_onnx").config
    assert image.max_batch_size == 0 and not image.HasField("dynamic_batching")
    assert image.platform == DenseNet.platform
    assert image.input[0].format == triton.model_config_pb2.ModelInput.FORMAT_NCHW
    assert list(image.input[0].dims) == [3, 224, 224]
    assert image.output[0].label_filename == "densenet_labels.txt"


def test_model_config_over_http_matches_grpc(qa: QA) -> None:
    from google.protobuf import json_format

    for model in ("simple", "densenet_onnx", "repeat_int32"):
        http_config = qa.http.get_model_config(model)
        grpc_config = qa.grpc.get_model_config(model).config
        # Triton's JSON: field names as declared, enums by name, 64-bit ints as numbers
        assert json_format.ParseDict(http_config, triton.model_config_pb2.ModelConfig()) == grpc_config
        assert all(isinstance(d, int) for i in http_config["input"] for d in i["dims"])
    versioned = qa.http.get_model_config("simple", "1")
    assert versioned["input"][0] == {
        "name": "INPUT0", "data_type": "TYPE_INT32", "format": "FORMAT_NONE", "dims": [16], "optional": False,
    }
    assert versioned["max_batch_size"] == 8


def test_model_config_of_an_unknown_model_or_version(qa: QA) -> None:
    message = expect(lambda: qa.grpc.get_model_config("no_such_model"), "NOT_FOUND")
    assert message.startswith("Request for unknown model: 'no_such_model' is not found")
    message = expect(lambda: qa.http.get_model_config("no_such_model"))
    assert message.startswith("Request for unknown model: 'no_such_model' is not found")
    message = expect(lambda: qa.grpc.get_model_config("simple", "9"), "NOT_FOUND")
    assert "Request for unknown model: 'simple' version 9 is not found" in message


# -- statistics ---------------------------------------------------------------------------


def test_statistics_count_every_request_summed_over_replicas(qa: QA) -> None:
    before = qa.grpc.get_inference_statistics("custom_identity_int32").model_stats
    base = before[0].inference_count if before else 0
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    requests = 24
    for i in range(requests):
        if i % 2:
            tensor = triton.InferInput("INPUT0", [1, 16], "INT32")
            tensor.set_data_from_numpy(data)
            qa.grpc.infer("custom_identity_int32", [tensor])
        else:
            tensor = triton_http.InferInput("INPUT0", [1, 16], "INT32")
            tensor.set_data_from_numpy(data)
            qa.http.infer("custom_identity_int32", [tensor])
    stats = qa.grpc.get_inference_statistics("custom_identity_int32").model_stats
    assert [(s.name, s.version) for s in stats] == [("custom_identity_int32", "1")]
    figures = stats[0]
    assert figures.inference_count == base + requests
    assert figures.inference_stats.success.count == base + requests
    assert figures.execution_count >= 1
    assert figures.inference_stats.compute_infer.ns > 0
    assert figures.last_inference > 0
    # each replica answered some of them: the gateway's figure is their sum
    per_replica = [replica_statistics(address, "custom_identity_int32") for address in replica_addresses(qa)]
    assert len(per_replica) == 2 and all(n > 0 for n in per_replica), per_replica
    assert sum(per_replica) == figures.inference_count

    http_stats = qa.http.get_inference_statistics("custom_identity_int32", "1")["model_stats"]
    assert http_stats[0]["inference_count"] == base + requests
    assert isinstance(http_stats[0]["inference_stats"]["success"]["ns"], int)


def test_statistics_count_rows_and_failures(qa: QA) -> None:
    inputs, _, _ = simple_inputs(triton, rows=3)
    before = qa.grpc.get_inference_statistics("simple").model_stats[0]
    qa.grpc.infer("simple", inputs)
    bad = triton.InferInput("INPUT0", [1, 16], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    expect(lambda: qa.grpc.infer("simple", [bad]), "INVALID_ARGUMENT")  # INPUT1 missing
    after = qa.grpc.get_inference_statistics("simple").model_stats[0]
    assert after.inference_count - before.inference_count == 3  # rows, as Triton counts them
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1


def test_statistics_of_every_model_and_of_unknown_ones(qa: QA) -> None:
    every = qa.grpc.get_inference_statistics().model_stats
    assert sorted({s.name for s in every}) == sorted(QA_MODELS)
    http_every = qa.http.get_inference_statistics()["model_stats"]
    assert sorted({s["name"] for s in http_every}) == sorted(QA_MODELS)
    message = expect(lambda: qa.grpc.get_inference_statistics("no_such_model"), "NOT_FOUND")
    assert message.startswith("Request for unknown model: 'no_such_model' is not found")
    message = expect(lambda: qa.http.get_inference_statistics("simple", "wrong_specification"))
    assert "failed to get model version from specified version string 'wrong_specification'" in message


def replica_addresses(qa: QA) -> list[str]:
    status, body = http_json("GET", f"{qa.gateway.base}/admin/v1/endpoints")
    assert status == 200, body
    return [ep["address"] for ep in body["endpoints"] if ep.get("ready")]


def replica_statistics(address: str, model: str) -> int:
    client = triton.InferenceServerClient(address)
    try:
        return client.get_inference_statistics(model).model_stats[0].inference_count
    finally:
        client.close()


# -- classification -----------------------------------------------------------------------


def top_k(scores: np.ndarray, k: int, labels: bool) -> list[bytes]:
    order = np.argsort(-scores.astype(np.float64), kind="stable")[:k]
    return [f"{scores[i]:f}:{i}".encode() + (f":CLASS_{i}".encode() if labels else b"") for i in order]


def densenet_input(module, seed: int = 3):
    image = np.random.default_rng(seed).random((3, 224, 224), dtype=np.float32)
    tensor = module.InferInput("data_0", [3, 224, 224], "FP32")
    tensor.set_data_from_numpy(image)
    return image, tensor


def test_class_count_returns_the_top_classes_with_labels(qa: QA) -> None:
    image, tensor = densenet_input(triton)
    expected = top_k(DenseNet("x").predict({"data_0": image}, {})["fc6_1"], 3, labels=True)
    result = qa.grpc.infer("densenet_onnx", [tensor], outputs=[triton.InferRequestedOutput("fc6_1", class_count=3)])
    assert result.as_numpy("fc6_1").tolist() == expected
    _, http_tensor = densenet_input(triton_http)
    for binary in (True, False):
        http_result = qa.http.infer(
            "densenet_onnx", [http_tensor],
            outputs=[triton_http.InferRequestedOutput("fc6_1", binary_data=binary, class_count=3)],
        )
        got = [v if isinstance(v, bytes) else v.encode() for v in http_result.as_numpy("fc6_1").tolist()]
        assert got == expected  # JSON data come back as str, binary data as bytes (as from Triton)


def test_class_count_per_batch_row_without_labels(qa: QA) -> None:
    inputs, a, b = simple_inputs(triton, rows=2)
    result = qa.grpc.infer("simple", inputs, outputs=[
        triton.InferRequestedOutput("OUTPUT0", class_count=2), triton.InferRequestedOutput("OUTPUT1"),
    ])
    classes = result.as_numpy("OUTPUT0")
    assert classes.shape == (2, 2)
    total = a + b
    assert classes.tolist() == [[f"{row[i]}:{i}".encode() for i in (15, 14)] for row in total]
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)  # the others as they are


def test_class_count_where_it_cannot_apply_is_refused(qa: QA) -> None:
    strings = [triton.InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
    for tensor in strings:
        tensor.set_data_from_numpy(np.array([[b"1"] * 16], dtype=object))
    message = expect(
        lambda: qa.grpc.infer("simple_string", strings, outputs=[triton.InferRequestedOutput("OUTPUT0", class_count=2)]),
        "INVALID_ARGUMENT",
    )
    assert "OUTPUT0" in message and "class" in message
    status, body, _ = http_request(
        "POST", f"{qa.gateway.base}/v2/models/simple/infer",
        b'{"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [' + b",".join([b"1"] * 16)
        + b']}, {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [' + b",".join([b"1"] * 16)
        + b']}], "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 0}}]}',
        {"Content-Type": "application/json"},
    )
    assert status == 400 and b"class_count" in body, body


# -- the model repository ----------------------------------------------------------------------


def test_repository_index_lists_every_model_and_version(qa: QA) -> None:
    grpc_index = qa.grpc.get_model_repository_index().models
    assert sorted((m.name, m.version, m.state) for m in grpc_index) == sorted(
        (name, "1", "READY") for name in QA_MODELS
    )
    http_index = qa.http.get_model_repository_index()
    assert sorted((m["name"], m["version"], m["state"]) for m in http_index) == sorted(
        (name, "1", "READY") for name in QA_MODELS
    )


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unload_and_load_act_on_the_registry(qa: QA, protocol: str) -> None:
    client = qa.grpc if protocol == "grpc" else qa.http
    model = "simple_int8"
    client.unload_model(model)
    assert not client.is_model_ready(model)
    index = {m.name: m for m in qa.grpc.get_model_repository_index().models}
    assert index[model].state == "UNAVAILABLE" and "unloaded" in index[model].reason
    status, ready_only = http_json("POST", f"{qa.gateway.base}/v2/repository/index", {"ready": True})
    assert status == 200 and model not in {m["name"] for m in ready_only} and "simple" in {m["name"] for m in ready_only}
    client.load_model(model)
    assert client.is_model_ready(model)
    assert qa.grpc.get_model_repository_index().models  # and the index says READY again:
    assert {m.name: m.state for m in qa.grpc.get_model_repository_index().models}[model] == "READY"


def test_load_with_a_config_override_sets_the_batching_limits(qa: QA) -> None:
    model = "simple_identity"
    qa.http.load_model(model, config='{"max_batch_size": "4", "dynamic_batching": {"max_queue_delay_microseconds": 500}}')
    config = qa.grpc.get_model_config(model).config
    assert config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    qa.grpc.load_model(model, config='{"max_batch_size": 8}')
    assert qa.grpc.get_model_config(model).config.max_batch_size == 8


def test_load_refusals(qa: QA) -> None:
    message = expect(lambda: qa.grpc.load_model("wrong_model_name"), "NOT_FOUND")
    assert "failed to load 'wrong_model_name'" in message and "Request for unknown model" in message
    message = expect(lambda: qa.http.load_model("wrong_model_name"), http_status=404)
    assert "failed to load" in message
    message = expect(lambda: qa.grpc.load_model("simple", config='"parameters": {{"max_batch_size": "16"}}'),
                     "INVALID_ARGUMENT")
    assert "failed to load 'simple'" in message
    message = expect(lambda: qa.grpc.load_model("simple", config='{"instance_group": [{"count": 2}]}'), "INVALID_ARGUMENT")
    assert "max_batch_size" in message
    message = expect(lambda: qa.grpc.load_model("simple", config="{}", files={"file:1/model.py": b"x"}),
                     "INVALID_ARGUMENT")
    assert "file overrides" in message
    assert qa.grpc.is_model_ready("simple")


# -- shared memory ---------------------------------------------------------------------------


def test_shared_memory_is_refused_saying_why(qa: QA) -> None:
    message = expect(lambda: qa.grpc.register_system_shared_memory("r", "/key", 64), "UNIMPLEMENTED")
    assert "network gateway" in message
    message = expect(lambda: qa.grpc.get_cuda_shared_memory_status(), "UNIMPLEMENTED")
    assert "network gateway" in message
    message = expect(lambda: qa.http.get_system_shared_memory_status(), http_status=404)
    assert "network gateway" in message
    message = expect(lambda: qa.http.unregister_cuda_shared_memory("r"), http_status=404)
    assert "network gateway" in message


# -- Triton's wording on errors ----------------------------------------------------------------


def test_unknown_models_and_versions_carry_tritons_wording(qa: QA) -> None:
    inputs, _, _ = simple_inputs(triton)
    message = expect(lambda: qa.grpc.infer("wrong_model_name", inputs), "NOT_FOUND")
    assert message.startswith("Request for unknown model: 'wrong_model_name' is not found")
    http_inputs, _, _ = simple_inputs(triton_http)
    message = expect(lambda: qa.http.infer("wrong_model_name", http_inputs), http_status=404)
    assert message.startswith("Request for unknown model: 'wrong_model_name' is not found")
    message = expect(lambda: qa.grpc.infer("simple", inputs, model_version="wrong_specification"), "NOT_FOUND")
    assert "failed to get model version from specified version string 'wrong_specification'" in message
    message = expect(lambda: qa.grpc.get_model_metadata("simple", "7"), "NOT_FOUND")
    assert "Request for unknown model: 'simple' version 7 is not found" in message
    assert "versions: 1" in message  # and ours


def test_raw_and_typed_contents_together_carry_tritons_wording(qa: QA) -> None:
    import grpc

    request = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(range(16))
    request.raw_input_contents.append(np.arange(8, dtype=np.int32).tobytes())
    request.inputs[0].contents.int_contents[:] = list(range(8))
    with grpc.insecure_channel(qa.gateway.grpc_url) as channel:
        stub = triton.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
            in info.value.details())


def test_the_qa_models_answer_as_tritons_do(qa: QA) -> None:
    inputs, a, b = simple_inputs(triton)
    result = qa.grpc.infer("simple", inputs)
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert Path(__file__).with_name("triton_qa_models.py").exists()


def test_the_current_tritonclient_is_what_the_suite_runs() -> None:
    """The dev extra resolves tritonclient >= 2.73 (it needs protobuf < 7; the generated
    code is made with a protobuf-6 protoc for that), and its shared memory module imports."""
    from importlib.metadata import version

    import google.protobuf
    import tritonclient.utils.shared_memory as shared_memory

    major, minor = (int(part) for part in version("tritonclient").split(".")[:2])
    assert (major, minor) >= (2, 73)
    assert int(google.protobuf.__version__.split(".")[0]) < 7
    assert callable(shared_memory.create_shared_memory_region)


def test_a_labels_file_beside_the_model(tmp_path: Path) -> None:
    """A relative labels file is read beside the model's artifact; the runtime answers
    classification and configuration itself (the gateway only forwards them)."""
    artifact = tmp_path / "classifier"
    artifact.mkdir()
    (artifact / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    qa_models = Path(__file__).with_name("triton_qa_models.py")
    runtime = Runtime(tmp_path / "runtime.log", "--kind", "python", "--model", f"pets={artifact}",
                      "--option", f"class={qa_models}:RelativeLabels")
    try:
        tensor = triton.InferInput("x", [4], "FP32")
        tensor.set_data_from_numpy(np.array([0.1, 0.7, 0.2, 0.05], dtype=np.float32))
        result = runtime.client.infer("pets", [tensor], outputs=[triton.InferRequestedOutput("y", class_count=2)])
        assert result.as_numpy("y").tolist() == [b"0.700000:1:dog", b"0.200000:2:bird"]
        assert runtime.client.get_model_config("pets").config.output[0].label_filename == "labels.txt"
        stats = runtime.client.get_inference_statistics("pets").model_stats[0]
        assert (stats.inference_count, stats.execution_count, stats.inference_stats.success.count) == (1, 1, 1)
    finally:
        runtime.stop()
