"""RegistryStore: the registry client (aetcd, asyncio), composed of one module per concern:

    records.py    models, runtimes, runtime status and the gateway defaults: validated,
                  conditional writes (writes.py: the one read-check-transaction-retry loop)
    workloads.py  jobs and streams, and their status (read-modify-write by two writers)
    endpoints.py  replicas' endpoint records and the leases they live under
    election.py   leader-election primitives on an etcd key
    this module   the two watches: every registry change, and one runtime's models

    async with RegistryStore("127.0.0.1:2379") as store:
        await store.apply_runtime(runtime_spec)
        result = await store.apply_model(model_spec)             # create or replace
        await store.apply_model(changed, expected_revision=result.record.revision)

Errors are the classes of registry.errors, never raw etcd or gRPC exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aetcd import rpc

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry import etcd as ops
from modelgw.registry.election import ElectionStore
from modelgw.registry.endpoints import EndpointStore
from modelgw.registry.errors import CorruptRecordError
from modelgw.registry.follow import Changes, Reset, follow_prefix
from modelgw.registry.keys import KIND
from modelgw.registry.records import check_name, decode_all
from modelgw.registry.validation import uses_runtime
from modelgw.registry.workloads import WorkloadStore

log = logging.getLogger(__name__)


class RegistryStore(EndpointStore, ElectionStore, WorkloadStore):
    """Registry records in etcd under one key prefix. Use as `async with`, or call close()."""

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

    def _watch_event(self, type_: int, key: bytes, value: bytes, revision: int) -> rpb.WatchEvent | None:
        parsed = self.keys.parse(key)
        kind = KIND.get(parsed.section) if parsed else None
        if kind is None:
            return None  # election keys and strays
        event = rpb.WatchEvent(type=type_, revision=revision, key=key.decode())
        if value:
            try:
                message = codec.decode(value, kind.message, key)
            except CorruptRecordError as exc:
                log.warning("skipping %s", exc)
                return None
            getattr(event, kind.event_field).CopyFrom(message)
        return event

    async def watch_assigned_models(self, runtime: str) -> AsyncIterator[dict[str, rpb.ModelSpec]]:
        """What a replica of `runtime` should have loaded, as {model name: spec}, where each
        spec keeps only the versions on this runtime. Yields the whole set at the start and
        again whenever it changes; survives etcd outages and compactions (it resyncs and
        carries on), so a replica can simply `async for desired in ...: reconcile(desired)`."""
        check_name("runtimes", runtime)
        models: dict[bytes, rpb.ModelSpec] = {}
        last: dict[str, rpb.ModelSpec] | None = None
        async for update in follow_prefix(self.etcd, self.keys.models):
            if isinstance(update, Reset):
                models = {kv.key: m for kv, m in decode_all(update.kvs.values(), rpb.ModelSpec)}
            elif isinstance(update, Changes):
                for ev in update.events:
                    models.pop(ev.kv.key, None)
                    if ev.type == rpc.Event.PUT:
                        models.update((kv.key, m) for kv, m in decode_all([ev.kv], rpb.ModelSpec))
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
