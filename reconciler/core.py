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

Jobs and streams (issue 13) are planned in the same pass, after the runtimes:
- a stream is kept like a runtime (plan_streams; stream_replicas(spec) consumers, a spec
  change rolls), and the reconciler writes its replica counts and conditions into
  status/streams/NAME (the replicas write their message counts and lag there);
- a job gets a workload while it is not finished (plan_jobs); the backend restarts it
  after a crash up to its backoff limit. The reconciler writes the JobStatus fields it
  owns (phase PENDING until the job process says RUNNING, attempts, FAILED with the
  reason once the retries are used up, SUCCEEDED when the backend saw it end so and the
  process had not said it yet, backend, observed_revision); the job process writes its
  progress, RUNNING and SUCCEEDED. Both write through update_job_status, a conditional
  read-modify-write, so neither loses the other's fields.
- A finished job (SUCCEEDED or FAILED) is final: its workload is left alone (a local
  process has ended; a Kubernetes Job stays until ttl_seconds_after_finished, for its
  logs) and a later change of its spec does not run it again (the status keeps saying what
  ran). To run it again, delete it and apply it again: the new record's create_revision
  is newer than the old status's observed_revision, so that status is not the new job's
  (job_status_of) and the new job starts from PENDING.
- A job's spec changed while it runs replaces its workload (the job resumes from its
  output's manifest, which is the job process's concern).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import Backend, JobWorkload, Workload, job_hash, spec_hash, stream_replicas
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
    status.conditions.extend(replica_conditions(spec.replicas, ready, workload))
    return status


def replica_conditions(desired: int, ready: int, workload: Workload | None) -> list[rpb.Condition]:
    """Available, Progressing and Degraded of a set of replicas (a runtime's, a stream's)."""
    available = ready >= desired
    running = workload.running if workload else 0
    progressing = workload is None or running != desired or ready != desired
    problems = workload.problems if workload else []
    restarts = workload.restarts if workload else 0
    return [
        rpb.Condition(
            type="Available",
            status="True" if available else "False",
            reason="ReplicasReady" if available else "ReplicasNotReady",
            message=f"{ready} of {desired} replicas ready",
        ),
        rpb.Condition(
            type="Progressing",
            status="True" if progressing else "False",
            reason="Scaling" if progressing else "Stable",
            message=f"{running} running, {ready} ready, {desired} desired",
        ),
        rpb.Condition(
            type="Degraded",
            status="True" if problems else "False",
            reason="ReplicaFailures" if problems else "NoFailures",
            message="; ".join(problems) if problems else f"{restarts} restart{'' if restarts == 1 else 's'} so far",
        ),
    ]


def same_status(
    a: rpb.RuntimeStatus | rpb.StreamStatus | None, b: rpb.RuntimeStatus | rpb.StreamStatus
) -> bool:
    """Equal but for timestamps."""
    if a is None or type(a) is not type(b):
        return False
    x, y = type(b)(), type(b)()
    x.CopyFrom(a)
    y.CopyFrom(b)
    for s in (x, y):
        s.ClearField("updated_at")
        for c in s.conditions:
            c.ClearField("last_transition_time")
    return x == y


def stamp(
    status: rpb.RuntimeStatus | rpb.StreamStatus, previous: rpb.RuntimeStatus | rpb.StreamStatus | None, now: Timestamp
) -> None:
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


# ---------------------------------------------------------------- jobs

FINISHED = (rpb.JobStatus.SUCCEEDED, rpb.JobStatus.FAILED)


@dataclass
class JobPlan:
    ensure: list[rpb.JobSpec]
    remove: list[str]


def job_status_of(record: rpb.JobRecord) -> rpb.JobStatus | None:
    """The record's status, unless it was left by an earlier record of the same name
    (deleted and applied again: observed before this record was created)."""
    if not record.HasField("status"):
        return None
    status = record.status
    if 0 < status.observed_revision < record.create_revision:
        return None
    return status


def finished(status: rpb.JobStatus | None) -> bool:
    return status is not None and status.phase in FINISHED


def plan_jobs(
    desired: dict[str, rpb.JobSpec],
    statuses: dict[str, rpb.JobStatus | None],
    observed: dict[str, JobWorkload],
    hashes: dict[str, str],
) -> JobPlan:
    """What to do for the jobs: a workload for each job not finished that has none of its
    hash (missing, or of an outdated spec: replaced); a finished job is left alone, whatever
    its spec says now; the workload of a job no longer registered is removed.
    `hashes`: job_hash of each desired job."""
    ensure = []
    for name, spec in sorted(desired.items()):
        if finished(statuses.get(name)):
            continue
        workload = observed.get(name)
        if workload is None or workload.spec_hash != hashes[name]:
            ensure.append(spec)
    remove = sorted(name for name in observed if name not in desired)
    return JobPlan(ensure, remove)


def job_status(
    current: rpb.JobStatus | None, record: rpb.JobRecord, workload: JobWorkload | None, backend: str, now: Timestamp
) -> rpb.JobStatus | None:
    """`current` with the fields the reconciler owns brought up to date (phase PENDING until
    the job says more, FAILED / SUCCEEDED as the backend saw it end, attempts, backend,
    observed_revision), or None when none of them changes (or the job is finished: final).
    The job process's own fields (progress, RUNNING, failures) are kept."""
    status = rpb.JobStatus()
    if current is not None and not (0 < current.observed_revision < record.create_revision):
        status.CopyFrom(current)
    if status.phase in FINISHED:
        return None
    before = rpb.JobStatus()
    before.CopyFrom(status)
    status.name = record.spec.name
    status.backend = backend
    status.observed_revision = record.revision
    if workload is not None:
        restarted = workload.attempts != status.attempts
        status.attempts = workload.attempts
        if workload.problems:
            status.message = "; ".join(workload.problems)
        if workload.outcome == rpb.JobStatus.FAILED:
            status.phase = rpb.JobStatus.FAILED
            status.message = workload.message
            status.finished_at.CopyFrom(now)
        elif workload.outcome == rpb.JobStatus.SUCCEEDED:
            status.phase = rpb.JobStatus.SUCCEEDED
            if not status.HasField("finished_at"):
                status.finished_at.CopyFrom(now)
        elif workload.message and restarted:
            # a crashed attempt, restarted: why (once: the job process may say more after)
            status.message = workload.message
    if status.phase == rpb.JobStatus.PHASE_UNSPECIFIED:
        status.phase = rpb.JobStatus.PENDING
    if status == before and current is not None:
        return None
    status.updated_at.CopyFrom(now)
    return status


# ---------------------------------------------------------------- streams


@dataclass
class StreamPlan:
    ensure: list[rpb.StreamSpec]
    remove: list[str]


def plan_streams(
    desired: dict[str, rpb.StreamSpec], observed: dict[str, Workload], hashes: dict[str, str]
) -> StreamPlan:
    """As plan() for runtimes: ensure what is missing, outdated or mis-scaled (ensure takes
    the next step of a roll), remove what is no longer registered."""
    ensure = []
    for name, spec in sorted(desired.items()):
        workload = observed.get(name)
        if workload is None or workload.spec_hash != hashes[name] or workload.replicas != stream_replicas(spec):
            ensure.append(spec)
    remove = sorted(name for name in observed if name not in desired)
    return StreamPlan(ensure, remove)


def stream_status(spec: rpb.StreamSpec, workload: Workload | None, backend: str, revision: int) -> rpb.StreamStatus:
    """The fields of a StreamStatus the reconciler owns. A replica is ready while its
    process (pod) is alive: Workload.instances (the replicas report their own figures)."""
    desired = stream_replicas(spec)
    ready = len(workload.instances or ()) if workload is not None else 0
    status = rpb.StreamStatus(
        name=spec.name, replicas_desired=desired, replicas_ready=ready, backend=backend, observed_revision=revision
    )
    status.conditions.extend(replica_conditions(desired, ready, workload))
    return status


STREAM_OWNED = ("name", "replicas_desired", "replicas_ready", "conditions", "observed_revision", "backend")


def owned_stream_fields(status: rpb.StreamStatus) -> rpb.StreamStatus:
    """Only the fields of a StreamStatus the reconciler writes."""
    mine = rpb.StreamStatus()
    for name in STREAM_OWNED:
        if name == "conditions":
            mine.conditions.extend(status.conditions)
        else:
            setattr(mine, name, getattr(status, name))
    return mine


def same_stream_status(current: rpb.StreamStatus | None, ours: rpb.StreamStatus) -> bool:
    """Whether `current` already says what `ours` does (the reconciler's fields, timestamps aside)."""
    return current is not None and same_status(owned_stream_fields(current), owned_stream_fields(ours))


def merge_stream_status(target: rpb.StreamStatus, ours: rpb.StreamStatus) -> None:
    """Our fields into `target` (what a replica wrote stays)."""
    for name in STREAM_OWNED:
        if name == "conditions":
            del target.conditions[:]
            target.conditions.extend(ours.conditions)
        else:
            setattr(target, name, getattr(ours, name))
    target.updated_at.CopyFrom(ours.updated_at)


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
        return self._job_or_stream_matters(change)

    @staticmethod
    def _job_or_stream_matters(change: Change) -> bool:
        """Job and stream records always matter; their statuses only when what the
        reconciler acts on or writes differs: the job process and the stream replicas
        rewrite them with every progress figure, which alone must not cause passes."""
        if change.section in (Section.JOB, Section.STREAM):
            return True
        if change.old is None or change.new is None:
            return change.section in (Section.JOB_STATUS, Section.STREAM_STATUS)
        if change.section is Section.JOB_STATUS:
            return bool(change.old.phase != change.new.phase or change.old.attempts != change.new.attempts)
        if change.section is Section.STREAM_STATUS:
            return not same_stream_status(change.old, change.new)
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
        await self.reconcile_jobs()
        await self.reconcile_streams()
        return todo

    async def reconcile_jobs(self) -> JobPlan:
        """The jobs' part of a pass: act on plan_jobs, then write what changed of the
        reconciler's JobStatus fields (read from etcd in this pass: the job process writes
        the same records)."""
        records = {r.spec.name: r for r in (await self.store.list_jobs()).jobs}
        models = list(self.view.models.values())
        desired = {name: r.spec for name, r in records.items()}
        statuses = {name: job_status_of(r) for name, r in records.items()}
        hashes = {name: job_hash(r.spec, r.create_revision) for name, r in records.items()}
        observed = await self.backend.observe_jobs()
        todo = plan_jobs(desired, statuses, observed, hashes)
        for spec in todo.ensure:
            status = statuses[spec.name]
            replaces = "replacing its outdated workload" if spec.name in observed else "starting it"
            log.info("job %s: not finished, %s (spec %s)", spec.name, replaces, hashes[spec.name])
            await self.backend.ensure_job(spec, hashes[spec.name], status.attempts if status else 0, models)
        for name in todo.remove:
            log.info("job %s: no longer in the registry, removing its workload", name)
            await self.backend.remove_job(name)
        if todo.ensure or todo.remove:
            observed = await self.backend.observe_jobs()
        now = Timestamp()
        now.GetCurrentTime()
        backend = self.backend.name
        for name, record in records.items():
            workload = observed.get(name)
            if workload is not None and workload.spec_hash != hashes[name]:
                workload = None  # an outdated spec's (finished) run says nothing of this one
            if job_status(statuses[name], record, workload, backend, now) is None:
                continue

            def mutate(
                current: rpb.JobStatus | None, record: rpb.JobRecord = record, workload: JobWorkload | None = workload
            ) -> rpb.JobStatus | None:
                # again on what is stored now: the job process may have written meanwhile
                new = job_status(current if current is not None and current.ByteSize() else None,
                                 record, workload, backend, now)
                if new is None or current is None:
                    return new if new is not None else current
                current.CopyFrom(new)
                return current

            try:
                await self.store.update_job_status(name, mutate)
            except NotFoundError:
                continue  # deleted meanwhile; the next pass removes its workload
        return todo

    async def reconcile_streams(self) -> StreamPlan:
        """The streams' part of a pass: as for runtimes, and the reconciler's StreamStatus
        fields (replica counts, conditions) written when they changed."""
        records = (await self.store.list_streams()).streams
        models = list(self.view.models.values())
        desired = {r.spec.name: r.spec for r in records}
        hashes = {name: spec_hash(spec) for name, spec in desired.items()}
        observed = await self.backend.observe_streams()
        todo = plan_streams(desired, observed, hashes)
        for spec in todo.ensure:
            log.info("stream %s: ensuring %d replicas (spec %s)", spec.name, stream_replicas(spec), hashes[spec.name])
            await self.backend.ensure_stream(spec, hashes[spec.name], models)
        for name in todo.remove:
            log.info("stream %s: no longer in the registry, removing its workload", name)
            await self.backend.remove_stream(name)
        if todo.ensure or todo.remove:
            observed = await self.backend.observe_streams()
        for record in records:
            name = record.spec.name
            ours = stream_status(record.spec, observed.get(name), self.backend.name, record.revision)
            current = record.status if record.HasField("status") else None
            if same_stream_status(current, ours):
                continue
            now = Timestamp()
            now.GetCurrentTime()
            stamp(ours, current, now)

            def mutate(current: rpb.StreamStatus | None, ours: rpb.StreamStatus = ours) -> rpb.StreamStatus:
                target = current if current is not None else rpb.StreamStatus()
                merge_stream_status(target, ours)
                return target

            try:
                await self.store.update_stream_status(name, mutate)
            except NotFoundError:
                continue
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
