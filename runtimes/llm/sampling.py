"""Sampling parameters of a request, and the sampler that picks every row's next token.

    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=64, stop=("\\n\\n",))
    params.check()                                 # ValueError naming the bad parameter
    result = Sampler().sample(logits, [params, ...], [generator, ...])   # the runner's, per step

Greedy (temperature 0) rows take the argmax. Other rows are scaled by their temperature,
cut to their top_k and top_p (all rows at once, one sort), and drawn with the
exponential race (argmax of p / E, E ~ Exp(1)), which samples exactly from p and lets
every row draw from its own torch.Generator: a seeded request gets the same tokens
whatever else shares its batch. Log-probabilities are those of the model's raw
distribution (before temperature and cuts), for rows that ask for them.

The runner samples (runner.py says why); the SampleResult it returns is plain data, one
entry per sampled row, which the scheduler applies (scheduler.update_from_output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                         # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()             # stop strings: the text ends before them
    stop_token_ids: tuple[int, ...] = ()   # besides the model's eos tokens (unless ignore_eos)
    ignore_eos: bool = False
    logprobs: int = 0                      # 0: off; N: the chosen token's and the top N's

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def check(self) -> None:
        """Raise ValueError with a message naming the parameter that is out of range."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also catches NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.logprobs < 0 or self.logprobs > 20:
            raise ValueError(f"logprobs must be in 0..20, got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2^63-1, got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (>= 0), got {list(self.stop_token_ids)}")


@dataclass
class SampleResult:
    """A step's new tokens: row i is the step's i-th `sample` row."""

    token_ids: list[int]
    logprobs: list[float | None]                     # the chosen token's, per row (None: not asked)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


class Sampler:
    """Next tokens for a batch of logits rows, each row with its own parameters."""

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> SampleResult:
        """logits: float32 [rows, vocab]; generators: one per row (used by sampled rows)."""
        rows = logits.shape[0]
        chosen = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            chosen[sampled] = self._sample_rows(logits[sampled], [params[i] for i in sampled],
                                                [generators[i] for i in sampled])
        token_ids = chosen.tolist()
        logprobs: list[float | None] = [None] * rows
        top: list[list[tuple[int, float]] | None] = [None] * rows
        wanted = [i for i, p in enumerate(params) if p.logprobs > 0]
        if wanted:
            lp = torch.log_softmax(logits[wanted], dim=-1)
            picked = lp.gather(1, chosen[wanted].unsqueeze(1)).squeeze(1).tolist()
            k = max(params[i].logprobs for i in wanted)
            top_values, top_indices = lp.topk(k, dim=-1)
            values, indices = top_values.tolist(), top_indices.tolist()
            for j, i in enumerate(wanted):
                logprobs[i] = picked[j]
                n = params[i].logprobs
                top[i] = list(zip(indices[j][:n], values[j][:n], strict=True))
        return SampleResult(token_ids, logprobs, top)

    @staticmethod
    def _sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
        vocab = logits.shape[1]
        temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
        logits = logits / temperature.unsqueeze(1)
        if any(0 < p.top_k < vocab for p in params) or any(p.top_p < 1.0 for p in params):
            logits = _cut(logits, params)
        probs = torch.softmax(logits, dim=-1)
        # the exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p (Gumbel-max in disguise)
        noise = torch.empty_like(probs)
        for row, generator in enumerate(generators):
            noise[row].exponential_(generator=generator)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a 0 draw would make 0/0 = NaN win the argmax
        return (probs / noise).argmax(dim=-1)


def _cut(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply top_k and top_p per row (-inf outside), with a single sort."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending: the best is last
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
    threshold = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device)
    if bool((top_p < 1.0).any()):
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
