"""Continuous batching, and every change of a request's state.

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512), pool)
    scheduler.add(sequence)                                  # queues (FIFO)
    step = scheduler.schedule()                              # plain data: what to compute
    result = runner.execute(step)                            # tensors: the sampled tokens
    outputs = scheduler.update_from_output(step, result)     # RequestOutputs of this step
    scheduler.abort("request-id")                            # cancellation, between steps

This is vLLM v1's engine loop: the scheduler decides, the runner computes, and the
scheduler applies the result: tokens computed and appended, stop token ids, stop strings
(through the sequence's TextStream), max_tokens, finishing and freeing the cache blocks,
and the outputs. Nothing else changes a Sequence.

What goes to the runner is a ScheduledStep of plain data (ids, token ids, positions,
block ids, sampling parameters), never a Sequence, so a runner may live in another
process or be another engine (TensorRT). The runner keeps its own per-request state:
requests admitted in a step come in `new_requests` (their blocks and sampling
parameters), requests that left since the last step in `finished_ids`.

Every step has a token budget (max_num_batched_tokens). Running sequences come first:
each decoding sequence takes one token, then sequences still in their prompt take a chunk
of it (chunked prefill: a long prompt spreads over several steps, so it never stalls the
decoders). Then waiting sequences are admitted in arrival order while the batch has room
(max_num_seqs), the budget lasts and the cache has blocks for their prompt + max_tokens.
Admission is strictly FIFO: when the oldest waiting request does not fit, the ones behind
it wait too, so a big request cannot be starved by a stream of small ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from modelgw.runtimes.llm.kv_cache import BlockPool
from modelgw.runtimes.llm.sampling import SampleResult, SamplingParams
from modelgw.runtimes.llm.sequence import RequestOutput, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32              # sequences in the running batch
    max_num_batched_tokens: int = 512   # new tokens per step (prefill chunks + decodes)
    max_waiting: int = 1024             # queued requests beyond which new ones are refused

    def check(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}), so every running sequence can decode in every step"
            )


@dataclass(frozen=True, slots=True)
class ScheduledRow:
    """One request's share of a step: tokens at positions start..start+len(token_ids)-1."""

    request_id: str
    token_ids: list[int]
    start: int          # tokens of this request already in the cache
    sample: bool        # its last token completes the request's tokens: sample the next one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request admitted in this step: what the runner keeps until it finishes."""

    request_id: str
    block_ids: list[int]        # its cache blocks, held from admission to finish
    params: SamplingParams


@dataclass
class ScheduledStep:
    """One step's work, plain data: one-token rows first (the model's 'single' rows), then
    multi-token chunks. The sampled tokens come back one per `sample` row, in row order."""

    rows: list[ScheduledRow] = field(default_factory=list)
    num_single: int = 0
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)   # left since the last step

    @property
    def empty(self) -> bool:
        return not self.rows

    @property
    def num_tokens(self) -> int:
        return sum(row.num_tokens for row in self.rows)

    @property
    def sampling_ids(self) -> list[str]:
        """The requests that get a new token from this step, in the order of the results."""
        return [row.request_id for row in self.rows if row.sample]


class QueueFull(Exception):
    """Too many requests are waiting already."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        config.check()
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order
        self._by_id: dict[str, Sequence] = {}
        self._finished_ids: list[str] = []  # admitted requests that left: the runner forgets them

    # -- requests in and out

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. ValueError if it can never fit the cache; QueueFull if too many wait."""
        if seq.request_id in self._by_id:
            raise ValueError(f"request id '{seq.request_id}' is already in use")
        if self.pool.blocks_for(seq.max_total_tokens) > self.pool.num_blocks:
            raise ValueError(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) needs "
                f"{seq.max_total_tokens} cache slots; the whole KV cache holds {self.pool.capacity_tokens}"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are queued already (max_waiting); retry later")
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request wherever it is; its final output (None if unknown or done)."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "cancelled")
        return seq.take_output(with_final_text=False)

    def abort_all(self, reason: str = "cancelled") -> list[RequestOutput]:
        """End every request (after a failed step, or at shutdown) with `reason`."""
        outputs = []
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, reason)
            output = seq.take_output(with_final_text=False)
            if output is not None:
                outputs.append(output)
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of the batch (or the queue) and free its cache blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._finished_ids.append(seq.request_id)
        else:
            self.waiting.remove(seq)
        self.pool.free(seq.blocks)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.request_id, None)

    # -- figures

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- the step

    def schedule(self) -> ScheduledStep:
        budget = self.config.max_num_batched_tokens
        singles: list[ScheduledRow] = []
        chunks: list[ScheduledRow] = []
        new_requests: list[NewRequest] = []
        # decoders first (one token each), then sequences part-way through their prompt
        for seq in self.running:
            if seq.num_tokens - seq.num_computed == 1 and budget:
                singles.append(self._row(seq, 1))
                budget -= 1
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed
            if remaining > 1 and budget:
                n = min(remaining, budget)
                (singles if n == 1 else chunks).append(self._row(seq, n))
                budget -= n
        # admissions, oldest first, while there is room in the batch, the budget and the cache
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            blocks = self.pool.allocate(self.pool.blocks_for(seq.max_total_tokens))
            if blocks is None:
                break  # strict FIFO: the head of the queue waits for memory, and so does everyone behind it
            self.waiting.popleft()
            seq.blocks = blocks
            seq.status = Status.RUNNING
            self.running.append(seq)
            new_requests.append(NewRequest(seq.request_id, list(blocks), seq.params))
            n = min(len(seq.prompt_ids), budget)
            (singles if n == 1 else chunks).append(self._row(seq, n))
            budget -= n
        finished_ids, self._finished_ids = self._finished_ids, []
        return ScheduledStep(singles + chunks, len(singles), new_requests, finished_ids)

    @staticmethod
    def _row(seq: Sequence, n: int) -> ScheduledRow:
        start = seq.num_computed
        return ScheduledRow(seq.request_id, seq.tokens(start, n), start, start + n == seq.num_tokens)

    def update_from_output(self, step: ScheduledStep, result: SampleResult) -> list[RequestOutput]:
        """Apply a step's result: its tokens are in the cache now, each `sample` row's request
        gets its new token (result rows in row order), stops end requests; the outputs."""
        by_id = self._by_id
        for row in step.rows:
            by_id[row.request_id].num_computed += row.num_tokens
        outputs = []
        for i, request_id in enumerate(step.sampling_ids):
            seq = by_id[request_id]
            token = result.token_ids[i]
            seq.output_ids.append(token)
            seq.pending_ids.append(token)
            logprob = result.logprobs[i]
            if logprob is not None:
                seq.pending_logprobs.append(logprob)
                seq.pending_top.append(result.top_logprobs[i] or [])
            reason = None
            if token in seq.stop_ids:
                reason = "stop"  # eos / stop token: not part of the text
            else:
                seq.text.add(token)
                if seq.text.stopped:
                    reason = "stop"
                elif len(seq.output_ids) >= seq.params.max_tokens:
                    reason = "length"
            if reason is not None:
                self._finish(seq, reason)
            output = seq.take_output()
            if output is not None:
                outputs.append(output)
        return outputs
