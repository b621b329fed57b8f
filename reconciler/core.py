"""The backend-neutral reconciler: desired runtimes (registry) -> workloads (backend).

Each pass reads the desired runtimes from the registry, observes the backend's workloads,
acts on the difference (ensure what is missing or outdated, remove what is no longer
wanted) and writes what it saw to status/runtimes/<name>, only when that changed. A pass
runs when a registry change matters to it (a runtime changed; a replica's endpoint came,
went or changed readiness; someone else touched a status), when the backend reports that a
workload changed by itself (Backend.follow: the kubernetes backend's Deployment watch) and
every `resync_seconds`, and only while this reconciler leads. Readiness comes from the
registry, not the backend: a replica is ready when its endpoint says so, whatever runs it
(the local backend rolls a spec change on it: ensure() is given the ready instances).

The workloads are let go (backend.close()) only when another reconciler is seen leading,
never because etcd was unreachable, even for longer than the election lease: see
election.LeaderElection.lost.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import Backend, Workload, spec_hash
from modelgw.reconciler.election import LeaderElection
from modelgw.registry.errors import NotFoundError, RegistryError
from modelgw.registry.keys import Section
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import Change, RegistryView
from modelgw.tasks import OutageLog, guard, stop_tasks

log = logging.getLogger(__name__)


@dataclass
class Plan:
    ensure: list[rpb.RuntimeSpec]
    remove: list[str]


def plan(
    desired: dict[str, rpb.RuntimeSpec], observed: dict[str, Workload], hashes: dict[str, str] | None = None
) -> Plan:
    """What to do to make the observed workloads match the desired runtimes. `hashes`:
    the workload hash of each desired runtime (Backend.workload_hash; spec_hash by default)."""
    ensure = []
    for name, spec in sorted(desired.items()):
        workload = observed.get(name)
        wanted = hashes[name] if hashes is not None else spec_hash(spec)
        if workload is None or workload.spec_hash != wanted or workload.replicas != spec.replicas:
            ensure.append(spec)
    remove = sorted(name for name in observed if name not in desired)
    return Plan(ensure, remove)


def runtime_status(
    spec: rpb.RuntimeSpec, workload: Workload | None, endpoints: list[rpb.Endpoint], backend: str, revision: int
) -> rpb.RuntimeStatus:
    """What is true of a runtime now, as conditions a person can read (no timestamps: the
    caller stamps them when it writes)."""
    if workload is not None and workload.instances is not None:
        # a crashed replica's endpoint stays until its lease runs out: count only live ones
        endpoints = [e for e in endpoints if e.instance in workload.instances]
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
    restarts = workload.restarts if workload else 0
    status.conditions.add(
        type="Degraded",
        status="True" if problems else "False",
        reason="ReplicaFailures" if problems else "NoFailures",
        message="; ".join(problems) if problems else f"{restarts} restart{'' if restarts == 1 else 's'} so far",
    )
    return status


def same_status(a: rpb.RuntimeStatus | None, b: rpb.RuntimeStatus) -> bool:
    """Equal but for timestamps."""
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


def stamp(status: rpb.RuntimeStatus, previous: rpb.RuntimeStatus | None, now: Timestamp) -> None:
    """Set updated_at, and each condition's last_transition_time: kept from `previous`
    while the condition's status stays the same, `now` when it flips."""
    status.updated_at.CopyFrom(now)
    before = {c.type: c for c in previous.conditions} if previous is not None else {}
    for condition in status.conditions:
        old = before.get(condition.type)
        if old is not None and old.status == condition.status and old.HasField("last_transition_time"):
            condition.last_transition_time.CopyFrom(old.last_transition_time)
        else:
            condition.last_transition_time.CopyFrom(now)


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
        if resync_seconds <= 0:
            raise ValueError(f"resync_seconds must be positive, not {resync_seconds}")
        self.store = store
        self.backend = backend
        self.view = RegistryView(store)
        self.election = LeaderElection(store, identity, ttl=lease_ttl)
        self.resync_seconds = resync_seconds
        self._wake = asyncio.Event()
        # runtime -> (the status we wrote, the etcd revision of that write)
        self._written: dict[str, tuple[rpb.RuntimeStatus, int]] = {}
        self.leading = False

    async def run(self) -> None:
        """Follow the registry and reconcile while leading; runs until cancelled. On the
        way out the backend lets go of its workloads before the leadership is given up,
        so a standby never runs its replicas next to ours."""
        await self.view.start(wait=False)
        unsubscribe = self.view.subscribe(self._on_change)
        try:
            while True:
                await self.election.acquire()
                self.leading = True
                try:
                    await self._lead()
                finally:
                    self.leading = False
                # another reconciler leads: it owns the workloads now
                log.warning("another reconciler leads: letting go of this process's workloads")
                await self._release()
        finally:
            unsubscribe()
            self.leading = False
            await self._release()
            await self.election.resign()
            await self.view.stop()

    async def _release(self) -> None:
        self._written.clear()
        try:
            await self.backend.close()
        except Exception:
            log.exception("the %s backend failed to let go of its workloads", self.backend.name)

    def _on_change(self, changes: list[Change]) -> None:
        if any(self._matters(change) for change in changes):
            self._wake.set()

    def _matters(self, change: Change) -> bool:
        """Whether a registry change can change what a pass does or writes. Endpoints
        rewrite their record for every model state and load figure change, and our own
        status writes come back here too: those alone must not cause passes."""
        if change.section is Section.RUNTIME:
            return True
        if change.section is Section.ENDPOINT:
            return change.old is None or change.new is None or change.old.ready != change.new.ready
        if change.section is Section.RUNTIME_STATUS:
            written = self._written.get(change.name)
            return change.new is None or written is None or not same_status(written[0], change.new)
        return False

    async def _lead(self) -> None:
        """Reconcile until another reconciler is seen leading."""
        lost = guard(asyncio.ensure_future(self.election.lost()), "the leadership check", log)
        # the backend wakes a pass when a workload changes by itself (a pod crashed)
        following = guard(asyncio.ensure_future(self.backend.follow(self._wake.set)), "the backend's watch", log)
        synced = waiter = None
        try:
            synced = asyncio.ensure_future(self.view.synced.wait())
            await asyncio.wait({synced, lost}, return_when=asyncio.FIRST_COMPLETED)
            outage = OutageLog(log, "reconcile pass")
            while not lost.done():
                self._wake.clear()
                try:
                    await self.reconcile_once()
                except RegistryError as exc:  # etcd unreachable, mostly
                    outage.failed(exc, "will retry")
                except Exception:
                    log.exception("reconcile pass failed (will retry)")
                    outage.failing = True
                else:
                    outage.recovered("works again")
                if outage.failing:  # do not spin on a failure that changes keep triggering
                    await asyncio.wait({lost}, timeout=min(1.0, self.resync_seconds))
                waiter = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waiter, lost}, timeout=self.resync_seconds, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            await stop_tasks(lost, following, synced, waiter)

    async def reconcile_once(self) -> Plan:
        """One pass: act on the difference, then write the statuses that changed."""
        # read the runtimes from etcd, not the view: their revisions go into the status
        records = (await self.store.list_runtimes()).runtimes
        desired = {r.spec.name: r.spec for r in records}
        revisions = {r.spec.name: r.revision for r in records}
        models = {name: self.view.models_on(name) for name in desired}
        hashes = {name: self.backend.workload_hash(spec, models[name]) for name, spec in desired.items()}
        observed = await self.backend.observe()
        todo = plan(desired, observed, hashes)
        for spec in todo.ensure:
            ready = frozenset(e.instance for e in self.view.endpoints_of(spec.name) if e.ready)
            log.info("runtime %s: ensuring %d replicas (spec %s)", spec.name, spec.replicas, hashes[spec.name])
            await self.backend.ensure(spec, hashes[spec.name], models[spec.name], ready)
        for name in todo.remove:
            log.info("runtime %s: no longer in the registry, removing its workload", name)
            await self.backend.remove(name)
        for name in [n for n in self._written if n not in desired]:
            del self._written[name]
        if todo.ensure or todo.remove:
            observed = await self.backend.observe()
        await self._write_statuses(desired, observed, revisions)
        return todo

    def _last_status(self, name: str) -> rpb.RuntimeStatus | None:
        """The status etcd holds for a runtime: what we last wrote until the view has
        caught up with that write, then the view's (which also sees deletions and other
        writers)."""
        written = self._written.get(name)
        if written is not None and self.view.revision < written[1]:
            return written[0]
        return self.view.statuses.get(name)

    async def _write_statuses(
        self, desired: dict[str, rpb.RuntimeSpec], observed: dict[str, Workload], revisions: dict[str, int]
    ) -> None:
        for name, spec in desired.items():
            endpoints = self.view.endpoints_of(name)
            status = runtime_status(spec, observed.get(name), endpoints, self.backend.name, revisions[name])
            previous = self._last_status(name)
            if same_status(previous, status):
                continue
            now = Timestamp()
            now.GetCurrentTime()
            stamp(status, previous, now)
            try:
                revision = await self.store.put_runtime_status(status)
            except NotFoundError:
                continue  # deleted meanwhile; the next pass removes its workload
            self._written[name] = (status, revision)
