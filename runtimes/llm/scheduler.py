"""Continuous batching: which sequences run in the next step, with how many tokens.

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512), pool)
    scheduler.add(sequence)                 # queues (FIFO)
    step = scheduler.schedule()             # at every step boundary
    ... run the model on step.work, sample step.sampling ...
    scheduler.finish(sequence, "stop")      # leaves at once; its cache blocks are free again
    scheduler.abort("request-id")           # cancellation, at any time between steps

Every step has a token budget (max_num_batched_tokens). Running sequences come first:
each decoding sequence takes one token, then sequences still in their prompt take a chunk
of it (chunked prefill: a long prompt spreads over several steps, so it never stalls the
decoders). Then waiting sequences are admitted in arrival order while the batch has room
(max_num_seqs), the budget lasts and the cache has blocks for their prompt + max_tokens.
Admission is strictly FIFO: when the oldest waiting request does not fit, the ones behind
it wait too, so a big request cannot be starved by a stream of small ones.

The scheduler knows nothing about tensors: the model runner turns a step into them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from modelgw.runtimes.llm.kv_cache import BlockPool
from modelgw.runtimes.llm.sequence import Sequence, Status


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


@dataclass
class ScheduledStep:
    """One step's work: (sequence, new tokens) with one-token rows first (the model's
    'single' rows), then multi-token chunks."""

    work: list[tuple[Sequence, int]] = field(default_factory=list)
    num_single: int = 0

    @property
    def empty(self) -> bool:
        return not self.work

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)

    @property
    def sampling(self) -> list[Sequence]:
        """Sequences that will have computed all their tokens after this step: they get a
        new token sampled (in the order of `work`)."""
        return [seq for seq, n in self.work if seq.num_computed + n == seq.num_tokens]


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

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of the batch (or the queue) and free its cache blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.pool.free(seq.blocks)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.request_id, None)

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request wherever it is; returns it (None if unknown or done)."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            self.finish(seq, "cancelled")
        return seq

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
        singles: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        # decoders first (one token each), then sequences part-way through their prompt
        for seq in self.running:
            if seq.num_tokens - seq.num_computed == 1 and budget:
                singles.append((seq, 1))
                budget -= 1
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed
            if remaining > 1 and budget:
                n = min(remaining, budget)
                (singles if n == 1 else chunks).append((seq, n))
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
            n = min(len(seq.prompt_ids), budget)
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n
        return ScheduledStep(work=singles + chunks, num_single=len(singles))
