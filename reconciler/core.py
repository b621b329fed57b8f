"""The backend-neutral reconciler: desired runtimes (registry) -> workloads (backend).

Each pass reads the desired runtimes from the registry view, observes the backend's
workloads, acts on the difference (ensure what is missing or outdated, remove what is no
longer wanted) and writes what it saw to status/runtimes/<name>. A pass runs on every
registry change and every `resync_seconds`, and only while this reconciler leads.
Readiness comes from the registry, not the backend: a replica is ready when its
endpoint says so, whatever runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import Backend, Workload, spec_hash
from modelgw.reconciler.election import LeaderElection
from modelgw.registry.errors import NotFoundError, RegistryError
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import RegistryView

log = logging.getLogger(__name__)


@dataclass
class Plan:
    ensure: list[rpb.RuntimeSpec]
    remove: list[str]


def plan(desired: dict[str, rpb.RuntimeSpec], observed: dict[str, Workload]) -> Plan:
    """What to do to make the observed workloads match the desired runtimes."""
    ensure = []
    for name, spec in sorted(desired.items()):
        workload = observed.get(name)
        if workload is None or workload.spec_hash != spec_hash(spec) or workload.replicas != spec.replicas:
            ensure.append(spec)
    remove = sorted(name for name in observed if name not in desired)
    return Plan(ensure, remove)


def runtime_status(
    spec: rpb.RuntimeSpec, workload: Workload | None, endpoints: list[rpb.Endpoint], backend: str, revision: int
) -> rpb.RuntimeStatus:
    """What is true of a runtime now, as conditions a person can read."""
    ready = sum(1 for e in endpoints if e.ready)
    status = rpb.RuntimeStatus(
        name=spec.name,
        replicas_desired=spec.replicas,
        replicas_ready=ready,
        backend=backend,
        observed_revision=revision,
    )
    available = ready >= spec.replicas
    status.conditions.add(
        type="Available",
        status="True" if available else "False",
        reason="ReplicasReady" if available else "ReplicasNotReady",
        message=f"{ready} of {spec.replicas} replicas ready",
    )
    running = workload.running if workload else 0
    progressing = workload is None or running != spec.replicas or ready != spec.replicas
    status.conditions.add(
        type="Progressing",
        status="True" if progressing else "False",
        reason="Scaling" if progressing else "Stable",
        message=f"{running} running, {ready} ready, {spec.replicas} desired",
    )
    problems = workload.problems if workload else []
    status.conditions.add(
        type="Degraded",
        status="True" if problems else "False",
        reason="ReplicaFailures" if problems else "NoFailures",
        message="; ".join(problems) if problems else f"{workload.restarts if workload else 0} restarts so far",
    )
    return status


def _same_status(a: rpb.RuntimeStatus | None, b: rpb.RuntimeStatus) -> bool:
    if a is None:
        return False
    x, y = rpb.RuntimeStatus(), rpb.RuntimeStatus()
    x.CopyFrom(a)
    y.CopyFrom(b)
    for s in (x, y):
        s.ClearField("updated_at")
        for c in s.conditions:
            c.ClearField("last_transition_time")
    return x == y


class Reconciler:
    def __init__(
        self,
        store: RegistryStore,
        backend: Backend,
        identity: str,
        *,
        resync_seconds: float = 5.0,
        lease_ttl: int = 10,
    ) -> None:
        self.store = store
        self.backend = backend
        self.view = RegistryView(store)
        self.election = LeaderElection(store, identity, ttl=lease_ttl)
        self.resync_seconds = resync_seconds
        self._wake = asyncio.Event()
        self._written: dict[str, rpb.RuntimeStatus] = {}
        self.leading = False

    async def run(self) -> None:
        """Follow the registry and reconcile while leading; runs until cancelled."""
        await self.view.start(wait=False)
        unsubscribe = self.view.subscribe(self._on_change)
        try:
            while True:
                await self.election.acquire()
                self.leading = True
                await self.view.synced.wait()
                lost = asyncio.ensure_future(self.election.lost())
                try:
                    await self._lead(lost)
                finally:
                    self.leading = False
                    lost.cancel()
                # leadership is gone: another reconciler owns the workloads now
                log.warning("stopping local workloads after losing leadership")
                await self._release_workloads()
        finally:
            unsubscribe()
            self.leading = False
            with contextlib.suppress(Exception):
                await self.election.resign()
            await self.view.stop()

    async def _release_workloads(self) -> None:
        for name in list((await self.backend.observe()).keys()):
            await self.backend.remove(name)

    def _on_change(self, changes: object) -> None:
        self._wake.set()

    async def _lead(self, lost: asyncio.Future) -> None:
        while not lost.done():
            self._wake.clear()
            try:
                await self.reconcile_once()
            except RegistryError as exc:
                log.warning("reconcile pass failed (will retry): %s", exc)
            waiter = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({waiter, lost}, timeout=self.resync_seconds, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def reconcile_once(self) -> Plan:
        # read the runtimes from etcd, not the view: their revisions go into the status
        records = (await self.store.list_runtimes()).runtimes
        desired = {r.spec.name: r.spec for r in records}
        revisions = {r.spec.name: r.revision for r in records}
        observed = await self.backend.observe()
        todo = plan(desired, observed)
        for spec in todo.ensure:
            log.info("runtime %s: ensuring %d replicas (spec %s)", spec.name, spec.replicas, spec_hash(spec))
            await self.backend.ensure(spec, spec_hash(spec))
        for name in todo.remove:
            log.info("runtime %s: no longer in the registry, removing its workload", name)
            await self.backend.remove(name)
            self._written.pop(name, None)
        if todo.ensure or todo.remove:
            observed = await self.backend.observe()
        await self._write_statuses(desired, observed, revisions)
        return todo

    async def _write_statuses(
        self, desired: dict[str, rpb.RuntimeSpec], observed: dict[str, Workload], revisions: dict[str, int]
    ) -> None:
        for name, spec in desired.items():
            endpoints = self.view.endpoints_of(name)
            status = runtime_status(spec, observed.get(name), endpoints, self.backend.name, revisions[name])
            if _same_status(self._written.get(name) or self.view.statuses.get(name), status):
                continue
            now = Timestamp()
            now.GetCurrentTime()
            status.updated_at.CopyFrom(now)
            for condition in status.conditions:
                condition.last_transition_time.CopyFrom(now)
            try:
                await self.store.put_runtime_status(status)
                self._written[name] = status
            except NotFoundError:
                pass  # deleted meanwhile; the next pass removes its workload
