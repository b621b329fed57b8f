"""What the reconciler core asks of a backend: observe workloads, make one match a
runtime spec, remove one. A backend is declarative, as a Kubernetes Deployment is: it is
told the desired spec and replica count and keeps its replicas there by itself
(the local backend supervises processes; the Kubernetes backend leaves that to the
Deployment controller). A spec change rolls (maxSurge 1, maxUnavailable 0): a backend
whose workload is still rolling reports the outdated hash from observe(), so the core
keeps calling ensure(). Backends are listed in reconciler.cli.BACKENDS."""

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


def spec_hash(spec: rpb.RuntimeSpec) -> str:
    """A stable hash of everything in a runtime spec that needs new replicas to change
    (everything but the replica count)."""
    pod = rpb.RuntimeSpec()
    pod.CopyFrom(spec)
    pod.replicas = 0
    return hashlib.sha256(pod.SerializeToString(deterministic=True)).hexdigest()[:16]


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


def custom_command(spec: rpb.RuntimeSpec, values: Mapping[str, object]) -> list[str]:
    """A runtime's own `command` with its {placeholders} filled from `values` (the same
    names on every backend); ValueError naming the bad placeholder and the known ones."""
    try:
        return [part.format(**values) for part in spec.command]
    except (KeyError, IndexError, ValueError) as exc:
        known = " ".join(f"{{{k}}}" for k in values)
        raise ValueError(f"runtimes/{spec.name}: command: bad placeholder {exc} (known: {known})") from None
