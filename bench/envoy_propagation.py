"""Envoy propagation: time from an acknowledged registry write to the first ModelInfer
through the gateway that is routed per the write, for the Envoy and the Python data plane
side by side in one run.

One etcd, one python runtime replica serving an echo model with versions 1 and 2, and two
gateways (--data-plane envoy and --data-plane python) on the same registry. Each change
flips the model's traffic split (100/0 <-> 0/100) through RegistryStore; from the moment
apply_model returned, a tight loop of ModelInfer calls on each gateway's gRPC port reads
response.model_version until it is the newly weighted version. The two planes are
measured alternately (A/B) so machine noise hits both. Prints p50, p99 and max per plane
(the poll loop's own round trip bounds the resolution: also printed), and for Envoy the
gateway's own split: compile+write and Envoy's pick-up (from its log lines, when the
gateway logs them at debug level; otherwise omitted).

    .venv/bin/python bench/envoy_propagation.py                 # 200 changes per plane
    .venv/bin/python bench/envoy_propagation.py --changes 500
    .venv/bin/python bench/envoy_propagation.py --change model  # each change a new model
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from envoy_helpers import gateway_on, infer_request, wait_routed
from gateway_helpers import Fleet, model_spec, runtime_spec

from modelgw.protos import inference_pb2_grpc as pb_grpc
from modelgw.registry.etcd_server import LocalEtcd
from modelgw.registry.store import RegistryStore

ECHO = "tests.gateway_models:Echo"


def split(new: str) -> dict[str, int]:
    return {"1": 100, "2": 0} if new == "1" else {"1": 0, "2": 100}


async def routed_after(
    stub: pb_grpc.GRPCInferenceServiceStub, version: str, deadline: float, model: str = "flip"
) -> tuple[float, int]:
    """Seconds until a ModelInfer of `model` answers from `version` (from now), and the polls
    it took; NOT_FOUND (a model not routed yet) and UNAVAILABLE (a new model its replica has
    not loaded yet: --change model counts the replica's load too) are polled again."""
    message = infer_request(model)
    start = time.perf_counter()
    polls = 0
    while time.perf_counter() - start < deadline:
        polls += 1
        try:
            answer = await stub.ModelInfer(message, timeout=5)
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            continue
        if answer.model_version == version:
            return time.perf_counter() - start, polls
    raise TimeoutError(f"{model} version {version} not routed after {deadline}s")


def envoy_directory(log: Path) -> Path:
    """The Envoy config directory the gateway named in its log."""
    match = re.search(r"; config in (\S+)", log.read_text())
    if match is None:
        raise RuntimeError(f"no envoy config directory in {log}")
    return Path(match.group(1))


async def measure(fleet: Fleet, urls: dict[str, str], changes: int, rds: Path, kind: str) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {plane: [] for plane in urls}
    figures.update({f"{plane} poll round trip": [] for plane in urls})
    # the envoy side split by the routes file's mtime (renamed into place whole): ack -> the
    # supervisor wrote it (watch + compile + write), and written -> first routed (Envoy's
    # pick-up through inotify, plus at most one poll)
    figures.update({"envoy ack -> rds written": [], "envoy rds written -> routed": []})
    channels = {plane: grpc.aio.insecure_channel(url) for plane, url in urls.items()}
    stubs = {plane: pb_grpc.GRPCInferenceServiceStub(channel) for plane, channel in channels.items()}
    try:
        async with RegistryStore(fleet.etcd, prefix=fleet.prefix) as store:
            version = "1"
            for i in range(changes):
                for plane in list(urls) if i % 2 == 0 else list(urls)[::-1]:  # A/B alternation
                    version = "2" if version == "1" else "1"
                    # warm the channel so the first poll is not a connect
                    await stubs[plane].ModelInfer(infer_request("flip"), timeout=5)
                    if kind == "split":
                        model, spec = "flip", model_spec("flip", "py", "python", {"1": ECHO, "2": ECHO}, split(version))
                    else:  # a new model: new clusters (CDS, EDS, warming) before its route
                        model, version = f"new-{plane}-{i}", "1"
                        spec = model_spec(model, "py", "python", {"1": ECHO})
                    await store.apply_model(spec)
                    acknowledged = time.time()
                    took, polls = await routed_after(stubs[plane], version, 10.0, model)
                    if plane == "envoy":
                        written = rds.stat().st_mtime_ns / 1e9
                        figures["envoy ack -> rds written"].append(max(0.0, written - acknowledged))
                        figures["envoy rds written -> routed"].append(max(0.0, acknowledged + took - written))
                    figures[plane].append(took)
                    figures[f"{plane} poll round trip"].append(took / polls)
                    # the other plane must also settle before its own turn (its view is
                    # the same etcd watch's): wait, unmeasured
                    for other in urls:
                        if other != plane:
                            await routed_after(stubs[other], version, 10.0, model)
    finally:
        for channel in channels.values():
            await channel.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=200, help="registry changes per data plane")
    parser.add_argument(
        "--change",
        choices=("split", "model"),
        default="split",
        help="split: flip a model's traffic 100/0 <-> 0/100 (routes only); model: add a new model (clusters and routes)",
    )
    args = parser.parse_args()
    local = LocalEtcd().start()
    workdir = Path(tempfile.mkdtemp(prefix="modelgw-envoy-propagation-"))
    fleet = Fleet(local.endpoint, "/modelgw-bench/envoy-propagation/", workdir)
    try:
        fleet.apply(
            runtime_spec("py", "python", ["python"]),
            model_spec("flip", "py", "python", {"1": ECHO, "2": ECHO}, split("1")),
        )
        fleet.replica("py", "python", lease_ttl=30)
        gateways = {plane: gateway_on(fleet, plane) for plane in ("envoy", "python")}
        urls = {plane: gateway.grpc_url for plane, gateway in gateways.items()}
        for url in urls.values():
            wait_routed(url, "flip", "1")
            wait_routed(url, "flip", "2")
        rds = envoy_directory(fleet.logs / "gateway-0.log") / "rds.json"
        figures = asyncio.run(measure(fleet, urls, args.changes, rds, args.change))
    finally:
        fleet.close()
        local.cleanup()
    print(f"ack -> first ModelInfer routed per the change ({args.change}; {args.changes} changes per plane; logs in {workdir})")
    for name, seconds in figures.items():
        ms = sorted(x * 1000 for x in seconds)
        p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
        print(f"{name:>26}: n={len(ms)}  p50 {statistics.median(ms):7.2f} ms  p99 {p99:7.2f} ms  max {ms[-1]:7.2f} ms")


if __name__ == "__main__":
    main()
