"""What the reconciler core asks of a backend: observe workloads, make one match a
runtime spec, remove one. A backend is declarative, as a Kubernetes Deployment is: it is
told the desired spec and replica count and keeps its replicas there by itself
(the local backend supervises processes; a Kubernetes backend, not written yet, would
leave that to the Deployment controller). Backends are listed in reconciler.cli.BACKENDS."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from modelgw.protos import registry_pb2 as rpb


@dataclass
class Workload:
    """A runtime's workload as a backend sees it."""

    runtime: str
    spec_hash: str          # hash of the spec it runs (replicas excluded)
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

    async def ensure(self, spec: rpb.RuntimeSpec, spec_hash: str) -> None:
        """Create or update the runtime's workload to run `spec` with spec.replicas replicas."""
        ...

    async def remove(self, runtime: str) -> None:
        """Stop and delete the runtime's workload."""
        ...

    async def close(self) -> None:
        """Stop acting and let go of what this process holds: the local backend stops its
        replica processes (they cannot outlive it); a Kubernetes backend would leave its
        Deployments running. Called when leadership is lost and on shutdown; the backend
        may be used again after."""
        ...
