"""Helpers for the LLM runtime tests: tiny random checkpoints saved by transformers
(save_pretrained) with our trained tokenizer, transformers as the reference, and a
driver that runs our engine to completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.engine import EngineConfig, GenerationRequest, TorchEngine
from modelgw.runtimes.llm.make_checkpoint import make_checkpoint, write_tokenizer
from modelgw.runtimes.llm.sampling import SamplingParams

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)

# prompts of different lengths: short ones, some over a 16-token cache block, one long
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog",
    "A",
    "Continuous batching lets new requests join the running batch at every step, and finished ones leave.",
    "Numbers: one two three",
    "def main(): print('hello')",
    "The key value cache holds the attention keys and values of every sequence; when it is full, "
    "new requests wait in the queue until memory is free. A client that goes away cancels its request.",
    "It is sunny",
]
MAX_TOKENS = [20, 5, 33, 12, 8, 27, 16, 40]


def tiny_checkpoint(directory: Path, **overrides: Any) -> Path:
    """`make_checkpoint` of the tests' usual tiny Llama (2 layers, hidden 64, 4 heads / 2 KV
    heads, vocab 512), with `overrides` of its arguments."""
    return make_checkpoint(directory, **{"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 512,
                                         **overrides})


def save_hf_checkpoint(directory: Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """A random tiny model of a transformers family, saved with save_pretrained, plus our
    trained tokenizer files."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[family]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if family == "qwen2":  # transformers initialises biases at 0: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(directory)
    write_tokenizer(directory, TINY["vocab_size"], config.max_position_embeddings)
    return directory


@dataclass
class Reference:
    tokens: list[int]
    logprobs: torch.Tensor        # [steps, vocab]: log_softmax of transformers' logits per step


def transformers_greedy(directory: Path, prompt_ids: list[list[int]], max_tokens: list[int]) -> list[Reference]:
    """transformers' generate(do_sample=False), one prompt at a time, with its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    references = []
    for ids, n in zip(prompt_ids, max_tokens, strict=True):
        inputs = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False,
                                 eos_token_id=2, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(ids):].tolist()
        logits = torch.cat(out.logits, dim=0).float()
        references.append(Reference(tokens, torch.log_softmax(logits, dim=-1)))
    return references


def prompt_logits_transformers(directory: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@dataclass
class Result:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    chunks: int = 0
    finish_reason: str | None = None
    completion_tokens: int = 0


def make_engine(directory: Path, **config: Any) -> TorchEngine:
    return TorchEngine(Checkpoint.open(directory), EngineConfig(**{"device": "cpu", **config}))


def run(engine: TorchEngine, requests: list[GenerationRequest], max_steps: int = 10_000) -> dict[str, Result]:
    """Queue all requests at once and step until every one finished."""
    for request in requests:
        engine.add_request(request)
    return drive(engine, max_steps)


def drive(engine: TorchEngine, max_steps: int = 10_000) -> dict[str, Result]:
    results: dict[str, Result] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return results
        for output in engine.step():
            result = results.setdefault(output.request_id, Result())
            result.text += output.text
            result.tokens += output.token_ids
            result.logprobs += output.logprobs or []
            result.top += output.top_logprobs or []
            result.chunks += 1
            if output.finished:
                result.finish_reason = output.finish_reason
                result.completion_tokens = output.completion_tokens
    raise AssertionError(f"the engine did not finish in {max_steps} steps")


def greedy(max_tokens: int, **more: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **more)
