"""The reconciler's pure parts: the plan (desired runtimes vs. observed workloads), the
status it writes, the spec hash that decides when replicas must be replaced, and which
registry changes wake it up. No etcd, no processes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from modelgw.protos import registry_pb2 as rpb
from modelgw.reconciler.backend import Workload, spec_hash
from modelgw.reconciler.core import Reconciler, plan, runtime_status, same_status, stamp
from modelgw.registry.keys import Section
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import Change, ChangeType


def runtime(name: str = "py", replicas: int = 2, **fields) -> rpb.RuntimeSpec:
    spec = rpb.RuntimeSpec(name=name, kind="python", model_formats=["python"], replicas=replicas, **fields)
    spec.options["factor"] = "3"
    return spec


def workload(spec: rpb.RuntimeSpec, replicas: int | None = None, **fields) -> Workload:
    return Workload(runtime=spec.name, spec_hash=spec_hash(spec),
                    replicas=spec.replicas if replicas is None else replicas, **fields)


def endpoint(instance: str, ready: bool = True, runtime_name: str = "py") -> rpb.Endpoint:
    return rpb.Endpoint(runtime=runtime_name, instance=instance, address="127.0.0.1:9000", ready=ready)


def conditions(status: rpb.RuntimeStatus) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in status.conditions}


# ---------------------------------------------------------------- spec_hash

MUTATIONS: dict[str, Callable[[rpb.RuntimeSpec], None]] = {
    "name": lambda s: setattr(s, "name", "other"),
    "kind": lambda s: setattr(s, "kind", "onnx"),
    "image": lambda s: setattr(s, "image", "registry.example/runtime:2"),
    "command": lambda s: s.command.extend(["{python}", "-m", "mine"]),
    "model_formats": lambda s: s.model_formats.append("onnx"),
    "resources": lambda s: setattr(s.resources, "cpu", "500m"),
    "env": lambda s: s.env.__setitem__("OMP_NUM_THREADS", "1"),
    "labels": lambda s: s.labels.__setitem__("team", "search"),
    "options": lambda s: s.options.__setitem__("factor", "4"),
    "node_selector": lambda s: s.node_selector.__setitem__("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),
}


def test_every_runtime_spec_field_is_covered_by_the_mutations() -> None:
    """A field added to RuntimeSpec later must be decided on here (hashed or not)."""
    fields = {f.name for f in rpb.RuntimeSpec.DESCRIPTOR.fields}
    assert fields == set(MUTATIONS) | {"replicas"}


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_spec_hash_changes_with_every_field_but_replicas(field: str) -> None:
    before = runtime()
    after = runtime()
    MUTATIONS[field](after)
    assert spec_hash(after) != spec_hash(before)


def test_spec_hash_ignores_replicas_and_is_stable() -> None:
    assert spec_hash(runtime(replicas=1)) == spec_hash(runtime(replicas=3))
    assert spec_hash(runtime()) == spec_hash(runtime())
    # map order does not matter
    a, b = runtime(), runtime()
    a.env["A"], a.env["B"] = "1", "2"
    b.env["B"], b.env["A"] = "2", "1"
    assert spec_hash(a) == spec_hash(b)


# ---------------------------------------------------------------- plan


def test_plan_creates_missing_workloads_and_removes_unwanted_ones() -> None:
    py, onnx = runtime("py"), runtime("onnx-rt")
    stale = runtime("gone")
    todo = plan({"py": py, "onnx-rt": onnx}, {"gone": workload(stale)})
    assert [s.name for s in todo.ensure] == ["onnx-rt", "py"]
    assert todo.remove == ["gone"]


def test_plan_leaves_matching_workloads_alone() -> None:
    py = runtime("py", replicas=2)
    todo = plan({"py": py}, {"py": workload(py, running=1, restarts=4)})  # running/restarts are the backend's business
    assert todo.ensure == [] and todo.remove == []


def test_plan_ensures_on_a_replica_count_or_spec_change() -> None:
    py = runtime("py", replicas=3)
    assert [s.name for s in plan({"py": py}, {"py": workload(py, replicas=2)}).ensure] == ["py"]
    changed = runtime("py", replicas=3)
    changed.options["factor"] = "5"
    assert [s.replicas for s in plan({"py": changed}, {"py": workload(py)}).ensure] == [3]


# ---------------------------------------------------------------- runtime_status


def test_status_of_a_runtime_with_all_replicas_ready() -> None:
    spec = runtime(replicas=2)
    status = runtime_status(spec, workload(spec, running=2, instances=frozenset({"a", "b"})),
                            [endpoint("a"), endpoint("b")], "local", 42)
    assert (status.name, status.replicas_desired, status.replicas_ready) == ("py", 2, 2)
    assert (status.backend, status.observed_revision) == ("local", 42)
    assert conditions(status) == {
        "Available": ("True", "ReplicasReady", "2 of 2 replicas ready"),
        "Progressing": ("False", "Stable", "2 running, 2 ready, 2 desired"),
        "Degraded": ("False", "NoFailures", "0 restarts so far"),
    }
    assert not status.HasField("updated_at")  # the writer stamps it


def test_status_counts_only_ready_endpoints_of_live_replicas() -> None:
    spec = runtime(replicas=2)
    # "dead" crashed: its endpoint waits for its lease to run out; "b" is still loading
    eps = [endpoint("a"), endpoint("b", ready=False), endpoint("dead")]
    status = runtime_status(spec, workload(spec, running=2, restarts=1, instances=frozenset({"a", "b"})), eps, "local", 7)
    assert status.replicas_ready == 1
    assert conditions(status)["Available"] == ("False", "ReplicasNotReady", "1 of 2 replicas ready")
    assert conditions(status)["Progressing"] == ("True", "Scaling", "2 running, 1 ready, 2 desired")
    assert conditions(status)["Degraded"] == ("False", "NoFailures", "1 restart so far")
    # a backend that cannot tell its instances: every ready endpoint counts
    assert runtime_status(spec, workload(spec, running=2), eps, "kubernetes", 7).replicas_ready == 2


def test_status_without_a_workload_and_with_failures() -> None:
    spec = runtime(replicas=1)
    status = runtime_status(spec, None, [], "local", 3)
    assert status.replicas_ready == 0
    assert conditions(status)["Progressing"] == ("True", "Scaling", "0 running, 0 ready, 1 desired")
    crashing = workload(spec, running=0, restarts=5, problems=["replica 0 keeps crashing (last exit code 1)"])
    assert conditions(runtime_status(spec, crashing, [], "local", 3))["Degraded"] == (
        "True", "ReplicaFailures", "replica 0 keeps crashing (last exit code 1)",
    )


def test_stamp_keeps_transition_times_of_conditions_that_did_not_flip() -> None:
    spec = runtime(replicas=2)
    first = runtime_status(spec, workload(spec, running=2, instances=frozenset({"a"})), [endpoint("a")], "local", 1)
    earlier, later = Timestamp(seconds=1000), Timestamp(seconds=2000)
    stamp(first, None, earlier)
    assert all(c.last_transition_time == earlier for c in first.conditions)

    second = runtime_status(spec, workload(spec, running=2, instances=frozenset({"a", "b"})),
                            [endpoint("a"), endpoint("b")], "local", 1)
    assert not same_status(first, second)
    stamp(second, first, later)
    times = {c.type: c.last_transition_time.seconds for c in second.conditions}
    assert times == {"Available": 2000, "Progressing": 2000, "Degraded": 1000}  # Degraded stayed False
    assert second.updated_at == later

    again = runtime_status(spec, workload(spec, running=2, instances=frozenset({"a", "b"})),
                           [endpoint("a"), endpoint("b")], "local", 1)
    assert same_status(second, again)  # timestamps aside, nothing changed: no write


# ---------------------------------------------------------------- what wakes the reconciler


async def test_only_changes_that_matter_wake_the_reconciler() -> None:
    store = RegistryStore("127.0.0.1:1")  # never contacted here
    try:
        reconciler = Reconciler(store, backend=None, identity="unit")  # type: ignore[arg-type]

        def change(section: Section, name: str, old, new) -> Change:
            kind = ChangeType.DELETE if new is None else ChangeType.PUT
            return Change(section, name, kind, old, new, revision=10)

        busy = endpoint("a")
        busy.load.in_flight = 3
        loading, ready = endpoint("a", ready=False), endpoint("a")
        spec = runtime()
        assert reconciler._matters(change(Section.RUNTIME, "py", None, spec))
        assert reconciler._matters(change(Section.ENDPOINT, "py/a", None, loading))  # a replica came
        assert reconciler._matters(change(Section.ENDPOINT, "py/a", loading, ready))  # became ready
        assert reconciler._matters(change(Section.ENDPOINT, "py/a", ready, None))  # went
        assert not reconciler._matters(change(Section.ENDPOINT, "py/a", ready, busy))  # load figures only
        assert not reconciler._matters(change(Section.MODEL, "m", None, rpb.ModelSpec(name="m")))

        ours = runtime_status(spec, None, [], "local", 1)
        reconciler._written["py"] = (ours, 11)
        echoed = rpb.RuntimeStatus()
        echoed.CopyFrom(ours)
        stamp(echoed, None, Timestamp(seconds=5))
        assert not reconciler._matters(change(Section.RUNTIME_STATUS, "py", None, echoed))  # our own write
        other = rpb.RuntimeStatus(name="py", replicas_desired=9)
        assert reconciler._matters(change(Section.RUNTIME_STATUS, "py", echoed, other))  # someone else's
        assert reconciler._matters(change(Section.RUNTIME_STATUS, "py", echoed, None))  # deleted
    finally:
        await store.close()
