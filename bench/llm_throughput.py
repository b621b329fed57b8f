"""LLM serving throughput and latency: modelgw's `llm` runtime, per engine, vs transformers' generate.

All run the same locally generated checkpoint (default: a random Llama with 8 layers,
hidden 512, 8 heads, 4 KV heads, vocab 4096, written by `modelgw llm make-checkpoint`)
on the CPU with the same torch intra-op threads, on the same prompts, greedy, with exactly
--max-tokens new tokens per request (eos ignored).

The systems compared (--variants, default all four):
- `torch`: a real `modelgw runtime serve --kind llm` process with `engine=torch`, float32;
- `onnxruntime`: the same with `engine=onnxruntime` (the exported step graph, float32);
- `int8`: the same with `engine=torch`, `quantization=int8` (weight-only int8);
- `transformers`: `model.generate` in this process, float32, one request after the other
  (what it can do without a serving layer).
Each runtime process is driven over gRPC ModelStreamInfer (one stream call per request,
`triton_enable_empty_final_response`, so every chunk leaves as soon as it exists) by N
concurrent closed-loop workers on one grpc.aio channel, at each --concurrency level. The
runtime batches them continuously. With --in-process the same engines are also driven in
this process (AsyncEngine, no gRPC), which separates the engine's cost from the serving
path's. All engines get the same KV cache size (--kv-cache-mb), enough for the load.

Greedy check, per engine (on the lowest concurrency level's requests): the fp32 engines'
tokens for the first prompt must be identical to fp32's reference (transformers where it
runs, else engine=torch), or the run fails. int8 is not expected to be identical: its
agreement with fp32 is reported (tokens equal up to the first difference, over the prompts
both have run) and does not fail the run.

The measurement is split into --rounds rounds; each round runs a share of every row's
requests (transformers, then each concurrency level for each engine in turn), so drift in
the machine's load (other work on a shared machine) hits all rows alike. Figures pool the
rounds.

Per row: output tokens/s (all output tokens / wall time of the level), time to first token
p50/p99 (request sent -> first token received), inter-token latency p50/p99 (gap between
consecutive streamed chunks; with `tok/chunk` > 1 the client fell behind and a chunk
carried several tokens). Timings are the client's, loopback gRPC included for modelgw.

Run from the repository root (several minutes on 2 cores with all four variants):

    .venv/bin/python bench/llm_throughput.py
    .venv/bin/python bench/llm_throughput.py --variants torch,int8 --concurrency 16,64 --max-tokens 128

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


@dataclass(frozen=True)
class Variant:
    """One of our engines as a runtime serves it: a row label and its `--option`s."""

    label: str
    engine: str
    quantization: str = "none"

    @property
    def exact(self) -> bool:
        """Greedy tokens must equal fp32's (int8 weights change the logits, so not for them)."""
        return self.quantization == "none"

    def options(self) -> list[str]:
        dtype = ["dtype=float32"] if self.quantization == "none" else []  # int8: weights int8, activations fp32
        return [f"engine={self.engine}", "device=cpu", f"quantization={self.quantization}", *dtype]


VARIANTS = {
    "torch": Variant("torch fp32", "torch"),
    "onnxruntime": Variant("onnxruntime fp32", "onnxruntime"),
    "int8": Variant("torch int8", "torch", "int8"),
}
ALL_VARIANTS = [*VARIANTS, "transformers"]

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
        return (f"{self.name:<30}{self.concurrency:>5}{len(self.timings):>6}{tokens:>8}"
                f"{tokens / self.seconds:>10.1f}{_ms(ttfts, 50):>10}{_ms(ttfts, 99):>10}"
                f"{_ms(gaps, 50):>9}{_ms(gaps, 99):>9}{tokens / max(chunks, 1):>10.2f}")

    @property
    def tokens_per_second(self) -> float:
        return sum(t.tokens for t in self.timings) / self.seconds


HEADER = (f"{'':<30}{'conc':>5}{'reqs':>6}{'tokens':>8}{'tok/s':>10}{'TTFT p50':>10}{'p99':>10}"
          f"{'ITL p50':>9}{'p99':>9}{'tok/chunk':>10}")


def _ms(values: list[float], q: int) -> str:
    if not values:
        return "-"
    return f"{np.percentile(values, q) * 1000:.1f}ms"


# -- modelgw: a runtime process over gRPC streaming --------------------------------------------


class RuntimeProcess:
    def __init__(self, checkpoint: Path, threads: int, max_num_seqs: int, kv_cache_mb: float, log: Path,
                 extra: list[str]) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelgw", "--log-level", "WARNING", "runtime", "serve", "--kind", "llm",
             "--model", f"bench={checkpoint}", "--port", str(self.port),
             "--option", f"threads={threads}", "--option", f"max_num_seqs={max_num_seqs}",
             "--option", "max_num_batched_tokens=512", "--option", "max_model_len=2048",
             "--option", f"kv_cache_mb={kv_cache_mb:g}", *extra],
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


def first_by_prompt(timings: list[RequestTiming]) -> dict[int, list[int]]:
    """The greedy tokens of each prompt's first finished request (requests finish out of order)."""
    tokens: dict[int, list[int]] = {}
    for timing in timings:
        tokens.setdefault(timing.prompt, timing.token_ids)
    return tokens


def agreement(ours: dict[int, list[int]], reference: dict[int, list[int]]) -> tuple[int, int, int, int]:
    """Over the prompts both ran: (tokens equal up to the first difference, tokens compared,
    prompts identical, prompts compared). After a difference the contexts differ, so later
    tokens say nothing of the weights."""
    agreed = compared = identical = 0
    prompts = sorted(ours.keys() & reference.keys())
    for prompt in prompts:
        a, b = ours[prompt], reference[prompt]
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        agreed += same
        compared += max(len(a), len(b))
        identical += a == b
    return agreed, compared, identical, len(prompts)


def kv_cache_mb(config, concurrency: int, max_tokens: int, prompt_tokens: int, block_size: int = 16) -> float:
    """MiB of fp32 KV cache for `concurrency` sequences of prompt + max_tokens (+ a block of slack each)."""
    tokens_per_sequence = -(-(prompt_tokens + max_tokens) // block_size) * block_size + block_size
    return concurrency * tokens_per_sequence * config.kv_bytes_per_token * 4 / 2**20


async def main_async(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from modelgw.runtimes.llm.make_checkpoint import make_checkpoint

        checkpoint = make_checkpoint(workdir / "checkpoint", layers=args.layers, hidden=args.hidden, heads=args.heads,
                                     kv_heads=args.kv_heads, vocab=args.vocab, seed=0)
    from modelgw.runtimes.llm.checkpoint import Checkpoint

    tokenizer = Checkpoint.open(checkpoint).tokenizer
    config = Checkpoint.open(checkpoint).config
    levels = [int(c) for c in args.concurrency.split(",")]
    longest_prompt = max(len(tokenizer.encode(p)) for p in PROMPTS)
    cache_mb = args.kv_cache_mb or kv_cache_mb(config, max(levels), args.max_tokens, longest_prompt)
    names = args.variants
    variants = {name: VARIANTS[name] for name in names if name in VARIANTS}
    print(f"checkpoint {checkpoint}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv heads, vocab {config.vocab_size}; "
          f"{args.threads} torch threads; prompts ~{len(tokenizer.encode(PROMPTS[0]))} tokens, "
          f"{args.max_tokens} new tokens each (greedy, eos ignored); KV cache {cache_mb:.0f} MiB per engine; "
          f"variants: {', '.join(names)}", flush=True)
    model = None
    if "transformers" in names:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    rounds = max(1, args.rounds)
    hf_row = Row("transformers generate fp32", 1)
    rows = {(name, c): Row(f"{v.label} (gRPC)", c) for name, v in variants.items() for c in levels}
    engine_rows = ({(name, c): Row(f"{v.label} (in-proc)", c) for name, v in variants.items() for c in levels}
                   if args.in_process else {})
    engines = {}
    runtimes: dict[str, RuntimeProcess] = {}
    try:
        if args.in_process:
            from modelgw.runtimes.llm.async_engine import AsyncEngine
            from modelgw.runtimes.llm.engine import EngineConfig, create_engine

            for name, v in variants.items():
                engines[name] = AsyncEngine(create_engine(Checkpoint.open(checkpoint), EngineConfig(
                    engine=v.engine, device="cpu", dtype="float32" if v.exact else "auto", quantization=v.quantization,
                    max_num_seqs=max(levels), max_num_batched_tokens=512, max_model_len=2048,
                    kv_cache_bytes=int(cache_mb * 2**20))), f"bench-{name}")
        # all started at once (loading overlaps); idle ones cost nothing while another is measured
        for name, v in variants.items():
            runtimes[name] = RuntimeProcess(checkpoint, args.threads, max(levels), cache_mb,
                                            workdir / f"runtime-{name}.log",
                                            [arg for o in v.options() for arg in ("--option", o)] + args.runtime_arg)
        for runtime in runtimes.values():
            await runtime.wait_ready()
            await run_modelgw_level(runtime.port, 2, 2, 8, 60)  # warm-up
        for r in range(rounds):
            if model is not None:
                share = [i for i in range(args.hf_requests) if i % rounds == r]
                print(f"round {r + 1}/{rounds}: transformers ({len(share)} requests) ...", flush=True)
                started = time.perf_counter()
                hf_row.add(run_transformers(model, tokenizer.encode, share, args.max_tokens),
                           time.perf_counter() - started)
            for concurrency in levels:
                requests = max(concurrency * args.requests_per_worker, args.min_requests) // rounds
                for name, runtime in runtimes.items():
                    print(f"round {r + 1}/{rounds}: {VARIANTS[name].label}, concurrency {concurrency} "
                          f"({requests} requests) ...", flush=True)
                    rows[name, concurrency].add(*await run_modelgw_level(
                        runtime.port, concurrency, requests, args.max_tokens, args.level_seconds, r * requests))
                    if name in engines:
                        engine_rows[name, concurrency].add(*await run_engine_level(
                            engines[name], tokenizer, concurrency, requests, args.max_tokens, args.level_seconds,
                            r * requests))
    finally:
        for runtime in runtimes.values():
            runtime.stop()
        for engine in engines.values():
            if engine.shutdown():
                engine.engine.close()

    print()
    print(HEADER)
    if model is not None:
        print(hf_row.line())
    for row in [*rows.values(), *engine_rows.values()]:
        print(row.line())
    print()
    # greedy tokens per engine, from its lowest concurrency level, against fp32's reference:
    # transformers where it ran, else engine=torch fp32 (else the comparison is moot)
    if model is not None:
        reference_name, reference = "transformers", first_by_prompt(hf_row.timings)
    elif "torch" in variants:
        reference_name, reference = "torch fp32", first_by_prompt(rows["torch", levels[0]].timings)
    else:
        reference_name, reference = "", {}
    failed = False
    for name, v in variants.items():
        ours = first_by_prompt(rows[name, levels[0]].timings)
        if v.exact:
            if not reference or (name == "torch" and reference_name == "torch fp32"):
                continue
            same = 0 in ours and 0 in reference and ours[0] == reference[0]
            failed |= not same
            print(f"{v.label}: first prompt's greedy tokens identical to {reference_name}: {'yes' if same else 'NO'}")
        else:  # int8 against fp32: engine=torch's more prompts where it ran, else the reference
            fp32_name, fp32 = (("torch fp32", first_by_prompt(rows["torch", levels[0]].timings))
                               if "torch" in variants else (reference_name, reference))
            agreed, compared, identical, prompts = agreement(ours, fp32)
            if prompts:
                print(f"{v.label}: greedy agreement with {fp32_name}: {agreed}/{compared} tokens "
                      f"({agreed / max(compared, 1):.0%}, up to the first difference), {identical}/{prompts} "
                      f"prompts identical (reported, not required)")
            else:
                print(f"{v.label}: no prompt in common with an fp32 run to compare")
    if model is not None:
        for row in [*rows.values(), *engine_rows.values()]:
            print(f"{row.name} at concurrency {row.concurrency}: "
                  f"{row.tokens_per_second / hf_row.tokens_per_second:.1f}x transformers' sequential tokens/s")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    return 1 if failed else 0


def variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(ALL_VARIANTS)}")
    return list(dict.fromkeys(names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="an existing checkpoint directory")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--variants", type=variant_list, default=ALL_VARIANTS,
                        help=f"comma-separated systems to compare (default all: {','.join(ALL_VARIANTS)})")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, every system (default 2)")
    parser.add_argument("--concurrency", default="1,16,64", help="concurrency levels (default 1,16,64)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument("--requests-per-worker", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--hf-requests", type=int, default=4, help="transformers requests in all (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds (default 2)")
    parser.add_argument("--in-process", action="store_true", help="also drive our engines in this process")
    parser.add_argument("--level-seconds", type=float, default=90.0, help="no new requests after this per level")
    parser.add_argument("--kv-cache-mb", type=float, default=0.0,
                        help="KV cache MiB per engine (default: enough for the top concurrency's sequences)")
    parser.add_argument("--runtime-arg", action="append", default=[], help="extra `runtime serve` argument")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as workdir:
        return asyncio.run(main_async(args, Path(workdir)))


if __name__ == "__main__":
    sys.exit(main())
