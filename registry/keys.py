"""The etcd key layout of the registry, under a configurable prefix (default /modelgw/v1/):

    runtimes/<name>                 RuntimeSpec
    models/<name>                   ModelSpec
    endpoints/<runtime>/<instance>  Endpoint (under the replica's lease)
    status/runtimes/<name>          RuntimeStatus (written by the reconciler)
    election/<name>                 leader key (e.g. election/reconciler), under a lease
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from google.protobuf.message import Message

from modelgw.protos import registry_pb2 as rpb

DEFAULT_PREFIX = "/modelgw/v1/"


class Section(str, Enum):
    RUNTIME = "runtime"
    MODEL = "model"
    ENDPOINT = "endpoint"
    RUNTIME_STATUS = "runtime_status"
    ELECTION = "election"


@dataclass(frozen=True)
class ParsedKey:
    """What a registry key names. `name` is the record name; for endpoints it is
    "<runtime>/<instance>" with `runtime` and `instance` set separately too."""

    section: Section
    name: str
    runtime: str = ""
    instance: str = ""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) cover exactly the keys starting with prefix."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # all 0xff: everything from prefix on


class Keys:
    """Builds and parses the registry's keys under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/"):
            raise ValueError(f"registry prefix must start with '/': {prefix!r}")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.root = self.prefix.encode()
        self.runtimes = self.root + b"runtimes/"
        self.models = self.root + b"models/"
        self.endpoints = self.root + b"endpoints/"
        self.statuses = self.root + b"status/runtimes/"
        self.elections = self.root + b"election/"

    def runtime(self, name: str) -> bytes:
        return self.runtimes + name.encode()

    def model(self, name: str) -> bytes:
        return self.models + name.encode()

    def endpoint(self, runtime: str, instance: str) -> bytes:
        return self.endpoints + f"{runtime}/{instance}".encode()

    def endpoints_of(self, runtime: str) -> bytes:
        """Prefix of one runtime's endpoints."""
        return self.endpoints + f"{runtime}/".encode()

    def runtime_status(self, name: str) -> bytes:
        return self.statuses + name.encode()

    def election(self, name: str = "reconciler") -> bytes:
        return self.elections + name.encode()

    def parse(self, key: bytes) -> ParsedKey | None:
        """What a key under this prefix names; None for keys outside the layout."""
        if not key.startswith(self.root):
            return None
        rest = key[len(self.root) :].decode("utf-8", "replace")
        section, _, name = rest.partition("/")
        if not name:
            return None
        if section == "runtimes":
            return ParsedKey(Section.RUNTIME, name) if "/" not in name else None
        if section == "models":
            return ParsedKey(Section.MODEL, name) if "/" not in name else None
        if section == "endpoints":
            runtime, _, instance = name.partition("/")
            if not runtime or not instance:
                return None
            return ParsedKey(Section.ENDPOINT, name, runtime=runtime, instance=instance)
        if section == "status":
            kind, _, status_name = name.partition("/")
            if kind == "runtimes" and status_name and "/" not in status_name:
                return ParsedKey(Section.RUNTIME_STATUS, status_name)
            return None
        if section == "election":
            return ParsedKey(Section.ELECTION, name)
        return None


# Which message each section holds (the election section holds plain identities).
RECORD_TYPES: dict[Section, type[Message]] = {
    Section.RUNTIME: rpb.RuntimeSpec,
    Section.MODEL: rpb.ModelSpec,
    Section.ENDPOINT: rpb.Endpoint,
    Section.RUNTIME_STATUS: rpb.RuntimeStatus,
}
