"""`modelgw stream run` on NATS JetStream: a real nats-server on a loopback port, real
`modelgw stream run` processes, a real python-kind model loaded in process.

- N messages in -> N results on the sink, each keyed by its source and in its order;
  malformed messages in the dead letter with their error; the lag back to 0, in the
  status record and on /metrics;
- a replica SIGKILLed mid-stream and started again loses no message, and the sink holds
  each result once (Nats-Msg-Id deduplication: exactly once in a JetStream sink);
- SIGTERM drains: the process exits 0 having acknowledged everything it read, each
  acknowledged message with its result published.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from broker_helpers import MALFORMED, NatsServer, expected_output, nats_stored, write_models
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from reconciler_helpers import Processes, until

from modelgw.net import free_port
from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.cleanup()


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


class Streams:
    """The JetStream streams of one test: source IN, sink OUT, dead letters DEAD."""

    def __init__(self) -> None:
        uid = uuid.uuid4().hex[:8]
        self.source, self.sink, self.dead = f"IN_{uid}", f"OUT_{uid}", f"DEAD_{uid}"
        self.subject, self.sink_subject, self.dead_subject = f"{uid}.in", f"{uid}.out", f"{uid}.dead"

    async def create(self, js: Any) -> None:
        await js.add_stream(name=self.source, subjects=[self.subject])
        await js.add_stream(name=self.sink, subjects=[self.sink_subject])
        await js.add_stream(name=self.dead, subjects=[self.dead_subject])

    def spec(self, name: str, url: str, model: str, **fields: Any) -> rpb.StreamSpec:
        return rpb.StreamSpec(
            name=name,
            source=rpb.BrokerTopic(broker=rpb.BrokerTopic.NATS, servers=[url], topic=self.subject, group="scorers",
                                   stream=self.source),
            model=rpb.ModelCall(model=model, mode=rpb.ModelCall.IN_PROCESS),
            sink=rpb.BrokerTopic(topic=self.sink_subject),
            dead_letter=rpb.BrokerTopic(topic=self.dead_subject),
            **fields,
        )

    async def count(self, js: Any, stream: str) -> int:
        return int((await js.stream_info(stream)).state.messages)


def stream_file(path: Path, spec: rpb.StreamSpec) -> Path:
    from google.protobuf import json_format

    path.write_text(json.dumps({"kind": "Stream", "spec": json_format.MessageToDict(spec)}))
    return path


async def metrics(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line.startswith("modelgw_stream_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_results_keyed_in_order_dead_letters_lag_and_status(
    etcd_server: Any, etcd_prefix: str, nats_server: NatsServer, js: Any, procs: Processes, tmp_path: Path
) -> None:
    streams = Streams()
    await streams.create(js)
    models = write_models(tmp_path)
    n = 300
    published: dict[str, tuple[int, bytes, list[float] | None]] = {}  # msg id -> (sequence, value, x)
    bad_at = {n * (i + 1) // (len(MALFORMED) + 1): i for i in range(len(MALFORMED))}  # spread among the good ones
    for i in range(n):
        if i in bad_at:
            value = MALFORMED[bad_at[i]][0]
            ack = await js.publish(streams.subject, value, headers={"Nats-Msg-Id": f"bad-{bad_at[i]}", "trace": "t"})
            published[f"bad-{bad_at[i]}"] = (ack.seq, value, None)
        x = [float(i), i + 0.5]
        value = json.dumps({"x": x}).encode()
        ack = await js.publish(streams.subject, value, headers={"Nats-Msg-Id": f"m-{i}", "trace": f"t{i}"})
        published[f"m-{i}"] = (ack.seq, value, x)

    spec = streams.spec("scores", nats_server.url, "double", batch_size=16, max_in_flight=64)
    async with RegistryStore(etcd_server.endpoint, prefix=etcd_prefix) as store:
        await store.apply_runtime(rpb.RuntimeSpec(name="py", kind="python", model_formats=["python"], replicas=1))
        await store.apply_model(rpb.ModelSpec(name="double", versions=[
            rpb.ModelVersion(version="1", uri=f"{models}:Double", format="python", runtime="py")]))
        await store.apply_stream(spec)
        port = free_port()
        replica = procs.start("stream", "stream", "run", "--name", "scores", "--etcd", etcd_server.endpoint,
                              "--prefix", etcd_prefix, "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                              "--status-seconds", "0.3")

        async def done() -> bool:
            return await streams.count(js, streams.sink) >= n and await streams.count(js, streams.dead) >= len(MALFORMED)

        await until(done, "every message answered or dead-lettered", timeout=90, logs=procs.logs)

        results = await nats_stored(js, streams.sink)
        assert len(results) == n
        keys = [r.headers["modelgw-key"] for r in results]
        assert sorted(keys) == sorted(f"m-{i}" for i in range(n))
        sequences = []
        for r in results:
            sequence, _, x = published[r.headers["modelgw-key"]]
            assert json.loads(r.data) == expected_output(x)
            assert r.headers["modelgw-source-stream"] == streams.source
            assert r.headers["modelgw-source-topic"] == streams.subject
            assert r.headers["modelgw-source-sequence"] == str(sequence)
            assert r.headers["trace"] == f"t{r.headers['modelgw-key'][2:]}"  # the source's headers passed on
            sequences.append(sequence)
        assert sequences == sorted(sequences), "results are published in the order the messages were read"

        dead = {d.headers["modelgw-key"]: d for d in await nats_stored(js, streams.dead)}
        assert sorted(dead) == sorted(f"bad-{i}" for i in range(len(MALFORMED)))
        for i, (value, phrase, code) in enumerate(MALFORMED):
            letter = dead[f"bad-{i}"]
            assert letter.data == value, "a dead letter carries the original message unchanged"
            assert phrase in letter.headers["modelgw-error"], letter.headers
            assert letter.headers["modelgw-error-code"] == code
            assert letter.headers["modelgw-source-sequence"] == str(published[f"bad-{i}"][0])

        async def settled() -> rpb.StreamStatus | None:
            status = await store.get_stream_status("scores")
            if status and status.consumer_lag == 0 and status.messages_processed == n:
                return status
            return None

        status = await until(settled, "the status record: lag 0, every message counted", timeout=30, logs=procs.logs)
        assert status.messages_failed == len(MALFORMED)
        info = await js.consumer_info(streams.source, "scorers")
        assert info.num_pending == 0 and info.num_ack_pending == 0
        samples = await metrics(port)
        assert samples['modelgw_stream_messages_total{outcome="processed",stream="scores"}'] == n
        assert samples['modelgw_stream_messages_total{outcome="failed",stream="scores"}'] == len(MALFORMED)
        assert samples['modelgw_stream_consumer_lag{stream="scores"}'] == 0
        assert samples['modelgw_stream_batch_size_sum{stream="scores"}'] == n + len(MALFORMED)

        assert replica.terminate(timeout=60) == 0, replica.output()


async def test_sigkilled_replica_restarted_loses_nothing_and_the_sink_holds_each_result_once(
    nats_server: NatsServer, js: Any, procs: Processes, tmp_path: Path
) -> None:
    streams = Streams()
    await streams.create(js)
    # the durable made beforehand with a short ack_wait, so that what the killed replica
    # held is redelivered within a second, not 30 s (the replica binds to it as it is)
    await js.add_consumer(streams.source, ConsumerConfig(durable_name="scorers", ack_policy=AckPolicy.EXPLICIT,
                                                         ack_wait=1.0, filter_subject=streams.subject))
    n = 1500
    for i in range(n):
        await js.publish(streams.subject, json.dumps({"x": [float(i)]}).encode(), headers={"Nats-Msg-Id": f"m-{i}"})
    models = write_models(tmp_path)
    spec = streams.spec("kill", nats_server.url, "double", batch_size=16, max_in_flight=64)
    path = stream_file(tmp_path / "stream.json", spec)
    command = ("stream", "run", "-f", str(path), "--model-uri", f"{models}:SlowDouble", "--runtime-kind", "python")

    first = procs.start("first", *command)
    await until(lambda: _at_least(js, streams, 200), "the first replica's results", timeout=60, logs=procs.logs)
    first.signal(signal.SIGKILL)
    first.wait(30)
    before = await streams.count(js, streams.sink)
    assert before < n, "killed mid-stream"
    info = await js.consumer_info(streams.source, "scorers")
    assert info.num_ack_pending > 0 or info.num_pending > 0

    second = procs.start("second", *command)
    await until(lambda: _at_least(js, streams, n), "every result, after the restart", timeout=90, logs=procs.logs)

    async def drained() -> bool:
        info = await js.consumer_info(streams.source, "scorers")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await until(drained, "lag 0: every message acknowledged", timeout=30, logs=procs.logs)
    results = await nats_stored(js, streams.sink)
    keys = [r.headers["modelgw-key"] for r in results]
    assert set(keys) == {f"m-{i}" for i in range(n)}, "no message lost"
    # a message redelivered after its result was published is published again under the
    # same Nats-Msg-Id and dropped by JetStream (made certain by the next test)
    assert len(keys) == n, f"{len(keys) - len(set(keys))} duplicates in the sink"
    for r in results:
        i = int(r.headers["modelgw-key"][2:])
        assert json.loads(r.data) == expected_output([float(i)])
    assert second.terminate(timeout=60) == 0, second.output()


async def _at_least(js: Any, streams: Streams, count: int) -> bool:
    return await streams.count(js, streams.sink) >= count


async def test_sigterm_drains_what_is_in_flight_and_exits_0(
    nats_server: NatsServer, js: Any, procs: Processes, tmp_path: Path
) -> None:
    streams = Streams()
    await streams.create(js)
    n = 400
    for i in range(n):
        await js.publish(streams.subject, json.dumps({"x": [float(i)]}).encode(), headers={"Nats-Msg-Id": f"m-{i}"})
    models = write_models(tmp_path)
    spec = streams.spec("drain", nats_server.url, "double", batch_size=8, max_in_flight=32)
    path = stream_file(tmp_path / "stream.json", spec)
    # 0.1 s per predict call: while it runs, up to 32 messages are in flight
    replica = procs.start("replica", "stream", "run", "-f", str(path), "--model-uri", f"{models}:SlowerDouble",
                          "--runtime-kind", "python")
    await until(lambda: _at_least(js, streams, 24), "the first results", timeout=60, logs=procs.logs)
    replica.signal(signal.SIGTERM)
    assert replica.wait(60) == 0, replica.output()

    info = await js.consumer_info(streams.source, "scorers")
    results = await nats_stored(js, streams.sink)
    # everything read was finished and acknowledged, and each acknowledged message has its result
    assert info.num_ack_pending == 0, info
    assert info.delivered.stream_seq == info.ack_floor.stream_seq
    assert len(results) == info.ack_floor.stream_seq < n
    assert sorted(int(r.headers["modelgw-source-sequence"]) for r in results) == list(range(1, len(results) + 1))
    assert "draining" in replica.output(), "SIGTERM came while messages were in flight"


async def test_messages_consumed_again_are_stored_once_in_a_nats_sink(
    nats_server: NatsServer, js: Any, procs: Processes, tmp_path: Path
) -> None:
    """What a redelivery does (a replica killed between publishing and acknowledging),
    made certain: the durable is deleted after a full pass, so a second run consumes every
    message again. Its results carry the same Nats-Msg-Id, and JetStream drops them."""
    streams = Streams()
    await streams.create(js)
    n = 200
    for i in range(n):
        await js.publish(streams.subject, json.dumps({"x": [float(i)]}).encode(), headers={"Nats-Msg-Id": f"m-{i}"})
    models = write_models(tmp_path)
    path = stream_file(tmp_path / "stream.json", streams.spec("again", nats_server.url, "double"))
    command = ("stream", "run", "-f", str(path), "--model-uri", f"{models}:Double", "--runtime-kind", "python")

    async def drained() -> bool:
        try:
            info = await js.consumer_info(streams.source, "scorers")
        except NotFoundError:  # the replica has not made the durable yet
            return False
        return info.delivered.stream_seq == n and info.num_pending == 0 and info.num_ack_pending == 0

    for run in ("first", "second"):
        replica = procs.start(run, *command)
        await until(drained, f"{run} run: every message consumed and acknowledged", timeout=60, logs=procs.logs)
        assert replica.terminate(timeout=60) == 0, replica.output()
        await js.delete_consumer(streams.source, "scorers")
    assert await streams.count(js, streams.sink) == n
