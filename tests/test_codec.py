"""Tensor codec: property-based round trips for every OIP datatype, errors that name the
tensor, and wire compatibility with tritonclient's own serialization.

Expected datatype <-> numpy dtype pairs and contents fields are written out here from the
OIP / Triton specification rather than read from the codec, so a wrong table in the codec
fails these tests. BF16 rounding is checked against torch's own bfloat16 conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelgw.oip import codec
from modelgw.oip.codec import TensorError
from modelgw.oip.protocol import MAX_SHAPE_DIMS
from modelgw.protos import inference_pb2 as pb

torch = pytest.importorskip("torch")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient import utils as triton_utils  # noqa: E402
from tritonclient.grpc import _utils as triton_grpc_utils  # noqa: E402
from tritonclient.grpc import service_pb2 as triton_pb  # noqa: E402
from tritonclient.grpc._infer_result import InferResult  # noqa: E402

settings.register_profile(
    "codec", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("codec")

# The OIP datatypes with a fixed-size numpy representation, and their numpy dtypes.
FIXED: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
# The InferTensorContents field of each datatype that has one (FP16 and BF16 have none).
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
ALL_DATATYPES = [*FIXED, "BYTES", "BF16"]
NAME = "pixel_values"

# Shapes of up to 4 dimensions, zero-size dimensions included, scalars (shape []) too.
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


def fixed_arrays(datatype: str) -> st.SearchStrategy[np.ndarray]:
    """Arrays of any value of the dtype: NaN, infinities, -0.0 and subnormals included."""
    return hnp.arrays(FIXED[datatype], shapes)


@st.composite
def bytes_arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(shapes)
    items = draw(
        st.lists(st.binary(max_size=12), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
    )
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def same_values(decoded: np.ndarray, expected: np.ndarray) -> bool:
    """Equal dtype, shape and elements, bit for bit (so -0.0 != 0.0), any NaN equal to NaN."""
    if decoded.dtype != expected.dtype or decoded.shape != expected.shape:
        return False
    if expected.dtype.kind == "O":
        return decoded.tolist() == expected.tolist()
    if expected.dtype.kind == "f":
        nan = np.isnan(expected)
        if not np.array_equal(nan, np.isnan(decoded)):
            return False
        return decoded[~nan].tobytes() == expected[~nan].tobytes()
    return decoded.tobytes() == expected.tobytes()


def request_round_trip(
    array: np.ndarray, datatype: str, *, raw: bool
) -> tuple[pb.ModelInferRequest, np.ndarray]:
    """Encode one input into a request, send it through the wire format, decode it."""
    request = pb.ModelInferRequest(model_name="m")
    codec.add_input(request, NAME, array, datatype, raw=raw)
    received = pb.ModelInferRequest.FromString(request.SerializeToString())
    return received, codec.decode_request_inputs(received)[NAME]


def torch_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Reference float -> bfloat16 rounding, by torch (bit patterns as uint16)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16)
    return tensor.view(torch.int16).numpy().view(np.uint16)


def torch_bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """Reference bfloat16 -> float32 widening, by torch."""
    tensor = torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16))
    return tensor.view(torch.bfloat16).to(torch.float32).numpy()


# ------------------------------------------------------------------ round trips


def test_datatype_of_maps_numpy_dtypes_to_oip_names() -> None:
    for datatype, dtype in FIXED.items():
        assert codec.datatype_of(np.zeros(2, dtype=dtype)) == datatype
        # Byte order does not change the datatype; the codec sends little-endian.
        assert codec.datatype_of(np.zeros(2, dtype=dtype.newbyteorder(">"))) == datatype
    for array in (np.array([b"a"]), np.array(["a"]), np.array([b"a"], dtype=object)):
        assert codec.datatype_of(array) == "BYTES"
    with pytest.raises(TypeError, match="complex64"):
        codec.datatype_of(np.zeros(1, dtype=np.complex64))


@pytest.mark.parametrize("datatype", list(FIXED))
@given(data=st.data())
def test_fixed_types_round_trip_through_raw_contents(datatype: str, data: st.DataObject) -> None:
    array = data.draw(fixed_arrays(datatype))
    raw = codec.encode_raw(NAME, array)
    assert raw == array.astype(FIXED[datatype].newbyteorder("<")).tobytes()
    assert same_values(codec.decode_raw(NAME, datatype, array.shape, raw), array)
    received, decoded = request_round_trip(array, None, raw=True)
    assert received.inputs[0].datatype == datatype
    assert list(received.inputs[0].shape) == list(array.shape)
    assert same_values(decoded, array)


@pytest.mark.parametrize("datatype", list(FIXED))
@given(data=st.data())
def test_big_endian_arrays_are_sent_little_endian(datatype: str, data: st.DataObject) -> None:
    array = data.draw(fixed_arrays(datatype))
    swapped = array.astype(array.dtype.newbyteorder(">"))
    decoded = codec.decode_raw(NAME, datatype, array.shape, codec.encode_raw(NAME, swapped))
    assert same_values(decoded, array)


@pytest.mark.parametrize("datatype", [d for d in FIXED if d in TYPED_FIELD])
@given(data=st.data())
def test_fixed_types_round_trip_through_typed_contents(datatype: str, data: st.DataObject) -> None:
    array = data.draw(fixed_arrays(datatype))
    received, decoded = request_round_trip(array, datatype, raw=False)
    assert not received.raw_input_contents
    contents = received.inputs[0].contents
    used = {field.name for field, _ in contents.ListFields()}
    assert used <= {TYPED_FIELD[datatype]}
    assert len(getattr(contents, TYPED_FIELD[datatype])) == array.size
    assert same_values(decoded, array)


@given(array=bytes_arrays(), raw=st.booleans())
def test_bytes_round_trip(array: np.ndarray, raw: bool) -> None:
    received, decoded = request_round_trip(array, None, raw=raw)
    assert received.inputs[0].datatype == "BYTES"
    assert same_values(decoded, array)
    if not raw:
        assert list(received.inputs[0].contents.bytes_contents) == array.reshape(-1).tolist()


@given(texts=hnp.arrays(np.dtype("U8"), shapes), raw=st.booleans())
def test_str_arrays_travel_as_utf8_bytes(texts: np.ndarray, raw: bool) -> None:
    _, decoded = request_round_trip(texts, None, raw=raw)
    assert decoded.shape == texts.shape
    assert decoded.reshape(-1).tolist() == [t.encode("utf-8") for t in texts.reshape(-1).tolist()]


@given(array=bytes_arrays())
def test_bytes_framing_is_length_prefixed(array: np.ndarray) -> None:
    raw = codec.encode_raw(NAME, array)
    expected = b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1).tolist())
    assert raw == expected


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_zero_size_tensors(datatype: str) -> None:
    dtype = np.dtype(object) if datatype == "BYTES" else FIXED.get(datatype, np.dtype(np.float32))
    for shape in ([0], [3, 0], [0, 2, 5]):
        array = np.zeros(shape, dtype=dtype)
        raw = codec.encode_raw(NAME, array, datatype)
        assert raw == b""
        decoded = codec.decode_raw(NAME, datatype, shape, raw)
        assert decoded.shape == tuple(shape) and decoded.size == 0


@given(array=hnp.arrays(np.dtype(np.int64), shapes), raw=st.booleans())
def test_response_outputs_round_trip(array: np.ndarray, raw: bool) -> None:
    response = pb.ModelInferResponse(model_name="m")
    codec.add_output(response, "scores", array, raw=raw)
    codec.add_output(response, "labels", np.array([b"cat", b"dog"], dtype=object), raw=raw)
    received = pb.ModelInferResponse.FromString(response.SerializeToString())
    outputs = codec.decode_response_outputs(received)
    assert same_values(outputs["scores"], array)
    assert outputs["labels"].tolist() == [b"cat", b"dog"]


# ------------------------------------------------------------------ BF16


# Ties to even, overflow to infinity, NaN, signed zero, subnormals and the extremes.
BF16_EDGE_CASES = np.array(
    [
        1.0 + 2**-8,  # exactly halfway between two bf16 values: rounds down to even
        1.0 + 3 * 2**-8,  # halfway, rounds up to even
        1.0 + 2**-8 + 2**-20,  # just above halfway: rounds up
        -(1.0 + 2**-8),
        np.finfo(np.float32).max,  # rounds up to infinity
        np.finfo(np.float32).tiny,
        np.float32(1e-45),  # smallest subnormal
        np.inf,
        -np.inf,
        np.nan,
        -0.0,
        0.0,
        65504.0,
        3.14159265,
    ],
    dtype=np.float32,
)


@given(array=hnp.arrays(np.dtype(np.float32), shapes))
@example(array=BF16_EDGE_CASES)
def test_bf16_encoding_rounds_like_torch(array: np.ndarray) -> None:
    raw = codec.encode_raw(NAME, array, "BF16")
    assert len(raw) == 2 * array.size
    bits = np.frombuffer(raw, dtype="<u2").reshape(array.shape)
    reference = torch_bf16_bits(array).reshape(array.shape)
    nan = np.isnan(array)
    assert np.array_equal(bits[~nan], reference[~nan])
    # NaN stays NaN (payloads may differ between implementations).
    decoded = codec.decode_raw(NAME, "BF16", array.shape, raw)
    assert decoded.dtype == np.float32
    assert np.array_equal(np.isnan(decoded), nan)
    assert same_values(decoded, torch_bf16_to_float(reference).reshape(array.shape))


@given(array=hnp.arrays(np.dtype(np.float16), shapes))
def test_bf16_encoding_from_float16_rounds_like_torch(array: np.ndarray) -> None:
    bits = np.frombuffer(codec.encode_raw(NAME, array, "BF16"), dtype="<u2")
    reference = (
        torch.from_numpy(array.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    )
    nan = np.isnan(array).reshape(-1)
    assert np.array_equal(bits[~nan], reference.reshape(-1)[~nan])


@given(bits=hnp.arrays(np.dtype("<u2"), shapes))
def test_bf16_decoding_widens_like_torch(bits: np.ndarray) -> None:
    decoded = codec.decode_raw(NAME, "BF16", bits.shape, bits.tobytes())
    assert same_values(decoded, torch_bf16_to_float(bits).reshape(bits.shape))
    # Every bf16 value is exact in float32, so encoding it again gives the same bits.
    not_nan = ~np.isnan(decoded)
    again = np.frombuffer(codec.encode_raw(NAME, decoded, "BF16"), dtype="<u2").reshape(bits.shape)
    assert np.array_equal(again[not_nan], bits[not_nan])


def test_bf16_has_no_typed_contents() -> None:
    with pytest.raises(TensorError, match=f"'{NAME}'.*BF16.*raw"):
        request_round_trip(np.ones(2, dtype=np.float32), "BF16", raw=False)


# ------------------------------------------------------------------ errors


def raises_for(tensor: str, *fragments: str):
    """pytest.raises for a TensorError about `tensor` whose message says each fragment."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(TensorError)
            self._info = self._ctx.__enter__()
            return self._info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            error = self._info.value
            assert error.tensor == tensor
            assert f"'{tensor}'" in str(error)
            for fragment in fragments:
                assert fragment in str(error), (fragment, str(error))
            return handled

    return _Check()


def typed_request(datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(
        name=NAME, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    )
    return request


def raw_request(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name=NAME, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    delta=st.integers(-3, 3).filter(bool),
)
def test_typed_element_count_mismatch(shape: tuple[int, ...], delta: int) -> None:
    count = int(np.prod(shape)) + delta
    if count < 0:
        return
    request = typed_request("FP32", list(shape), fp32_contents=[1.0] * count)
    with raises_for(NAME, f"{int(np.prod(shape))} elements", f"{count} were given"):
        codec.decode_request_inputs(request)


@pytest.mark.parametrize("datatype", [*FIXED, "BF16"])
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    delta=st.integers(-5, 5).filter(bool),
)
def test_raw_length_mismatch(datatype: str, shape: tuple[int, ...], delta: int) -> None:
    itemsize = 2 if datatype == "BF16" else FIXED[datatype].itemsize
    length = int(np.prod(shape)) * itemsize + delta
    if length < 0:
        return
    with raises_for(NAME, f"{length} bytes", datatype):
        codec.decode_request_inputs(raw_request(datatype, list(shape), b"\x00" * length))


@pytest.mark.parametrize(
    "raw, count, fragment",
    [
        (
            b"\x02\x00\x00\x00ab\x01\x00",
            2,
            "ends inside the length of element 1",
        ),  # truncated prefix
        (b"\x03\x00", 1, "1 BYTES elements need at least 4 bytes, but 2 were given"),
        (b"\x03\x00\x00\x00ab", 1, "claims 3 bytes but only 2 remain"),  # truncated element
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00", 2, "claims 1 bytes but only 0 remain"),
        (b"\x01\x00\x00\x00a\x00", 1, "1 bytes left over after 1"),  # overlong
        (b"\x00\x00\x00\x00", 0, "4 bytes left over after 0"),
        (b"\x00\x00\x00\x00", 2, "2 BYTES elements need at least 8 bytes"),
        (b"\xff\xff\xff\xff", 1, "claims 4294967295 bytes"),
    ],
)
def test_bytes_framing_errors(raw: bytes, count: int, fragment: str) -> None:
    with raises_for(NAME, fragment):
        codec.decode_request_inputs(raw_request("BYTES", [count], raw))


@given(array=bytes_arrays().filter(lambda a: a.size > 0), cut=st.integers(1, 5))
def test_any_truncated_bytes_tensor_is_refused(array: np.ndarray, cut: int) -> None:
    raw = codec.encode_raw(NAME, array)
    with raises_for(NAME):
        codec.decode_raw(NAME, "BYTES", array.shape, raw[: max(0, len(raw) - cut)])
    with raises_for(NAME, "left over"):
        codec.decode_raw(NAME, "BYTES", array.shape, raw + b"\x00" * cut)


def test_shape_far_larger_than_bytes_data_is_refused_before_allocating() -> None:
    # A billion elements claimed for an empty payload: refused from the payload size.
    with raises_for(NAME, "1000000000 BYTES elements need at least"):
        codec.decode_request_inputs(raw_request("BYTES", [1_000_000, 1000], b""))


@pytest.mark.parametrize("raw", [True, False])
def test_negative_dimension(raw: bool) -> None:
    request = raw_request("INT32", [2, -1], b"") if raw else typed_request("INT32", [2, -1])
    with raises_for(NAME, "[2, -1]", "negative"):
        codec.decode_request_inputs(request)


@pytest.mark.parametrize("shape", [[1] * 65, [0, 2**62, 2**62]])
def test_shapes_numpy_cannot_hold(shape: list[int]) -> None:
    count = int(np.prod(shape, dtype=object))
    with raises_for(NAME, "shape"):
        codec.decode_request_inputs(raw_request("UINT8", shape, b"\x00" * count))


@pytest.mark.parametrize("raw", [True, False])
def test_shape_with_more_dims_than_allowed_is_refused_briefly(raw: bool) -> None:
    # 10,000 dims once made an error that echoed the shape outgrow gRPC's metadata limit
    shape = [1] * 10_000
    request = raw_request("UINT8", shape, b"\x00") if raw else typed_request("UINT8", shape, uint_contents=[0])
    with raises_for(NAME, "10000 dimensions", f"at most {MAX_SHAPE_DIMS}") as info:
        codec.decode_request_inputs(request)
    assert len(str(info.value)) < 200, str(info.value)


def test_shape_with_the_most_dims_allowed_decodes() -> None:
    shape = [1] * MAX_SHAPE_DIMS
    array = codec.decode_request_inputs(raw_request("UINT8", shape, b"\x07"))[NAME]
    assert array.shape == tuple(shape) and array.item() == 7


@pytest.mark.parametrize("datatype", ["FLOAT32", "fp32", "", "STRING"])
@pytest.mark.parametrize("raw", [True, False])
def test_unknown_datatype(datatype: str, raw: bool) -> None:
    request = (
        raw_request(datatype, [1], b"\x00" * 4)
        if raw
        else typed_request(datatype, [1], fp32_contents=[1.0])
    )
    with raises_for(NAME, f"unknown datatype '{datatype}'", "FP32"):
        codec.decode_request_inputs(request)


@pytest.mark.parametrize(
    "datatype, contents, wrong",
    [
        ("FP32", {"int_contents": [1]}, "int_contents"),
        ("INT64", {"int_contents": [1]}, "int_contents"),  # INT64 goes in int64_contents
        ("UINT8", {"int_contents": [1]}, "int_contents"),
        ("FP64", {"fp32_contents": [1.0]}, "fp32_contents"),
        ("BYTES", {"bytes_contents": [b"a"], "fp32_contents": [1.0]}, "fp32_contents"),
        ("BOOL", {"bool_contents": [True], "uint_contents": [1]}, "uint_contents"),
    ],
)
def test_contents_in_the_wrong_field(datatype: str, contents: dict, wrong: str) -> None:
    with raises_for(NAME, TYPED_FIELD[datatype], wrong):
        codec.decode_request_inputs(typed_request(datatype, [1], **contents))


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_types_have_no_typed_contents(datatype: str) -> None:
    with raises_for(NAME, datatype, "raw"):
        codec.decode_request_inputs(typed_request(datatype, [1], fp32_contents=[1.0]))
    with raises_for(NAME, datatype, "raw"):
        codec.encode_contents(
            NAME, np.ones(1, dtype=np.float16), pb.InferTensorContents(), datatype
        )


SMALL_INTS = ["UINT8", "UINT16", "INT8", "INT16"]


@pytest.mark.parametrize("datatype", SMALL_INTS)
@given(data=st.data())
def test_out_of_range_typed_ints(datatype: str, data: st.DataObject) -> None:
    info = np.iinfo(FIXED[datatype])
    field = TYPED_FIELD[datatype]
    wire = np.iinfo(np.uint32 if field == "uint_contents" else np.int32)
    value = data.draw(
        st.integers(int(wire.min), int(info.min) - 1)
        | st.integers(int(info.max) + 1, int(wire.max))
        if info.min > wire.min
        else st.integers(int(info.max) + 1, int(wire.max))
    )
    with raises_for(NAME, "out of range", datatype):
        codec.decode_request_inputs(typed_request(datatype, [2], **{field: [0, value]}))


@pytest.mark.parametrize("datatype", SMALL_INTS)
def test_in_range_typed_int_extremes(datatype: str) -> None:
    info = np.iinfo(FIXED[datatype])
    request = typed_request(
        datatype, [2], **{TYPED_FIELD[datatype]: [int(info.min), int(info.max)]}
    )
    decoded = codec.decode_request_inputs(request)[NAME]
    assert decoded.dtype == FIXED[datatype] and decoded.tolist() == [info.min, info.max]


def test_bool_raw_bytes_other_than_0_or_1() -> None:
    with raises_for(NAME, "BOOL", "0 or 1"):
        codec.decode_request_inputs(raw_request("BOOL", [3], b"\x00\x01\x02"))


def test_raw_entries_do_not_match_inputs() -> None:
    request = raw_request("FP32", [1], b"\x00" * 4)
    request.inputs.add(name="second", datatype="FP32", shape=[1])
    with pytest.raises(TensorError, match="raw_input_contents has 1 entries for 2 inputs"):
        codec.decode_request_inputs(request)


def test_raw_and_typed_contents_together() -> None:
    request = raw_request("FP32", [1], b"\x00" * 4)
    request.inputs[0].contents.fp32_contents.append(1.0)
    with raises_for(NAME, "both contents and raw_input_contents"):
        codec.decode_request_inputs(request)


def test_input_given_twice() -> None:
    request = typed_request("FP32", [1], fp32_contents=[1.0])
    request.inputs.add(
        name=NAME, datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[2.0])
    )
    with raises_for(NAME, "more than once"):
        codec.decode_request_inputs(request)


def test_response_raw_entries_do_not_match_outputs() -> None:
    response = pb.ModelInferResponse()
    codec.add_output(response, "a", np.ones(1, dtype=np.float32))
    response.outputs.add(name="b", datatype="FP32", shape=[1])
    with pytest.raises(TensorError, match="raw_output_contents has 1 entries for 2 outputs"):
        codec.decode_response_outputs(response)


def test_bytes_elements_that_are_not_bytes_encode_alike_typed_and_raw() -> None:
    array = np.array([5, "é", b"\x00x"], dtype=object)
    contents = pb.InferTensorContents()
    codec.encode_contents(NAME, array, contents)
    raw_elements = codec.decode_raw(NAME, "BYTES", [3], codec.encode_raw(NAME, array)).tolist()
    assert list(contents.bytes_contents) == raw_elements == [b"5", "é".encode(), b"\x00x"]


# ------------------------------------------------------------------ tritonclient wire compatibility


@st.composite
def triton_bytes_arrays(draw: st.DrawFn) -> np.ndarray:
    """Object arrays of bytes, str and ints: the element kinds tritonclient serializes."""
    shape = draw(shapes)
    element = st.binary(max_size=10) | st.text(max_size=6) | st.integers(-1000, 1000)
    items = draw(st.lists(element, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def triton_bf16(array: np.ndarray) -> np.ndarray:
    """A BF16 tensor as tritonclient users build it: an ml_dtypes.bfloat16 array."""
    return np.asarray(array, dtype=triton_utils.triton_to_np_dtype("BF16"))


def triton_serialized(array_of_bytes: np.ndarray) -> bytes:
    """tritonclient returns a 0-d object array holding the bytes, or an empty array."""
    return array_of_bytes.item() if array_of_bytes.size else b""


@given(array=triton_bytes_arrays())
def test_bytes_serialization_matches_tritonclient(array: np.ndarray) -> None:
    ours = codec.encode_raw(NAME, array)
    theirs = triton_serialized(triton_utils.serialize_byte_tensor(array))
    assert ours == theirs
    assert codec.decode_raw(NAME, "BYTES", [array.size], theirs).tolist() == (
        triton_utils.deserialize_bytes_tensor(ours).tolist()
    )


@given(array=hnp.arrays(np.dtype(np.float32), shapes))
def test_bf16_decoding_reads_tritonclient_serialization(array: np.ndarray) -> None:
    # tritonclient (since 2.6x) sends BF16 as ml_dtypes.bfloat16 arrays' bytes; they must
    # decode to the values it reads back from them.
    theirs = triton_bf16(array).tobytes()
    decoded = codec.decode_raw(NAME, "BF16", array.shape, theirs)
    expected = np.frombuffer(theirs, dtype=triton_utils.triton_to_np_dtype("BF16")).reshape(array.shape)
    assert same_values(decoded, expected.astype(np.float32))


@given(
    bits=hnp.arrays(
        np.dtype("<u2"),
        shapes,
        elements=st.integers(0, 0xFFFF).filter(lambda b: (b & 0x7FFF) <= 0x7F80),
    )
)
def test_bf16_encoding_matches_tritonclient_for_bf16_values(bits: np.ndarray) -> None:
    # For values that bf16 holds exactly (NaN aside), rounding and truncation agree.
    values = torch_bf16_to_float(bits).reshape(bits.shape)
    ours = codec.encode_raw(NAME, values, "BF16")
    assert ours == triton_bf16(values).tobytes()


@st.composite
def triton_inputs(draw: st.DrawFn) -> list[tuple[str, str, np.ndarray]]:
    """One input per OIP datatype, in a random order, as tritonclient users build them."""
    inputs = []
    for datatype in draw(st.permutations(ALL_DATATYPES)):
        if datatype == "BYTES":
            array = draw(bytes_arrays())
        elif datatype == "BF16":
            array = triton_bf16(draw(hnp.arrays(np.dtype(np.float32), shapes)))
        else:
            array = draw(fixed_arrays(datatype))
        inputs.append((f"in_{datatype.lower()}", datatype, array))
    return inputs


@given(inputs=triton_inputs())
def test_tritonclient_requests_decode(inputs: list[tuple[str, str, np.ndarray]]) -> None:
    triton_inputs_ = []
    for name, datatype, array in inputs:
        infer_input = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        triton_inputs_.append(infer_input)
    # The exact request tritonclient.grpc.InferenceServerClient.infer puts on the wire.
    triton_request = triton_grpc_utils._get_inference_request(
        model_name="m",
        inputs=triton_inputs_,
        model_version="",
        request_id="",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    ours = pb.ModelInferRequest.FromString(triton_request.SerializeToString())
    decoded = codec.decode_request_inputs(ours)
    assert list(decoded) == [name for name, _, _ in inputs]
    for name, datatype, array in inputs:
        if datatype == "BF16":
            expected = array.astype(np.float32)  # the bfloat16 values the client sent
        else:
            expected = array
        assert same_values(decoded[name], expected), name


@given(inputs=triton_inputs())
def test_our_responses_read_by_tritonclient(inputs: list[tuple[str, str, np.ndarray]]) -> None:
    response = pb.ModelInferResponse(model_name="m")
    for name, datatype, array in inputs:
        codec.add_output(response, name, array, datatype)
    result = InferResult(triton_pb.ModelInferResponse.FromString(response.SerializeToString()))
    for name, datatype, array in inputs:
        got = result.as_numpy(name)
        if datatype == "BF16":
            expected = torch_bf16_to_float(torch_bf16_bits(array)).reshape(array.shape)
            got = got.astype(np.float32).reshape(array.shape)
        elif datatype == "BYTES":
            expected = array
            got = got.reshape(array.shape)
        else:
            expected = array
        assert same_values(got, expected), name
