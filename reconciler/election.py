"""Leader election through etcd: one reconciler acts, the others stand by.

    election = LeaderElection(store, identity="host-123", ttl=10)
    await election.acquire()     # returns once we lead
    await election.lost()        # returns once another candidate leads
    await election.resign()      # shutdown: the key goes at once

The leader key lives under a lease the candidate keeps alive. If the leader dies, etcd
deletes its key when the lease runs out and a standby wins the next campaign, so the
takeover happens within the lease TTL (plus one campaign interval).

The leadership is lost only when another candidate is seen holding the key. A lease that
expired while etcd was unreachable (etcd down or frozen for longer than the TTL, or this
process cut off from it) is not a loss by itself: nobody else may have led meanwhile, and
stopping healthy workloads for it causes the outage the lease was meant to avoid. The
leader grants a new lease and campaigns again the moment etcd answers; it lets go only
if the key then names someone else. If only this process was cut off, a standby may have
led (and started replicas) for a while: both ran workloads until the old leader heard
from etcd again, which is the price of keeping traffic up through an etcd outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from modelgw.registry.errors import RegistryError
from modelgw.registry.leases import Lease
from modelgw.registry.store import RegistryStore
from modelgw.tasks import OutageLog

log = logging.getLogger(__name__)

# between two tries while etcd does not answer: short, so a campaign follows its return
RETRY_SECONDS = 0.5


class LeaderElection:
    def __init__(self, store: RegistryStore, identity: str, ttl: int = 10, name: str = "reconciler") -> None:
        self.store = store
        self.identity = identity
        self.ttl = ttl
        self.name = name
        self.lease: Lease | None = None

    @property
    def interval(self) -> float:
        """How often a standby campaigns and a leader checks the key: ttl/4."""
        return max(0.2, self.ttl / 4)

    async def _live_lease(self) -> Lease:
        """The lease to campaign with: ours while etcd keeps it, else a new one."""
        if self.lease is None or not self.lease.alive:
            if self.lease is not None:
                await self.lease.stop()
            self.lease = await self.store.grant_lease(self.ttl)
        return self.lease

    async def acquire(self) -> None:
        """Return once this candidate leads; campaigns every ttl/4 seconds until then."""
        outage = OutageLog(log, f"campaign for {self.name}")
        while True:
            try:
                lease = await self._live_lease()
                won = await self.store.campaign(self.identity, lease, self.name) and await lease.confirm()
            except RegistryError as exc:
                outage.failed(exc)
            else:
                outage.recovered()
                if won:
                    log.info("%s is now the leader of %s", self.identity, self.name)
                    return
            await asyncio.sleep(self.interval)

    async def lost(self) -> None:
        """Return when the leadership is lost for sure: the election key names another
        candidate. Checks the key every ttl/4 seconds, and at once when etcd says our lease
        expired: then a new lease is granted and the campaign run again (retried every
        RETRY_SECONDS until etcd answers); winning it keeps the leadership. While etcd
        cannot be reached we keep leading, and our replicas keep serving."""
        assert self.lease is not None, "acquire() first"
        outage = OutageLog(log, f"{self.identity}: checking the leadership of {self.name}")
        announced: Lease | None = None  # the expired lease already logged
        while True:
            lease = self.lease
            if lease.alive:
                try:
                    await asyncio.wait_for(lease.lost.wait(), self.interval)
                except TimeoutError:
                    pass
            if not lease.alive and lease is not announced:
                announced = lease
                log.warning(
                    "%s: the lease of the %s leadership expired (etcd was out of reach); campaigning again",
                    self.identity, self.name,
                )
            try:
                if await self.store.campaign(self.identity, await self._live_lease(), self.name):
                    if not lease.alive:
                        log.info("%s still leads %s, under a new lease", self.identity, self.name)
                    outage.recovered()
                    continue
                holder = await self.store.leader(self.name)
            except RegistryError as exc:
                outage.failed(exc)
                if self.lease.alive:  # its keeper hears first when etcd is back: campaign at once then
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.lease.lost.wait(), RETRY_SECONDS)
                else:
                    await asyncio.sleep(RETRY_SECONDS)
                continue
            outage.recovered()
            if holder is not None and holder != self.identity:
                log.warning("%s lost the leadership of %s: %s leads", self.identity, self.name, holder)
                return
            # our own key under a lease etcd has not finished revoking, or it just went:
            # campaign again shortly

    async def resign(self) -> None:
        if self.lease is not None and self.lease.alive:
            try:
                await self.store.resign(self.identity, self.name)
                await self.lease.revoke()
            except RegistryError as exc:
                log.warning("could not resign cleanly (the lease will expire): %s", exc)
        elif self.lease is not None:
            await self.lease.stop()
        self.lease = None
