"""One request's state inside the engine: its tokens, cache blocks, progress and text."""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Sequence as Seq

import torch

from modelgw.runtimes.llm.detokenizer import Decoding, TextStream
from modelgw.runtimes.llm.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request being generated. Only the engine thread touches it."""

    __slots__ = ("request_id", "prompt_ids", "output_ids", "params", "stop_ids", "num_computed", "blocks",
                 "status", "finish_reason", "generator", "text", "arrival", "pending_ids", "pending_logprobs",
                 "pending_top")

    def __init__(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, tokenizer: Decoding,
                 eos_token_ids: Seq[int] = ()) -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        eos = () if params.ignore_eos else tuple(eos_token_ids)
        self.stop_ids = frozenset(eos) | frozenset(params.stop_token_ids)
        self.num_computed = 0          # tokens whose K/V are in the cache
        self.blocks: list[int] = []    # cache blocks, held from admission to finish
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self.text = TextStream(tokenizer, self.prompt_ids, params.stop)
        self.arrival = time.monotonic()
        # what was generated since the last RequestOutput
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[float] = []
        self.pending_top: list[list[tuple[int, float]]] = []

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        """Cache slots this sequence may need: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_tokens

    def tokens(self, start: int, count: int) -> list[int]:
        """Token ids at positions start..start+count-1 (prompt, then output)."""
        prompt = len(self.prompt_ids)
        if start + count <= prompt:
            return self.prompt_ids[start:start + count]
        if start >= prompt:  # decoding: no list copies on the hot path
            return self.output_ids[start - prompt:start - prompt + count]
        return (self.prompt_ids + self.output_ids)[start:start + count]

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, prompt={len(self.prompt_ids)}, "
                f"output={len(self.output_ids)}, computed={self.num_computed})")
