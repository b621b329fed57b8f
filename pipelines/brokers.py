"""One small interface over the two brokers a stream reads and writes: Kafka (aiokafka)
and NATS JetStream (nats-py). `modelgw stream run` (pipelines/streams.py) sees only this.

    source = open_source(spec.source, client_id="modelgw-stream-fraud-0")
    await source.start()
    batch = await source.receive(32, timeout=0.5)     # [Received], possibly fewer or none
    ...                                               # results published first, then:
    await source.ack(batch)                           # commit (Kafka) / ack (JetStream)
    lag = await source.lag()                          # not yet acknowledged, group-wide

    sink = open_sink(spec.sink, spec.source)          # unset broker/servers: the source's
    await sink.start()
    await sink.publish([Outgoing(key, value, headers, dedup_id)])   # returns once stored

Acknowledgement is at least once on both brokers: a message is acknowledged only after
the caller says so, and the caller says so only after what it produced is stored.

- Kafka commits an offset per partition, which acknowledges everything before it too, so
  the source commits only the contiguous prefix of acknowledged offsets (batches finish
  out of order). Commits are serialized, so the committed offset never moves back. On a
  rebalance, what was acknowledged is committed and the rest is read again by the
  partition's next owner (duplicates, never loss). The producer writes with acks=all and,
  where the broker grants it, idempotence (a producer retry is not written twice); Tansu
  refuses InitProducerId, so against Tansu the producer falls back without it and says so.
- JetStream acknowledges each message. A message being worked on longer than a third of
  the consumer's ack_wait is marked in progress, so a slow model does not make the
  server hand it to another replica. The sink publish carries Nats-Msg-Id = `dedup_id`:
  a result published again for a redelivered message (same id) inside the sink stream's
  duplicate window (2 minutes by default) is dropped by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from modelgw.protos import registry_pb2 as rpb

log = logging.getLogger(__name__)

# the provenance headers every result and dead letter carries
SOURCE_TOPIC = "modelgw-source-topic"  # Kafka topic / NATS subject
SOURCE_PARTITION = "modelgw-source-partition"  # Kafka
SOURCE_OFFSET = "modelgw-source-offset"  # Kafka
SOURCE_STREAM = "modelgw-source-stream"  # NATS: the JetStream stream
SOURCE_SEQUENCE = "modelgw-source-sequence"  # NATS: the stream sequence
KEY_HEADER = "modelgw-key"  # NATS has no keys: a result's key travels in this header
NATS_MSG_ID = "Nats-Msg-Id"

Headers = list[tuple[str, bytes]]


@dataclass
class Received:
    """One message read from a source."""

    value: bytes
    key: bytes | None  # Kafka: the record key; NATS: its Nats-Msg-Id, else "stream/sequence"
    headers: Headers  # as published (NATS: header values encoded as UTF-8)
    provenance: Headers  # where it was read: the SOURCE_* headers
    id: str  # unique in the source: "topic/partition/offset" or "stream/sequence"
    deliveries: int = 1  # NATS: times the server has delivered it (1: first); Kafka: 1
    handle: Any = field(default=None, repr=False)  # the broker's own message / tracker


@dataclass
class Outgoing:
    """One message to publish."""

    key: bytes | None
    value: bytes
    headers: Headers
    dedup_id: str  # NATS: sent as Nats-Msg-Id (deduplicated by the stream); Kafka: unused


class Source(ABC):
    """A consumer-group member (Kafka) or a pull consumer on a durable (JetStream)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def receive(self, max_messages: int, timeout: float) -> list[Received]:
        """Up to max_messages, returning as soon as any are there, or [] after timeout s."""

    @abstractmethod
    async def ack(self, messages: list[Received]) -> None:
        """The messages are done: commit / acknowledge them (at least once)."""

    @abstractmethod
    async def lag(self) -> int | None:
        """Messages of the source that the group / durable has not acknowledged (all its
        members together); None when unknown (not yet joined, broker away)."""

    @abstractmethod
    async def close(self) -> None:
        """Leave the group / unsubscribe; unacknowledged messages are delivered again."""


class Sink(ABC):
    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def publish(self, messages: list[Outgoing]) -> None:
        """Publish all of them; returns once the broker has stored every one (acks=all /
        a JetStream PubAck), raises if it could not (nothing is known about the rest)."""

    @abstractmethod
    async def close(self) -> None: ...


def resolve(topic: rpb.BrokerTopic, source: rpb.BrokerTopic) -> rpb.BrokerTopic:
    """A sink's or dead letter's topic with its unset broker and servers taken from the
    source (StreamSpec's rule)."""
    resolved = rpb.BrokerTopic()
    resolved.CopyFrom(topic)
    if resolved.broker == rpb.BrokerTopic.BROKER_UNSPECIFIED:
        resolved.broker = source.broker
    if not resolved.servers and resolved.broker == source.broker:
        resolved.servers.extend(source.servers)
    return resolved


def open_source(topic: rpb.BrokerTopic, *, client_id: str) -> Source:
    if topic.broker == rpb.BrokerTopic.KAFKA:
        return KafkaSource(topic, client_id=client_id)
    if topic.broker == rpb.BrokerTopic.NATS:
        return NatsSource(topic, client_id=client_id)
    raise ValueError(f"source.broker: {topic.broker} is not KAFKA or NATS")


def open_sink(topic: rpb.BrokerTopic, source: rpb.BrokerTopic, *, client_id: str) -> Sink:
    topic = resolve(topic, source)
    if topic.broker == rpb.BrokerTopic.KAFKA:
        return KafkaSink(topic, client_id=client_id)
    if topic.broker == rpb.BrokerTopic.NATS:
        return NatsSink(topic, client_id=client_id)
    raise ValueError(f"broker: {topic.broker} is not KAFKA or NATS")


# ---------------------------------------------------------------- Kafka


class _Partition:
    """The offsets read from one partition since it was assigned, and which are done:
    what may be committed is the offset after the last of the done prefix."""

    def __init__(self) -> None:
        self.read: deque[int] = deque()
        self.done: set[int] = set()

    def take(self) -> int | None:
        """The offset to commit now (None: nothing new), forgetting the prefix it covers."""
        last = None
        while self.read and self.read[0] in self.done:
            last = self.read.popleft()
            self.done.discard(last)
        return None if last is None else last + 1


class KafkaSource(Source):
    def __init__(self, topic: rpb.BrokerTopic, *, client_id: str) -> None:
        self.topic = topic
        self.client_id = client_id
        self.consumer: Any = None
        self.partitions: dict[Any, _Partition] = {}  # TopicPartition -> what is being worked on
        self._commit_lock = asyncio.Lock()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

        source = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await source._commit_done(list(revoked))
                for tp in revoked:
                    source.partitions.pop(tp, None)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                for tp in assigned:
                    source.partitions[tp] = _Partition()
                log.info("kafka %s/%s: assigned partitions %s", source.topic.topic, source.topic.group,
                         sorted(tp.partition for tp in assigned))

        consumer = AIOKafkaConsumer(
            bootstrap_servers=list(self.topic.servers),
            # dynamic membership: a member that stops leaves the group at once (a static
            # one would hold its partitions for the session timeout)
            group_id=self.topic.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new group reads the topic from its start
        )
        self.consumer = consumer
        await consumer.start()
        consumer.subscribe([self.topic.topic], listener=Listener())

    async def receive(self, max_messages: int, timeout: float) -> list[Received]:
        batches = await self.consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_messages)
        received = []
        for tp, records in batches.items():
            partition = self.partitions.get(tp)
            if partition is None:  # read just before a revocation: its next owner reads it again
                continue
            for r in records:
                partition.read.append(r.offset)
                provenance = [
                    (SOURCE_TOPIC, tp.topic.encode()),
                    (SOURCE_PARTITION, str(tp.partition).encode()),
                    (SOURCE_OFFSET, str(r.offset).encode()),
                ]
                received.append(
                    Received(
                        value=r.value if r.value is not None else b"",
                        key=r.key,
                        headers=[(k, bytes(v) if v is not None else b"") for k, v in r.headers],
                        provenance=provenance,
                        id=f"{tp.topic}/{tp.partition}/{r.offset}",
                        handle=(tp, partition, r.offset),
                    )
                )
        return received

    async def ack(self, messages: list[Received]) -> None:
        touched = []
        for m in messages:
            tp, partition, offset = m.handle
            current = self.partitions.get(tp)
            if current is not None and current is partition:  # else revoked since: not ours to commit
                current.done.add(offset)
                touched.append(tp)
        await self._commit_done(touched)

    async def _commit_done(self, tps: list[Any]) -> None:
        from aiokafka.errors import KafkaError

        # serialized, and offsets taken inside the lock: two commits never land out of
        # order, so the committed offset of a partition only moves forward
        async with self._commit_lock:
            offsets = {}
            for tp in dict.fromkeys(tps):
                partition = self.partitions.get(tp)
                offset = partition.take() if partition is not None else None
                if offset is not None:
                    offsets[tp] = offset
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:
                # a rebalance took the partitions away: their next owner reads from the last
                # commit (duplicates, not loss)
                log.warning("kafka %s/%s: commit %s failed (%s): read again by the partition's next owner",
                            self.topic.topic, self.topic.group,
                            {tp.partition: o for tp, o in offsets.items()}, exc)

    async def lag(self) -> int | None:
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        ids = self.consumer.partitions_for_topic(self.topic.topic) if self.consumer else None
        if not ids:
            return None
        tps = [TopicPartition(self.topic.topic, p) for p in sorted(ids)]
        try:
            end = await self.consumer.end_offsets(tps)
            start = await self.consumer.beginning_offsets(tps)
            lag = 0
            for tp in tps:
                # Tansu answers ListOffsets with the last record batch's base offset + 1 (short
                # of the end by the rest of that batch); the high watermark of our own fetches
                # is right, for the partitions this member reads
                last = max(end[tp], self.consumer.highwater(tp) or 0) if tp in self.partitions else end[tp]
                committed = await self.consumer.committed(tp)  # the group's, whoever owns tp
                lag += max(0, last - max(committed if committed is not None else 0, start[tp]))
        except (TimeoutError, KafkaError, OSError) as exc:
            log.debug("kafka %s: lag unknown: %s", self.topic.topic, exc)
            return None
        return lag

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()  # leaves the group: the others take its partitions now


class KafkaSink(Sink):
    def __init__(self, topic: rpb.BrokerTopic, *, client_id: str) -> None:
        self.topic = topic
        self.client_id = client_id
        self.producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        def producer(idempotent: bool) -> Any:
            return AIOKafkaProducer(
                bootstrap_servers=list(self.topic.servers),
                client_id=self.client_id,
                acks="all",
                enable_idempotence=idempotent,
            )

        candidate = producer(True)
        try:
            await candidate.start()
        except KafkaError as exc:
            with contextlib.suppress(Exception):
                await candidate.stop()
            # Tansu answers InitProducerId with an error: a retried send may then be
            # written twice (at least once still holds)
            log.warning("kafka %s: the broker refuses an idempotent producer (%s): writing without idempotence",
                        self.topic.topic, exc)
            candidate = producer(False)
            self.producer = candidate
            await candidate.start()
        self.producer = candidate

    async def publish(self, messages: list[Outgoing]) -> None:
        futures = [
            await self.producer.send(self.topic.topic, m.value, key=m.key, headers=m.headers) for m in messages
        ]
        await asyncio.gather(*futures)

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


# ---------------------------------------------------------------- NATS JetStream


async def _nats_connect(servers: list[str], client_id: str) -> Any:
    import nats

    urls = [s if "://" in s else f"nats://{s}" for s in servers]
    # reconnect for ever: the stream runs as long as it is not stopped
    return await nats.connect(servers=urls, name=client_id, max_reconnect_attempts=-1, connect_timeout=5)


class NatsSource(Source):
    def __init__(self, topic: rpb.BrokerTopic, *, client_id: str) -> None:
        self.topic = topic
        self.client_id = client_id
        self.nc: Any = None
        self.sub: Any = None
        self.stream = topic.stream or None
        self.in_flight: dict[int, tuple[float, Any]] = {}  # stream sequence -> (received at, msg)
        self.ack_wait = 30.0
        self._keeper: asyncio.Task | None = None

    async def start(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self.nc = await _nats_connect(list(self.topic.servers), self.client_id)
        js = self.nc.jetstream()
        if self.stream is None:
            self.stream = await js.find_stream_name_by_subject(self.topic.topic)
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL)
        # creates the durable when it is missing (every replica binds to the same one)
        self.sub = await js.pull_subscribe(self.topic.topic, durable=self.topic.group, stream=self.stream, config=config)
        info = await self.sub.consumer_info()
        if info.config.ack_wait:
            self.ack_wait = float(info.config.ack_wait)
        self._keeper = asyncio.get_running_loop().create_task(self._keep_in_progress())

    async def receive(self, max_messages: int, timeout: float) -> list[Received]:
        import nats.errors

        try:
            msgs = await self.sub.fetch(max_messages, timeout=max(timeout, 0.001))
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        received = []
        now = time.monotonic()
        for m in msgs:
            meta = m.metadata
            seq = meta.sequence.stream
            headers = dict(m.headers or {})
            msg_id = headers.get(NATS_MSG_ID)
            self.in_flight[seq] = (now, m)
            received.append(
                Received(
                    value=m.data,
                    key=(msg_id or f"{meta.stream}/{seq}").encode(),
                    headers=[(k, v.encode()) for k, v in headers.items() if not k.startswith("Nats-")],
                    provenance=[
                        (SOURCE_TOPIC, m.subject.encode()),
                        (SOURCE_STREAM, meta.stream.encode()),
                        (SOURCE_SEQUENCE, str(seq).encode()),
                    ],
                    id=f"{meta.stream}/{seq}",
                    deliveries=meta.num_delivered or 1,
                    handle=m,
                )
            )
        return received

    async def ack(self, messages: list[Received]) -> None:
        for m in messages:
            await m.handle.ack()
            self.in_flight.pop(m.handle.metadata.sequence.stream, None)
        # the acks are plain publishes: a flush's PONG says the server has read them
        await self.nc.flush()

    async def _keep_in_progress(self) -> None:
        """Mark messages held longer than a third of ack_wait in progress (+WPI), which
        restarts their ack_wait: a slow batch is not redelivered to another replica."""
        every = max(self.ack_wait / 3, 0.05)
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for seq, (since, msg) in list(self.in_flight.items()):
                if now - since >= every:
                    try:
                        await msg.in_progress()
                        self.in_flight[seq] = (now, msg)
                    except Exception as exc:  # a reconnect: the next round tries again
                        log.debug("nats: in-progress ack of %s failed: %s", seq, exc)

    async def lag(self) -> int | None:
        try:
            info = await self.sub.consumer_info()
        except Exception as exc:  # a lag figure is best effort: never stop the stream for it
            log.debug("nats %s: lag unknown: %s", self.topic.group, exc)
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def close(self) -> None:
        from modelgw.tasks import stop_tasks

        await stop_tasks(self._keeper)
        if self.nc is not None:
            # unsubscribe, not drain: messages fetched and not handed out are redelivered
            await self.nc.close()


class NatsSink(Sink):
    def __init__(self, topic: rpb.BrokerTopic, *, client_id: str) -> None:
        self.topic = topic
        self.client_id = client_id
        self.nc: Any = None
        self.js: Any = None

    async def start(self) -> None:
        self.nc = await _nats_connect(list(self.topic.servers), self.client_id)
        self.js = self.nc.jetstream()

    async def publish(self, messages: list[Outgoing]) -> None:
        async def one(m: Outgoing) -> None:
            headers = {k: v.decode("utf-8", errors="replace") for k, v in m.headers if not k.startswith("Nats-")}
            if m.key is not None:
                headers[KEY_HEADER] = m.key.decode("utf-8", errors="replace")
            headers[NATS_MSG_ID] = m.dedup_id
            await self.js.publish(self.topic.topic, m.value, headers=headers, stream=self.topic.stream or None)

        await asyncio.gather(*(one(m) for m in messages))

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()
