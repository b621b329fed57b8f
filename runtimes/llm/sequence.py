"""One request's state inside the engine, and what it hands out after a step.

A Sequence belongs to the Scheduler: only the scheduler changes it (admission, tokens
computed, tokens appended, finish), in the engine thread. The runner never sees one; it
gets plain data (scheduler.ScheduledStep) and keeps its own per-request state (blocks,
sampling parameters, generator).

A RequestOutput carries what a request gained since its previous output: a text delta
(never part of a stop string), the new token ids (and their logprobs when asked), and on
the last one finished=True with the finish reason and token counts.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from modelgw.runtimes.llm.detokenizer import Decoding, TextStream
from modelgw.runtimes.llm.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    request_id: str
    text: str                                        # delta since the previous output
    token_ids: list[int]                             # tokens since the previous output
    logprobs: list[float] | None = None              # theirs, when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None                 # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Sequence:
    """A request being generated. Only the scheduler changes it, in the engine thread."""

    __slots__ = ("arrival", "blocks", "finish_reason", "num_computed", "output_ids", "params", "pending_ids",
                 "pending_logprobs", "pending_top", "prompt_ids", "request_id", "status", "stop_ids", "text")

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

    def take_output(self, with_final_text: bool = True) -> RequestOutput | None:
        """What this sequence gained since its last output; None while there is nothing
        to show yet (its tokens then travel with the next output). A cancelled sequence
        (with_final_text=False) ends without the text its last tokens were holding back."""
        finished = self.status is Status.FINISHED
        text = self.text.take(final=finished) if with_final_text or not finished else ""
        if not text and not finished:
            return None
        asked = self.params.logprobs > 0
        output = RequestOutput(
            request_id=self.request_id,
            text=text,
            token_ids=self.pending_ids,
            logprobs=self.pending_logprobs if asked else None,
            top_logprobs=self.pending_top if asked else None,
            finished=finished,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
        )
        self.pending_ids, self.pending_logprobs, self.pending_top = [], [], []
        return output

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, prompt={len(self.prompt_ids)}, "
                f"output={len(self.output_ids)}, computed={self.num_computed})")
