"""One-command GPU check of the `llm` engines, sized for the lent H200 (< 8 minutes).

    python bench/gpu_check.py                         # on the GPU machine, from the repo root
    python bench/gpu_check.py --device cpu --quick    # here: exercises the script and the report

What it does, on one generated random Llama checkpoint (`make_checkpoint`; default 8
layers, hidden 1024, 16 heads, 8 KV heads, vocab 8192; --quick: the 2-layer toy):

1. Reference: the torch engine on the CPU in float32, greedy, --prompts prompts x
   --max-tokens tokens each, with the chosen tokens' log-probabilities.
2. For each engine (torch; tensorrt where `tensorrt` imports and a GPU is there, else a
   row saying why not): the same prompts greedy on --device in --dtype (bfloat16 on a
   GPU): tokens agreeing with the reference up to the first divergence, prompts
   identical, mean |logprob difference| over the agreeing tokens.
3. Throughput, in-process (engine.step driven here, no gRPC): closed-loop at each
   --concurrency level (default 1,16,64): output tokens/s and time to first token
   p50/p99 (request queued -> its first token out of a step), every request exactly
   --max-tokens tokens (ignore_eos).

Every phase is bounded by --budget-s overall (levels not started in time are reported as
skipped). The report is printed and, with --out, written as JSON. Needs only torch,
safetensors, tokenizers, jinja2 and this checkout (installed or not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _importable_from_checkout() -> None:
    """Runnable from a bare checkout (the GPU machine has no editable install): the
    package maps modelgw.runtimes -> runtimes/ etc. (pyproject package-dir), so the
    repository root is added to the modelgw package's path when it is not installed."""
    try:
        import modelgw.runtimes.llm
    except ImportError:
        sys.path.insert(0, str(REPO))
        import modelgw

        modelgw.__path__.append(str(REPO))


_importable_from_checkout()

PROMPTS = [
    "A model gateway routes every request to a runtime that has the model loaded, and the runtime",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun",
    "Continuous batching lets new requests join the running batch at every step, so the",
    "The key value cache holds the attention keys and values of every sequence that is running",
    "Greedy decoding always takes the most likely next token, while sampling draws from the",
    "Each replica registers an endpoint under a lease that expires when the replica dies",
    "Hello world! How are you today? I am fine, thank you. What is the weather like",
    "Load figures tell the gateway how busy each replica is, so it can route the next request",
]

FULL_MODEL = dict(layers=8, hidden=1024, heads=16, kv_heads=8, vocab=8192, max_position=2048)
QUICK_MODEL = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=512, max_position=512)


@dataclass
class Agreement:
    prompts: int
    identical_prompts: int
    agreeing_tokens: int        # up to each prompt's first divergence
    total_tokens: int
    mean_abs_logprob_diff: float


@dataclass
class Level:
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float


@dataclass
class EngineReport:
    engine: str
    device: str
    dtype: str
    skipped: str | None = None
    load_s: float = 0.0
    agreement: Agreement | None = None
    levels: list[Level] = field(default_factory=list)
    skipped_levels: list[int] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: only to exercise the script)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--engines", default="torch,tensorrt", help="comma-separated: torch, tensorrt")
    parser.add_argument("--checkpoint", default=None, help="an hf-llama checkpoint directory (default: generate one)")
    parser.add_argument("--quick", action="store_true", help="toy model, 2 prompts, few tokens, concurrency 1,4")
    parser.add_argument("--prompts", type=int, default=None, help="prompts for the agreement check (default 8; quick 2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64; quick 8)")
    parser.add_argument("--concurrency", default=None, help="levels, default 1,16,64 (quick 1,4)")
    parser.add_argument("--requests-per-level", type=int, default=None, help="default 2 x concurrency, at least 4")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole check")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.prompts = args.prompts or (2 if quick else 8)
    args.max_tokens = args.max_tokens or (8 if quick else 64)
    levels = args.concurrency or ("1,4" if quick else "1,16,64")
    try:
        args.levels = [int(c) for c in levels.split(",")]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {levels!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error(f"--concurrency levels must be >= 1, got {levels!r}")
    args.engine_names = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engine_names) - {"torch", "tensorrt"}
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from torch, tensorrt")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be 1..{len(PROMPTS)}, got {args.prompts}")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


def _engine_config(device: str, dtype: str, max_num_seqs: int, max_model_len: int) -> Any:
    from modelgw.runtimes.llm.engine import EngineConfig

    return EngineConfig(device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max(512, max_num_seqs), max_model_len=max_model_len)


def greedy_run(engine: Any, prompt_ids: list[list[int]], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Each prompt alone, greedy: (tokens, their logprobs)."""
    from modelgw.runtimes.llm.engine import GenerationRequest
    from modelgw.runtimes.llm.sampling import SamplingParams

    results = []
    for i, ids in enumerate(prompt_ids):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)
        engine.add_request(GenerationRequest(f"g{i}", tuple(ids), params))
        tokens: list[int] = []
        logprobs: list[float] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.token_ids
                logprobs += out.logprobs or []
        results.append((tokens, logprobs))
    return results


def agreement(reference: list[tuple[list[int], list[float]]], other: list[tuple[list[int], list[float]]]) -> Agreement:
    agreeing = total = identical = 0
    diffs: list[float] = []
    for (ref_tokens, ref_lp), (tokens, lp) in zip(reference, other, strict=True):
        total += len(ref_tokens)
        prefix = 0
        while prefix < min(len(ref_tokens), len(tokens)) and ref_tokens[prefix] == tokens[prefix]:
            prefix += 1
        agreeing += prefix
        identical += int(tokens == ref_tokens)
        diffs += [abs(a - b) for a, b in zip(ref_lp[:prefix], lp[:prefix], strict=False)]
    return Agreement(len(reference), identical, agreeing, total, statistics.fmean(diffs) if diffs else 0.0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def throughput(engine: Any, prompt_ids: list[list[int]], concurrency: int, requests: int, max_tokens: int,
               device: str) -> Level:
    """Closed loop: `concurrency` requests in flight until `requests` have finished."""
    from modelgw.runtimes.llm.engine import GenerationRequest
    from modelgw.runtimes.llm.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    queued: dict[str, float] = {}
    ttfts: list[float] = []
    sent = done = tokens = 0

    def send() -> None:
        nonlocal sent
        request_id = f"t{concurrency}-{sent}"
        queued[request_id] = time.perf_counter()
        engine.add_request(GenerationRequest(request_id, tuple(prompt_ids[sent % len(prompt_ids)]), params))
        sent += 1

    _sync(device)
    start = time.perf_counter()
    for _ in range(min(concurrency, requests)):
        send()
    while done < requests:
        outputs = engine.step()
        now = time.perf_counter()  # step() returns after the sampled tokens are on the host
        for out in outputs:
            tokens += len(out.token_ids)
            first = queued.pop(out.request_id, None)
            if first is not None and out.token_ids:
                ttfts.append(now - first)
            if out.finished:
                done += 1
                if sent < requests:
                    send()
    seconds = time.perf_counter() - start
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else 0.0
    return Level(concurrency, requests, tokens, round(seconds, 3), round(tokens / seconds, 1),
                 round(statistics.median(ttfts) * 1e3, 2) if ttfts else 0.0, round(p99 * 1e3, 2))


def check_engine(name: str, checkpoint: Any, prompt_ids: list[list[int]], reference: list[tuple[list[int], list[float]]],
                 args: argparse.Namespace, deadline: float, workdir: Path) -> EngineReport:
    report = EngineReport(name, args.device, args.dtype)
    max_model_len = max(len(p) for p in prompt_ids) + args.max_tokens + 16
    config = _engine_config(args.device, args.dtype, max(args.levels), max_model_len)
    start = time.perf_counter()
    try:
        if name == "tensorrt":
            from modelgw.runtimes.llm.tensorrt_engine import TensorRTEngine, tensorrt_missing

            missing = tensorrt_missing()
            if missing:
                report.skipped = missing
                return report
            engine: Any = TensorRTEngine(checkpoint, config, cache_dir=workdir / "plans")
        else:
            from modelgw.runtimes.llm.engine import TorchEngine

            engine = TorchEngine(checkpoint, config)
    except Exception as exc:  # the report says why this engine did not run; the others go on
        report.skipped = f"failed to load: {type(exc).__name__}: {exc}"
        return report
    report.load_s = round(time.perf_counter() - start, 2)
    try:
        greedy_run(engine, prompt_ids[:1], 2)  # warm-up: kernels, allocator, plan contexts
        report.agreement = agreement(reference, greedy_run(engine, prompt_ids, args.max_tokens))
        for level in args.levels:
            if time.perf_counter() > deadline:
                report.skipped_levels.append(level)
                continue
            requests = args.requests_per_level or max(4, 2 * level)
            report.levels.append(throughput(engine, prompt_ids, level, requests, args.max_tokens, args.device))
    finally:
        engine.close()
    return report


def format_report(model: dict[str, Any], reports: list[EngineReport], seconds: float) -> str:
    lines = [f"model: {model}", f"wall: {seconds:.1f} s"]
    for r in reports:
        head = f"[{r.engine} {r.device} {r.dtype}]"
        if r.skipped:
            lines.append(f"{head} skipped: {r.skipped}")
            continue
        a = r.agreement
        if a is not None:
            lines.append(f"{head} load {r.load_s:.1f} s; greedy vs CPU float32: {a.identical_prompts}/{a.prompts} prompts "
                         f"identical, {a.agreeing_tokens}/{a.total_tokens} tokens before the first divergence, "
                         f"mean |logprob diff| {a.mean_abs_logprob_diff:.2e}")
        lines.append(f"{head} {'conc':>5} {'reqs':>5} {'tokens':>7} {'tok/s':>9} {'TTFT p50 ms':>12} {'p99 ms':>9}")
        for lv in r.levels:
            lines.append(f"{head} {lv.concurrency:>5} {lv.requests:>5} {lv.output_tokens:>7} {lv.tokens_per_s:>9.1f} "
                         f"{lv.ttft_p50_ms:>12.2f} {lv.ttft_p99_ms:>9.2f}")
        if r.skipped_levels:
            lines.append(f"{head} levels not run (over --budget-s): {r.skipped_levels}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from modelgw.runtimes.llm.checkpoint import Checkpoint
    from modelgw.runtimes.llm.engine import TorchEngine
    from modelgw.runtimes.llm.make_checkpoint import make_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no CUDA GPU (run with --device cpu --quick to exercise the script)",
              file=sys.stderr)
        return 2
    began = time.perf_counter()
    deadline = began + args.budget_s
    model = QUICK_MODEL if args.quick else FULL_MODEL
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        workdir = Path(tmp)
        directory = Path(args.checkpoint) if args.checkpoint else make_checkpoint(workdir / "ckpt", **model)
        checkpoint = Checkpoint.open(directory)
        prompt_ids = [checkpoint.tokenizer.encode(p) for p in PROMPTS[:args.prompts]]
        max_model_len = max(len(p) for p in prompt_ids) + args.max_tokens + 16
        reference_engine = TorchEngine(checkpoint, _engine_config("cpu", "float32", 4, max_model_len))
        try:
            reference = greedy_run(reference_engine, prompt_ids, args.max_tokens)
        finally:
            reference_engine.close()
        reports = [check_engine(name, checkpoint, prompt_ids, reference, args, deadline, workdir)
                   for name in args.engine_names]
    seconds = time.perf_counter() - began
    print(format_report(model if not args.checkpoint else {"checkpoint": args.checkpoint}, reports, seconds))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model, "seconds": round(seconds, 1), "torch": torch.__version__,
                                              "reports": [asdict(r) for r in reports]}, indent=1))
    return 0 if all(r.skipped is None or r.engine == "tensorrt" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
