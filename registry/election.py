"""Leader-election primitives on an etcd key (part of RegistryStore); the campaign loop
that uses them is reconciler/election.py.

    won = await store.campaign("host-1", lease)      # election/reconciler is ours?
    holder = await store.leader()                    # who holds it, or None
    await store.resign("host-1")                     # let go (only if we hold it)

The key holds the leader's identity and lives under the leader's lease, so a dead leader's
key goes when its lease expires; it is not a registry record (no kind, no JSON).
"""

from __future__ import annotations

from modelgw.registry import etcd as ops
from modelgw.registry.etcd import LeaseLike
from modelgw.registry.records import RecordStore
from modelgw.registry.writes import first


class ElectionStore(RecordStore):
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
        holder = first(result.responses[0])
        return holder is not None and holder.value == value and holder.lease == ops.lease_id(lease)

    async def leader(self, name: str = "reconciler") -> str | None:
        """The identity holding the election key of `name`, or None."""
        kv = first(await self.etcd.range(self.keys.election(name)))
        return kv.value.decode() if kv else None

    async def resign(self, identity: str, name: str = "reconciler") -> bool:
        """Give up leadership, if `identity` holds it; True if it did."""
        key = self.keys.election(name)
        result = await self.etcd.txn([ops.value_is(key, identity.encode())], [ops.delete(key)])
        return result.succeeded
