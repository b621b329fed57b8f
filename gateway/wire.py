"""Read the routing fields of a serialized ModelInferRequest without parsing it.

The gateway forwards inference requests as the bytes it received. Routing needs only
model_name (field 1) and model_version (field 2), so instead of decoding every tensor we
walk the top-level fields and skip the rest by their length: a handful of steps per
request, no copies of tensor data.
"""

from __future__ import annotations


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("message ends inside a varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


def routing_fields(buf: bytes) -> tuple[str, str]:
    """(model_name, model_version) of a serialized ModelInferRequest / ModelMetadataRequest.

    Both messages carry the name in field 1 and the version in field 2. The last
    occurrence wins, as in protobuf's own parsing. Raises WireError on malformed input.
    """
    name = b""
    version = b""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == 2:
            length, pos = _varint(buf, pos)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {field} runs past the end of the message")
            if field == 1:
                name = buf[pos:stop]
            elif field == 2:
                version = buf[pos:stop]
            pos = stop
        elif wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type} for field {field}")
        if pos > end:
            raise WireError("message ends inside a field")
    try:
        return name.decode("utf-8"), version.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("model name or version is not valid UTF-8") from None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_version(payload: bytes, version: str) -> bytes:
    """The message with field 2 (model_version / version) set to `version`.

    Protobuf takes the last occurrence of a singular field, so appending the field is the
    same as setting it, without decoding the message.
    """
    encoded = version.encode("utf-8")
    return payload + b"\x12" + _encode_varint(len(encoded)) + encoded
