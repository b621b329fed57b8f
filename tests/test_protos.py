"""The generated protobuf code is current, and the inference contract is wire-identical to
the one unmodified tritonclient speaks (compared descriptor by descriptor)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet

from modelgw.protos import inference_pb2

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"

triton_pb = pytest.importorskip("tritonclient.grpc.service_pb2")


def run_check(generate_py: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(generate_py), *args], capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------------ staleness


def test_generated_code_in_the_repository_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modelgw.protos.generate", "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "current" in result.stdout


@pytest.mark.parametrize(
    "proto, stale_module, edit",
    [
        # A new field in an existing message.
        (
            "inference.proto",
            "inference_pb2.py",
            (
                "message ServerLiveRequest {}",
                "message ServerLiveRequest { string stale_probe = 1; }",
            ),
        ),
        # A new message.
        (
            "registry.proto",
            "registry_pb2.py",
            (None, "\nmessage StaleProbe { string note = 1; }\n"),
        ),
    ],
)
def test_check_fails_when_a_proto_changes_without_regeneration(
    tmp_path: Path, proto: str, stale_module: str, edit: tuple[str | None, str]
) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    generate_py = copy / "generate.py"
    # Control: the untouched copy is current, so a failure below is due to the edit.
    control = run_check(generate_py, "--check")
    assert control.returncode == 0, control.stdout + control.stderr

    source = copy / proto
    old, new = edit
    text = source.read_text()
    if old is None:
        text += new
    else:
        assert text.count(old) == 1, f"{proto} no longer contains the text this test edits"
        text = text.replace(old, new)
    source.write_text(text)

    stale = run_check(generate_py, "--check")
    assert stale.returncode != 0
    assert stale_module in stale.stdout + stale.stderr
    assert "stale" in stale.stdout + stale.stderr

    # Regenerating brings the copy back to current, and the new symbol is in the output.
    regenerated = run_check(generate_py)
    assert regenerated.returncode == 0, regenerated.stdout + regenerated.stderr
    assert run_check(generate_py, "--check").returncode == 0
    added = "stale_probe" if proto == "inference.proto" else "StaleProbe"
    assert added in (copy / stale_module).read_text()
    # The repository's own files were not touched by any of this.
    assert added not in (PROTOS / stale_module).read_text()


# ------------------------------------------------------------------ wire compatibility


def field_facts(field: FieldDescriptor) -> dict:
    """Everything about a field that decides its wire format and generated API."""
    message = field.message_type
    return {
        "name": field.name,
        "number": field.number,
        "type": field.type,
        "repeated": field.is_repeated,
        "packed": field.is_packed,
        "message_type": message.full_name if message else None,
        "map": bool(message and message.GetOptions().map_entry),
        "enum_type": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
        "json_name": field.json_name,
    }


def all_messages(descriptors) -> list[Descriptor]:
    """Messages and, recursively, their nested messages (map entries included)."""
    found = []
    for message in descriptors:
        found.append(message)
        found.extend(all_messages(message.nested_types))
    return found


OUR_MESSAGES = all_messages(inference_pb2.DESCRIPTOR.message_types_by_name.values())


def test_we_define_the_oip_messages() -> None:
    names = {m.full_name for m in OUR_MESSAGES}
    for expected in (
        "inference.ModelInferRequest",
        "inference.ModelInferRequest.InferInputTensor",
        "inference.ModelInferResponse",
        "inference.ModelStreamInferResponse",
        "inference.InferTensorContents",
        "inference.InferParameter",
        "inference.ModelMetadataResponse.TensorMetadata",
    ):
        assert expected in names
    assert inference_pb2.DESCRIPTOR.package == "inference"


@pytest.mark.parametrize("message", OUR_MESSAGES, ids=lambda m: m.full_name)
def test_message_matches_tritonclient(message: Descriptor) -> None:
    theirs = triton_pb.DESCRIPTOR.pool.FindMessageTypeByName(message.full_name)
    ours_fields = {f.number: field_facts(f) for f in message.fields}
    their_fields = {f.number: field_facts(f) for f in theirs.fields}
    if theirs.file.name.endswith("model_config.proto"):
        # Triton's ModelConfig tree is declared in part (the fields modelgw fills): each
        # field we declare is theirs exactly, and a client skips none it needs
        assert {n: their_fields.get(n) for n in ours_fields} == ours_fields
    else:
        assert ours_fields == their_fields
    assert [o.name for o in message.oneofs] == [o.name for o in theirs.oneofs]
    assert message.GetOptions().map_entry == theirs.GetOptions().map_entry


def test_service_methods_match_tritonclient() -> None:
    ours = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "ServerLive"} <= set(
        ours.methods_by_name
    )
    for method in ours.methods:
        their_method = theirs.methods_by_name.get(method.name)
        assert their_method is not None, f"tritonclient has no method {method.name}"
        assert method.input_type.full_name == their_method.input_type.full_name, method.name
        assert method.output_type.full_name == their_method.output_type.full_name, method.name
        assert method.client_streaming == their_method.client_streaming, method.name
        assert method.server_streaming == their_method.server_streaming, method.name
    stream = ours.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming


def test_a_tritonclient_request_parses_field_for_field() -> None:
    # A belt-and-braces check on real bytes: every field tritonclient sets survives a trip
    # through our message and back into theirs unchanged, with no unknown fields left over.
    request = triton_pb.ModelInferRequest(model_name="m", model_version="2", id="req-1")
    request.parameters["priority"].uint64_param = 3
    request.parameters["sequence_id"].string_param = "s"
    tensor = request.inputs.add(name="x", datatype="INT64", shape=[1, 2])
    tensor.parameters["shared_memory_offset"].int64_param = 0
    tensor.contents.int64_contents.extend([1, -2])
    request.outputs.add(name="y").parameters["classification"].int64_param = 2
    request.raw_input_contents.append(b"")
    wire = request.SerializeToString()
    ours = inference_pb2.ModelInferRequest.FromString(wire)
    assert not any(len(UnknownFieldSet(m)) for m in (ours, *ours.inputs, ours.inputs[0].contents))
    assert ours.inputs[0].contents.int64_contents == [1, -2]
    assert ours.parameters["priority"].uint64_param == 3
    assert triton_pb.ModelInferRequest.FromString(ours.SerializeToString()) == request
