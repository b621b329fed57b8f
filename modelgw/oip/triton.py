"""Triton's protocol extensions as modelgw speaks them, for the runtimes and the gateway
alike: model configuration data types, statistics sums, and the JSON Triton's HTTP
server writes for ModelConfig and ModelStatistics.

    config_data_type("BYTES")                 # -> pb.TYPE_STRING
    add_statistics(total, replica_figures)    # the gateway's sum over replicas
    message_json(pb.ModelConfigResponse(...).config)   # REST body, as Triton writes it
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from modelgw.protos import inference_pb2 as pb

# the parameter a requested output carries to ask for its top-k classes (Triton's name,
# on gRPC and HTTP alike)
CLASSIFICATION = "classification"

# datatypes whose top-k can be taken (Triton's list: numbers of a fixed size but FP16/BF16)
CLASSIFIABLE = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"})

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def config_data_type(datatype: str) -> int:
    """The ModelConfig DataType of an OIP datatype (BYTES is Triton's TYPE_STRING)."""
    return pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def add_statistics(total: pb.ModelStatistics, part: pb.ModelStatistics) -> None:
    """Add `part` (one replica's figures for a version) into `total`."""
    total.last_inference = max(total.last_inference, part.last_inference)
    total.inference_count += part.inference_count
    total.execution_count += part.execution_count
    for field in _DURATIONS:
        mine, theirs = getattr(total.inference_stats, field), getattr(part.inference_stats, field)
        mine.count += theirs.count
        mine.ns += theirs.ns


_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def _numbers(data: dict, descriptor: Descriptor) -> dict:
    """The proto3 JSON mapping writes 64-bit integers as strings; Triton's server writes
    them as numbers (its clients read e.g. `dims` and `max_queue_delay_microseconds` as ints)."""
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            if entry.message_type is not None:
                for v in value.values():
                    _numbers(v, entry.message_type)
        elif field.message_type is not None:
            for v in value if isinstance(value, list) else [value]:
                _numbers(v, field.message_type)
        elif field.cpp_type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def message_json(message: Message) -> Any:
    """A ModelConfig / ModelStatisticsResponse as Triton's HTTP server writes it: field
    names as declared, enums by name, every field present, integers as numbers."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(data, message.DESCRIPTOR)
