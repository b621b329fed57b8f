"""LLM serving throughput and latency: modelgw's `llm` runtime vs transformers' generate.

Both run the same locally generated checkpoint (default: a random Llama with 8 layers,
hidden 512, 8 heads, 4 KV heads, vocab 4096, written by `modelgw llm make-checkpoint`),
in float32 on the CPU with the same torch intra-op threads, on the same prompts, greedy,
with exactly --max-tokens new tokens per request (eos ignored), and the first request's
tokens are checked to be identical on both sides.

- modelgw: a real `modelgw runtime serve --kind llm` process, driven over gRPC
  ModelStreamInfer (one stream call per request, `triton_enable_empty_final_response`, so
  every chunk leaves as soon as it exists) by N concurrent closed-loop workers on one
  grpc.aio channel, at concurrency 1, 4 and 16. The runtime batches them continuously.
- transformers: `model.generate` in this process, one request after the other (what it
  can do without a serving layer).
- with --in-process: also our engine driven in this process (AsyncEngine, no gRPC), which
  separates the engine's cost from the serving path's.

The measurement is split into --rounds rounds; each round runs a share of every row's
requests (transformers, then each concurrency level), so drift in the machine's load
(other work on a shared machine) hits all rows alike. Figures pool the rounds.

Per row: output tokens/s (all output tokens / wall time of the level), time to first token
p50/p99 (request sent -> first token received), inter-token latency p50/p99 (gap between
consecutive streamed chunks; with `tok/chunk` > 1 the client fell behind and a chunk
carried several tokens). Timings are the client's, loopback gRPC included for modelgw.

Run from the repository root (about 2-3 minutes on 2 cores):

    .venv/bin/python bench/llm_throughput.py
    .venv/bin/python bench/llm_throughput.py --threads 2 --concurrency 1,4,16 --max-tokens 128

Every phase is bounded (--level-seconds); the runtime process is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from modelgw.net import free_port

REPO = Path(__file__).resolve().parent.parent

PROMPTS = [
    "A model gateway routes every request to a runtime that has the model loaded, and the runtime",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun of the afternoon",
    "Continuous batching lets new requests join the running batch at every step, so the",
    "The key value cache holds the attention keys and values of every sequence that is running, and",
    "Hello world! How are you today? I am fine, thank you. What is the weather like in the",
    "Each replica registers an endpoint under a lease that expires when the replica dies, so the",
    "Greedy decoding always takes the most likely next token, while sampling draws from the",
    "Load figures tell the gateway how busy each replica is, so it can route the next request to",
]


@dataclass
class RequestTiming:
    sent: float
    prompt: int = -1  # index into PROMPTS
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in it)
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def ttft(self) -> float | None:
        for arrival, n in self.chunks:
            if n:
                return arrival - self.sent
        return None

    def gaps(self) -> list[float]:
        times = [t for t, n in self.chunks if n]
        return [b - a for a, b in itertools.pairwise(times)]


@dataclass
class Row:
    name: str
    concurrency: int
    timings: list[RequestTiming] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, timings: list[RequestTiming], seconds: float) -> None:
        self.timings += timings
        self.seconds += seconds

    def line(self) -> str:
        tokens = sum(t.tokens for t in self.timings)
        ttfts = [x for t in self.timings if (x := t.ttft()) is not None]
        gaps = [g for t in self.timings for g in t.gaps()]
        chunks = sum(len([c for c in t.chunks if c[1]]) for t in self.timings)
        return (f"{self.name:<24}{self.concurrency:>5}{len(self.timings):>6}{tokens:>8}"
                f"{tokens / self.seconds:>10.1f}{_ms(ttfts, 50):>10}{_ms(ttfts, 99):>10}"
                f"{_ms(gaps, 50):>9}{_ms(gaps, 99):>9}{tokens / max(chunks, 1):>10.2f}")

    @property
    def tokens_per_second(self) -> float:
        return sum(t.tokens for t in self.timings) / self.seconds


HEADER = (f"{'':<24}{'conc':>5}{'reqs':>6}{'tokens':>8}{'tok/s':>10}{'TTFT p50':>10}{'p99':>10}"
          f"{'ITL p50':>9}{'p99':>9}{'tok/chunk':>10}")


def _ms(values: list[float], q: int) -> str:
    if not values:
        return "-"
    return f"{np.percentile(values, q) * 1000:.1f}ms"


# -- modelgw: a runtime process over gRPC streaming --------------------------------------------


class RuntimeProcess:
    def __init__(self, checkpoint: Path, threads: int, max_num_seqs: int, log: Path, extra: list[str]) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelgw", "--log-level", "WARNING", "runtime", "serve", "--kind", "llm",
             "--model", f"bench={checkpoint}", "--port", str(self.port),
             "--option", f"threads={threads}", "--option", f"max_num_seqs={max_num_seqs}",
             "--option", "max_num_batched_tokens=512", "--option", "max_model_len=2048", *extra],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO,  # noqa: SIM115 (the child holds it)
        )

    async def wait_ready(self, timeout: float = 120.0) -> None:
        from modelgw.protos import inference_pb2 as pb
        from modelgw.protos import inference_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the runtime exited:\n{self.log.read_text(errors='replace')}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if (await stub.ModelReady(pb.ModelReadyRequest(name="bench"), timeout=1)).ready:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError("the runtime did not get ready")
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stream_request(prompt: str, max_tokens: int):
    from modelgw.oip.codec import add_input, set_parameter
    from modelgw.protos import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name="bench")
    add_input(request, "text_input", np.array([prompt.encode()], dtype=object), "BYTES")
    for key, value in {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                       "triton_enable_empty_final_response": True}.items():
        set_parameter(request.parameters, key, value)
    request.outputs.add(name="text_output")
    request.outputs.add(name="token_ids")
    return request


async def closed_loop(concurrency: int, requests: int, level_seconds: float, one) -> tuple[list[RequestTiming], float]:
    """`concurrency` workers each running `one(index)` back to back until `requests` are done."""
    timings: list[RequestTiming] = []
    next_index = 0
    started = time.perf_counter()
    deadline = started + level_seconds

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            timings.append(await one(index))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timings, time.perf_counter() - started


async def run_modelgw_level(port: int, concurrency: int, requests: int, max_tokens: int,
                            level_seconds: float, first_index: int = 0) -> tuple[list[RequestTiming], float]:
    from modelgw.oip.codec import decode_response_outputs
    from modelgw.protos import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
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
                    ids = decode_response_outputs(response)["token_ids"]
                    timing.chunks.append((now, len(ids)))
                    timing.token_ids.extend(int(i) for i in ids)
                if response.parameters["triton_final_response"].bool_param:
                    break
            return timing

        return await closed_loop(concurrency, requests, level_seconds, one)


async def run_engine_level(engine, tokenizer, concurrency: int, requests: int, max_tokens: int,
                           level_seconds: float, first_index: int = 0) -> tuple[list[RequestTiming], float]:
    """The same load on an in-process AsyncEngine (no gRPC, no protobuf)."""
    from modelgw.runtimes.llm.engine import GenerationRequest
    from modelgw.runtimes.llm.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(index: int) -> RequestTiming:
        prompt = PROMPTS[(first_index + index) % len(PROMPTS)]
        request = GenerationRequest(f"bench-{first_index}-{index}-{time.monotonic_ns()}",
                                    tuple(tokenizer.encode(prompt)), params)
        timing = RequestTiming(time.perf_counter(), (first_index + index) % len(PROMPTS))
        async for output in engine.generate(request):
            timing.chunks.append((time.perf_counter(), len(output.token_ids)))
            timing.token_ids.extend(output.token_ids)
        return timing

    return await closed_loop(concurrency, requests, level_seconds, one)


# -- transformers: sequential generate -------------------------------------------------------


class Streamer:
    """transformers' streamer protocol: put() gets the prompt first, then each new token."""

    def __init__(self, timing: RequestTiming) -> None:
        self.timing = timing
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.timing.chunks.append((time.perf_counter(), len(ids)))
        self.timing.token_ids.extend(ids)

    def end(self) -> None:
        pass


def run_transformers(model, tokenizer_encode, indices: list[int], max_tokens: int) -> list[RequestTiming]:
    import torch

    timings = []
    for index in indices:
        ids = torch.tensor([tokenizer_encode(PROMPTS[index % len(PROMPTS)])])
        timing = RequestTiming(time.perf_counter(), index % len(PROMPTS))
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, streamer=Streamer(timing))
        timings.append(timing)
    return timings


# -- main ------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from modelgw.runtimes.llm.make_checkpoint import make_checkpoint

        checkpoint = make_checkpoint(workdir / "checkpoint", layers=args.layers, hidden=args.hidden, heads=args.heads,
                                     kv_heads=args.kv_heads, vocab=args.vocab, seed=0)
    from transformers import AutoModelForCausalLM

    from modelgw.runtimes.llm.checkpoint import Checkpoint

    tokenizer = Checkpoint.open(checkpoint).tokenizer
    config = Checkpoint.open(checkpoint).config
    print(f"checkpoint {checkpoint}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv heads, vocab {config.vocab_size}; float32, "
          f"{args.threads} torch threads; prompts ~{len(tokenizer.encode(PROMPTS[0]))} tokens, "
          f"{args.max_tokens} new tokens each (greedy, eos ignored)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    levels = [int(c) for c in args.concurrency.split(",")]
    rounds = max(1, args.rounds)
    hf_row = Row("transformers generate", 1)
    rows = {c: Row("modelgw llm (gRPC)", c) for c in levels}
    engine_rows = {c: Row("modelgw engine (in-proc)", c) for c in levels} if args.in_process else {}
    engine = None
    if args.in_process:
        from modelgw.runtimes.llm.async_engine import AsyncEngine
        from modelgw.runtimes.llm.engine import EngineConfig, TorchEngine

        engine = AsyncEngine(TorchEngine(Checkpoint.open(checkpoint), EngineConfig(
            device="cpu", max_num_seqs=max(levels), max_num_batched_tokens=512, max_model_len=2048)), "bench")
    runtime = RuntimeProcess(checkpoint, args.threads, max(levels), workdir / "runtime.log", args.runtime_arg)
    try:
        await runtime.wait_ready()
        await run_modelgw_level(runtime.port, 2, 2, 8, 60)  # warm-up
        for r in range(rounds):
            share = [i for i in range(args.hf_requests) if i % rounds == r]
            print(f"round {r + 1}/{rounds}: transformers ({len(share)} requests) ...", flush=True)
            started = time.perf_counter()
            hf_row.add(run_transformers(model, tokenizer.encode, share, args.max_tokens),
                       time.perf_counter() - started)
            for concurrency in levels:
                requests = max(concurrency * args.requests_per_worker, args.min_requests) // rounds
                print(f"round {r + 1}/{rounds}: modelgw, concurrency {concurrency} ({requests} requests) ...",
                      flush=True)
                rows[concurrency].add(*await run_modelgw_level(
                    runtime.port, concurrency, requests, args.max_tokens, args.level_seconds, r * requests))
                if engine is not None:
                    engine_rows[concurrency].add(*await run_engine_level(
                        engine, tokenizer, concurrency, requests, args.max_tokens, args.level_seconds, r * requests))
    finally:
        runtime.stop()
        if engine is not None:
            engine.shutdown()

    # the same checkpoint, the same greedy tokens on both sides (else the comparison is moot)
    # compared by prompt, not by position: at concurrency > 1 requests finish out of order
    ours = next((t for t in rows[levels[0]].timings if t.prompt == 0), None)
    theirs = next((t for t in hf_row.timings if t.prompt == 0), None)
    same = ours is not None and theirs is not None and ours.token_ids == theirs.token_ids

    print()
    print(HEADER)
    print(hf_row.line())
    for row in [*rows.values(), *engine_rows.values()]:
        print(row.line())
    print()
    print(f"first prompt, greedy tokens identical on both sides: {'yes' if same else 'NO'}")
    for row in [*rows.values(), *engine_rows.values()]:
        print(f"{row.name} at concurrency {row.concurrency}: "
              f"{row.tokens_per_second / hf_row.tokens_per_second:.1f}x transformers' sequential tokens/s")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="an existing checkpoint directory")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides (default 2)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument("--requests-per-worker", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--hf-requests", type=int, default=4, help="transformers requests in all (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds (default 2)")
    parser.add_argument("--in-process", action="store_true", help="also drive our engine in this process")
    parser.add_argument("--level-seconds", type=float, default=90.0, help="no new requests after this per level")
    parser.add_argument("--runtime-arg", action="append", default=[], help="extra `runtime serve` argument")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as workdir:
        return asyncio.run(main_async(args, Path(workdir)))


if __name__ == "__main__":
    sys.exit(main())
