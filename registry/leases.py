"""Leases kept alive in the background: what a runtime replica holds its endpoint record
under, and a leader its election key. When the replica dies, etcd deletes the keys by
itself once the TTL runs out.

    lease = await store.grant_lease(ttl=10)      # granted and kept alive
    await store.put_endpoint(endpoint, lease)
    ...
    await lease.lost.wait()    # etcd says it expired (e.g. after a long outage): grant anew
    await lease.revoke()       # graceful shutdown: the records go at once
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from modelgw.registry.errors import RegistryError
from modelgw.registry.etcd import Etcd
from modelgw.tasks import OutageLog, stop_tasks

log = logging.getLogger(__name__)


class Lease:
    """An etcd lease refreshed every ttl/3 seconds until revoked or lost.

    `lost` is set when etcd answers that the lease no longer exists (it expired while this
    process could not reach etcd, or someone revoked it): its keys are gone, and whoever
    holds it must grant a new lease and write them again. While etcd is unreachable the
    lease is not declared lost (etcd extends leases when it comes back), the keeper just
    keeps trying; `last_refreshed` (time.monotonic) tells how long it has been.
    """

    def __init__(self, etcd: Etcd, lease_id: int, ttl: int) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.last_refreshed = time.monotonic()
        self._etcd = etcd
        self._revoked = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Lease:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_alive(), name=f"lease-{self.id:x}")
        return self

    @property
    def alive(self) -> bool:
        return not self.lost.is_set() and not self._revoked

    async def _keep_alive(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        # at most 1 s between tries while etcd is away: whoever holds the lease hears
        # within a second of etcd's return whether it outlived the outage
        retry = min(interval, 1.0)
        outage = OutageLog(log, f"lease {self.id:x}: keep-alive")
        while True:
            try:
                remaining = await self._etcd.keep_alive_once(self.id)
            except RegistryError as exc:
                outage.failed(exc)
                await asyncio.sleep(retry)
                continue
            if remaining <= 0:
                log.warning("lease %x has expired; its keys are gone", self.id)
                self.lost.set()
                return
            outage.recovered("works again")
            self.last_refreshed = time.monotonic()
            await asyncio.sleep(interval)

    async def confirm(self) -> bool:
        """Refresh the lease now and say whether etcd still has it (False sets `lost`).
        A key just written under a lease that had expired, but that etcd had not yet
        revoked (as when a frozen etcd thaws), goes a moment later: a candidate that won
        an election with such a lease has not won. RegistryError when etcd is unreachable."""
        if await self._etcd.keep_alive_once(self.id) <= 0:
            self.lost.set()
            return False
        self.last_refreshed = time.monotonic()
        return True

    async def stop(self) -> None:
        """Stop refreshing (the lease then expires after its TTL) without revoking it."""
        await stop_tasks(self._task)
        self._task = None

    async def revoke(self) -> None:
        """Stop refreshing and revoke the lease: every key under it is deleted now."""
        await self.stop()
        self._revoked = True
        await self._etcd.revoke(self.id)

    async def __aenter__(self) -> Lease:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(RegistryError):
            await self.revoke()

    def __repr__(self) -> str:
        return f"Lease(id={self.id:x}, ttl={self.ttl}, alive={self.alive})"
