"""Tensor codec: OIP v2 tensors (typed contents or raw bytes) to numpy and back.

One module for runtimes and the gateway's REST side. Conventions follow the KServe Open
Inference Protocol and Triton:
- raw contents are little-endian, row-major; BYTES elements are each a 4-byte
  little-endian length followed by the bytes;
- FP16 and BF16 have no typed contents field and travel only as raw bytes;
- numpy has no bfloat16, so BF16 decodes to float32 (exact) and encodes from any float
  array with round-to-nearest-even;
- BYTES decodes to an object array of `bytes`.
Every error is a `TensorError` naming the tensor, so a caller can act on it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from modelgw.oip.protocol import MAX_SHAPE_DIMS
from modelgw.protos import inference_pb2 as pb

# OIP datatype -> numpy dtype (little-endian). BYTES and BF16 are special-cased.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
    "BF16": np.dtype("<f4"),
}
DATATYPES = frozenset(NUMPY_DTYPES)

# OIP datatype -> the InferTensorContents field that carries it (None: raw only).
CONTENTS_FIELD: dict[str, str | None] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": None,
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
    "BF16": None,
}

_DTYPE_TO_DATATYPE: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
}

_LEN = struct.Struct("<I")


class TensorError(ValueError):
    """A tensor is malformed: wrong datatype, shape, element count or encoding."""

    code = grpc.StatusCode.INVALID_ARGUMENT  # its status (modelgw/errors.py), wherever it is raised

    def __init__(self, tensor: str, message: str) -> None:
        super().__init__(f"tensor '{tensor}': {message}")
        self.tensor = tensor


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype for a numpy array (str/bytes arrays map to BYTES)."""
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _DTYPE_TO_DATATYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TypeError(f"no OIP datatype for numpy dtype {array.dtype}") from None


def check_dims(name: str, shape: Sequence[int]) -> None:
    """Refuse a shape with more than MAX_SHAPE_DIMS dimensions, without echoing it (an
    error quoting 10,000 dims outgrew gRPC's metadata limit). Runs before anything else
    reads or quotes the shape."""
    if len(shape) > MAX_SHAPE_DIMS:
        raise TensorError(name, f"shape has {len(shape)} dimensions; at most {MAX_SHAPE_DIMS} are allowed")


def element_count(name: str, shape: Sequence[int]) -> int:
    """Number of elements of a concrete shape; refuses too many or negative dimensions."""
    check_dims(name, shape)
    if shape and min(shape) < 0:
        raise TensorError(name, f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def _check_datatype(name: str, datatype: str) -> None:
    if datatype not in NUMPY_DTYPES:
        raise TensorError(
            name, f"unknown datatype '{datatype}'; expected one of {', '.join(sorted(DATATYPES))}"
        )


# ------------------------------------------------------------------ BYTES framing


def _as_bytes(item: Any) -> bytes:
    """One BYTES element: bytes as they are, str as UTF-8, anything else as its str().

    Typed and raw encoding share this so both give the same element for the same value
    (`bytes(5)` would silently be five zero bytes)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8")
    return str(item).encode("utf-8")


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES elements, row-major, each as a 4-byte length and its bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        item = _as_bytes(item)
        parts.append(_LEN.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """Parse exactly `count` length-prefixed elements that fill `raw` exactly."""
    view = memoryview(raw)
    out: list[bytes] = []
    offset = 0
    total = len(view)
    # Each element needs at least its 4-byte length: a shape far larger than the data
    # fails here at once instead of after allocating `count` slots.
    if count * 4 > total:
        raise TensorError(
            name, f"{count} BYTES elements need at least {count * 4} bytes, but {total} were given"
        )
    for i in range(count):
        if offset + 4 > total:
            raise TensorError(name, f"BYTES data ends inside the length of element {i} of {count}")
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise TensorError(
                name, f"BYTES element {i} claims {length} bytes but only {total - offset} remain"
            )
        out.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != total:
        raise TensorError(name, f"{total - offset} bytes left over after {count} BYTES elements")
    return out


# ------------------------------------------------------------------ BF16


def float_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF
    rounded = ((bits + rounding) >> 16).astype("<u2")
    nan = np.isnan(array.astype("<f4", copy=False))
    if nan.any():
        rounded = np.where(nan, ((bits >> 16) | 0x0040).astype("<u2"), rounded)
    return rounded


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


# ------------------------------------------------------------------ decode


def _reshape(name: str, array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """array.reshape(shape), with numpy's limits (at most 64 dimensions, sizes that fit
    in memory addressing, even for zero-size arrays) reported as a TensorError."""
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise TensorError(name, f"shape {list(shape)} is not usable: {exc}") from None


def _object_array(items: Sequence[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """A numpy array from raw contents; zero-copy (read-only) for fixed-size types."""
    _check_datatype(name, datatype)
    shape = tuple(shape)  # once: a protobuf repeated field is slow to iterate repeatedly
    count = element_count(name, shape)
    if datatype == "BYTES":
        return _reshape(name, _object_array(deserialize_bytes(name, raw, count)), shape)
    itemsize = 2 if datatype == "BF16" else NUMPY_DTYPES[datatype].itemsize
    if len(raw) != count * itemsize:
        raise TensorError(
            name,
            f"raw contents hold {len(raw)} bytes, but shape {list(shape)} of {datatype} "
            f"needs {count} x {itemsize} = {count * itemsize} bytes",
        )
    if datatype == "BF16":
        return _reshape(name, bf16_bits_to_float(np.frombuffer(raw, dtype="<u2")), shape)
    if datatype == "BOOL":
        values = np.frombuffer(raw, dtype=np.uint8)
        if values.size and values.max() > 1:
            raise TensorError(name, "BOOL raw contents must be bytes 0 or 1")
        return _reshape(name, values.view(np.bool_), shape)
    return _reshape(name, np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]), shape)


def decode_contents(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    """A numpy array from typed contents; refuses contents of another type's field."""
    _check_datatype(name, datatype)
    shape = tuple(shape)
    count = element_count(name, shape)
    field = CONTENTS_FIELD[datatype]
    if field is None:
        raise TensorError(name, f"{datatype} has no typed contents; send it as raw contents")
    for other in pb.InferTensorContents.DESCRIPTOR.fields:
        if other.name != field and len(getattr(contents, other.name)):
            raise TensorError(
                name, f"datatype {datatype} goes in {field}, but {other.name} was set"
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(
            name, f"shape {list(shape)} needs {count} elements but {len(values)} were given"
        )
    if datatype == "BYTES":
        return _reshape(name, _object_array(list(values)), shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        array = np.asarray(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise TensorError(name, f"a value is out of range for {datatype}")
        return _reshape(name, array.astype(dtype), shape)
    return _reshape(name, np.asarray(values, dtype=dtype), shape)


def decode_request_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input of a ModelInferRequest, by name, from raw or typed contents."""
    raw = request.raw_input_contents
    if raw:
        for tensor in request.inputs:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                # Triton's words first: its clients match on them
                raise TensorError(
                    tensor.name,
                    f"contents field must not be specified when using raw_input_contents for '{tensor.name}' "
                    f"for model '{request.model_name}' (both contents and raw_input_contents were set)",
                )
    if raw and len(raw) != len(request.inputs):
        raise TensorError(
            "*",
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one entry per input or none",
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise TensorError(tensor.name, "input given more than once")
        if raw:
            inputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            inputs[tensor.name] = decode_contents(
                tensor.name, tensor.datatype, tensor.shape, tensor.contents
            )
    return inputs


def decode_response_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of a ModelInferResponse, by name (the client-side counterpart)."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise TensorError(
            "*",
            f"raw_output_contents has {len(raw)} entries for {len(response.outputs)} outputs; "
            "expected one entry per output or none",
        )
    outputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        if raw:
            outputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            outputs[tensor.name] = decode_contents(
                tensor.name, tensor.datatype, tensor.shape, tensor.contents
            )
    return outputs


# ------------------------------------------------------------------ encode


def encode_raw(name: str, array: np.ndarray, datatype: str | None = None) -> bytes:
    """Raw contents for an array in the given (or inferred) datatype."""
    datatype = datatype or datatype_of(array)
    _check_datatype(name, datatype)
    if datatype == "BYTES":
        return serialize_bytes(np.asarray(array, dtype=object))
    if datatype == "BF16":
        return float_to_bf16_bits(np.asarray(array)).tobytes()
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def encode_contents(
    name: str, array: np.ndarray, contents: pb.InferTensorContents, datatype: str | None = None
) -> None:
    """Fill typed contents from an array; FP16/BF16 have none and raise."""
    datatype = datatype or datatype_of(array)
    _check_datatype(name, datatype)
    field = CONTENTS_FIELD[datatype]
    if field is None:
        raise TensorError(name, f"{datatype} has no typed contents; use raw contents")
    flat = np.asarray(array).reshape(-1)
    if datatype == "BYTES":
        getattr(contents, field).extend(_as_bytes(item) for item in flat)
    else:
        getattr(contents, field).extend(flat.astype(NUMPY_DTYPES[datatype]).tolist())


def add_output(
    response: pb.ModelInferResponse,
    name: str,
    array: np.ndarray,
    datatype: str | None = None,
    *,
    raw: bool = True,
) -> None:
    """Append one output to a response, as raw contents (like Triton) or typed contents."""
    _add_tensor(response.outputs, response.raw_output_contents, name, array, datatype, raw)


def add_input(
    request: pb.ModelInferRequest,
    name: str,
    array: np.ndarray,
    datatype: str | None = None,
    *,
    raw: bool = True,
) -> None:
    """Append one input to a request (used by our own clients and benchmarks)."""
    _add_tensor(request.inputs, request.raw_input_contents, name, array, datatype, raw)


def _add_tensor(tensors: Any, raw_contents: Any, name: str, array: np.ndarray, datatype: str | None, raw: bool) -> None:
    """Append a tensor to `tensors`, its data to `raw_contents` or to its typed contents."""
    datatype = datatype or datatype_of(array)
    tensor = tensors.add(name=name, datatype=datatype, shape=np.shape(array))
    if raw:
        raw_contents.append(encode_raw(name, array, datatype))
    else:
        encode_contents(name, array, tensor.contents, datatype)


# ------------------------------------------------------------------ parameters


def parameter_value(param: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def parameters_dict(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()}


def set_parameter(params: Any, key: str, value: Any) -> None:
    """Set params[key] (a protobuf map of InferParameter) from a Python value."""
    target = params[key]
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)
