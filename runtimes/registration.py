"""A runtime replica in the registry: its endpoint record, and the models etcd assigns it.

    registration = EndpointRegistration(store, server, runtime="torch", instance="torch-0-ab12")
    await registration.start()     # lease + endpoint record; starts following assignments
    await registration.assigned.wait()   # the first assigned models are loaded (or failed)
    ...
    await registration.stop()      # record written not ready, then the lease revoked

- The endpoint record (address, readiness, loaded models with their state, load figures)
  lives under a lease kept alive in the background; if the replica dies, etcd drops it
  after the TTL.
- Every model with a version on this runtime is loaded; versions that go away are
  unloaded; a changed URI or batching limit reloads the version. A load that fails stays
  FAILED, with its reason in the record, until its spec changes (no retry loop).
- The record is rewritten when a model's state or the readiness changes, and, at most
  once per `load_interval`, when the load figures change (an LLM replica with sequences
  running or KV cache held: every `load_interval`, so that its figures are known fresh). If the lease is lost (etcd
  expired it: the replica could not reach etcd for longer than the TTL, or it was
  revoked) a new lease is granted and the record written again, under the same instance,
  as soon as etcd answers (the lease keeper tries every second while it is away).
- A clean stop writes the record not ready before it revokes the lease, so that the
  gateway tells a replica leaving (dropped at once) from one whose record etcd expired
  during an outage (routed to while it keeps answering; see gateway.routing).

What is registered is a `Registrant`: our RuntimeServer with its ModelRepository, or
`modelgw runtime attach`'s view of an OIP server we did not write (runtimes.attach), so
that both hold their records under leases the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from modelgw.oip.protocol import UNLOADED_LABEL
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.errors import LeaseNotFoundError, RegistryError
from modelgw.registry.leases import Lease
from modelgw.registry.store import RegistryStore
from modelgw.runtimes.errors import InferenceError, ModelLoadError
from modelgw.runtimes.repository import ModelLoad, ModelState, ModelStatus
from modelgw.tasks import OutageLog, guard, stop_tasks

log = logging.getLogger(__name__)

_STATES = {
    ModelState.LOADING: rpb.LoadedModel.LOADING,
    ModelState.READY: rpb.LoadedModel.READY,
    ModelState.FAILED: rpb.LoadedModel.FAILED,
    ModelState.UNLOADING: rpb.LoadedModel.UNLOADING,
}


@dataclass(frozen=True)
class Assignment:
    """What is loaded for one (model, version): reloading is needed when this changes."""

    uri: str
    max_batch_size: int | None
    max_queue_delay: float | None


def assignments(specs: dict[str, rpb.ModelSpec]) -> dict[tuple[str, str], Assignment]:
    """{(model, version): Assignment} for the model specs assigned to this runtime."""
    wanted = {}
    for spec in specs.values():
        if spec.labels.get(UNLOADED_LABEL) == "true":
            continue  # unloaded through the gateway's model repository API: none of its versions
        limits = spec.limits
        for version in spec.versions:
            wanted[(spec.name, version.version)] = Assignment(
                uri=version.uri,
                max_batch_size=limits.max_batch_size or None,
                max_queue_delay=(limits.max_queue_delay_ms / 1000.0) if limits.max_queue_delay_ms else None,
            )
    return wanted


class Models(Protocol):
    """The models a registrant serves: what the record lists, and how assigned models are
    loaded and unloaded (runtimes.repository.ModelRepository is one)."""

    def statuses(self) -> list[ModelStatus]: ...

    def load_figures(self) -> list[ModelLoad]: ...

    def watch(self) -> AsyncIterator[ModelStatus]: ...

    async def load(
        self, name: str, version: str, uri: str, *, max_batch_size: int | None, max_queue_delay: float | None
    ) -> object: ...

    async def unload(self, name: str, version: str) -> None: ...


class Registrant(Protocol):
    """A server with an endpoint record (runtimes.server.RuntimeServer is one)."""

    @property
    def repository(self) -> Models: ...

    @property
    def ready(self) -> bool: ...

    @property
    def address(self) -> str: ...


class EndpointRegistration:
    def __init__(
        self,
        store: RegistryStore,
        server: Registrant,
        *,
        runtime: str,
        instance: str,
        address: str | None = None,
        lease_ttl: int = 10,
        load_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.server = server
        self.repository: Models = server.repository
        self.runtime = runtime
        self.instance = instance
        self.address = address or server.address
        self.lease_ttl = lease_ttl
        self.load_interval = load_interval
        self.lease: Lease | None = None
        self.loaded: dict[tuple[str, str], Assignment] = {}
        self.started_at = Timestamp()
        self.assigned = asyncio.Event()  # the first assignment from etcd has been acted on
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_load: tuple = ()
        self._outage = OutageLog(log, f"endpoints/{runtime}/{instance}: writing the record")

    @property
    def what(self) -> str:
        return f"endpoints/{self.runtime}/{self.instance}"

    # -- the record ----------------------------------------------------------------------

    def endpoint(self) -> rpb.Endpoint:
        ep = rpb.Endpoint(
            runtime=self.runtime, instance=self.instance, address=self.address, ready=self.server.ready
        )
        ep.started_at.CopyFrom(self.started_at)
        for status in sorted(self.repository.statuses(), key=lambda s: (s.name, s.version)):
            if status.state in _STATES:
                ep.models.add(name=status.name, version=status.version, state=_STATES[status.state], message=status.message)
        figures = self.repository.load_figures()
        ep.load.queue_depth = sum(f.queue_depth for f in figures)
        ep.load.in_flight = sum(f.in_flight for f in figures)
        extra = getattr(self.server, "extra_load_figures", None)
        if extra is not None:  # e.g. the LLM runtime's KV-cache use
            extra(ep.load)
        return ep

    @staticmethod
    def _load_key(ep: rpb.Endpoint) -> tuple:
        return (ep.load.queue_depth, ep.load.in_flight, ep.load.kv_cache_usage, ep.load.running)

    async def _write(self) -> None:
        """Write the record under a live lease; a lost lease means etcd dropped the record:
        grant a new one and write it again."""
        for _ in range(2):
            if self.lease is None or not self.lease.alive:
                if self.lease is not None:
                    log.warning("%s: lease %x is gone (expired or revoked): registering again", self.what, self.lease.id)
                self.lease = await self.store.grant_lease(self.lease_ttl)
                log.info("%s: registered under lease %x", self.what, self.lease.id)
            ep = self.endpoint()
            try:
                await self.store.put_endpoint(ep, self.lease)
            except LeaseNotFoundError:
                log.warning("%s: lease %x expired before its keeper noticed: registering again", self.what, self.lease.id)
                await self.lease.stop()
                self.lease = None
                continue
            self._last_load = self._load_key(ep)
            return
        raise LeaseNotFoundError(f"{self.what}: a freshly granted lease was not found; etcd lost it")

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Register (or keep trying in the background if etcd is not there yet) and start
        following the models assigned to the runtime."""
        self.started_at.GetCurrentTime()
        try:
            await self._write()
        except RegistryError as exc:
            # etcd is not there yet: the publisher keeps trying
            log.warning("%s: cannot register yet (will retry): %s", self.what, exc)
            self._outage.failing = True
            self._dirty.set()
        loop = asyncio.get_running_loop()
        self._tasks = [
            guard(loop.create_task(self._follow_assignments(), name="assignments"), f"{self.what}: assignments", log),
            guard(loop.create_task(self._follow_repository(), name="model-states"), f"{self.what}: model states", log),
            guard(loop.create_task(self._publish(), name="endpoint-publisher"), f"{self.what}: publisher", log),
        ]

    def mark_dirty(self) -> None:
        """Ask for the record to be rewritten soon (e.g. readiness changed)."""
        self._dirty.set()

    async def stop(self) -> None:
        """Stop following, write the record not ready (a replica leaving, not one whose
        lease etcd expired), then revoke the lease: the record is deleted at once."""
        await stop_tasks(*self._tasks)
        self._tasks = []
        if self.lease is not None:
            try:
                if self.lease.alive:
                    leaving = self.endpoint()
                    leaving.ready = False
                    with contextlib.suppress(LeaseNotFoundError):
                        await self.store.put_endpoint(leaving, self.lease)
                await self.lease.revoke()
                log.info("%s: deregistered", self.what)
            except RegistryError as exc:
                log.warning("%s: could not revoke lease (the record expires with it): %s", self.what, exc)

    # -- background work -----------------------------------------------------------------

    async def _publish(self) -> None:
        """Rewrite the record when asked, when the lease is lost, and (at most once per
        load_interval) when the load figures moved."""
        while True:
            waits = [asyncio.ensure_future(self._dirty.wait())]
            if self.lease is not None and self.lease.alive:
                waits.append(asyncio.ensure_future(self.lease.lost.wait()))
            try:
                await asyncio.wait(waits, timeout=self.load_interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
            lease_lost = self.lease is None or not self.lease.alive
            # an LLM replica at work (running sequences, KV cache held) rewrites its record
            # every load_interval even when its figures stand still: the gateway takes
            # figures older than that as stale (gateway.routing.llm_load)
            busy = bool(self._last_load) and bool(self._last_load[3] or self._last_load[2])
            if not (self._dirty.is_set() or lease_lost or busy or self._load_key(self.endpoint()) != self._last_load):
                continue
            self._dirty.clear()
            try:
                await self._write()
            except RegistryError as exc:
                self._outage.failed(exc, "will keep trying")
                self._dirty.set()
                await asyncio.sleep(self.load_interval)
                continue
            except Exception:  # a bug of ours: keep the replica registered regardless
                log.exception("%s: writing the record failed", self.what)
                self._dirty.set()
                await asyncio.sleep(self.load_interval)
                continue
            self._outage.recovered("works again (etcd is reachable)")

    async def _follow_repository(self) -> None:
        async for _ in self.repository.watch():
            self._dirty.set()

    async def _follow_assignments(self) -> None:
        async for specs in self.store.watch_assigned_models(self.runtime):
            try:
                await self._reconcile(assignments(specs))
            except Exception:  # keep following: the next change may well work
                log.exception("%s: acting on the assigned models failed", self.what)
            self.assigned.set()

    async def _reconcile(self, wanted: dict[tuple[str, str], Assignment]) -> None:
        for key in [k for k in self.loaded if k not in wanted]:
            name, version = key
            log.info("model '%s' version '%s' is no longer assigned here: unloading", name, version)
            self.loaded.pop(key)
            with contextlib.suppress(InferenceError):
                await self.repository.unload(name, version)
        loads = [
            self._load(key, assignment)
            for key, assignment in wanted.items()
            if self.loaded.get(key) != assignment
        ]
        await asyncio.gather(*loads)

    async def _load(self, key: tuple[str, str], assignment: Assignment) -> None:
        name, version = key
        self.loaded[key] = assignment
        started = time.monotonic()
        try:
            await self.repository.load(
                name,
                version,
                assignment.uri,
                max_batch_size=assignment.max_batch_size,
                max_queue_delay=assignment.max_queue_delay,
            )
            log.info("model '%s' version '%s' loaded in %.2fs", name, version, time.monotonic() - started)
        except ModelLoadError as exc:
            # the state FAILED with its reason is in the endpoint record for all to see
            log.error("%s", exc)
