"""The routing table when an endpoint record disappears (gateway/routing.py's rule): a
replica that answers keeps being routed to while its record is briefly gone (etcd expired
its lease in an outage; it registers again within a second), and is dropped at once when
it fails, when its grace ends, when it left cleanly (last record not ready) or when
nobody was talking to it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from modelgw.gateway.errors import GatewayError
from modelgw.gateway.routing import RoutingTable
from modelgw.protos import registry_pb2 as rpb

KEY = "py/py-0"


def model() -> rpb.ModelSpec:
    spec = rpb.ModelSpec(name="m")
    spec.versions.add(version="1", uri="x", format="python", runtime="py")
    return spec


def endpoint(instance: str = "py-0", ready: bool = True, port: int = 9000) -> rpb.Endpoint:
    ep = rpb.Endpoint(runtime="py", instance=instance, address=f"127.0.0.1:{port}", ready=ready)
    ep.models.add(name="m", version="1", state=rpb.LoadedModel.READY)
    return ep


def routed(table: RoutingTable) -> list[str]:
    try:
        return [table.pick("m")[1].key]
    except GatewayError as err:
        assert err.code == grpc.StatusCode.UNAVAILABLE
        return []


def answering_table(**kwargs: float) -> RoutingTable:
    """A table routing `m` to one replica that has just answered a request."""
    table = RoutingTable(**kwargs)
    table.update([model()], {KEY: endpoint()})
    table.pick("m")[1].succeeded()
    return table


def test_a_replica_that_answers_stays_routed_while_its_record_is_gone() -> None:
    table = answering_table()
    replica = table.replicas[KEY]
    table.update(endpoints={})  # etcd expired its lease
    assert routed(table) == [KEY]
    assert table.pick("m")[1] is replica
    table.update(endpoints={KEY: endpoint()})  # registered again under a new lease
    assert table.pick("m")[1] is replica
    replica.eject()  # an ordinary replica again: a failure ejects it, it stays in the table
    assert KEY in table.replicas and routed(table) == [KEY]


def test_an_orphan_that_fails_is_dropped_at_once() -> None:
    table = answering_table()
    table.update(endpoints={})
    table.pick("m")[1].eject()
    assert routed(table) == [] and KEY not in table.replicas


def test_a_replica_that_left_cleanly_is_dropped_at_once() -> None:
    # its last write (not ready) reached the table before the deletion
    table = answering_table()
    table.update(endpoints={KEY: endpoint(ready=False)})
    table.update(endpoints={})
    assert routed(table) == [] and KEY not in table.replicas
    # or came in the same batch as the deletion: the caller passes the last record
    table = answering_table()
    table.update(endpoints={}, deleted={KEY: endpoint(ready=False)})
    assert routed(table) == [] and KEY not in table.replicas


def test_a_replica_nobody_talked_to_or_that_failed_is_dropped_at_once() -> None:
    table = RoutingTable()
    table.update([model()], {KEY: endpoint()})
    table.update(endpoints={})
    assert routed(table) == []
    table = answering_table()
    table.replicas[KEY].eject()
    table.update(endpoints={})
    assert routed(table) == []


def test_an_orphan_at_a_new_address_is_a_new_replica() -> None:
    table = answering_table()
    old = table.replicas[KEY]
    table.update(endpoints={})
    table.update(endpoints={KEY: endpoint(port=9001)})
    assert table.pick("m")[1] is not old and table.pick("m")[1].address.endswith(":9001")


async def test_an_orphan_is_dropped_when_its_grace_ends() -> None:
    table = answering_table(orphan_grace=0.3)
    table.update(endpoints={})
    assert routed(table) == [KEY]
    for _ in range(200):  # a bound on the wait, not a timing assertion
        if not routed(table):
            break
        await asyncio.sleep(0.05)
    assert routed(table) == [] and KEY not in table.replicas


@pytest.mark.parametrize("others", [0, 2])
def test_other_replicas_are_untouched(others: int) -> None:
    table = answering_table()
    records = {KEY: endpoint()} | {f"py/py-{i}": endpoint(f"py-{i}", port=9000 + i) for i in range(1, others + 1)}
    table.update(endpoints=records)
    rest = {k: v for k, v in records.items() if k != KEY}
    table.update(endpoints=rest)
    assert set(table.replicas) == set(records)


def test_a_split_version_without_replicas_gives_its_share_to_the_versions_that_have_them() -> None:
    spec = rpb.ModelSpec(name="m", traffic={"1": 50, "2": 30, "3": 20})
    for version, runtime in (("1", "gone"), ("2", "py"), ("3", "py")):
        spec.versions.add(version=version, uri="x", format="python", runtime=runtime)
    ep = rpb.Endpoint(runtime="py", instance="py-0", address="127.0.0.1:9000", ready=True)
    for version in ("2", "3"):
        ep.models.add(name="m", version=version, state=rpb.LoadedModel.READY)
    table = RoutingTable()
    table.update([spec], {KEY: ep})
    # version 1's runtime has no replica: its 50% goes to 2 and 3 in their 30:20 ratio
    chosen = [table.pick("m")[0] for _ in range(2000)]
    assert set(chosen) == {"2", "3"}
    assert 0.5 < chosen.count("2") / len(chosen) < 0.7
    # a session key keeps its choice, and one that would pick 1 is moved, not refused
    assert len({table.pick("m", sticky_key=f"s{i}")[0] for i in range(50)} - {"2", "3"}) == 0
    assert table.pick("m", sticky_key="s7")[0] == table.pick("m", sticky_key="s7")[0]
    # a request that names the version still gets the truth
    with pytest.raises(GatewayError) as err:
        table.pick("m", "1")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # and with no replica for any version the request is refused as before
    table.update([spec], {})
    assert routed(table) == []
