"""int8 weights vs fp32 on CPU, side by side in one run (issue 12, item 5).

    .venv/bin/python bench/llm_int8.py [--hidden 512 --layers 4 --vocab 8192 --threads 1 --batch 8]

On one random make_checkpoint model (no real checkpoint is on our machines) it loads the
torch engine twice, quantization=none (fp32, oneDNN-packed weights) and quantization=int8,
and prints per engine: the weight memory, tokens/s over 8 prompts x 64 greedy tokens in
batches of --batch (the whole run, prefill included, after a warm-up; best of --repeats,
fp32 and int8 alternating), and for int8 the
quality against fp32: greedy tokens equal to fp32's (free-running, counted up to the first
difference per prompt, since after it the contexts differ), teacher-forced argmax agreement
over fp32's continuations, and the mean absolute logit difference there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llm_helpers import PROMPTS

from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.engine import EngineConfig, GenerationRequest, TorchEngine
from modelgw.runtimes.llm.kv_cache import KVCache
from modelgw.runtimes.llm.make_checkpoint import make_checkpoint
from modelgw.runtimes.llm.model import Decoder, PrefillSpan, StepBatch
from modelgw.runtimes.llm.quantization import Int8Weight
from modelgw.runtimes.llm.sampling import SamplingParams


def weight_bytes(model: Decoder) -> int:
    tensors: list = [model.embed, model.norm, *([] if model.lm_head is model.embed else [model.lm_head])]
    for layer in model.layers:
        tensors += [t for t in vars(layer).values() if t is not None]
    total = 0
    for t in tensors:
        if isinstance(t, Int8Weight):
            total += t.nbytes
        else:  # oneDNN-packed tensors report their logical size
            total += t.numel() * t.element_size()
    return total


def generate(engine: TorchEngine, prompts: list[tuple[int, ...]], max_tokens: int) -> tuple[dict[str, list[int]], float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(f"p{i}", ids, params))
    tokens: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id].extend(output.token_ids)
    return tokens, time.perf_counter() - start


def teacher_forced_logits(model: Decoder, ids: list[int]) -> torch.Tensor:
    cfg = model.config
    n = len(ids)
    cache = KVCache(cfg.num_layers, -(-n // 16), 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    batch = StepBatch(input_ids=torch.tensor(ids), positions=torch.arange(n), slot_mapping=torch.arange(n),
                      spans=[PrefillSpan(0, n, 0, None, None)], logits_index=torch.arange(n))
    return model.forward(batch, cache)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="prompts run together (8: all in one batch; 1: one by one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_checkpoint(Path(tmp), layers=args.layers, hidden=args.hidden, heads=args.hidden // 64,
                                    kv_heads=max(1, args.hidden // 256), vocab=args.vocab)
        engines = {q: TorchEngine(Checkpoint.open(directory), EngineConfig(engine="torch", device="cpu",
                                                                            quantization=q, kv_cache_bytes=64 << 20))
                   for q in ("none", "int8")}
        tokenizer = engines["none"].tokenizer
        prompts = [tuple(tokenizer.encode(p)) for p in PROMPTS]
        results: dict[str, dict[str, list[int]]] = {}
        best: dict[str, float] = {}
        for engine in engines.values():
            generate(engine, prompts[:args.batch], 8)  # warm-up
        for _ in range(args.repeats):  # alternating, best of: the machine is shared, its noise only slows
            for q, engine in engines.items():
                tokens, seconds = {}, 0.0
                for first in range(0, len(prompts), args.batch):
                    part, took = generate(engine, prompts[first:first + args.batch], args.max_tokens)
                    tokens.update({f"p{first + int(k[1:])}": v for k, v in part.items()})
                    seconds += took
                results[q] = tokens
                best[q] = max(best.get(q, 0.0), sum(len(t) for t in tokens.values()) / seconds)
        for q, engine in engines.items():
            print(f"quantization={q:5s} weights {weight_bytes(engine.model) / 2**20:7.2f} MiB   {best[q]:7.1f} tok/s "
                  f"({len(prompts)} prompts x {args.max_tokens} tokens, {args.batch} at a time, {args.threads} "
                  f"thread(s), best of {args.repeats})")
        want, got = results["none"], results["int8"]
        prefix = 0
        for k in want:
            n = 0
            while n < len(want[k]) and want[k][n] == got[k][n]:
                n += 1
            prefix += n
        total = sum(len(v) for v in want.values())
        agree = steps = 0
        diffs, mean_abs = [], 0.0
        for i, ids in enumerate(prompts):
            context = list(ids) + want[f"p{i}"]
            a = teacher_forced_logits(engines["none"].model, context)[len(ids) - 1:]
            b = teacher_forced_logits(engines["int8"].model, context)[len(ids) - 1:]
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            steps += a.shape[0]
            diffs.append((a - b).abs().mean().item())
            mean_abs = a.abs().mean().item()
        print(f"int8 vs fp32: free-running greedy tokens equal up to the first difference {prefix}/{total} "
              f"({prefix / total:.1%}); teacher-forced argmax agreement {agree}/{steps} ({agree / steps:.1%}); "
              f"mean |logit diff| {sum(diffs) / len(diffs):.4f} (mean |logit| {mean_abs:.3f})")
        for engine in engines.values():
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
