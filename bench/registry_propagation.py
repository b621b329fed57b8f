"""Registry propagation: time from an acknowledged write to the watch cache holding it.

One process writes N model updates through RegistryStore (each a validated, guarded etcd
transaction) and follows them with a RegistryView over its own connection. For each
write, the latency is from the moment apply_model returned (the write is acknowledged)
to the moment the view published a snapshot containing that revision; if the view got
there first (its watch event can overtake the transaction's reply), it is 0. Also shown:
the write's own round trip, and write sent -> view holding it. Prints p50, p99 and max.

    .venv/bin/python bench/registry_propagation.py               # starts its own etcd
    .venv/bin/python bench/registry_propagation.py --etcd 127.0.0.1:2379 --writes 1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.etcd_server import LocalEtcd
from modelgw.registry.store import RegistryStore
from modelgw.registry.view import RegistryView


async def measure(endpoint: str, writes: int) -> dict[str, list[float]]:
    prefix = f"/modelgw-bench/{uuid.uuid4().hex[:8]}/"
    seen_at: dict[int, float] = {}
    async with (
        RegistryStore(endpoint, prefix=prefix) as writer,
        RegistryStore(endpoint, prefix=prefix) as reader,
    ):
        await writer.apply_runtime(
            rpb.RuntimeSpec(name="torch", kind="pytorch", model_formats=["torchscript"])
        )
        view = await RegistryView(reader).start()
        view.subscribe(
            lambda changes: seen_at.update((c.revision, time.perf_counter()) for c in changes)
        )
        spec = rpb.ModelSpec(
            name="bench",
            versions=[
                rpb.ModelVersion(version="1", uri="/m/1", format="torchscript", runtime="torch")
            ],
        )
        after_ack, round_trip, end_to_end = [], [], []
        for i in range(writes):
            spec.description = str(i)
            sent = time.perf_counter()
            revision = (await writer.apply_model(spec)).record.revision
            acknowledged = time.perf_counter()
            await view.wait_for_revision(revision, timeout=10)
            after_ack.append(max(0.0, seen_at[revision] - acknowledged))
            round_trip.append(acknowledged - sent)
            end_to_end.append(seen_at[revision] - sent)
        await view.stop()
        await writer.etcd.delete(writer.keys.root, writer.keys.root[:-1] + b"0")
    return {
        "ack -> view": after_ack,
        "write round trip": round_trip,
        "sent -> view": end_to_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", help="HOST:PORT of an etcd to use (default: start a private one)")
    parser.add_argument("--writes", type=int, default=1000)
    args = parser.parse_args()
    local = None if args.etcd else LocalEtcd().start()
    try:
        figures = asyncio.run(measure(args.etcd or local.endpoint, args.writes))
    finally:
        if local:
            local.cleanup()
    for name, seconds in figures.items():
        ms = sorted(x * 1000 for x in seconds)
        p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
        print(
            f"{name:>17}: n={len(ms)}  p50 {statistics.median(ms):6.2f} ms  p99 {p99:6.2f} ms  max {ms[-1]:6.2f} ms"
        )


if __name__ == "__main__":
    main()
