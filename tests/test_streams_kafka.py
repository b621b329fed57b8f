"""`modelgw stream run` on Kafka: Tansu (a Kafka-protocol broker, memory storage) on a
loopback port, real `modelgw stream run` processes in a consumer group, a real
python-kind model loaded in process.

Consumer-group joins against Tansu take 5-23 s, so this is one test in phases, each
phase starting where the last left the group:
1. N keyed messages (malformed ones among them) in -> N results on the sink keyed by
   their source key, with the source partition and offset in headers; the malformed in
   the dead letter with their error; the lag back to 0 in the status record;
2. a replica SIGKILLed mid-stream and started again: no message lost (at least once:
   the duplicates are counted, not forbidden);
3. SIGTERM: exit 0 with the group's committed offsets at the end of every partition.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from broker_helpers import MALFORMED, Tansu, expected_output, kafka_records, write_models
from reconciler_helpers import Processes, until

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

pytestmark = pytest.mark.slow  # two consumer-group joins against Tansu


@pytest.fixture(scope="module")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    with Tansu(tmp_path_factory.mktemp("tansu")) as broker:
        yield broker


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.cleanup()


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(topic, value, key=key, headers=[("trace", key)])
        await producer.flush()
    finally:
        await producer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """{partition: the group's committed offset}, read by a consumer of the group that does
    not subscribe (so it never joins)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
    finally:
        await consumer.stop()


async def test_kafka_stream_results_dead_letters_kill_restart_and_drain(
    etcd_server: Any, etcd_prefix: str, tansu: Tansu, procs: Processes, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    source, sink, dead, group, partitions = f"in-{uid}", f"out-{uid}", f"dead-{uid}", f"scorers-{uid}", 3
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(source, partitions, 1), NewTopic(sink, 1, 1), NewTopic(dead, 1, 1)])
    await admin.close()
    models = write_models(tmp_path)

    # phase 1: results keyed by their source, dead letters, lag 0
    n1 = 200
    first: list[tuple[bytes, bytes]] = [(f"a-{i}".encode(), json.dumps({"x": [float(i), 1.0]}).encode()) for i in range(n1)]
    for i, (value, _, _) in enumerate(MALFORMED):
        first.insert(10 + 25 * i, (f"bad-{i}".encode(), value))
    await produce(tansu.bootstrap, source, first)

    spec = rpb.StreamSpec(
        name="clicks",
        source=rpb.BrokerTopic(broker=rpb.BrokerTopic.KAFKA, servers=[tansu.bootstrap], topic=source, group=group),
        model=rpb.ModelCall(model="double", mode=rpb.ModelCall.IN_PROCESS),
        sink=rpb.BrokerTopic(topic=sink),
        dead_letter=rpb.BrokerTopic(topic=dead),
        batch_size=16, max_in_flight=64,
    )
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name="py", kind="python", model_formats=["python"], replicas=1))
        await store.apply_model(rpb.ModelSpec(name="double", versions=[
            rpb.ModelVersion(version="1", uri=f"{models}:SlowDouble", format="python", runtime="py")]))
        await store.apply_stream(spec)
        command = ("stream", "run", "--name", "clicks", "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix,
                   "--status-seconds", "0.5")
        replica = procs.start("replica-1", *command)

        async def count(topic: str, at_least: int) -> bool:
            return len(await kafka_records(tansu.bootstrap, topic)) >= at_least

        await until(lambda: count(sink, n1), "phase 1: every result", timeout=120, every=1, logs=procs.logs)
        await until(lambda: count(dead, len(MALFORMED)), "phase 1: every dead letter", timeout=30, logs=procs.logs)
        results = await kafka_records(tansu.bootstrap, sink)
        assert sorted(r.key for r in results) == sorted(k for k, _ in first if k.startswith(b"a-"))
        for r in results:
            headers = dict(r.headers)
            i = int(r.key[2:])
            assert json.loads(r.value) == expected_output([float(i), 1.0])
            assert headers["trace"] == r.key, "the source's headers are passed on"
            assert headers["modelgw-source-topic"] == source.encode()
            assert 0 <= int(headers["modelgw-source-partition"]) < partitions
            assert headers["modelgw-source-offset"].isdigit()
        letters = {r.key: r for r in await kafka_records(tansu.bootstrap, dead)}
        assert sorted(letters) == sorted(f"bad-{i}".encode() for i in range(len(MALFORMED)))
        for i, (value, phrase, code) in enumerate(MALFORMED):
            letter = letters[f"bad-{i}".encode()]
            headers = dict(letter.headers)
            assert letter.value == value, "a dead letter carries the original message unchanged"
            assert phrase in headers["modelgw-error"].decode(), headers
            assert headers["modelgw-error-code"] == code.encode()
            assert headers["modelgw-source-offset"].isdigit()

        async def status_settled(processed: int) -> rpb.StreamStatus | None:
            status = await store.get_stream_status("clicks")
            return status if status and status.consumer_lag == 0 and status.messages_processed >= processed else None

        status = await until(lambda: status_settled(n1), "phase 1: lag 0 in the status", timeout=30, logs=procs.logs)
        assert status.messages_processed == n1 and status.messages_failed == len(MALFORMED)

        # phase 2: SIGKILL mid-stream, start again: nothing lost
        n2 = 2000
        second = [(f"b-{i}".encode(), json.dumps({"x": [float(i)]}).encode()) for i in range(n2)]
        await produce(tansu.bootstrap, source, second)
        await until(lambda: count(sink, n1 + 150), "phase 2: results before the kill", timeout=60, logs=procs.logs)
        replica.signal(signal.SIGKILL)
        replica.wait(30)
        before = len(await kafka_records(tansu.bootstrap, sink))
        assert before < n1 + n2, "killed mid-stream"
        replica = procs.start("replica-2", *command)

        async def all_keys() -> bool:
            keys = {r.key for r in await kafka_records(tansu.bootstrap, sink)}
            return all(k in keys for k, _ in second)

        await until(all_keys, "phase 2: every result after the restart", timeout=180, every=1, logs=procs.logs)
        results = await kafka_records(tansu.bootstrap, sink)
        copies = Counter(r.key for r in results if r.key.startswith(b"b-"))
        duplicates = sum(c - 1 for c in copies.values())
        print(f"phase 2: {n2} messages, {duplicates} results published twice (at least once)")
        for r in results:
            if r.key.startswith(b"b-"):
                assert json.loads(r.value) == expected_output([float(int(r.key[2:]))])
        # (the killed replica's counts since its last status write died with it: the
        # status counts are a lower bound after a kill, the lag is the group's own)
        await until(lambda: status_settled(0), "phase 2: lag 0 in the status", timeout=60, logs=procs.logs)

        # phase 3: SIGTERM drains, commits and exits 0
        assert replica.terminate(timeout=60) == 0, replica.output()
        # (summed: Tansu's end offsets fall short, see broker_helpers.kafka_records)
        committed = await committed_offsets(tansu.bootstrap, group, source, partitions)
        assert sum(committed.values()) == len(first) + n2, committed
