"""LLM replica choice: time to first token over two replicas at concurrency 32, the
gateway's load-aware choice vs its previous one (outstanding requests), in one run.

Everything is started here and stopped on exit: a private etcd (LocalEtcd), the registry
records, two `modelgw runtime serve --kind llm` replicas of one runtime (a checkpoint
written by `modelgw llm make-checkpoint`), and two `modelgw gateway` processes over the
same registry and replicas: one with `--llm-replica-choice load` (the default), one with
`--llm-replica-choice outstanding` (power of two choices on this gateway's outstanding
requests, what every LLM request got before).

The fleet is shared, as it is with several gateway replicas: replica A also serves
--background closed-loop streams sent to it directly (another gateway's traffic, which
this gateway's own counts cannot see; its load figures do). Each --rounds round runs
--requests streamed generations (ModelStreamInfer, one stream per request, --max-tokens
new tokens, eos ignored) at --concurrency through one gateway, then the other, so drift
in the machine's load hits both alike. TTFT is the client's: request sent -> first token
received. The share of the measured requests each gateway sent to replica A is read from
its `modelgw_llm_replica_picks_total`.

Run from the repository root (a few minutes on 2 cores):

    .venv/bin/python bench/llm_routing.py
    .venv/bin/python bench/llm_routing.py --rounds 2 --requests 64 --background 12
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from llm_throughput import PROMPTS, RequestTiming, closed_loop, stream_request  # noqa: E402  (a sibling script)

from modelgw.net import free_port  # noqa: E402
from modelgw.protos import registry_pb2 as rpb  # noqa: E402
from modelgw.registry.etcd_server import LocalEtcd  # noqa: E402
from modelgw.registry.store import RegistryStore  # noqa: E402

REPO = BENCH_DIR.parent
MODEL = "bench"  # the name llm_throughput.stream_request asks for
RUNTIME = "llm"
PREFIX = "/modelgw-bench-llm-routing/"


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "modelgw", "--log-level", "WARNING", *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Gateway:
    def __init__(self, etcd: str, choice: str, log: Path) -> None:
        self.choice = choice
        self.grpc_port, self.http_port = free_port(), free_port()
        self.process = spawn(
            ["gateway", "--etcd", etcd, "--prefix", PREFIX, "--host", "127.0.0.1", "--insecure-no-auth",
             "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
             "--llm-replica-choice", choice], log,
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as answer:
            return answer.read().decode()

    def picks(self, instance: str) -> float:
        pattern = re.compile(rf'^modelgw_llm_replica_picks_total\{{[^}}]*instance="{re.escape(instance)}"[^}}]*\}} (\S+)$')
        return sum(float(m.group(1)) for line in self.metrics().splitlines() if (m := pattern.match(line)))


async def until_ready(gateways: list[Gateway], store: RegistryStore, timeout: float = 300.0) -> dict[str, str]:
    """instance -> address once both replicas are ready and both gateways answer for the model."""
    import grpc

    from modelgw.protos import inference_pb2 as pb
    from modelgw.protos import inference_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    while True:
        eps = (await store.list_endpoints()).endpoints
        ready = {ep.instance: ep.address for ep in eps if ep.ready and any(
            m.state == rpb.LoadedModel.READY for m in ep.models)}
        answering = 0
        for gateway in gateways:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    answering += (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=2)).ready
        if len(ready) == 2 and answering == len(gateways):
            return ready
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout:.0f}s: replicas {ready}, gateways answering {answering}")
        await asyncio.sleep(0.5)


async def drive(address: str, concurrency: int, requests: int, max_tokens: int, seconds: float,
                first_index: int = 0) -> list[RequestTiming]:
    import grpc

    from modelgw.oip.codec import decode_response_outputs
    from modelgw.protos import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(index: int) -> RequestTiming:
            prompt = PROMPTS[(first_index + index) % len(PROMPTS)]
            timing = RequestTiming(time.perf_counter(), (first_index + index) % len(PROMPTS))
            async for message in stub.ModelStreamInfer(iter([stream_request(prompt, max_tokens)])):
                now = time.perf_counter()
                if message.error_message:
                    raise RuntimeError(message.error_message)
                response = message.infer_response
                if response.outputs:
                    timing.chunks.append((now, len(decode_response_outputs(response)["token_ids"])))
                if response.parameters["triton_final_response"].bool_param:
                    break
            return timing

        timings, _ = await closed_loop(concurrency, requests, seconds, one)
        return timings


async def background(address: str, workers: int, max_tokens: int, stop_event: asyncio.Event) -> int:
    """Closed-loop streams straight to one replica until told to stop; how many finished."""
    done = 0

    async def loop(i: int) -> None:
        nonlocal done
        while not stop_event.is_set():
            await drive(address, 1, 1, max_tokens, 3600.0, first_index=i)
            done += 1

    tasks = [asyncio.create_task(loop(i)) for i in range(workers)]
    await stop_event.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return done


def ms(values: list[float], q: int) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}ms" if values else "-"


async def main_async(args: argparse.Namespace, workdir: Path, checkpoint: Path) -> int:
    processes: list[subprocess.Popen] = []
    with LocalEtcd(data_dir=workdir / "etcd") as etcd:
        async with RegistryStore(etcd.endpoint, prefix=PREFIX) as store:
            await store.apply_runtime(rpb.RuntimeSpec(name=RUNTIME, kind="llm", model_formats=["hf-llama"], replicas=2))
            spec = rpb.ModelSpec(name=MODEL)
            spec.versions.add(version="1", uri=str(checkpoint), format="hf-llama", runtime=RUNTIME)
            await store.apply_model(spec)
            try:
                for name in ("a", "b"):
                    processes.append(spawn(
                        ["runtime", "serve", "--kind", "llm", "--registry", etcd.endpoint, "--prefix", PREFIX,
                         "--runtime", RUNTIME, "--instance", f"llm-{name}", "--port", "0", "--host", "127.0.0.1",
                         "--option", f"threads={args.threads}", "--option", f"max_num_seqs={args.max_num_seqs}"],
                        workdir / f"runtime-{name}.log",
                    ))
                gateways = [Gateway(etcd.endpoint, choice, workdir / f"gateway-{choice}.log")
                            for choice in ("load", "outstanding")]
                processes += [g.process for g in gateways]
                addresses = await until_ready(gateways, store)
                busy = "llm-a"
                print(f"replicas: {addresses}; background: {args.background} streams of {args.background_tokens} "
                      f"tokens straight to {busy}", flush=True)
                stop_event = asyncio.Event()
                load = asyncio.create_task(background(addresses[busy], args.background, args.background_tokens, stop_event))
                await asyncio.sleep(args.warmup)  # the background load shows in A's record
                timings: dict[str, list[RequestTiming]] = {g.choice: [] for g in gateways}
                to_busy: dict[str, float] = dict.fromkeys(timings, 0.0)
                for round_index in range(args.rounds):
                    for gateway in gateways:
                        before = gateway.picks(busy)
                        got = await drive(f"127.0.0.1:{gateway.grpc_port}", args.concurrency, args.requests,
                                          args.max_tokens, args.round_seconds, first_index=round_index)
                        timings[gateway.choice] += got
                        to_busy[gateway.choice] += gateway.picks(busy) - before
                        ttfts = [x for t in got if (x := t.ttft()) is not None]
                        print(f"  round {round_index + 1} {gateway.choice:<12} {len(got)} requests, TTFT p50 "
                              f"{ms(ttfts, 50)} p99 {ms(ttfts, 99)}", flush=True)
                stop_event.set()
                finished = await load
            finally:
                for process in processes:
                    stop(process)
    print(f"\nconcurrency {args.concurrency} over 2 replicas, {args.max_tokens} tokens per request; replica A also "
          f"serving {args.background} direct streams ({finished} finished during the run)")
    print(f"{'choice':<14}{'reqs':>6}{'TTFT p50':>10}{'p99':>10}{'ITL p50':>9}{'to A':>8}")
    for choice, got in timings.items():
        ttfts = [x for t in got if (x := t.ttft()) is not None]
        gaps = [g for t in got for g in t.gaps()]
        share = to_busy[choice] / max(1, len(got))
        print(f"{choice:<14}{len(got):>6}{ms(ttfts, 50):>10}{ms(ttfts, 99):>10}{ms(gaps, 50):>9}{share:>8.0%}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96, help="measured requests per gateway per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-seconds", type=float, default=120.0, help="bound on one round of one gateway")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--background", type=int, default=40, help="direct streams kept on replica A (beyond its batch)")
    parser.add_argument("--background-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-num-seqs", type=int, default=32, help="each replica's running batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llm-routing-"))
    try:
        checkpoint = workdir / "ckpt"
        subprocess.run(
            [sys.executable, "-m", "modelgw", "llm", "make-checkpoint", str(checkpoint), "--layers", str(args.layers),
             "--hidden", str(args.hidden), "--seed", "3"], check=True, cwd=REPO, capture_output=True,
        )
        return asyncio.run(main_async(args, workdir, checkpoint))
    finally:
        if args.keep_logs:
            print(f"logs in {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
