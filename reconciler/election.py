"""Leader election through etcd: one reconciler acts, the others stand by.

The leader key lives under a lease the candidate keeps alive. If the leader dies, etcd
deletes its key when the lease runs out and a standby wins the next campaign, so the
takeover happens within the lease TTL (plus one campaign interval).
"""

from __future__ import annotations

import asyncio
import logging

from modelgw.registry.errors import RegistryError
from modelgw.registry.leases import Lease
from modelgw.registry.store import RegistryStore

log = logging.getLogger(__name__)


class LeaderElection:
    def __init__(self, store: RegistryStore, identity: str, ttl: int = 10, name: str = "reconciler") -> None:
        self.store = store
        self.identity = identity
        self.ttl = ttl
        self.name = name
        self.lease: Lease | None = None

    async def acquire(self) -> None:
        """Return once this candidate leads; campaigns every ttl/4 seconds until then."""
        interval = max(0.2, self.ttl / 4)
        failing = False
        while True:
            try:
                if self.lease is None or not self.lease.alive:
                    self.lease = await self.store.grant_lease(self.ttl)
                if await self.store.campaign(self.identity, self.lease, self.name):
                    log.info("%s is now the leader of %s", self.identity, self.name)
                    return
                failing = False
            except RegistryError as exc:
                if not failing:  # once per outage, not every interval
                    log.warning("campaign for %s failed, retrying: %s", self.name, exc)
                failing = True
            await asyncio.sleep(interval)

    async def lost(self) -> None:
        """Return when the leadership is lost for sure: etcd says our lease expired, or the
        election key no longer names us (someone deleted it and another candidate won).
        While etcd cannot be reached we keep leading, and our replicas keep serving: if
        etcd is down nobody can take over, and if only we were cut off, the lease keeper
        hears that the lease expired as soon as etcd answers again."""
        assert self.lease is not None, "acquire() first"
        interval = max(0.2, self.ttl / 4)
        while True:
            try:
                await asyncio.wait_for(self.lease.lost.wait(), interval)
            except asyncio.TimeoutError:
                pass
            else:
                log.warning("%s lost the leadership of %s: its lease expired", self.identity, self.name)
                return
            try:
                # a read while the key is ours; recreates it (ours again) if someone deleted it
                still_ours = await self.store.campaign(self.identity, self.lease, self.name)
            except RegistryError:
                continue
            if not still_ours:
                log.warning("%s lost the leadership of %s: the election key names another", self.identity, self.name)
                return

    async def resign(self) -> None:
        if self.lease is not None and self.lease.alive:
            try:
                await self.store.resign(self.identity, self.name)
                await self.lease.revoke()
            except RegistryError as exc:
                log.warning("could not resign cleanly (the lease will expire): %s", exc)
        self.lease = None
