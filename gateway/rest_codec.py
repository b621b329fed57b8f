"""OIP v2 REST bodies <-> the gRPC messages the runtimes speak.

JSON tensors and Triton's binary tensor data extension (a JSON header of
`Inference-Header-Content-Length` bytes, then each binary input's bytes in order, sized
by its `binary_data_size` parameter) become one ModelInferRequest with raw contents;
a ModelInferResponse becomes JSON, with outputs as binary data where the client asked.
Every problem is a GatewayError(INVALID_ARGUMENT) that names the tensor or field.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np

from modelgw.gateway.errors import GatewayError
from modelgw.gateway.json_body import parse_json
from modelgw.oip import codec
from modelgw.protos import inference_pb2 as pb

# Parameters of the binary extension: consumed here, never forwarded.
_BINARY_PARAMS = ("binary_data_size", "binary_data", "binary_data_output")

# datatype -> numpy kinds accepted from JSON for it ("b" bool, "i"/"u" ints, "f" floats)
_JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf", "BF16": "iuf"}


_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


def _bad(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(parsed JSON header, the binary tail) of a request body."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise _bad(f"Inference-Header-Content-Length must be an integer, got '{header_length[:40]}'") from None
        if size < 0 or size > len(body):
            raise _bad(
                f"Inference-Header-Content-Length is {size} but the body has {len(body)} bytes"
            )
        json_part, binary = body[:size], memoryview(body)[size:]
    # no depth scan on this hot path: tensors nest as deep as their shape, and Python's
    # recursion bound (a 400 too) is far past any tensor's
    document = parse_json(json_part, "the request body", max_depth=None, allow_constants=True)
    if not isinstance(document, dict):
        raise _bad("the request body must be a JSON object with an 'inputs' list")
    return document, binary


def _text(value: str, where: str) -> str:
    """A string protobuf can carry: JSON allows lone surrogates ("\\ud800"), UTF-8 does not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def _set_parameters(target: Any, params: Any, where: str) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be a JSON object")
    for key, value in params.items():
        if key in _BINARY_PARAMS:
            continue
        _text(key, f"{where}: a parameter name")
        if value is None or isinstance(value, (list, dict)):
            raise _bad(f"{where}: parameter '{key}' must be a string, number or boolean")
        if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _UINT64_MAX:
            raise _bad(f"{where}: parameter '{key}' is out of the 64-bit integer range")
        if isinstance(value, str):
            _text(value, f"{where}: parameter '{key}'")
        codec.set_parameter(target, key, value)


def _json_array(name: str, datatype: str, data: Any, count: int) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat: list[Any] = []
        for item in _leaves(data):
            if not isinstance(item, str):
                raise codec.TensorError(name, "BYTES data must be strings")
            try:
                flat.append(item.encode("utf-8"))
            except UnicodeEncodeError:
                raise codec.TensorError(name, "BYTES data is not valid Unicode text (a lone surrogate)") from None
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        target = codec.NUMPY_DTYPES[datatype]
        try:
            array = np.asarray(data)
        except (ValueError, OverflowError):
            raise codec.TensorError(name, "data is a ragged nested list") from None
        if target.kind in "iu" and array.dtype.kind in "fO":
            # numpy turns Python ints beyond int64 into floats or objects: look closer
            array = _exact_integers(name, datatype, data)
        if array.dtype == object:
            raise codec.TensorError(name, "data is a ragged nested list or mixes types")
        array = array.reshape(-1)
        kinds = _JSON_KINDS.get(datatype, "iu")
        if array.size and array.dtype.kind not in kinds:
            got = _KIND_NAMES.get(array.dtype.kind, array.dtype.kind)
            raise codec.TensorError(name, f"{datatype} data must be {_describe(kinds)}, got {got}")
        if target.kind in "iu" and array.size:
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise codec.TensorError(name, f"a value is out of range for {datatype}")
        array = array.astype(target)
    if array.size != count:
        raise codec.TensorError(name, f"shape needs {count} elements but data has {array.size}")
    return array


def _describe(kinds: str) -> str:
    return {"b": "booleans", "iu": "integers", "iuf": "numbers"}.get(kinds, kinds)


_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings", "O": "mixed values"}


def _leaves(data: list) -> list[Any]:
    """The non-list items of a nested list, in order (iteratively: no recursion limit)."""
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _exact_integers(name: str, datatype: str, data: list) -> np.ndarray:
    """Integer data numpy could not hold as int64: in range for `datatype` (e.g. UINT64
    above 2**63) or a clear error. The caller checks the element count."""
    flat = _leaves(data)
    if not all(isinstance(v, int) for v in flat):
        kinds = {type(v).__name__ for v in flat if not isinstance(v, int)}
        raise codec.TensorError(name, f"{datatype} data must be integers, got {', '.join(sorted(kinds))} values")
    info = np.iinfo(codec.NUMPY_DTYPES[datatype])
    if flat and (min(flat) < info.min or max(flat) > info.max):
        raise codec.TensorError(name, f"a value is out of range for {datatype}")
    return np.array(flat, dtype=codec.NUMPY_DTYPES[datatype])


def infer_request_from_json(
    document: dict, binary: memoryview, model: str, version: str
) -> tuple[pb.ModelInferRequest, bool, set[str]]:
    """(request, all outputs binary?, names of outputs asked for as binary)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in document:
        if not isinstance(document["id"], str):
            raise _bad("'id' must be a string")
        request.id = _text(document["id"], "'id'")
    params = document.get("parameters")
    _set_parameters(request.parameters, params, "request")
    binary_all = bool(isinstance(params, dict) and params.get("binary_data_output"))

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    offset = 0
    try:
        for i, spec in enumerate(inputs):
            if not isinstance(spec, dict):
                raise _bad(f"inputs[{i}] must be a JSON object")
            name = spec.get("name")
            if not isinstance(name, str) or not name:
                raise _bad(f"inputs[{i}]: 'name' must be a non-empty string")
            _text(name, f"inputs[{i}]: 'name'")
            datatype = spec.get("datatype")
            shape = spec.get("shape")
            if datatype not in codec.DATATYPES:
                expected = ", ".join(sorted(codec.DATATYPES))
                raise codec.TensorError(name, f"unknown datatype {datatype!r}; expected one of {expected}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise codec.TensorError(name, "'shape' must be a list of integers")
            count = codec.element_count(name, shape)  # first: it bounds the dims before any message quotes them
            if any(d > _INT64_MAX for d in shape):
                raise codec.TensorError(name, f"shape {shape} has a dimension beyond the 64-bit range")
            tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
            _set_parameters(tensor.parameters, spec.get("parameters"), f"input '{name}'")
            size = (spec.get("parameters") or {}).get("binary_data_size") if isinstance(spec.get("parameters"), dict) else None
            if size is not None:
                if "data" in spec:  # Triton refuses it too: which of the two would be meant?
                    raise codec.TensorError(name, "has both binary data (a binary_data_size parameter) and JSON 'data'; send one")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise codec.TensorError(name, "binary_data_size must be a non-negative integer")
                if offset + size > len(binary):
                    raise codec.TensorError(
                        name,
                        f"binary_data_size is {size} but only {len(binary) - offset} bytes of binary data remain",
                    )
                raw = bytes(binary[offset : offset + size])
                offset += size
                codec.decode_raw(name, datatype, shape, raw)  # validates size and framing
                request.raw_input_contents.append(raw)
            else:
                if "data" not in spec:
                    raise codec.TensorError(name, "has neither 'data' nor a binary_data_size parameter")
                array = _json_array(name, datatype, spec["data"], count)
                request.raw_input_contents.append(codec.encode_raw(name, array, datatype))
    except codec.TensorError as err:
        raise _bad(str(err)) from None
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data were not claimed by any input's binary_data_size")

    binary_outputs: set[str] = set()
    outputs = document.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise _bad("'outputs' must be a list")
        for i, spec in enumerate(outputs):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise _bad(f"outputs[{i}] must be an object with a 'name'")
            _text(spec["name"], f"outputs[{i}]: 'name'")
            out = request.outputs.add(name=spec["name"])
            oparams = spec.get("parameters")
            _set_parameters(out.parameters, oparams, f"output '{spec['name']}'")
            if isinstance(oparams, dict) and oparams.get("binary_data"):
                binary_outputs.add(spec["name"])
    return request, binary_all, binary_outputs


def infer_response_to_body(
    response: pb.ModelInferResponse, binary_all: bool, binary_outputs: set[str]
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when there is no binary part)."""
    arrays = codec.decode_response_outputs(response)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = codec.parameters_dict(response.parameters)
    outputs = []
    chunks: list[bytes] = []
    for i, tensor in enumerate(response.outputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = codec.parameters_dict(tensor.parameters)
        if binary_all or tensor.name in binary_outputs or tensor.datatype == "BF16":
            raw = response.raw_output_contents[i] if response.raw_output_contents else codec.encode_raw(
                tensor.name, arrays[tensor.name], tensor.datatype
            )
            params["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = _json_data(tensor.name, tensor.datatype, arrays[tensor.name])
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _json_data(name: str, datatype: str, array: np.ndarray) -> list:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            return [bytes(v).decode("utf-8") for v in flat]
        except UnicodeDecodeError:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output '{name}' holds bytes that are not UTF-8; ask for it with parameters.binary_data=true",
            ) from None
    if datatype in ("FP16", "FP32", "FP64", "BF16") and not np.isfinite(flat).all():
        # JSON has no NaN or Infinity; binary data carries them exactly
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"output '{name}' holds NaN or Infinity, which JSON cannot carry; ask for it with parameters.binary_data=true",
        )
    return flat.tolist()


def model_metadata_to_json(response: pb.ModelMetadataResponse) -> dict:
    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in response.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in response.outputs],
    }
