"""The stream runner's pure parts: which Kafka offset may be committed when batches finish
out of order, what a message must look like, and where a sink's unset broker points."""

from __future__ import annotations

from modelgw.pipelines.brokers import _Partition, resolve
from modelgw.pipelines.streams import parse_message
from modelgw.protos import registry_pb2 as rpb


def test_only_the_contiguous_prefix_of_done_offsets_is_committed() -> None:
    partition = _Partition()
    partition.read.extend([5, 6, 7, 8])
    partition.done.update({6, 7})  # a later batch finished first
    assert partition.take() is None, "offset 5 is not done: committing 8 would acknowledge it"
    partition.done.add(5)
    assert partition.take() == 8  # 5, 6, 7 done: the next offset to read is 8
    assert partition.take() is None
    partition.done.add(8)
    assert partition.take() == 9
    assert not partition.read and not partition.done


def test_a_message_must_be_a_json_object() -> None:
    assert parse_message(b'{"x": [1, 2]}') == ({"x": [1, 2]}, None)
    for value, phrase in [(b"\xff", "not UTF-8"), (b"{x", "not JSON"), (b"3", "JSON int, not an object")]:
        row, problem = parse_message(value)
        assert row == {} and problem is not None and phrase in problem, problem


def test_a_sinks_unset_broker_and_servers_are_the_sources() -> None:
    source = rpb.BrokerTopic(broker=rpb.BrokerTopic.KAFKA, servers=["a:9092"], topic="in", group="g")
    assert resolve(rpb.BrokerTopic(topic="out"), source) == rpb.BrokerTopic(
        broker=rpb.BrokerTopic.KAFKA, servers=["a:9092"], topic="out")
    other = rpb.BrokerTopic(broker=rpb.BrokerTopic.NATS, servers=["nats://b:4222"], topic="out")
    assert resolve(other, source) == other
    # another broker without servers gets none of the source's (a Kafka address is no NATS URL)
    assert not resolve(rpb.BrokerTopic(broker=rpb.BrokerTopic.NATS, topic="out"), source).servers
