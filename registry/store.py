"""The registry client: models, runtimes, endpoints and status in etcd (aetcd, asyncio).

    async with RegistryStore("127.0.0.1:2379") as store:
        await store.apply_runtime(runtime_spec)
        result = await store.apply_model(model_spec)             # create or replace
        await store.apply_model(changed, expected_revision=result.record.revision)

Every write is one etcd transaction that also checks what it depends on:
- optimistic concurrency on the record itself: `expected_revision` 0 creates only, >0 must
  equal the record's mod_revision, None creates or replaces (the write is still guarded by
  the revision just read, and retried when someone else wrote in between);
- referential integrity: a model's runtimes exist and load its formats (their
  mod_revisions are compared in the transaction); a runtime used by models is not deleted
  without `force`, and does not drop a format they use (the models' range is compared).
Errors are the classes of registry.errors, never raw etcd or gRPC exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

from aetcd import rpc
from google.protobuf.message import Message

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry import etcd as ops
from modelgw.registry.errors import (
    ConflictError,
    CorruptRecordError,
    IntegrityError,
    NotFoundError,
    ValidationError,
)
from modelgw.registry.etcd import Etcd, LeaseLike
from modelgw.registry.follow import Changes, Reset, follow_prefix
from modelgw.registry.keys import DEFAULT_PREFIX, RECORD_TYPES, Keys, Section
from modelgw.registry.leases import Lease
from modelgw.registry.validation import (
    DNS_LABEL_RULE,
    check_endpoint,
    check_model,
    check_runtime,
    check_runtime_status,
    is_dns_label,
    model_runtimes,
    uses_runtime,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# Writes without an expected revision retry when another writer slipped in between their
# read and their transaction; this bounds the retries under heavy contention.
MAX_ATTEMPTS = 16


def _check_name(kind: str, name: str) -> None:
    if not is_dns_label(name):
        raise ValidationError(f"{kind}/{name or '<unnamed>'}: name: {name!r} is not a DNS label ({DNS_LABEL_RULE})")


def _check_expected(what: str, expected: int | None, current: int) -> None:
    """Raise ConflictError unless the record's current revision is what the writer expects."""
    if expected is None or expected == current:
        return
    if expected == 0:
        message = f"{what} already exists (revision {current}); read it and apply with that revision to change it"
    elif current == 0:
        message = f"{what} was expected at revision {expected} but no longer exists"
    else:
        message = (
            f"{what} was changed by someone else: it is at revision {current}, not {expected}; "
            "read it again and reapply your change"
        )
    raise ConflictError(message, current)


class RegistryStore:
    """Registry records in etcd under one key prefix. Use as `async with`, or call close()."""

    def __init__(self, etcd: str | Etcd = "127.0.0.1:2379", *, prefix: str = DEFAULT_PREFIX, timeout: float = 5.0):
        self.etcd = etcd if isinstance(etcd, Etcd) else Etcd(etcd, timeout=timeout)
        self.keys = Keys(prefix)

    @property
    def endpoint(self) -> str:
        return self.etcd.endpoint

    async def close(self) -> None:
        await self.etcd.close()

    async def __aenter__(self) -> "RegistryStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _decode(self, kv, cls: type[M]) -> M:
        return codec.decode(kv.value, cls, kv.key)

    # ------------------------------------------------------------------ models

    async def apply_model(self, spec: rpb.ModelSpec, expected_revision: int | None = None) -> rpb.ApplyModelResponse:
        """Create or update a model. Raises ValidationError, IntegrityError (a runtime it
        names does not exist), ConflictError (not at expected_revision)."""
        check_model(spec)
        what = f"models/{spec.name}"
        key = self.keys.model(spec.name)
        names = model_runtimes(spec)
        value = codec.encode(spec)
        current_revision = 0
        for _ in range(MAX_ATTEMPTS):
            read = await self.etcd.txn(
                success=[ops.get(key), *(ops.get(self.keys.runtime(n)) for n in names)]
            )
            current = _first(read.responses[0])
            current_revision = current.mod_revision if current else 0
            _check_expected(what, expected_revision, current_revision)
            runtime_kvs = {n: _first(r) for n, r in zip(names, read.responses[1:])}
            missing = [n for n, kv in runtime_kvs.items() if kv is None]
            if missing:
                raise IntegrityError(_missing_runtimes(what, spec, missing))
            runtimes = {n: self._decode(kv, rpb.RuntimeSpec) for n, kv in runtime_kvs.items()}
            check_model(spec, runtimes)
            if current is not None and self._same(current, spec):
                record = rpb.ModelRecord(spec=spec, revision=current_revision, create_revision=current.create_revision)
                return rpb.ApplyModelResponse(record=record, outcome=rpb.UNCHANGED)
            guards = [ops.mod_revision_is(key, current_revision)]
            guards += [ops.mod_revision_is(self.keys.runtime(n), kv.mod_revision) for n, kv in runtime_kvs.items()]
            written = await self.etcd.txn(guards, [ops.put(key, value)])
            if written.succeeded:
                revision = written.header.revision
                record = rpb.ModelRecord(
                    spec=spec, revision=revision, create_revision=current.create_revision if current else revision
                )
                return rpb.ApplyModelResponse(record=record, outcome=rpb.UPDATED if current else rpb.CREATED)
            # the model or one of its runtimes changed since the read: read again
        raise ConflictError(f"{what} kept changing under this write ({MAX_ATTEMPTS} attempts); retry", current_revision)

    def _formats(self, kv) -> list[str]:
        """The model formats of a stored runtime (none when absent or unreadable)."""
        try:
            return list(self._decode(kv, rpb.RuntimeSpec).model_formats) if kv else []
        except CorruptRecordError:
            return []

    def _same(self, kv, spec: Message) -> bool:
        try:
            return self._decode(kv, type(spec)) == spec
        except CorruptRecordError:
            return False

    async def get_model(self, name: str) -> rpb.ModelRecord:
        _check_name("models", name)
        response = await self.etcd.range(self.keys.model(name))
        kv = _first(response)
        if kv is None:
            raise NotFoundError(f"models/{name} does not exist")
        return rpb.ModelRecord(
            spec=self._decode(kv, rpb.ModelSpec), revision=kv.mod_revision, create_revision=kv.create_revision
        )

    async def list_models(self) -> rpb.ListModelsResponse:
        response = await self.etcd.range_prefix(self.keys.models)
        models = [
            rpb.ModelRecord(spec=spec, revision=kv.mod_revision, create_revision=kv.create_revision)
            for kv, spec in self._decode_all(response.kvs, rpb.ModelSpec)
        ]
        return rpb.ListModelsResponse(models=models, revision=response.header.revision)

    async def delete_model(self, name: str, expected_revision: int | None = None) -> int:
        """Delete a model; returns the etcd revision of the deletion."""
        _check_name("models", name)
        what = f"models/{name}"
        key = self.keys.model(name)
        current_revision = 0
        for _ in range(MAX_ATTEMPTS):
            current = _first(await self.etcd.range(key))
            current_revision = current.mod_revision if current else 0
            if current is None and not expected_revision:
                raise NotFoundError(f"{what} does not exist")
            _check_expected(what, expected_revision, current_revision)
            deleted = await self.etcd.txn([ops.mod_revision_is(key, current_revision)], [ops.delete(key)])
            if deleted.succeeded:
                return deleted.header.revision
        raise ConflictError(f"{what} kept changing under this delete ({MAX_ATTEMPTS} attempts); retry", current_revision)

    # ------------------------------------------------------------------ runtimes

    async def apply_runtime(
        self, spec: rpb.RuntimeSpec, expected_revision: int | None = None
    ) -> rpb.ApplyRuntimeResponse:
        """Create or update a runtime. Raises ValidationError, ConflictError, and
        IntegrityError when the update drops a model format that models still use."""
        check_runtime(spec)
        what = f"runtimes/{spec.name}"
        key = self.keys.runtime(spec.name)
        value = codec.encode(spec)
        current_revision = 0
        for _ in range(MAX_ATTEMPTS):
            read = await self.etcd.txn(
                success=[ops.get(key), ops.get(self.keys.runtime_status(spec.name)), ops.get_prefix(self.keys.models)]
            )
            current = _first(read.responses[0])
            current_revision = current.mod_revision if current else 0
            _check_expected(what, expected_revision, current_revision)
            status_kv = _first(read.responses[1])
            status = self._decode(status_kv, rpb.RuntimeStatus) if status_kv else None
            if current is not None and self._same(current, spec):
                record = _runtime_record(spec, current.mod_revision, current.create_revision, status)
                return rpb.ApplyRuntimeResponse(record=record, outcome=rpb.UNCHANGED)
            guards = [ops.mod_revision_is(key, current_revision)]
            if set(self._formats(current)) - set(spec.model_formats):
                models = [m for _, m in self._decode_all(read.responses[2].response_range.kvs, rpb.ModelSpec)]
                broken = _dropped_formats(spec, models)
                if broken:
                    raise IntegrityError(f"{what}: model_formats: {broken}; change those models first")
                # a model written meanwhile could use a dropped format: guard the models' range
                guards.append(ops.unchanged_since(self.keys.models, read.header.revision))
            written = await self.etcd.txn(guards, [ops.put(key, value)])
            if written.succeeded:
                revision = written.header.revision
                create_revision = current.create_revision if current else revision
                record = _runtime_record(spec, revision, create_revision, status)
                return rpb.ApplyRuntimeResponse(record=record, outcome=rpb.UPDATED if current else rpb.CREATED)
        raise ConflictError(f"{what} kept changing under this write ({MAX_ATTEMPTS} attempts); retry", current_revision)

    async def get_runtime(self, name: str) -> rpb.RuntimeRecord:
        _check_name("runtimes", name)
        read = await self.etcd.txn(success=[ops.get(self.keys.runtime(name)), ops.get(self.keys.runtime_status(name))])
        kv = _first(read.responses[0])
        if kv is None:
            raise NotFoundError(f"runtimes/{name} does not exist")
        status_kv = _first(read.responses[1])
        status = self._decode(status_kv, rpb.RuntimeStatus) if status_kv else None
        return _runtime_record(self._decode(kv, rpb.RuntimeSpec), kv.mod_revision, kv.create_revision, status)

    async def list_runtimes(self) -> rpb.ListRuntimesResponse:
        read = await self.etcd.txn(success=[ops.get_prefix(self.keys.runtimes), ops.get_prefix(self.keys.statuses)])
        statuses = {s.name: s for _, s in self._decode_all(read.responses[1].response_range.kvs, rpb.RuntimeStatus)}
        runtimes = [
            _runtime_record(spec, kv.mod_revision, kv.create_revision, statuses.get(spec.name))
            for kv, spec in self._decode_all(read.responses[0].response_range.kvs, rpb.RuntimeSpec)
        ]
        return rpb.ListRuntimesResponse(runtimes=runtimes, revision=read.header.revision)

    async def delete_runtime(self, name: str, expected_revision: int | None = None, force: bool = False) -> int:
        """Delete a runtime and its status. Refused with IntegrityError while models use it,
        unless force (their versions on it then have no runtime until it is applied again)."""
        _check_name("runtimes", name)
        what = f"runtimes/{name}"
        key = self.keys.runtime(name)
        current_revision = 0
        for _ in range(MAX_ATTEMPTS):
            read = await self.etcd.txn(success=[ops.get(key), ops.get_prefix(self.keys.models)])
            current = _first(read.responses[0])
            current_revision = current.mod_revision if current else 0
            if current is None and not expected_revision:
                raise NotFoundError(f"{what} does not exist")
            _check_expected(what, expected_revision, current_revision)
            guards = [ops.mod_revision_is(key, current_revision)]
            if not force:
                users = [
                    f"models/{m.name}"
                    for _, m in self._decode_all(read.responses[1].response_range.kvs, rpb.ModelSpec)
                    if uses_runtime(m, name)
                ]
                if users:
                    raise IntegrityError(
                        f"{what} is used by {', '.join(users)}; delete or change those models first, "
                        "or delete with force"
                    )
                # no model may start using it between this read and the delete
                guards.append(ops.unchanged_since(self.keys.models, read.header.revision))
            deleted = await self.etcd.txn(guards, [ops.delete(key), ops.delete(self.keys.runtime_status(name))])
            if deleted.succeeded:
                return deleted.header.revision
        raise ConflictError(f"{what} kept changing under this delete ({MAX_ATTEMPTS} attempts); retry", current_revision)

    # ------------------------------------------------------------------ runtime status

    async def put_runtime_status(self, status: rpb.RuntimeStatus) -> int:
        """Write what the reconciler observed for a runtime; NotFoundError if the runtime
        is gone (so a late write never resurrects the status of a deleted runtime)."""
        check_runtime_status(status)
        written = await self.etcd.txn(
            [ops.exists(self.keys.runtime(status.name))],
            [ops.put(self.keys.runtime_status(status.name), codec.encode(status))],
        )
        if not written.succeeded:
            raise NotFoundError(f"runtimes/{status.name} does not exist; its status was not written")
        return written.header.revision

    async def get_runtime_status(self, name: str) -> rpb.RuntimeStatus | None:
        _check_name("runtimes", name)
        kv = _first(await self.etcd.range(self.keys.runtime_status(name)))
        return self._decode(kv, rpb.RuntimeStatus) if kv else None

    # ------------------------------------------------------------------ leases and endpoints

    async def grant_lease(self, ttl: int = 10, *, keep_alive: bool = True) -> Lease:
        """A new lease of ttl seconds, refreshed in the background unless keep_alive=False.
        See leases.Lease: `lost` is set if etcd lets it expire; `revoke()` on shutdown."""
        if ttl < 1:
            raise ValidationError(f"lease ttl: {ttl} must be at least 1 second")
        lease = Lease(self.etcd, await self.etcd.grant(ttl), ttl)
        return lease.start() if keep_alive else lease

    async def revoke_lease(self, lease: LeaseLike) -> None:
        """Revoke a lease (by Lease or id): every key under it is deleted now."""
        if isinstance(lease, Lease):
            await lease.revoke()
        else:
            await self.etcd.revoke(lease)

    async def put_endpoint(self, endpoint: rpb.Endpoint, lease: LeaseLike) -> int:
        """Write a replica's endpoint record under its lease (create or replace); returns
        the revision. LeaseNotFoundError when the lease has expired: grant a new one."""
        check_endpoint(endpoint)
        if not ops.lease_id(lease):
            raise ValidationError(f"endpoints/{endpoint.runtime}/{endpoint.instance}: an endpoint needs a lease")
        response = await self.etcd.put(
            self.keys.endpoint(endpoint.runtime, endpoint.instance), codec.encode(endpoint), lease
        )
        return response.header.revision

    async def delete_endpoint(self, runtime: str, instance: str) -> bool:
        """Delete an endpoint record now (revoking its lease does too); False if absent."""
        response = await self.etcd.delete(self.keys.endpoint(runtime, instance))
        return response.deleted > 0

    async def list_endpoints(self, runtime: str = "") -> rpb.ListEndpointsResponse:
        """Endpoints of every runtime, or of one."""
        if runtime:
            _check_name("runtimes", runtime)
        prefix = self.keys.endpoints_of(runtime) if runtime else self.keys.endpoints
        response = await self.etcd.range_prefix(prefix)
        endpoints = [e for _, e in self._decode_all(response.kvs, rpb.Endpoint)]
        return rpb.ListEndpointsResponse(endpoints=endpoints, revision=response.header.revision)

    # ------------------------------------------------------------------ leader election

    async def campaign(self, identity: str, lease: LeaseLike, name: str = "reconciler") -> bool:
        """Try to become the leader of `name`: True if the election key is (now) ours. The
        key lives under `lease`, so a dead leader's key goes when its lease expires; losers
        retry later (or watch the key) and win once it is gone."""
        key = self.keys.election(name)
        value = identity.encode()
        result = await self.etcd.txn(
            [ops.mod_revision_is(key, 0)], [ops.put(key, value, lease)], [ops.get(key)]
        )
        if result.succeeded:
            return True
        holder = _first(result.responses[0])
        return holder is not None and holder.value == value and holder.lease == ops.lease_id(lease)

    async def leader(self, name: str = "reconciler") -> str | None:
        """The identity holding the election key of `name`, or None."""
        kv = _first(await self.etcd.range(self.keys.election(name)))
        return kv.value.decode() if kv else None

    async def resign(self, identity: str, name: str = "reconciler") -> bool:
        """Give up leadership, if `identity` holds it; True if it did."""
        key = self.keys.election(name)
        result = await self.etcd.txn([ops.value_is(key, identity.encode())], [ops.delete(key)])
        return result.succeeded

    # ------------------------------------------------------------------ watches

    async def watch(self, start_revision: int = 0) -> AsyncIterator[rpb.WatchEvent]:
        """Registry changes as WatchEvents. start_revision 0: first a PUT for every record
        (all at the revision read), then changes; >0: changes from that revision on.
        Raises CompactedError when start_revision is compacted, UnavailableError when etcd
        goes away: this is one watch, for an API client to resume; the in-process
        consumers want RegistryView or watch_assigned_models, which never give up."""
        revision = start_revision
        if start_revision <= 0:
            snapshot = await self.etcd.range_prefix(self.keys.root)
            revision = snapshot.header.revision + 1
            for kv in snapshot.kvs:
                event = self._watch_event(rpb.WatchEvent.PUT, kv.key, kv.value, kv.mod_revision)
                if event is not None:
                    event.revision = snapshot.header.revision
                    yield event
        stream = self.etcd.watch(self.keys.root, ops.prefix_end(self.keys.root), start_revision=revision, prev_kv=True)
        try:
            async for response in stream:
                for ev in response.events:
                    if ev.type == rpc.Event.PUT:
                        event = self._watch_event(rpb.WatchEvent.PUT, ev.kv.key, ev.kv.value, ev.kv.mod_revision)
                    else:
                        event = self._watch_event(rpb.WatchEvent.DELETE, ev.kv.key, ev.prev_kv.value, ev.kv.mod_revision)
                    if event is not None:
                        yield event
        finally:
            await stream.aclose()

    def _watch_event(self, kind: int, key: bytes, value: bytes, revision: int) -> rpb.WatchEvent | None:
        parsed = self.keys.parse(key)
        cls = RECORD_TYPES.get(parsed.section) if parsed else None
        if cls is None:
            return None  # election keys and strays
        event = rpb.WatchEvent(type=kind, revision=revision, key=key.decode())
        if value:
            try:
                message = codec.decode(value, cls, key)
            except CorruptRecordError as exc:
                log.warning("skipping %s", exc)
                return None
            field = {
                Section.MODEL: "model",
                Section.RUNTIME: "runtime",
                Section.ENDPOINT: "endpoint",
                Section.RUNTIME_STATUS: "runtime_status",
            }[parsed.section]
            getattr(event, field).CopyFrom(message)
        return event

    async def watch_assigned_models(self, runtime: str) -> AsyncIterator[dict[str, rpb.ModelSpec]]:
        """What a replica of `runtime` should have loaded, as {model name: spec}, where each
        spec keeps only the versions on this runtime. Yields the whole set at the start and
        again whenever it changes; survives etcd outages and compactions (it resyncs and
        carries on), so a replica can simply `async for desired in ...: reconcile(desired)`."""
        _check_name("runtimes", runtime)
        models: dict[bytes, rpb.ModelSpec] = {}
        last: dict[str, rpb.ModelSpec] | None = None
        async for update in follow_prefix(self.etcd, self.keys.models):
            if isinstance(update, Reset):
                models = {kv.key: m for kv, m in self._decode_all(update.kvs.values(), rpb.ModelSpec)}
            elif isinstance(update, Changes):
                for ev in update.events:
                    models.pop(ev.kv.key, None)
                    if ev.type == rpc.Event.PUT:
                        models.update((kv.key, m) for kv, m in self._decode_all([ev.kv], rpb.ModelSpec))
            else:
                continue
            assigned = {}
            for spec in models.values():
                if uses_runtime(spec, runtime):
                    mine = rpb.ModelSpec()
                    mine.CopyFrom(spec)
                    del mine.versions[:]
                    mine.versions.extend(v for v in spec.versions if v.runtime == runtime)
                    assigned[spec.name] = mine
            if assigned != last:
                last = assigned
                yield assigned

    # ------------------------------------------------------------------ helpers

    def _decode_all(self, kvs: Iterable, cls: type[M]) -> list[tuple[rpc.KeyValue, M]]:
        """(kv, message) for many records, skipping (and logging) corrupt ones so that one
        bad value does not hide the rest."""
        decoded = []
        for kv in kvs:
            try:
                decoded.append((kv, codec.decode(kv.value, cls, kv.key)))
            except CorruptRecordError as exc:
                log.warning("skipping %s", exc)
        return decoded

def _first(response: rpc.RangeResponse | rpc.ResponseOp) -> rpc.KeyValue | None:
    """The first kv of a range response (or of a transaction's range op), or None."""
    if isinstance(response, rpc.ResponseOp):
        response = response.response_range
    return response.kvs[0] if response.kvs else None


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
