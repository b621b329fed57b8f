"""RegistryView against a real etcd: sees puts and deletes, tells subscribers, resyncs after
a compaction, keeps serving through an etcd stop and converges to etcd's state after it."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.errors import UnavailableError
from modelgw.registry.keys import Section
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import Change, ChangeType, RegistryView


def runtime(name: str = "torch", replicas: int = 1) -> rpb.RuntimeSpec:
    return rpb.RuntimeSpec(name=name, kind="pytorch", model_formats=["torchscript"], replicas=replicas)


def model(name: str, versions=("1",)) -> rpb.ModelSpec:
    return rpb.ModelSpec(
        name=name,
        versions=[rpb.ModelVersion(version=v, uri=f"/m/{name}/{v}", format="torchscript", runtime="torch") for v in versions],
    )


def endpoint(instance: str) -> rpb.Endpoint:
    return rpb.Endpoint(runtime="torch", instance=instance, address="127.0.0.1:9000", ready=True)


async def until(check, timeout: float = 20.0) -> None:
    """Wait until check() is true (a bound on the wait, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def etcd_state(store: RegistryStore) -> tuple[dict, dict, dict, dict]:
    """What etcd holds, in the view's shape, read afresh."""
    models = {r.spec.name: r.spec for r in (await store.list_models()).models}
    runtimes_list = (await store.list_runtimes()).runtimes
    runtimes = {r.spec.name: r.spec for r in runtimes_list}
    statuses = {r.spec.name: r.status for r in runtimes_list if r.HasField("status")}
    endpoints = {f"{e.runtime}/{e.instance}": e for e in (await store.list_endpoints()).endpoints}
    return models, runtimes, endpoints, statuses


def view_state(view: RegistryView) -> tuple[dict, dict, dict, dict]:
    return dict(view.models), dict(view.runtimes), dict(view.endpoints), dict(view.statuses)


def etcdctl(endpoint: str, *args: str) -> str:
    env = {**os.environ, "ETCDCTL_API": "3"}
    return subprocess.run(
        ["etcdctl", "--endpoints", endpoint, *args], env=env, capture_output=True, text=True, check=True, timeout=30
    ).stdout


@pytest.fixture
async def store(etcd_server, etcd_prefix):
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as s:
        yield s


async def test_view_starts_with_the_current_state_and_follows_changes(store):
    await store.apply_runtime(runtime())
    await store.apply_model(model("a"))
    async with RegistryView(store) as view:
        assert set(view.models) == {"a"} and set(view.runtimes) == {"torch"}
        written = await store.apply_model(model("b"))
        await view.wait_for_revision(written.record.revision, timeout=10)
        assert view.models["b"] == model("b")
        assert view.revision >= written.record.revision

        lease = await store.grant_lease(ttl=10)
        revision = await store.put_endpoint(endpoint("torch-0"), lease)
        await view.wait_for_revision(revision, timeout=10)
        assert view.endpoints["torch/torch-0"].address == "127.0.0.1:9000"
        assert [e.instance for e in view.endpoints_of("torch")] == ["torch-0"]
        assert sorted(m.name for m in view.models_on("torch")) == ["a", "b"]

        revision = await store.put_runtime_status(rpb.RuntimeStatus(name="torch", replicas_ready=1))
        await view.wait_for_revision(revision, timeout=10)
        assert view.statuses["torch"].replicas_ready == 1

        revision = await store.delete_model("a")
        await view.wait_for_revision(revision, timeout=10)
        assert "a" not in view.models
        await lease.revoke()
        await until(lambda: not view.endpoints)
        assert view_state(view) == await etcd_state(store)


async def test_every_kind_of_the_one_table_reaches_keys_view_and_watch(store):
    """keys.KINDS is the only list of record kinds: each row's records are parsed, held by
    the view under their section and carried by the watch in the row's event field."""
    from modelgw.registry.keys import KINDS

    await store.apply_runtime(runtime())
    await store.apply_model(model("a"))
    lease = await store.grant_lease(ttl=10)
    await store.put_endpoint(endpoint("torch-0"), lease)
    await store.put_runtime_status(rpb.RuntimeStatus(name="torch", replicas_ready=1))
    call = rpb.ModelCall(model="a")
    await store.apply_job(rpb.JobSpec(name="j", model=call, input_uri="/in.jsonl", output_uri="/out"))
    await store.put_job_status(rpb.JobStatus(name="j", rows_done=1))
    source = rpb.BrokerTopic(broker=rpb.BrokerTopic.NATS, servers=["nats://127.0.0.1:4222"], topic="in", group="g")
    await store.apply_stream(rpb.StreamSpec(name="s", source=source, model=call, sink=rpb.BrokerTopic(topic="out")))
    await store.put_stream_status(rpb.StreamStatus(name="s", replicas_ready=1))
    await store.apply_gateway_defaults(rpb.GatewayDefaults(name="default"))
    names = {Section.RUNTIME: "torch", Section.MODEL: "a", Section.ENDPOINT: "torch/torch-0",
             Section.RUNTIME_STATUS: "torch", Section.JOB: "j", Section.JOB_STATUS: "j", Section.STREAM: "s",
             Section.STREAM_STATUS: "s", Section.GATEWAY_DEFAULTS: "default"}
    assert set(names) == {kind.section for kind in KINDS}
    async with RegistryView(store) as view:
        watch = store.watch()
        events = [await anext(watch) for _ in KINDS]
        await watch.aclose()
        for kind in KINDS:
            key = store.keys.record(kind.section, names[kind.section])
            assert store.keys.parse(key).section == kind.section
            assert isinstance(view.snapshot.of(kind.section)[names[kind.section]], kind.message)
            (event,) = [e for e in events if e.key == key.decode()]
            assert event.WhichOneof("object") == kind.event_field
    await lease.revoke()


async def test_snapshots_are_immutable_and_consistent(store):
    await store.apply_runtime(runtime())
    async with RegistryView(store) as view:
        before = view.snapshot
        revision = (await store.apply_model(model("a"))).record.revision
        await view.wait_for_revision(revision, timeout=10)
        assert before.models == {} and view.snapshot is not before
        assert view.snapshot.runtimes is before.runtimes  # untouched sections are shared, not copied


async def test_subscribers_are_told_what_changed(store):
    await store.apply_runtime(runtime())
    async with RegistryView(store) as view:
        received: list[Change] = []
        unsubscribe = view.subscribe(received.extend)
        iterated: list[list[Change]] = []

        async def iterate():
            async for changes in view.changes():
                iterated.append(changes)

        task = asyncio.create_task(iterate())
        await asyncio.sleep(0)  # let the iterator subscribe
        first = await store.apply_model(model("a"))
        second = await store.apply_model(model("a", versions=("1", "2")))
        deleted = await store.delete_model("a")
        await view.wait_for_revision(deleted, timeout=10)
        unsubscribe()
        await store.apply_model(model("b"))
        await until(lambda: "b" in view.models)
        await until(lambda: len(iterated) == 4)
        task.cancel()

        assert [(c.section, c.name, c.type, c.revision) for c in received] == [
            (Section.MODEL, "a", ChangeType.PUT, first.record.revision),
            (Section.MODEL, "a", ChangeType.PUT, second.record.revision),
            (Section.MODEL, "a", ChangeType.DELETE, deleted),
        ]
        assert received[0].old is None and received[0].new == model("a")
        assert received[1].old == model("a") and len(received[1].new.versions) == 2
        assert received[2].old == received[1].new and received[2].new is None
        assert [c for batch in iterated[:3] for c in batch] == received  # the iterator saw the same
        assert iterated[3][0].name == "b"


async def test_a_failing_subscriber_does_not_stop_the_view(store):
    await store.apply_runtime(runtime())
    async with RegistryView(store) as view:
        def broken(changes):
            raise RuntimeError("subscriber bug")

        view.subscribe(broken)
        revision = (await store.apply_model(model("a"))).record.revision
        await view.wait_for_revision(revision, timeout=10)
        revision = (await store.apply_model(model("b"))).record.revision
        await view.wait_for_revision(revision, timeout=10)
        assert set(view.models) == {"a", "b"}


async def test_resync_after_compaction(etcd):
    """The view resumes from its revision; when etcd compacted it away (etcdctl compact),
    the view reads everything again and tells subscribers the difference."""
    async with RegistryStore(etcd.endpoint) as store:
        await store.apply_runtime(runtime())
        await store.apply_model(model("stays"))
        await store.apply_model(model("goes"))
        view = await RegistryView(store).start()
        received: list[Change] = []
        view.subscribe(received.extend)
        assert view.resyncs == 1
        await view.stop()  # the view falls behind ...

        await store.delete_model("goes")
        await store.apply_model(model("new"))
        await store.apply_model(model("stays", versions=("1", "2")))
        current = (await store.list_models()).revision
        etcdctl(etcd.endpoint, "compact", str(current))  # ... past what etcd still has

        await view.start()
        await until(lambda: view.resyncs == 2)
        assert view_state(view) == await etcd_state(store)
        changes = {(c.name, c.type) for c in received}
        assert changes == {("goes", ChangeType.DELETE), ("new", ChangeType.PUT), ("stays", ChangeType.PUT)}

        # and it keeps following after the resync
        revision = (await store.apply_model(model("later"))).record.revision
        await view.wait_for_revision(revision, timeout=10)
        assert "later" in view.models
        await view.stop()


async def test_resume_without_compaction_does_not_resync(etcd):
    async with RegistryStore(etcd.endpoint) as store:
        await store.apply_runtime(runtime())
        view = await RegistryView(store).start()
        await view.stop()
        revision = (await store.apply_model(model("a"))).record.revision
        await view.start()
        await view.wait_for_revision(revision, timeout=10)
        assert "a" in view.models and view.resyncs == 1
        await view.stop()


async def test_view_survives_an_etcd_restart_and_converges(etcd):
    async with RegistryStore(etcd.endpoint, timeout=2) as store:
        await store.apply_runtime(runtime())
        for name in ("a", "b", "c"):
            await store.apply_model(model(name))
        lease = await store.grant_lease(ttl=30)
        await store.put_endpoint(endpoint("torch-0"), lease)
        view = await RegistryView(store, max_backoff=0.5).start()
        assert set(view.models) == {"a", "b", "c"} and view.connected

        etcd.stop()
        await until(lambda: not view.connected)
        # etcd is down: the last snapshot keeps being served
        assert set(view.models) == {"a", "b", "c"} and "torch/torch-0" in view.endpoints
        with pytest.raises(UnavailableError):
            await store.list_models()

        etcd.start()
        await until(lambda: view.connected)
        assert view.resyncs == 2  # what came back was read in full
        await store.delete_model("a")
        await store.apply_model(model("d"))
        await store.apply_model(model("b", versions=("1", "2")))
        await lease.revoke()
        expected = await etcd_state(store)
        await until(lambda: view_state(view) == expected)
        assert set(view.models) == {"b", "c", "d"} and not view.endpoints
        await view.stop()


async def test_view_started_while_etcd_is_down_syncs_when_it_comes_up(etcd):
    async with RegistryStore(etcd.endpoint, timeout=2) as store:
        await store.apply_runtime(runtime())
        etcd.stop()
        view = RegistryView(store, max_backoff=0.5)
        with pytest.raises(UnavailableError, match="no snapshot from etcd"):
            await view.start(timeout=1)
        assert not view.synced.is_set() and view.models == {}
        etcd.start()
        await asyncio.wait_for(view.synced.wait(), 30)
        assert set(view.runtimes) == {"torch"}
        await view.stop()
