"""The etcd key layout of the registry, under a configurable prefix (default /modelgw/v1/):

    runtimes/<name>                 RuntimeSpec
    models/<name>                   ModelSpec
    endpoints/<runtime>/<instance>  Endpoint (under the replica's lease)
    status/runtimes/<name>          RuntimeStatus (written by the reconciler)
    jobs/<name>                     JobSpec
    streams/<name>                  StreamSpec
    status/jobs/<name>              JobStatus (the job process and the reconciler)
    status/streams/<name>           StreamStatus (the stream replicas and the reconciler)
    gateway-defaults/<name>         GatewayDefaults (one record, named "default")
    election/<name>                 leader key (e.g. election/reconciler), under a lease

Each record kind is one row of KINDS (its path, message, view attribute, watch-event field,
document kind): Keys.parse, the RegistryView, the store's watch and the file/body reader
all read that table, and nothing else lists the kinds.
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
    JOB = "job"
    STREAM = "stream"
    JOB_STATUS = "job_status"
    STREAM_STATUS = "stream_status"
    GATEWAY_DEFAULTS = "gateway_defaults"
    ELECTION = "election"


@dataclass(frozen=True)
class RecordKind:
    """One kind of registry record: where it lives, what it holds, how it is read back."""

    section: Section
    path: str  # its keys under the prefix: path + name ("models/resnet")
    message: type[Message]  # what the key's value holds (proto3 JSON, see codec.py)
    attribute: str  # the Snapshot / RegistryView mapping of these records: view.models
    event_field: str  # the WatchEvent `object` field carrying one
    document: str = ""  # its `kind:` in files and admin bodies ("" for none)
    applied: bool = False  # whether people apply it (endpoints and statuses are written by processes)
    parts: int = 1  # name segments: 1 "<name>", 2 "<runtime>/<instance>"


# THE table of record kinds: key parsing, the view, the watches and the document reader all
# read it, so a new kind is one row here (plus its Section member).
KINDS: tuple[RecordKind, ...] = (
    RecordKind(Section.RUNTIME, "runtimes/", rpb.RuntimeSpec, "runtimes", "runtime", "Runtime", applied=True),
    RecordKind(Section.MODEL, "models/", rpb.ModelSpec, "models", "model", "Model", applied=True),
    RecordKind(Section.ENDPOINT, "endpoints/", rpb.Endpoint, "endpoints", "endpoint", "Endpoint", parts=2),
    RecordKind(Section.RUNTIME_STATUS, "status/runtimes/", rpb.RuntimeStatus, "statuses", "runtime_status"),
    RecordKind(Section.JOB, "jobs/", rpb.JobSpec, "jobs", "job", "Job", applied=True),
    RecordKind(Section.STREAM, "streams/", rpb.StreamSpec, "streams", "stream", "Stream", applied=True),
    RecordKind(Section.JOB_STATUS, "status/jobs/", rpb.JobStatus, "job_statuses", "job_status"),
    RecordKind(Section.STREAM_STATUS, "status/streams/", rpb.StreamStatus, "stream_statuses", "stream_status"),
    RecordKind(
        Section.GATEWAY_DEFAULTS, "gateway-defaults/", rpb.GatewayDefaults, "gateway_defaults", "gateway_defaults",
        "GatewayDefaults", applied=True,
    ),
)
KIND: dict[Section, RecordKind] = {kind.section: kind for kind in KINDS}
ELECTION_PATH = "election/"  # not a record: leader keys hold plain identities


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
        self.runtimes = self.of(Section.RUNTIME)
        self.models = self.of(Section.MODEL)
        self.endpoints = self.of(Section.ENDPOINT)
        self.statuses = self.of(Section.RUNTIME_STATUS)
        self.jobs = self.of(Section.JOB)
        self.streams = self.of(Section.STREAM)
        self.job_statuses = self.of(Section.JOB_STATUS)
        self.stream_statuses = self.of(Section.STREAM_STATUS)
        self.elections = self.root + ELECTION_PATH.encode()

    def of(self, section: Section) -> bytes:
        """The prefix of every record of a kind."""
        return self.root + KIND[section].path.encode()

    def record(self, section: Section, name: str) -> bytes:
        """The key of one record (`name` is "<runtime>/<instance>" for endpoints)."""
        return self.of(section) + name.encode()

    def runtime(self, name: str) -> bytes:
        return self.record(Section.RUNTIME, name)

    def model(self, name: str) -> bytes:
        return self.record(Section.MODEL, name)

    def endpoint(self, runtime: str, instance: str) -> bytes:
        return self.record(Section.ENDPOINT, f"{runtime}/{instance}")

    def endpoints_of(self, runtime: str) -> bytes:
        """Prefix of one runtime's endpoints."""
        return self.endpoints + f"{runtime}/".encode()

    def runtime_status(self, name: str) -> bytes:
        return self.record(Section.RUNTIME_STATUS, name)

    def job(self, name: str) -> bytes:
        return self.record(Section.JOB, name)

    def stream(self, name: str) -> bytes:
        return self.record(Section.STREAM, name)

    def job_status(self, name: str) -> bytes:
        return self.record(Section.JOB_STATUS, name)

    def stream_status(self, name: str) -> bytes:
        return self.record(Section.STREAM_STATUS, name)

    def gateway_defaults(self, name: str = "default") -> bytes:
        return self.record(Section.GATEWAY_DEFAULTS, name)

    def election(self, name: str = "reconciler") -> bytes:
        return self.elections + name.encode()

    def parse(self, key: bytes) -> ParsedKey | None:
        """What a key under this prefix names; None for keys outside the layout."""
        if not key.startswith(self.root):
            return None
        rest = key[len(self.root) :].decode("utf-8", "replace")
        if rest.startswith(ELECTION_PATH):
            name = rest[len(ELECTION_PATH) :]
            return ParsedKey(Section.ELECTION, name) if name else None
        for kind in KINDS:
            if rest.startswith(kind.path):
                name = rest[len(kind.path) :]
                parts = name.split("/", kind.parts - 1)
                if len(parts) != kind.parts or not all(parts) or (kind.parts == 1 and "/" in name):
                    return None
                if kind.parts == 2:
                    return ParsedKey(kind.section, name, runtime=parts[0], instance=parts[1])
                return ParsedKey(kind.section, name)
        return None
