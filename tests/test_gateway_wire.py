"""The gateway reads routing fields off the wire: it must agree with protobuf's parser."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelgw.gateway.wire import WireError, routing_fields
from modelgw.oip import codec
from modelgw.protos import inference_pb2 as pb

names = st.text(min_size=0, max_size=40)


@given(
    name=names,
    version=names,
    request_id=names,
    shape=st.lists(st.integers(0, 4), max_size=3),
    params=st.dictionaries(st.text(max_size=8), st.integers(-(2**62), 2**62), max_size=3),
)
@settings(max_examples=200, deadline=None)
def test_routing_fields_match_protobuf(name, version, request_id, shape, params):
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=request_id)
    for key, value in params.items():
        request.parameters[key].int64_param = value
    codec.add_input(request, "x", np.zeros(shape, dtype=np.float32))
    request.outputs.add(name="y")
    payload = request.SerializeToString()
    parsed = pb.ModelInferRequest.FromString(payload)
    assert routing_fields(payload) == (parsed.model_name, parsed.model_version)


def test_metadata_and_ready_requests_share_the_layout():
    for message in (pb.ModelMetadataRequest(name="m", version="3"), pb.ModelReadyRequest(name="m", version="3")):
        assert routing_fields(message.SerializeToString()) == ("m", "3")


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_garbage_is_refused_or_parsed_like_protobuf(payload):
    try:
        expected = pb.ModelInferRequest.FromString(payload)
    except Exception:
        expected = None
    try:
        got = routing_fields(payload)
    except WireError:
        # we may refuse more than protobuf does (it would fail later, on tensors), never less
        return
    if expected is not None:
        assert got == (expected.model_name, expected.model_version)


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x05ab", b"\x0a", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x00\x01", b"\x0b"],
)
def test_truncated_or_invalid_messages_raise(payload):
    with pytest.raises(WireError):
        routing_fields(payload)


@given(name=names, old=names, new=st.text(min_size=1, max_size=300))
@settings(max_examples=100, deadline=None)
def test_with_version_sets_the_version_for_protobuf(name, old, new):
    from modelgw.gateway.wire import with_version

    request = pb.ModelInferRequest(model_name=name, model_version=old)
    codec.add_input(request, "x", np.arange(3, dtype=np.int64))
    rewritten = pb.ModelInferRequest.FromString(with_version(request.SerializeToString(), new))
    assert rewritten.model_version == new
    assert rewritten.model_name == name
    assert codec.decode_request_inputs(rewritten)["x"].tolist() == [0, 1, 2]
