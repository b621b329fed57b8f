"""What the reconciler core asks of a backend: observe workloads, make one match a
runtime spec (or a job's, or a stream's), remove one. A backend is declarative, as a Kubernetes Deployment is: it is
told the desired spec and replica count and keeps its replicas there by itself
(the local backend supervises processes; the Kubernetes backend leaves that to the
Deployment controller). A spec change rolls (maxSurge 1, maxUnavailable 0): a backend
whose workload is still rolling reports the outdated hash from observe(), so the core
keeps calling ensure(). Backends are listed in reconciler.cli.BACKENDS.

Jobs and streams (issue 13) are the same three verbs on their own records:
- a stream is a runtime without endpoints: `replicas` consumer processes/pods, kept at
  that count and rolled on a spec change; its Workload is the runtime one (`runtime` holds
  the stream's name, `instances` the replicas alive);
- a job runs to completion: one process/pod at a time, restarted after a crash at most
  backoff_limit times (0: DEFAULT_BACKOFF_LIMIT), then failed; exit code JOB_EXIT_FAILED
  (the job process gave up by itself) is not retried. Its JobWorkload says what the
  backend saw of it (attempts, whether it ended and how); the core turns that into the
  JobStatus fields the reconciler owns (the job process writes its own progress)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from modelgw.protos import registry_pb2 as rpb


@dataclass
class Workload:
    """A runtime's workload as a backend sees it."""

    runtime: str
    spec_hash: str          # Backend.workload_hash of what it runs (the spec, replicas excluded)
    replicas: int           # replicas it is asked to run
    running: int = 0        # replicas whose process/pod is up (not necessarily ready)
    restarts: int = 0       # crashes since the workload was created
    problems: list[str] = field(default_factory=list)  # e.g. "replica 1 keeps crashing: ..."
    # the instance names of its current replicas (as their endpoints are named), so that a
    # dead replica's endpoint, still there until its lease runs out, is not counted as
    # ready; None when the backend cannot tell
    instances: frozenset[str] | None = None


def spec_hash(spec: rpb.RuntimeSpec | rpb.StreamSpec) -> str:
    """A stable hash of everything in a runtime (or stream) spec that needs new replicas to
    change (everything but the replica count)."""
    pod = type(spec)()
    pod.CopyFrom(spec)
    pod.replicas = 0
    return hashlib.sha256(pod.SerializeToString(deterministic=True)).hexdigest()[:16]


DEFAULT_BACKOFF_LIMIT = 6  # JobSpec.backoff_limit 0, as a Kubernetes Job's default
# `modelgw job run`'s exit code for "failed for good" (pipelines.jobs.EXIT_FAILED: a bad
# spec or input, too many rejected rows; it has written phase FAILED itself): not retried,
# by either backend. Any other failure (another exit code, a signal: SIGKILL, the OOM
# killer) is a crash, restarted up to the backoff limit; the job resumes its checkpoint.
JOB_EXIT_FAILED = 1


@dataclass
class JobWorkload:
    """A job's workload as a backend sees it."""

    job: str
    spec_hash: str           # job_hash of what it runs
    attempts: int = 0        # process/pod starts so far
    active: bool = False     # a process/pod runs, or will be restarted
    # rpb.JobStatus.SUCCEEDED / FAILED once the backend saw it end so (a process exiting 0,
    # the Job's Complete condition; retries used up), else PHASE_UNSPECIFIED
    outcome: int = 0
    message: str = ""        # why it failed, or what the last failed attempt said
    # why the backend does not run it as it is (a pvc:// URI that cannot be mounted, an
    # API server's refusal): into the status message while they last
    problems: list[str] = field(default_factory=list)


def backoff_limit(spec: rpb.JobSpec) -> int:
    return spec.backoff_limit or DEFAULT_BACKOFF_LIMIT


def stream_replicas(spec: rpb.StreamSpec) -> int:
    return spec.replicas or 1  # StreamSpec: "0: 1"


def job_hash(spec: rpb.JobSpec, create_revision: int) -> str:
    """What a job's workload runs: its whole spec, and the record's create_revision, so that
    a job deleted and applied again (same spec, new record) is a new workload, never the
    old one's finished run."""
    body = spec.SerializeToString(deterministic=True) + b"\0" + str(create_revision).encode()
    return hashlib.sha256(body).hexdigest()[:16]


class Backend(Protocol):
    name: str

    async def observe(self) -> dict[str, Workload]:
        """Every workload this backend manages, by runtime name."""
        ...

    def workload_hash(self, spec: rpb.RuntimeSpec, models: Sequence[rpb.ModelSpec]) -> str:
        """The hash observe() reports once the runtime runs `spec` with `models` assigned
        (what needs new replicas when it changes: the spec, and for Kubernetes the model
        volumes its pods mount)."""
        ...

    async def ensure(
        self, spec: rpb.RuntimeSpec, spec_hash: str, models: Sequence[rpb.ModelSpec], ready: frozenset[str]
    ) -> None:
        """Create or update the runtime's workload to run `spec` (its hash: `spec_hash`, from
        workload_hash) with spec.replicas replicas and the `models` assigned to it, or take
        the next step of a roll. `ready`: the instances whose endpoints are ready now (the
        local backend rolls on it; Kubernetes has readiness probes of its own)."""
        ...

    async def remove(self, runtime: str) -> None:
        """Stop and delete the runtime's workload."""
        ...

    async def follow(self, wake: Callable[[], None]) -> None:
        """Run until cancelled, calling wake() when a workload changed by itself (a pod
        crashed, a Deployment became available): the core then runs a pass. A backend
        whose workloads only change when told to may just wait."""
        ...

    async def close(self) -> None:
        """Stop acting and let go of what this process holds: the local backend stops its
        replica processes (they cannot outlive it); the Kubernetes backend leaves its
        Deployments running. Called when leadership is lost and on shutdown; the backend
        may be used again after."""
        ...

    # -- jobs

    async def observe_jobs(self) -> dict[str, JobWorkload]:
        """Every job workload this backend manages, by job name (finished ones too, while
        the backend keeps them: a Kubernetes Job until its TTL)."""
        ...

    async def ensure_job(
        self, spec: rpb.JobSpec, spec_hash: str, attempts: int, models: Sequence[rpb.ModelSpec]
    ) -> None:
        """Run the job (spec hash `spec_hash`, from job_hash) unless its workload already
        does; a workload of another hash is replaced. `attempts`: the starts its status
        counts already (a new leader carries on counting). `models`: the registry's (a pod
        mounts the claims of the model it loads in-process)."""
        ...

    async def remove_job(self, job: str) -> None:
        """Stop and delete the job's workload."""
        ...

    # -- streams

    async def observe_streams(self) -> dict[str, Workload]:
        """Every stream workload this backend manages, by stream name."""
        ...

    async def ensure_stream(self, spec: rpb.StreamSpec, spec_hash: str, models: Sequence[rpb.ModelSpec]) -> None:
        """As ensure() for a runtime: stream_replicas(spec) consumers of `spec`, rolled one
        at a time on a spec change (a consumer is ready when its process/pod is alive)."""
        ...

    async def remove_stream(self, stream: str) -> None:
        ...


def custom_command(spec: rpb.RuntimeSpec, values: Mapping[str, object]) -> list[str]:
    """A runtime's own `command` with its {placeholders} filled from `values` (the same
    names on every backend); ValueError naming the bad placeholder and the known ones."""
    try:
        return [part.format(**values) for part in spec.command]
    except (KeyError, IndexError, ValueError) as exc:
        known = " ".join(f"{{{k}}}" for k in values)
        raise ValueError(f"runtimes/{spec.name}: command: bad placeholder {exc} (known: {known})") from None
