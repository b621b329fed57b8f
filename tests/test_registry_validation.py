"""Registry records: validation messages per field, the codec, the key layout and the
apply file format. Pure functions: no etcd needed here."""

from __future__ import annotations

import json

import pytest

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec, files
from modelgw.registry.errors import CorruptRecordError, ValidationError
from modelgw.registry.keys import Keys, Section, prefix_end
from modelgw.registry.validation import (
    check_endpoint,
    check_model,
    check_runtime,
    model_problems,
    parse_quantity,
    runtime_problems,
)


def runtime(**fields) -> rpb.RuntimeSpec:
    base = {"name": "torch", "kind": "pytorch", "model_formats": ["torchscript"], "replicas": 2}
    return codec.from_dict({**base, **fields}, rpb.RuntimeSpec, "test")


def model(**fields) -> rpb.ModelSpec:
    base = {
        "name": "resnet",
        "versions": [
            {"version": "1", "uri": "/models/resnet/1", "format": "torchscript", "runtime": "torch"},
            {"version": "2", "uri": "file:///models/resnet/2", "format": "torchscript", "runtime": "torch"},
        ],
    }
    return codec.from_dict({**base, **fields}, rpb.ModelSpec, "test")


def test_valid_records_pass():
    for name in ("simple_string", "resnet50.v1", "ResNet-50", "_x", "m" * 128):
        check_model(model(name=name))
    check_runtime(runtime(resources={"cpu": "500m", "memory": "1Gi", "gpu": 1}, env={"OMP_NUM_THREADS": "1"}))
    check_model(model(traffic={"1": 90, "2": 10}, limits={"timeout_seconds": 30, "max_batch_size": 8}))
    check_model(model(), {"torch": runtime()})
    check_endpoint(rpb.Endpoint(runtime="torch", instance="torch-0", address="127.0.0.1:9000"))


# (record, the field its message must name, a fragment of the explanation)
INVALID_RUNTIMES = [
    (runtime(name="Torch"), "runtimes/Torch: name:", "not a DNS label"),
    (runtime(name="a" * 64), "name:", "not a DNS label"),
    (runtime(name="torch\n"), "name:", "not a DNS label"),  # `$` alone would let a trailing newline through
    (runtime(name=""), "runtimes/<unnamed>: name:", "required"),
    (runtime(kind="Tensor Flow"), "runtimes/torch: kind:", "'Tensor Flow' is not a kind name"),
    (runtime(kind="k" * 64), "runtimes/torch: kind:", "is not a kind name"),
    (runtime(kind=""), "runtimes/torch: kind:", "required"),
    (runtime(model_formats=[]), "runtimes/torch: model_formats:", "at least one"),
    (runtime(model_formats=["onnx", "onnx"]), "model_formats[1]:", "duplicates model_formats[0]"),
    (runtime(replicas=1000), "runtimes/torch: replicas:", "maximum"),
    (runtime(resources={"cpu": "lots"}), "resources.cpu:", "not a Kubernetes quantity"),
    (runtime(resources={"memory": "512MB"}), "resources.memory:", "not a Kubernetes quantity"),
    (runtime(resources={"cpu": "0"}), "resources.cpu:", "more than zero"),
    (runtime(resources={"gpu": 1000}), "resources.gpu:", "maximum"),
    (runtime(env={"1BAD": "x"}), "env['1BAD']:", "environment variable"),
    (runtime(labels={"team": "a b"}), "labels['team']:", "label value"),
    (runtime(options={"a=b": "c"}), "options['a=b']:", "without '='"),
]

INVALID_MODELS = [
    (model(name="Res Net"), "models/Res Net: name:", "not a model name"),
    (model(name=".hidden"), "models/.hidden: name:", "not a model name"),
    (model(name="a/b"), "models/a/b: name:", "not a model name"),
    (model(name="m" * 129), "name:", "not a model name"),
    (model(name="m\n"), "name:", "not a model name"),
    (model(versions=[]), "models/resnet: versions:", "at least one version"),
    (
        model(versions=[{"version": "1", "uri": "/a", "format": "onnx", "runtime": "torch"}] * 2),
        "versions[1].version:",
        "duplicates versions[0]",
    ),
    (model(versions=[{"uri": "/a", "format": "onnx", "runtime": "torch"}]), "versions[0].version:", "required"),
    (
        model(versions=[{"version": "1 0", "uri": "/a", "format": "x", "runtime": "torch"}]),
        "versions[0].version:",
        "not a version name",
    ),
    (
        model(versions=[{"version": "1", "uri": "s3://bucket/m", "format": "x", "runtime": "torch"}]),
        "versions[0].uri:",
        "scheme 's3' is not supported",
    ),
    (model(versions=[{"version": "1", "uri": "models/m", "format": "x", "runtime": "torch"}]), "versions[0].uri:", "relative path"),
    (
        model(versions=[{"version": "1", "uri": "file://host/m", "format": "x", "runtime": "torch"}]),
        "versions[0].uri:",
        "must not name a host",
    ),
    (model(versions=[{"version": "1", "format": "x", "runtime": "torch"}]), "versions[0].uri:", "required"),
    (model(versions=[{"version": "1", "uri": "/m", "runtime": "torch"}]), "versions[0].format:", "required"),
    (
        model(versions=[{"version": "1", "uri": "/m", "format": "x", "runtime": "Torch!"}]),
        "versions[0].runtime:",
        "not a DNS label",
    ),
    (model(traffic={"1": 50, "2": 40}), "models/resnet: traffic:", "sum to 90"),
    (model(traffic={"1": 50, "3": 50}), "traffic['3']:", "no such version"),
    (model(traffic={"1": 150}), "traffic['1']:", "more than 100"),
    (model(limits={"timeout_seconds": -1}), "limits.timeout_seconds:", "zero or more"),
    (model(limits={"max_batch_size": 10**6}), "limits.max_batch_size:", "maximum"),
    (model(access={"public": True, "scopes": ["infer"]}), "access.public:", "cannot also require"),
    (model(access={"scopes": ["has space"]}), "access.scopes[0]:", "without spaces"),
    (model(labels={"-bad": "x"}), "labels['-bad']:", "label key"),
    (model(description="x" * 2000), "description:", "longer than"),
]


@pytest.mark.parametrize(("spec", "field", "why"), INVALID_RUNTIMES, ids=lambda v: None)
def test_invalid_runtime_names_the_field(spec, field, why):
    with pytest.raises(ValidationError) as caught:
        check_runtime(spec)
    message = str(caught.value)
    assert field in message and why in message, message
    assert len(caught.value.problems) == 1, caught.value.problems


@pytest.mark.parametrize(("spec", "field", "why"), INVALID_MODELS, ids=lambda v: None)
def test_invalid_model_names_the_field(spec, field, why):
    with pytest.raises(ValidationError) as caught:
        check_model(spec)
    message = str(caught.value)
    assert field in message and why in message, message


def test_model_format_must_be_loaded_by_its_runtime():
    onnx_runtime = runtime(name="ort", kind="onnx", model_formats=["onnx"])
    spec = model(versions=[{"version": "1", "uri": "/m", "format": "torchscript", "runtime": "ort"}])
    problems = model_problems(spec, {"ort": onnx_runtime})
    assert problems == [
        "models/resnet: versions[0].format: runtime 'ort' does not load format 'torchscript' (it loads: onnx)"
    ]
    # without the runtime at hand, the format cannot be judged (the store always passes it)
    assert model_problems(spec) == []


def test_every_problem_is_reported_at_once():
    spec = model(name="Bad!", versions=[{"version": "1", "uri": "ftp://x", "format": "", "runtime": ""}])
    problems = model_problems(spec)
    fields = [p.split(": ")[1] for p in problems]
    assert fields == ["name", "versions[0].uri", "versions[0].format", "versions[0].runtime"], problems


def test_endpoint_problems():
    bad = rpb.Endpoint(runtime="torch", instance="", address="nohost")
    with pytest.raises(ValidationError) as caught:
        check_endpoint(bad)
    assert "instance: required" in str(caught.value)
    assert "address: 'nohost' is not host:port" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", 0.5), ("2", 2.0), ("1Gi", 2.0**30), ("1.5G", 1.5e9), ("1e3", 1000.0), ("abc", None), ("1 Gi", None)],
)
def test_quantities(text, value):
    assert parse_quantity(text) == value


def test_runtime_problems_empty_for_minimal_spec():
    assert runtime_problems(rpb.RuntimeSpec(name="x", kind="python", model_formats=["python"])) == []


def test_any_kind_name_is_accepted_the_runtime_spec_declaring_its_formats():
    # kinds plug in as entry points where the runtime runs, which the registry cannot
    # see: it checks the name, and models against the formats the runtime declares
    tensorflow = runtime(name="tf", kind="tensorflow", model_formats=["savedmodel"])
    assert runtime_problems(tensorflow) == []
    check_model(model(versions=[{"version": "1", "uri": "/m/1", "format": "savedmodel", "runtime": "tf"}]),
                {"tf": tensorflow})
    (problem,) = model_problems(
        model(versions=[{"version": "1", "uri": "/m/1", "format": "onnx", "runtime": "tf"}]), {"tf": tensorflow}
    )
    assert problem == "models/resnet: versions[0].format: runtime 'tf' does not load format 'onnx' (it loads: savedmodel)"


# ---------------------------------------------------------------- codec


def test_codec_roundtrip_uses_proto_field_names_and_sorted_maps():
    spec = model(traffic={"2": 10, "1": 90}, labels={"z": "1", "a": "2"})
    data = codec.encode(spec)
    parsed = json.loads(data)
    assert list(parsed["traffic"]) == ["1", "2"] and list(parsed["labels"]) == ["a", "z"]
    assert "model_formats" in codec.encode(runtime()).decode()
    assert codec.decode(data, rpb.ModelSpec) == spec


def test_codec_tolerates_unknown_fields_in_stored_records_but_not_in_input():
    stored = json.dumps({"name": "resnet", "added_by_a_newer_writer": 1}).encode()
    assert codec.decode(stored, rpb.ModelSpec).name == "resnet"
    with pytest.raises(ValidationError, match=r"models/resnet: added_by_a_newer_writer: unknown field"):
        codec.from_dict({"name": "resnet", "added_by_a_newer_writer": 1}, rpb.ModelSpec, "models/resnet")


def test_codec_corrupt_record_names_the_key():
    with pytest.raises(CorruptRecordError, match="/modelgw/v1/models/x: stored value is not a valid record"):
        codec.decode(b"{not json", rpb.ModelSpec, b"/modelgw/v1/models/x")


def test_codec_input_type_errors_name_the_field():
    with pytest.raises(ValidationError) as caught:
        codec.from_dict(
            {"name": "m", "versions": [{"version": 1.5}], "traffic": {"1": -3}, "access": {"public": "yes"}},
            rpb.ModelSpec,
            "models/m",
        )
    assert caught.value.problems == [
        "models/m: versions[0].version: expected a string, got float 1.5 (quote it)",
        "models/m: traffic['1']: expected a whole number of 0 or more, got -3",
        "models/m: access.public: expected true or false, got str 'yes'",
    ]


def test_codec_accepts_yaml_numbers_for_strings_and_camel_case():
    spec = codec.from_dict(
        {"name": "m", "versions": [{"version": 1, "uri": "/m", "format": "x", "runtime": "r"}], "traffic": {1: 100}},
        rpb.ModelSpec,
        "models/m",
    )
    assert spec.versions[0].version == "1" and dict(spec.traffic) == {"1": 100}
    assert list(codec.from_dict({"name": "r", "modelFormats": ["x"]}, rpb.RuntimeSpec, "r").model_formats) == ["x"]


# ---------------------------------------------------------------- keys


def test_key_layout():
    keys = Keys("/mg")
    assert keys.prefix == "/mg/"
    assert keys.model("resnet") == b"/mg/models/resnet"
    assert keys.endpoint("torch", "torch-0") == b"/mg/endpoints/torch/torch-0"
    assert keys.runtime_status("torch") == b"/mg/status/runtimes/torch"
    assert keys.election() == b"/mg/election/reconciler"
    parsed = keys.parse(keys.endpoint("torch", "torch-0"))
    assert (parsed.section, parsed.name, parsed.runtime, parsed.instance) == (
        Section.ENDPOINT,
        "torch/torch-0",
        "torch",
        "torch-0",
    )
    assert keys.parse(keys.runtime_status("torch")).section == Section.RUNTIME_STATUS
    assert keys.parse(b"/other/models/x") is None
    assert keys.parse(b"/mg/unknown/x") is None
    assert prefix_end(b"/mg/") == b"/mg0"
    with pytest.raises(ValueError):
        Keys("no-slash")


# ---------------------------------------------------------------- apply files


def test_files_multi_document_yaml():
    text = """
kind: Runtime
spec: {name: torch, kind: pytorch, model_formats: [torchscript]}
---
kind: Model
revision: 7
spec:
  name: resnet
  versions: [{version: 1, uri: /m/1, format: torchscript, runtime: torch}]
---
"""
    docs = files.parse_documents(text, "f.yaml")
    assert [(d.kind, d.spec.name, d.revision, d.source) for d in docs] == [
        ("Runtime", "torch", None, "f.yaml#1"),
        ("Model", "resnet", 7, "f.yaml#2"),
    ]


def test_files_json_list_and_kubectl_list():
    item = {"kind": "Runtime", "spec": {"name": "torch", "kind": "pytorch", "model_formats": ["x"]}}
    assert len(files.parse_documents(json.dumps([item, item]), "f.json")) == 2
    assert len(files.parse_documents(json.dumps({"kind": "List", "items": [item]}), "f.json")) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Model\nspec: [1", "f.yaml: invalid YAML at line"),
        ("{", "f.yaml: invalid JSON at line 1"),
        ("", "f.yaml: no documents found"),
        ("kind: Gadget\nspec: {}", "f.yaml: kind: 'Gadget' is not one of Runtime, Model"),
        ("spec: {name: x}", "f.yaml: kind: required"),
        ("kind: Model", "f.yaml: spec: required"),
        ("kind: Endpoint\nspec: {}", "endpoints are registered by runtime replicas"),
        ("kind: Model\nmetadata: {}\nspec: {}", "unknown field 'metadata'"),
        ("kind: Model\nrevision: -1\nspec: {name: m}", "models/m: revision: expected a whole number"),
        ("kind: Runtime\nspec: {name: r, replicas: many}", "runtimes/r: replicas: expected a whole number"),
        ("- 1\n- 2", "f.yaml#1: expected a mapping with kind and spec"),
    ],
)
def test_files_errors_say_where(text, message):
    with pytest.raises(ValidationError) as caught:
        files.parse_documents(text, "f.yaml")
    assert message in str(caught.value)


def test_files_get_output_applies_again():
    record = rpb.RuntimeRecord(spec=runtime(), revision=12, status=rpb.RuntimeStatus(name="torch", replicas_ready=1))
    text = files.dump_yaml([files.runtime_document(record)])
    (doc,) = files.parse_documents(text, "out.yaml")
    assert doc.spec == record.spec and doc.revision == 12
