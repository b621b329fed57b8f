"""Registry records <-> bytes and plain dicts, through the proto3 JSON mapping.

Stored records are compact JSON with the .proto field names (snake_case, as in the files
people write for `modelgw apply`), so `etcdctl get` shows what the CLI accepts. Reading a
stored record ignores unknown fields, so an older reader survives a newer writer; reading
user input (files, API bodies) does not, so a misspelt field is an error, not a silent no-op.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from modelgw.registry.errors import CorruptRecordError, ValidationError

M = TypeVar("M", bound=Message)


def to_dict(message: Message) -> dict[str, Any]:
    """The message as a JSON-ready dict (proto field names, default values left out, map
    entries sorted so that equal messages always give equal bytes)."""
    return _sort_maps(json_format.MessageToDict(message, preserving_proto_field_name=True), message.DESCRIPTOR)


def _sort_maps(data: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None or field.message_type is None or field.message_type.full_name.startswith("google.protobuf."):
            continue
        if _is_map(field):
            data[field.name] = dict(sorted(value.items()))
        elif field.is_repeated:
            data[field.name] = [_sort_maps(item, field.message_type) for item in value]
        else:
            data[field.name] = _sort_maps(value, field.message_type)
    return data


def encode(message: Message) -> bytes:
    """The message as the bytes stored in etcd: compact UTF-8 JSON."""
    return json.dumps(to_dict(message), separators=(",", ":"), ensure_ascii=False).encode()


def decode(data: bytes, cls: type[M], key: bytes | str = "") -> M:
    """A stored record back as a message; CorruptRecordError names the key when it is not."""
    message = cls()
    try:
        json_format.Parse(data, message, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        where = key.decode() if isinstance(key, bytes) else key
        raise CorruptRecordError(f"{where or cls.__name__}: stored value is not a valid record: {exc}") from None
    return message


def from_dict(data: Any, cls: type[M], what: str) -> M:
    """User input (a parsed file or request body) as a message. Unknown fields and values
    of the wrong type are a ValidationError naming the field, prefixed with `what` (e.g.
    "models/resnet"). Whole numbers given for string fields become strings, because YAML
    reads `version: 1` as a number."""
    problems: list[str] = []
    coerced = _coerce_message(data, cls.DESCRIPTOR, "", problems)
    if problems:
        raise ValidationError([f"{what}: {p}" for p in problems])
    message = cls()
    try:
        json_format.ParseDict(coerced, message)
    except json_format.ParseError as exc:
        raise ValidationError(f"{what}: {_readable(str(exc))}") from None
    return message


_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64,
}
_UNSIGNED_TYPES = {
    FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce_message(data: Any, descriptor: Descriptor, path: str, problems: list[str]) -> Any:
    if descriptor.full_name.startswith("google.protobuf."):
        return data  # well-known types (Timestamp) have JSON forms of their own
    if not isinstance(data, dict):
        problems.append(f"{path or 'spec'}: expected a mapping of fields, got {_show(data)}")
        return data
    by_name = {**{f.json_name: f for f in descriptor.fields}, **descriptor.fields_by_name}
    out = {}
    for key, value in data.items():
        field = by_name.get(key) if isinstance(key, str) else None
        if field is None:
            known = ", ".join(descriptor.fields_by_name)
            problems.append(f"{_join(path, str(key))}: unknown field (fields: {known})")
            continue
        where = _join(path, key)
        if value is None:
            continue  # an empty YAML value: leave the field unset
        if _is_map(field):
            out[key] = _coerce_map(value, field, where, problems)
        elif field.is_repeated:
            if not isinstance(value, list):
                problems.append(f"{where}: expected a list, got {_show(value)}")
                continue
            out[key] = [_coerce_value(v, field, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        else:
            out[key] = _coerce_value(value, field, where, problems)
    return out


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _coerce_map(value: Any, field: FieldDescriptor, where: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {_show(value)}")
        return value
    value_field = field.message_type.fields_by_name["value"]
    return {
        str(k): _coerce_value(v, value_field, f"{where}[{str(k)!r}]", problems) for k, v in value.items()
    }


def _coerce_value(value: Any, field: FieldDescriptor, where: str, problems: list[str]) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _coerce_message(value, field.message_type, where, problems)
    if kind == FieldDescriptor.TYPE_STRING:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {_show(value)} (quote it)")
    elif kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {_show(value)}")
    elif kind in _INTEGER_TYPES or kind in _UNSIGNED_TYPES:
        number = value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            number = int(value)  # proto3 JSON writes 64-bit integers as strings
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if not isinstance(number, int) or isinstance(number, bool):
            problems.append(f"{where}: expected a whole number, got {_show(value)}")
        elif kind in _UNSIGNED_TYPES and number < 0:
            problems.append(f"{where}: expected a whole number of 0 or more, got {number}")
        else:
            return number
    elif kind in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {_show(value)}")
    elif kind == FieldDescriptor.TYPE_ENUM and (not isinstance(value, (str, int)) or isinstance(value, bool)):
        problems.append(f"{where}: expected one of {', '.join(field.enum_type.values_by_name)}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _readable(error: str) -> str:
    # json_format says e.g. 'Failed to parse replicas field: invalid literal ...' or
    # 'Message type "x.ModelSpec" has no field named "verions".'; drop the package noise.
    return error.replace("modelgw.registry.v1.", "")
