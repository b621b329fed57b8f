"""Two reconcilers on one etcd: exactly one leads and runs replicas (forked by it); SIGKILL
it and its replicas die with it (PR_SET_PDEATHSIG: nothing else signals them) while the standby takes over within the lease
TTL and brings them back; a leader stopped with SIGTERM stops its replicas before it
hands over. At no point do more replica processes run than the runtime asks for."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from reconciler_helpers import (
    Process,
    Processes,
    endpoints,
    key_info,
    parent_pid,
    pid_alive,
    ready_endpoints,
    replica_processes,
    until,
)

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

LEASE_TTL = 3
REPLICAS = 2


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


class Watch:
    """Counts the replica processes under a prefix on every poll and remembers the most
    seen at once: a takeover must never leave two leaders' replicas running together."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.most = 0

    def replicas(self) -> dict[str, int]:
        found = replica_processes(self.prefix)
        self.most = max(self.most, len(found))
        return found


async def serving(store: RegistryStore, watch: Watch, leader: Process) -> dict[str, rpb.Endpoint]:
    """REPLICAS ready endpoints, each a live process forked by `leader`, and nothing else."""
    processes = watch.replicas()
    ready = await ready_endpoints(store, "py", ("scale", "1"))
    all_endpoints = await endpoints(store, "py")
    if len(ready) == len(all_endpoints) == REPLICAS and set(ready) == set(processes) \
            and all(parent_pid(pid) == leader.pid for pid in processes.values()):
        return ready
    return {}


async def test_one_leader_acts_and_a_standby_takes_over(etcd_server, processes: Processes) -> None:
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    watch = Watch(prefix)
    logs = processes.logs
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name="py", kind="python", model_formats=["python"], replicas=REPLICAS))
        await store.apply_model(rpb.ModelSpec(name="scale", versions=[rpb.ModelVersion(
            version="1", uri="modelgw.runtimes.examples.scale:Scale", format="python", runtime="py")]))

        a = processes.reconciler("rec-a", etcd_server.endpoint, prefix, lease_ttl=LEASE_TTL, resync=1.0)
        await until(lambda: store.leader(), "a leader", logs=logs)
        b = processes.reconciler("rec-b", etcd_server.endpoint, prefix, lease_ttl=LEASE_TTL, resync=1.0)
        by_name = {"rec-a": a, "rec-b": b}
        leader = by_name[await store.leader()]
        standby = b if leader is a else a
        assert leader is a  # the first one up won; the second stands by

        first = await until(lambda: serving(store, watch, leader), "the leader's replicas serve", timeout=90, logs=logs)
        # the standby keeps standing by: still exactly the leader's replicas, several
        # resync periods and campaigns later
        for _ in range(12):
            await asyncio.sleep(0.3)
            assert set(await serving(store, watch, leader)) == set(first), logs()
            assert await store.leader() == "rec-a"
        assert watch.most == REPLICAS

        # SIGKILL the leader: its replicas get SIGTERM from the kernel and deregister
        old_pids = list(watch.replicas().values())
        leader.signal(signal.SIGKILL)
        leader.wait(30)
        await until(lambda: not any(pid_alive(p) for p in old_pids) and not watch.replicas(),
                    "the dead leader's replicas died with it", timeout=30, logs=logs)
        for instance in first:  # a clean stop on the death signal (SIGTERM), not a crash
            assert "shutting down" in (processes.directory / "rec-a" / "logs" / f"{instance}.log").read_text()
        # the standby takes over once the leader's lease runs out, and brings the replicas back
        await until(lambda: _leader_is(store, "rec-b"), "rec-b leads", timeout=LEASE_TTL * 10, logs=logs)
        second = await until(lambda: serving(store, watch, standby), "the new leader's replicas serve",
                             timeout=90, logs=logs)
        assert not set(second) & set(first)

        # a clean stop (SIGTERM) of the leader: replicas stopped first, then the leadership
        # handed over at once (resigned, not expired); the next standby takes over
        c = processes.reconciler("rec-c", etcd_server.endpoint, prefix, lease_ttl=LEASE_TTL, resync=1.0)
        await until(lambda: _log_has(c, "started"), "rec-c up", logs=logs)
        pids = list(watch.replicas().values())
        standby.signal(signal.SIGTERM)
        await until(lambda: _leader_is(store, "rec-c"), "rec-c leads", timeout=LEASE_TTL * 10, every=0.05, logs=logs)
        # by the time rec-c leads, rec-b's replicas are gone (stopped before it resigned)
        assert not any(pid_alive(p) for p in pids), logs()
        assert standby.wait(30) == 0, logs()
        third = await until(lambda: serving(store, watch, c), "rec-c's replicas serve", timeout=90, logs=logs)
        assert not set(third) & set(second)
        assert watch.most == REPLICAS, f"{watch.most} replica processes ran at once\n{logs()}"


async def _leader_is(store: RegistryStore, identity: str) -> bool:
    return await store.leader() == identity


def _log_has(process: Process, text: str) -> bool:
    return text in process.output()




async def test_a_lapsed_lease_keeps_the_replicas_and_another_leader_takes_them(etcd_server, processes: Processes) -> None:
    """etcd drops the leader's election lease (as after an outage longer than its TTL):
    nobody else leads, so the leader keeps its replicas running (the same processes) and
    leads again under a new lease. Another candidate seen holding the key is what makes
    it let go of them."""
    prefix = f"/modelgw-test/{uuid.uuid4().hex[:12]}/"
    logs = processes.logs
    async with RegistryStore(etcd_server.endpoint, prefix=prefix) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name="py", kind="python", model_formats=["python"], replicas=1))
        await store.apply_model(rpb.ModelSpec(name="scale", versions=[rpb.ModelVersion(
            version="1", uri="modelgw.runtimes.examples.scale:Scale", format="python", runtime="py")]))
        leader = processes.reconciler("rec-a", etcd_server.endpoint, prefix, lease_ttl=LEASE_TTL, resync=1.0)
        watch = Watch(prefix)

        async def serving_one() -> dict[str, int]:
            ready = await ready_endpoints(store, "py", ("scale", "1"))
            found = watch.replicas()
            return found if len(ready) == 1 and set(ready) == set(found) else {}

        before = await until(serving_one, "the leader's replica serves", timeout=90, logs=logs)
        key = store.keys.election("reconciler")
        lapsed = (await key_info(store, key)).lease
        await store.etcd.revoke(lapsed)  # its key goes with it, as when etcd expires it

        async def leads_again() -> bool:
            info = await key_info(store, key)
            return info is not None and info.value == b"rec-a" and info.lease != lapsed

        await until(leads_again, "rec-a leads again under a new lease", timeout=LEASE_TTL * 10, logs=logs)
        for _ in range(10):  # several resync periods later: still the same replica process
            await asyncio.sleep(0.3)
            assert watch.replicas() == before, logs()
        assert all(pid_alive(pid) for pid in before.values())

        # another candidate holds the key: now rec-a lets go of its replicas
        intruder = await store.grant_lease(60, keep_alive=False)
        await store.etcd.put(key, b"intruder", intruder)
        await until(lambda: not any(pid_alive(p) for p in before.values()), "rec-a let go of its replicas",
                    timeout=30, logs=logs)
        await store.etcd.revoke(intruder)  # the intruder goes: rec-a leads and starts a new one
        after = await until(serving_one, "rec-a's new replica serves", timeout=90, logs=logs)
        assert not set(after) & set(before)
        assert await store.leader() == "rec-a" and leader.alive()
