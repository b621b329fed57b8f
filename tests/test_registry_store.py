"""RegistryStore against a real etcd: create/update/conflict/delete semantics, referential
integrity inside transactions (also under races), records readable with etcdctl, leases,
runtime status, leader election, the assigned-models watch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.errors import (
    ConflictError,
    IntegrityError,
    LeaseNotFoundError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from modelgw.registry.store import RegistryStore


def runtime(name: str = "torch", formats: tuple[str, ...] = ("torchscript",), replicas: int = 1) -> rpb.RuntimeSpec:
    return rpb.RuntimeSpec(name=name, kind="pytorch", model_formats=list(formats), replicas=replicas)


def model(name: str = "resnet", runtime_name: str = "torch", fmt: str = "torchscript", versions=("1",)) -> rpb.ModelSpec:
    return rpb.ModelSpec(
        name=name,
        versions=[
            rpb.ModelVersion(version=v, uri=f"/models/{name}/{v}", format=fmt, runtime=runtime_name) for v in versions
        ],
    )


@pytest.fixture
async def store(etcd_server, etcd_prefix):
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as s:
        yield s


async def eventually(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Poll an async predicate until it returns something truthy (bounded, not timed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(interval)


def etcdctl(endpoint: str, *args: str) -> str:
    env = {**os.environ, "ETCDCTL_API": "3"}
    out = subprocess.run(
        ["etcdctl", "--endpoints", endpoint, *args], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout


# ---------------------------------------------------------------- create / update / conflict / delete


async def test_create_update_unchanged_and_revisions(store):
    created = await store.apply_runtime(runtime())
    assert created.outcome == rpb.CREATED
    assert created.record.revision == created.record.create_revision > 0

    again = await store.apply_runtime(runtime())
    assert again.outcome == rpb.UNCHANGED and again.record.revision == created.record.revision

    updated = await store.apply_runtime(runtime(replicas=3), expected_revision=created.record.revision)
    assert updated.outcome == rpb.UPDATED
    assert updated.record.revision > created.record.revision
    assert updated.record.create_revision == created.record.create_revision

    read = await store.get_runtime("torch")
    assert read.spec.replicas == 3 and read.revision == updated.record.revision


async def test_stale_revision_is_a_conflict_carrying_the_current_revision(store):
    first = await store.apply_runtime(runtime())
    second = await store.apply_runtime(runtime(replicas=2), expected_revision=first.record.revision)
    with pytest.raises(ConflictError) as caught:
        await store.apply_runtime(runtime(replicas=5), expected_revision=first.record.revision)
    assert caught.value.current_revision == second.record.revision
    assert f"revision {second.record.revision}, not {first.record.revision}" in str(caught.value)
    # nothing was overwritten
    assert (await store.get_runtime("torch")).spec.replicas == 2


async def test_create_only_refuses_an_existing_record(store):
    await store.apply_runtime(runtime())
    created = await store.apply_model(model(), expected_revision=0)
    with pytest.raises(ConflictError, match="already exists") as caught:
        await store.apply_model(model(versions=("1", "2")), expected_revision=0)
    assert caught.value.current_revision == created.record.revision


async def test_expected_revision_of_a_missing_record_conflicts(store):
    await store.apply_runtime(runtime())
    with pytest.raises(ConflictError, match="no longer exists") as caught:
        await store.apply_model(model(), expected_revision=42)
    assert caught.value.current_revision == 0


async def test_get_list_delete(store):
    await store.apply_runtime(runtime())
    for name in ("a", "b", "c"):
        await store.apply_model(model(name))
    listed = await store.list_models()
    assert [r.spec.name for r in listed.models] == ["a", "b", "c"]
    assert listed.revision >= max(r.revision for r in listed.models)

    record = await store.get_model("b")
    with pytest.raises(ConflictError):
        await store.delete_model("b", expected_revision=record.revision - 1)
    deleted_at = await store.delete_model("b", expected_revision=record.revision)
    assert deleted_at > record.revision
    with pytest.raises(NotFoundError, match="models/b does not exist"):
        await store.get_model("b")
    with pytest.raises(NotFoundError):
        await store.delete_model("b")
    assert [r.spec.name for r in (await store.list_models()).models] == ["a", "c"]


async def test_invalid_records_and_names_are_refused(store):
    with pytest.raises(ValidationError, match=r"runtimes/torch: kind: 'Jax Runtime' is not a kind name"):
        await store.apply_runtime(rpb.RuntimeSpec(name="torch", kind="Jax Runtime", model_formats=["x"]))
    with pytest.raises(ValidationError, match="not a model name"):
        await store.get_model("../etc")
    assert (await store.list_runtimes()).runtimes == []


async def test_records_in_etcd_are_json_readable_with_etcdctl(store, etcd_server, etcd_prefix):
    await store.apply_runtime(runtime())
    await store.apply_model(model())
    out = etcdctl(etcd_server.endpoint, "get", f"{etcd_prefix}models/resnet", "--print-value-only")
    stored = json.loads(out)
    assert stored["name"] == "resnet"
    assert stored["versions"][0] == {
        "version": "1",
        "uri": "/models/resnet/1",
        "format": "torchscript",
        "runtime": "torch",
    }
    keys = etcdctl(etcd_server.endpoint, "get", etcd_prefix, "--prefix", "--keys-only").split()
    assert keys == [f"{etcd_prefix}models/resnet", f"{etcd_prefix}runtimes/torch"]


# ---------------------------------------------------------------- referential integrity


async def test_model_with_missing_runtime_is_refused(store):
    with pytest.raises(IntegrityError, match=r"models/resnet: versions\[0\].runtime: runtime 'torch' does not exist"):
        await store.apply_model(model())
    assert (await store.list_models()).models == []


async def test_model_format_must_be_loaded_by_its_runtime(store):
    await store.apply_runtime(runtime(formats=("onnx",)))
    with pytest.raises(ValidationError, match=r"versions\[0\].format: runtime 'torch' does not load format 'torchscript'"):
        await store.apply_model(model())


async def test_a_model_is_validated_once_per_write(store, monkeypatch):
    """A spec's fields are checked once, before the first read; each attempt checks only
    what depends on the records it read (its runtimes' formats)."""
    from modelgw.registry import validation

    calls = []
    counted = validation.model_problems
    monkeypatch.setattr(validation, "model_problems", lambda *a, **kw: calls.append(a) or counted(*a, **kw))
    await store.apply_runtime(runtime())
    assert (await store.apply_model(model())).outcome == rpb.CREATED
    assert len(calls) == 1, calls


async def test_runtime_in_use_cannot_be_deleted_unless_forced(store):
    await store.apply_runtime(runtime())
    await store.apply_model(model("a"))
    await store.apply_model(model("b"))
    with pytest.raises(IntegrityError, match="runtimes/torch is used by models/a, models/b"):
        await store.delete_runtime("torch")
    await store.put_runtime_status(rpb.RuntimeStatus(name="torch", replicas_ready=1))
    await store.delete_runtime("torch", force=True)
    with pytest.raises(NotFoundError):
        await store.get_runtime("torch")
    assert await store.get_runtime_status("torch") is None  # the status went with it


async def test_runtime_cannot_drop_a_format_models_use(store):
    await store.apply_runtime(runtime(formats=("torchscript", "pt2")))
    await store.apply_model(model(fmt="torchscript"))
    with pytest.raises(IntegrityError, match=r"'torchscript' is still used by models/resnet versions\[0\]"):
        await store.apply_runtime(runtime(formats=("pt2",)))
    # dropping an unused format is fine
    assert (await store.apply_runtime(runtime(formats=("torchscript",)))).outcome == rpb.UPDATED


async def test_race_create_only_exactly_one_writer_wins(store):
    await store.apply_runtime(runtime())
    specs = [model(versions=(str(i),)) for i in range(2)]
    results = await asyncio.gather(*(store.apply_model(s, expected_revision=0) for s in specs), return_exceptions=True)
    wins = [r for r in results if isinstance(r, rpb.ApplyModelResponse)]
    losses = [r for r in results if isinstance(r, ConflictError)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert losses[0].current_revision == wins[0].record.revision
    stored = await store.get_model("resnet")
    assert stored.spec == wins[0].record.spec


async def test_race_delete_runtime_against_model_apply(store):
    """A model applied while its runtime is deleted: either the model exists and the runtime
    too (delete refused), or the runtime is gone and the model was refused. Never a model
    left pointing at a missing runtime."""
    for round_ in range(6):
        await store.apply_runtime(runtime())
        results = await asyncio.gather(
            store.delete_runtime("torch"), store.apply_model(model(f"m{round_}")), return_exceptions=True
        )
        deleted, applied = results
        runtime_exists = bool((await store.list_runtimes()).runtimes)
        model_names = [r.spec.name for r in (await store.list_models()).models]
        if isinstance(applied, rpb.ApplyModelResponse):
            assert isinstance(deleted, IntegrityError) and runtime_exists, results
            assert f"m{round_}" in model_names
            await store.delete_model(f"m{round_}")
            await store.delete_runtime("torch")
        else:
            assert isinstance(applied, IntegrityError) and isinstance(deleted, int), results
            assert not runtime_exists and f"m{round_}" not in model_names


async def test_concurrent_read_modify_write_keeps_every_update(store):
    """8 writers x 50 read-modify-write increments of one record: the final count is 400;
    each lost race surfaces as ConflictError to the loser, who re-reads and retries."""
    await store.apply_runtime(runtime())
    counter = model()
    counter.labels["count"] = "0"
    await store.apply_model(counter)
    conflicts = 0

    async def writer() -> None:
        nonlocal conflicts
        for _ in range(50):
            while True:
                record = await store.get_model("resnet")
                spec = record.spec
                spec.labels["count"] = str(int(spec.labels["count"]) + 1)
                try:
                    await store.apply_model(spec, expected_revision=record.revision)
                    break
                except ConflictError as exc:
                    assert exc.current_revision > record.revision
                    conflicts += 1

    await asyncio.gather(*(writer() for _ in range(8)))
    assert (await store.get_model("resnet")).spec.labels["count"] == "400"
    assert conflicts > 0  # 8 writers on one record do collide; each collision was refused


# ---------------------------------------------------------------- leases, endpoints, status


def endpoint(instance: str = "torch-0", runtime_name: str = "torch") -> rpb.Endpoint:
    return rpb.Endpoint(
        runtime=runtime_name,
        instance=instance,
        address="127.0.0.1:9000",
        ready=True,
        models=[rpb.LoadedModel(name="resnet", version="1", state=rpb.LoadedModel.READY)],
    )


async def test_endpoint_goes_with_its_revoked_lease(store):
    lease = await store.grant_lease(ttl=10)
    await store.put_endpoint(endpoint("torch-0"), lease)
    await store.put_endpoint(endpoint("torch-1"), lease)
    await store.put_endpoint(endpoint("onnx-0", "onnx"), lease)
    listed = await store.list_endpoints("torch")
    assert sorted(e.instance for e in listed.endpoints) == ["torch-0", "torch-1"]
    assert listed.endpoints[0].models[0].state == rpb.LoadedModel.READY
    assert len((await store.list_endpoints()).endpoints) == 3
    await lease.revoke()
    assert (await store.list_endpoints()).endpoints == []
    with pytest.raises(LeaseNotFoundError):
        await store.put_endpoint(endpoint(), lease)


async def test_endpoint_expires_when_its_lease_is_not_kept_alive(store):
    lease = await store.grant_lease(ttl=2, keep_alive=False)
    await store.put_endpoint(endpoint(), lease)
    assert len((await store.list_endpoints()).endpoints) == 1

    async def gone():
        return not (await store.list_endpoints()).endpoints

    await eventually(gone)


async def test_kept_alive_lease_outlives_its_ttl_and_reports_loss(store):
    lease = await store.grant_lease(ttl=2)
    await store.put_endpoint(endpoint(), lease)
    # keep-alive refreshes every ttl/3: after four refreshes (more than one TTL) it is still there
    for _ in range(4):
        refreshed = lease.last_refreshed
        await eventually(lambda since=refreshed: _after(lambda: lease.last_refreshed > since))
    assert len((await store.list_endpoints()).endpoints) == 1 and lease.alive
    # revoked behind the keeper's back: the keeper learns the lease is lost
    await store.etcd.revoke(lease.id)
    await asyncio.wait_for(lease.lost.wait(), 10)
    assert not lease.alive
    await lease.stop()


async def _after(check):
    return check()


async def test_runtime_status(store):
    with pytest.raises(NotFoundError, match="runtimes/torch does not exist"):
        await store.put_runtime_status(rpb.RuntimeStatus(name="torch"))
    await store.apply_runtime(runtime(replicas=2))
    await store.put_runtime_status(
        rpb.RuntimeStatus(name="torch", replicas_desired=2, replicas_ready=1, backend="local", observed_revision=5)
    )
    record = await store.get_runtime("torch")
    assert record.status.replicas_ready == 1 and record.status.observed_revision == 5
    assert (await store.list_runtimes()).runtimes[0].status.backend == "local"


async def test_leader_election(store):
    lease_a = await store.grant_lease(ttl=5)
    lease_b = await store.grant_lease(ttl=5)
    assert await store.campaign("a", lease_a)
    assert await store.campaign("a", lease_a)  # idempotent for the holder
    assert not await store.campaign("b", lease_b)
    assert await store.leader() == "a"
    await lease_a.revoke()  # the leader dies: its key goes with the lease
    assert await store.campaign("b", lease_b)
    assert not await store.resign("a")
    assert await store.resign("b") and await store.leader() is None
    await lease_b.revoke()


# ---------------------------------------------------------------- watches


async def test_watch_replays_state_then_streams_changes(store):
    await store.apply_runtime(runtime())
    events: list[rpb.WatchEvent] = []

    async def consume():
        async for event in store.watch():
            events.append(event)

    task = asyncio.create_task(consume())
    await eventually(lambda: _after(lambda: len(events) == 1))
    assert events[0].type == rpb.WatchEvent.PUT and events[0].runtime.name == "torch"
    await store.apply_model(model())
    await store.delete_model("resnet")
    await eventually(lambda: _after(lambda: len(events) == 3))
    task.cancel()
    assert [(e.type, e.WhichOneof("object")) for e in events[1:]] == [
        (rpb.WatchEvent.PUT, "model"),
        (rpb.WatchEvent.DELETE, "model"),  # a delete carries the last value
    ]
    assert events[2].model.name == "resnet" and events[2].key.endswith("models/resnet")
    assert events[2].revision > events[1].revision


async def test_watch_assigned_models(store):
    await store.apply_runtime(runtime("torch"))
    await store.apply_runtime(runtime("other"))
    mixed = model("mixed", versions=("1",))
    mixed.versions.add(version="2", uri="/models/mixed/2", format="torchscript", runtime="other")
    await store.apply_model(mixed)
    seen: asyncio.Queue[dict] = asyncio.Queue()

    async def follow():
        async for assigned in store.watch_assigned_models("torch"):
            await seen.put(assigned)

    task = asyncio.create_task(follow())
    try:
        first = await asyncio.wait_for(seen.get(), 10)
        assert list(first) == ["mixed"]
        assert [v.version for v in first["mixed"].versions] == ["1"]  # only this runtime's versions
        await store.apply_model(model("only-other", "other"))  # not ours: no new yield
        await store.apply_model(model("resnet"))
        second = await asyncio.wait_for(seen.get(), 10)
        assert sorted(second) == ["mixed", "resnet"]
        await store.delete_model("mixed")
        third = await asyncio.wait_for(seen.get(), 10)
        assert list(third) == ["resnet"]
    finally:
        task.cancel()


async def test_unreachable_etcd_is_a_clear_error():
    async with RegistryStore("127.0.0.1:1", timeout=2) as store:
        with pytest.raises(UnavailableError, match=r"etcd at 127\.0\.0\.1:1 is unreachable"):
            await store.list_models()
        with pytest.raises(UnavailableError):
            await store.apply_runtime(runtime())
