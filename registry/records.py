"""The registry's records in etcd: models, runtimes, runtime status and the gateway
defaults (aetcd, asyncio); jobs and streams are workloads.py's.

RecordStore is the base of RegistryStore (store.py), which adds endpoints and their leases
(endpoints.py), leader election (election.py) and watches; use RegistryStore:

    async with RegistryStore("127.0.0.1:2379") as store:
        await store.apply_runtime(runtime_spec)
        result = await store.apply_model(model_spec)             # create or replace
        await store.apply_model(changed, expected_revision=result.record.revision)

Every write is one writes.conditional_write: one etcd transaction that also checks what it
depends on:
- optimistic concurrency on the record itself: `expected_revision` 0 creates only, >0 must
  equal the record's mod_revision, None creates or replaces (the write is still guarded by
  the revision just read, and retried when someone else wrote in between);
- referential integrity: a model's runtimes exist and load its formats (their
  mod_revisions are compared in the transaction); a runtime used by models is not deleted
  without `force`, and does not drop a format they use (the models' range is compared);
  likewise a model called by jobs or streams is not deleted without `force`, and does not
  drop a version one of them pins (the jobs' and streams' ranges are compared).
A spec's own fields are validated once, before the first read; only the checks against
the records read are repeated on each attempt. Errors are the classes of registry.errors,
never raw etcd or gRPC exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Self, TypeVar

from aetcd import rpc
from google.protobuf.message import Message

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry import etcd as ops
from modelgw.registry.errors import CorruptRecordError, IntegrityError, NotFoundError, ValidationError
from modelgw.registry.etcd import Etcd
from modelgw.registry.keys import DEFAULT_PREFIX, Keys
from modelgw.registry.validation import (
    GATEWAY_DEFAULTS_NAME,
    check_gateway_defaults,
    check_model,
    check_model_formats,
    check_runtime,
    check_runtime_status,
    model_runtimes,
    name_problem,
    uses_runtime,
)
from modelgw.registry.writes import Read, Write, conditional_write, first

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


def check_name(kind: str, name: str) -> None:
    """ValidationError unless `name` can name a record of `kind` ("models")."""
    problem = name_problem(kind, name)
    if problem:
        raise ValidationError(f"{kind}/{name or '<unnamed>'}: name: {problem}")


class RecordStore:
    """Registry records in etcd under one key prefix. Use as `async with`, or call close()."""

    def __init__(self, etcd: str | Etcd = "127.0.0.1:2379", *, prefix: str = DEFAULT_PREFIX, timeout: float = 5.0):
        self.etcd = etcd if isinstance(etcd, Etcd) else Etcd(etcd, timeout=timeout)
        self.keys = Keys(prefix)

    @property
    def endpoint(self) -> str:
        return self.etcd.endpoint

    async def close(self) -> None:
        await self.etcd.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ models

    async def apply_model(self, spec: rpb.ModelSpec, expected_revision: int | None = None) -> rpb.ApplyModelResponse:
        """Create or update a model. Raises ValidationError, IntegrityError (a runtime it
        names does not exist, or the update drops a version a job or stream pins),
        ConflictError (not at expected_revision)."""
        check_model(spec)
        what = f"models/{spec.name}"
        names = model_runtimes(spec)
        n = len(names)

        def plan(read: Read) -> Write | None:
            runtime_kvs = {name: read.kv(i) for i, name in enumerate(names)}
            missing = [name for name, kv in runtime_kvs.items() if kv is None]
            if missing:
                raise IntegrityError(_missing_runtimes(what, spec, missing))
            check_model_formats(spec, {name: decode_kv(kv, rpb.RuntimeSpec) for name, kv in runtime_kvs.items()})
            if same_record(read.current, spec):
                return None
            guards = [ops.mod_revision_is(self.keys.runtime(name), kv.mod_revision) for name, kv in runtime_kvs.items()]
            dropped = set(_versions(read.current)) - {v.version for v in spec.versions}
            if dropped:
                pinned = _pinned_versions(spec.name, dropped, read.kvs(n), read.kvs(n + 1))
                if pinned:
                    raise IntegrityError(f"{what}: versions: {pinned}; change those first")
                # a job or stream applied meanwhile could pin a dropped version: guard their ranges
                guards += [ops.unchanged_since(self.keys.jobs, read.revision),
                           ops.unchanged_since(self.keys.streams, read.revision)]
            return Write([ops.put(self.keys.model(spec.name), codec.encode(spec))], guards)

        written = await conditional_write(
            self.etcd, what, self.keys.model(spec.name), expected_revision, plan,
            reads=[*(ops.get(self.keys.runtime(name)) for name in names),
                   ops.get_prefix(self.keys.jobs), ops.get_prefix(self.keys.streams)],
        )
        record = rpb.ModelRecord(spec=spec, revision=written.revision, create_revision=written.create_revision)
        return rpb.ApplyModelResponse(record=record, outcome=outcome_of(written.current, written.wrote))

    async def get_model(self, name: str) -> rpb.ModelRecord:
        check_name("models", name)
        kv = first(await self.etcd.range(self.keys.model(name)))
        if kv is None:
            raise NotFoundError(f"models/{name} does not exist")
        return rpb.ModelRecord(spec=decode_kv(kv, rpb.ModelSpec), revision=kv.mod_revision, create_revision=kv.create_revision)

    async def list_models(self) -> rpb.ListModelsResponse:
        response = await self.etcd.range_prefix(self.keys.models)
        models = [
            rpb.ModelRecord(spec=spec, revision=kv.mod_revision, create_revision=kv.create_revision)
            for kv, spec in decode_all(response.kvs, rpb.ModelSpec)
        ]
        return rpb.ListModelsResponse(models=models, revision=response.header.revision)

    async def delete_model(self, name: str, expected_revision: int | None = None, force: bool = False) -> int:
        """Delete a model; returns the etcd revision of the deletion. Refused with
        IntegrityError while jobs or streams call it, unless force (they then fail, saying
        the model does not exist, until it is applied again), as runtimes used by models are."""
        check_name("models", name)
        what = f"models/{name}"
        key = self.keys.model(name)

        def plan(read: Read) -> Write:
            guards = []
            if not force:
                users = _model_users(name, read.kvs(0), read.kvs(1))
                if users:
                    raise IntegrityError(
                        f"{what} is used by {', '.join(users)}; delete or change those first, or delete with force"
                    )
                # no job or stream may start calling it between this read and the delete
                guards += [ops.unchanged_since(self.keys.jobs, read.revision),
                           ops.unchanged_since(self.keys.streams, read.revision)]
            return Write([ops.delete(key)], guards)

        written = await conditional_write(
            self.etcd, what, key, expected_revision, plan,
            reads=[ops.get_prefix(self.keys.jobs), ops.get_prefix(self.keys.streams)], must_exist=True, verb="delete",
        )
        return written.revision

    # ------------------------------------------------------------------ runtimes

    async def apply_runtime(
        self, spec: rpb.RuntimeSpec, expected_revision: int | None = None
    ) -> rpb.ApplyRuntimeResponse:
        """Create or update a runtime. Raises ValidationError, ConflictError, and
        IntegrityError when the update drops a model format that models still use."""
        check_runtime(spec)
        what = f"runtimes/{spec.name}"
        status: rpb.RuntimeStatus | None = None

        def plan(read: Read) -> Write | None:
            nonlocal status
            status_kv = read.kv(0)
            status = decode_kv(status_kv, rpb.RuntimeStatus) if status_kv else None
            if same_record(read.current, spec):
                return None
            guards = []
            if set(_formats(read.current)) - set(spec.model_formats):
                broken = _dropped_formats(spec, [m for _, m in decode_all(read.kvs(1), rpb.ModelSpec)])
                if broken:
                    raise IntegrityError(f"{what}: model_formats: {broken}; change those models first")
                # a model written meanwhile could use a dropped format: guard the models' range
                guards.append(ops.unchanged_since(self.keys.models, read.revision))
            return Write([ops.put(self.keys.runtime(spec.name), codec.encode(spec))], guards)

        written = await conditional_write(
            self.etcd, what, self.keys.runtime(spec.name), expected_revision, plan,
            reads=[ops.get(self.keys.runtime_status(spec.name)), ops.get_prefix(self.keys.models)],
        )
        record = _runtime_record(spec, written.revision, written.create_revision, status)
        return rpb.ApplyRuntimeResponse(record=record, outcome=outcome_of(written.current, written.wrote))

    async def get_runtime(self, name: str) -> rpb.RuntimeRecord:
        check_name("runtimes", name)
        read = await self.etcd.txn(success=[ops.get(self.keys.runtime(name)), ops.get(self.keys.runtime_status(name))])
        kv = first(read.responses[0])
        if kv is None:
            raise NotFoundError(f"runtimes/{name} does not exist")
        status_kv = first(read.responses[1])
        status = decode_kv(status_kv, rpb.RuntimeStatus) if status_kv else None
        return _runtime_record(decode_kv(kv, rpb.RuntimeSpec), kv.mod_revision, kv.create_revision, status)

    async def list_runtimes(self) -> rpb.ListRuntimesResponse:
        read = await self.etcd.txn(success=[ops.get_prefix(self.keys.runtimes), ops.get_prefix(self.keys.statuses)])
        statuses = {s.name: s for _, s in decode_all(read.responses[1].response_range.kvs, rpb.RuntimeStatus)}
        runtimes = [
            _runtime_record(spec, kv.mod_revision, kv.create_revision, statuses.get(spec.name))
            for kv, spec in decode_all(read.responses[0].response_range.kvs, rpb.RuntimeSpec)
        ]
        return rpb.ListRuntimesResponse(runtimes=runtimes, revision=read.header.revision)

    async def delete_runtime(self, name: str, expected_revision: int | None = None, force: bool = False) -> int:
        """Delete a runtime and its status. Refused with IntegrityError while models use it,
        unless force (their versions on it then have no runtime until it is applied again)."""
        check_name("runtimes", name)
        what = f"runtimes/{name}"
        key = self.keys.runtime(name)

        def plan(read: Read) -> Write:
            guards = []
            if not force:
                models = decode_all(read.kvs(0), rpb.ModelSpec)
                users = [f"models/{m.name}" for _, m in models if uses_runtime(m, name)]
                if users:
                    raise IntegrityError(
                        f"{what} is used by {', '.join(users)}; delete or change those models first, "
                        "or delete with force"
                    )
                # no model may start using it between this read and the delete
                guards.append(ops.unchanged_since(self.keys.models, read.revision))
            return Write([ops.delete(key), ops.delete(self.keys.runtime_status(name))], guards)

        written = await conditional_write(
            self.etcd, what, key, expected_revision, plan,
            reads=[ops.get_prefix(self.keys.models)], must_exist=True, verb="delete",
        )
        return written.revision

    # ------------------------------------------------------------------ runtime status

    async def put_runtime_status(self, status: rpb.RuntimeStatus) -> int:
        """Write what the reconciler observed for a runtime; NotFoundError if the runtime
        is gone (so a late write never resurrects the status of a deleted runtime)."""
        check_runtime_status(status)
        runtime_key = self.keys.runtime(status.name)

        def plan(read: Read) -> Write:
            runtime = read.kv(0)
            if runtime is None:
                raise NotFoundError(f"runtimes/{status.name} does not exist; its status was not written")
            value = codec.encode(status)
            return Write([ops.put(self.keys.runtime_status(status.name), value)], [ops.exists(runtime_key)])

        written = await conditional_write(
            self.etcd, f"status/runtimes/{status.name}", self.keys.runtime_status(status.name), None, plan,
            reads=[ops.get(runtime_key)],
        )
        return written.revision

    async def get_runtime_status(self, name: str) -> rpb.RuntimeStatus | None:
        check_name("runtimes", name)
        kv = first(await self.etcd.range(self.keys.runtime_status(name)))
        return decode_kv(kv, rpb.RuntimeStatus) if kv else None

    # ------------------------------------------------------------------ gateway defaults

    async def apply_gateway_defaults(
        self, spec: rpb.GatewayDefaults, expected_revision: int | None = None
    ) -> rpb.ApplyGatewayDefaultsResponse:
        """Create or update the registry-wide gateway defaults (the one record, named
        "default"). Raises ValidationError, ConflictError."""
        check_gateway_defaults(spec)
        key = self.keys.gateway_defaults(spec.name)

        def plan(read: Read) -> Write | None:
            return None if same_record(read.current, spec) else Write([ops.put(key, codec.encode(spec))])

        written = await conditional_write(self.etcd, f"gateway-defaults/{spec.name}", key, expected_revision, plan)
        record = rpb.GatewayDefaultsRecord(spec=spec, revision=written.revision, create_revision=written.create_revision)
        return rpb.ApplyGatewayDefaultsResponse(record=record, outcome=outcome_of(written.current, written.wrote))

    async def get_gateway_defaults(self, name: str = GATEWAY_DEFAULTS_NAME) -> rpb.GatewayDefaultsRecord:
        """The gateway defaults record; NotFoundError when none was applied. "" means "default"."""
        name = _defaults_name(name)
        kv = first(await self.etcd.range(self.keys.gateway_defaults(name)))
        if kv is None:
            raise NotFoundError(f"gateway-defaults/{name} does not exist")
        spec = decode_kv(kv, rpb.GatewayDefaults)
        return rpb.GatewayDefaultsRecord(spec=spec, revision=kv.mod_revision, create_revision=kv.create_revision)

    async def delete_gateway_defaults(self, name: str = GATEWAY_DEFAULTS_NAME, expected_revision: int | None = None) -> int:
        name = _defaults_name(name)
        key = self.keys.gateway_defaults(name)
        written = await conditional_write(
            self.etcd, f"gateway-defaults/{name}", key, expected_revision, lambda read: Write([ops.delete(key)]),
            must_exist=True, verb="delete",
        )
        return written.revision


# ---------------------------------------------------------------------- helpers


def decode_all(kvs: Iterable[rpc.KeyValue], cls: type[M]) -> list[tuple[rpc.KeyValue, M]]:
    """(kv, message) for many records, skipping (and logging) corrupt ones so that one
    bad value does not hide the rest."""
    decoded = []
    for kv in kvs:
        try:
            decoded.append((kv, codec.decode(kv.value, cls, kv.key)))
        except CorruptRecordError as exc:
            log.warning("skipping %s", exc)
    return decoded


def decode_kv(kv: rpc.KeyValue, cls: type[M]) -> M:
    """One stored record; CorruptRecordError naming its key when it is not one."""
    return codec.decode(kv.value, cls, kv.key)


def same_record(kv: rpc.KeyValue | None, spec: Message) -> bool:
    """Whether the stored record already is `spec` (an unreadable one is not)."""
    if kv is None:
        return False
    try:
        return decode_kv(kv, type(spec)) == spec
    except CorruptRecordError:
        return False


def _formats(kv: rpc.KeyValue | None) -> list[str]:
    """The model formats of a stored runtime (none when absent or unreadable)."""
    try:
        return list(decode_kv(kv, rpb.RuntimeSpec).model_formats) if kv else []
    except CorruptRecordError:
        return []


def outcome_of(current: rpc.KeyValue | None, wrote: bool) -> int:
    """The ApplyOutcome of a conditional write that found `current` and `wrote` or not."""
    if not wrote:
        return rpb.UNCHANGED
    return rpb.UPDATED if current is not None else rpb.CREATED


def _runtime_record(
    spec: rpb.RuntimeSpec, revision: int, create_revision: int, status: rpb.RuntimeStatus | None
) -> rpb.RuntimeRecord:
    record = rpb.RuntimeRecord(spec=spec, revision=revision, create_revision=create_revision)
    if status is not None:
        record.status.CopyFrom(status)
    return record


def _missing_runtimes(what: str, spec: rpb.ModelSpec, missing: list[str]) -> str:
    fields = [
        f"versions[{i}].runtime: runtime {v.runtime!r} does not exist"
        for i, v in enumerate(spec.versions)
        if v.runtime in missing
    ]
    return f"{what}: {'; '.join(fields)} (apply the runtime first)"


def _dropped_formats(spec: rpb.RuntimeSpec, models: list[rpb.ModelSpec]) -> str:
    """Which models use a format this runtime spec no longer lists, as one message."""
    uses = []
    for model in models:
        for i, version in enumerate(model.versions):
            if version.runtime == spec.name and version.format not in spec.model_formats:
                uses.append(f"'{version.format}' is still used by models/{model.name} versions[{i}]")
    return "; ".join(uses)


def _versions(kv: rpc.KeyValue | None) -> list[str]:
    """The versions of a stored model (none when absent or unreadable)."""
    try:
        return [v.version for v in decode_kv(kv, rpb.ModelSpec).versions] if kv else []
    except CorruptRecordError:
        return []


def _workloads(jobs: Iterable[rpc.KeyValue], streams: Iterable[rpc.KeyValue]) -> list[tuple[str, rpb.ModelCall]]:
    """("jobs/<name>" or "streams/<name>", the model it calls) of every job and stream."""
    calls = [(f"jobs/{s.name}", s.model) for _, s in decode_all(jobs, rpb.JobSpec)]
    return calls + [(f"streams/{s.name}", s.model) for _, s in decode_all(streams, rpb.StreamSpec)]


def _model_users(model: str, jobs: Iterable[rpc.KeyValue], streams: Iterable[rpc.KeyValue]) -> list[str]:
    return [what for what, call in _workloads(jobs, streams) if call.model == model]


def _pinned_versions(
    model: str, dropped: set[str], jobs: Iterable[rpc.KeyValue], streams: Iterable[rpc.KeyValue]
) -> str:
    """Which jobs and streams pin a version this model spec no longer has, as one message."""
    return "; ".join(
        f"version {call.version!r} is still called by {what}"
        for what, call in _workloads(jobs, streams)
        if call.model == model and call.version in dropped
    )


def _defaults_name(name: str) -> str:
    name = name or GATEWAY_DEFAULTS_NAME
    if name != GATEWAY_DEFAULTS_NAME:
        raise ValidationError(
            f"gateway-defaults/{name}: name: the one GatewayDefaults record is named {GATEWAY_DEFAULTS_NAME!r}"
        )
    return name
