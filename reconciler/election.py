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
        while True:
            try:
                if self.lease is None or not self.lease.alive:
                    self.lease = await self.store.grant_lease(self.ttl)
                if await self.store.campaign(self.identity, self.lease, self.name):
                    log.info("%s is now the leader of %s", self.identity, self.name)
                    return
            except RegistryError as exc:
                log.warning("campaign for %s failed, retrying: %s", self.name, exc)
            await asyncio.sleep(interval)

    async def lost(self) -> None:
        """Return when leadership is lost for sure (etcd says our lease expired)."""
        assert self.lease is not None, "acquire() first"
        await self.lease.lost.wait()
        log.warning("%s lost the leadership of %s", self.identity, self.name)

    async def resign(self) -> None:
        if self.lease is not None and self.lease.alive:
            try:
                await self.store.resign(self.identity, self.name)
                await self.lease.revoke()
            except RegistryError as exc:
                log.warning("could not resign cleanly (the lease will expire): %s", exc)
        self.lease = None
