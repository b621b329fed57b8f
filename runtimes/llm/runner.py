"""The model runner: a scheduled step (plain data) -> tensors -> forward -> sampled tokens.

    runner = ModelRunner(decoder, cache)
    result = runner.execute(step)       # SampleResult: one token per `sample` row, in row order

It owns the KV cache tensors, the sampler, and per request what it needs across steps:
the cache blocks, the sampling parameters and the seeded generator (made on the model's
device), from the step that admits the request (`step.new_requests`) until the step that
says it left (`step.finished_ids`). It knows nothing about queues, stops or text, and
changes no scheduler state: the scheduler applies the result (update_from_output).

Sampling happens here, as in vLLM: the logits [rows, vocab] stay on the model's device
and only token ids (and the logprobs asked for) come back, which is what a runner in
another process or a TensorRT engine returns; a generator must live on the device of the
logits it draws for. Stops need the text and the request's lifecycle: the scheduler's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from modelgw.runtimes.llm.kv_cache import KVCache
from modelgw.runtimes.llm.model import DecodeChunk, Decoder, PrefillSpan, StepBatch
from modelgw.runtimes.llm.sampling import Sampler, SampleResult, SamplingParams
from modelgw.runtimes.llm.scheduler import ScheduledStep


@dataclass(slots=True)
class _RunnerRequest:
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None   # sampled (non-greedy) requests only


class StepRunner:
    """What every runner shares: per-request state from admission to departure, and
    sampling on the logits' device. A backend (the torch Decoder below, onnxruntime,
    TensorRT) implements forward(step), and only that."""

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self._requests: dict[str, _RunnerRequest] = {}

    def block_ids(self, step: ScheduledStep) -> dict[str, list[int]]:
        """The cache blocks of each request with a row in `step`."""
        return {row.request_id: self._requests[row.request_id].block_ids for row in step.rows}

    def forward(self, step: ScheduledStep) -> torch.Tensor:
        """A non-empty step's float32 logits [sample rows, vocab] on `device`, its K/V
        written to the cache."""
        raise NotImplementedError

    def execute(self, step: ScheduledStep) -> SampleResult:
        """Run the step: its tokens' K/V go into the cache; the sampled tokens come back."""
        for request_id in step.finished_ids:
            self._requests.pop(request_id, None)
        for new in step.new_requests:
            generator = None
            if not new.params.greedy:
                generator = torch.Generator(device=self.device)
                seed = new.params.seed
                generator.manual_seed(seed if seed is not None else random.getrandbits(63))
            self._requests[new.request_id] = _RunnerRequest(new.block_ids, new.params, generator)
        if step.empty:
            return SampleResult([], [])
        logits = self.forward(step)  # float32 [sample rows, vocab]
        sampling = [self._requests[request_id] for request_id in step.sampling_ids]
        if not sampling:
            return SampleResult([], [])
        return self.sampler.sample(logits, [r.params for r in sampling], [r.generator for r in sampling])

    def close(self) -> None:
        self._requests.clear()


# K+V bytes one decode chunk may gather on the CPU: about an L2's worth per core (measured on
# the bench's model, 2 cores: at concurrency 64 a whole-batch gather + attention took 3x as
# long as chunks of ~2 MiB; chunks of ~0.6 MiB were slower again, by their per-call cost)
DECODE_CHUNK_BYTES = 2 << 20


class ModelRunner(StepRunner):
    """The torch runner: the Decoder over the paged KVCache."""

    def __init__(self, model: Decoder, cache: KVCache) -> None:
        super().__init__(cache.block_size, model.device)
        self.model = model
        self.cache = cache
        self._dtype = model.dtype
        # decode chunks of at most this many blocks (rows x padded width) each, so that a
        # chunk's gathered K and V fit DECODE_CHUNK_BYTES on the CPU; 0: all single rows in
        # one chunk (on a GPU, where one big launch beats several small ones)
        block_bytes = cache.keys[0, 0].numel() * cache.keys.element_size() * 2
        self.decode_chunk_blocks = max(1, DECODE_CHUNK_BYTES // block_bytes) if model.device.type == "cpu" else 0

    def forward(self, step: ScheduledStep) -> torch.Tensor:
        return self.model.forward(self.build(step), self.cache)

    def build(self, step: ScheduledStep) -> StepBatch:
        bs = self.block_size
        device = self.device
        requests = self._requests
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        # single rows: one token each, shortest context first, attended in chunks of similar
        # length (model.DecodeChunk); flat[i] is where the step's i-th single row went
        singles = step.rows[:step.num_single]
        order = sorted(range(len(singles)), key=lambda i: singles[i].start)
        flat = [0] * len(singles)
        # (first row, stop row, width in blocks, offset in `table`) of each chunk; the block
        # tables and masks of all chunks become one tensor each, which chunks take views of
        bounds: list[tuple[int, int, int, int]] = []
        table: list[int] = []
        lengths: list[int] = []  # context length of each single row, in flat order
        first = 0
        while first < len(order):
            # rows are taken while the chunk's padded blocks stay within decode_chunk_blocks:
            # the longest row so far sets the width
            width = -(-(singles[order[first]].start + 1) // bs)
            last = first + 1
            if self.decode_chunk_blocks:
                while last < len(order):
                    w = -(-(singles[order[last]].start + 1) // bs)
                    if (last - first + 1) * w > self.decode_chunk_blocks:
                        break
                    width, last = w, last + 1
            else:
                last = len(order)
                width = -(-(singles[order[-1]].start + 1) // bs)
            bounds.append((first, last, width, len(table)))
            for i in order[first:last]:
                row = singles[i]
                blocks = requests[row.request_id].block_ids
                pos = row.start
                flat[i] = len(input_ids)
                input_ids.extend(row.token_ids)
                positions.append(pos)
                slots.append(blocks[pos // bs] * bs + pos % bs)
                used = blocks[:width]
                table.extend(used)
                table.extend([used[0]] * (width - len(used)))  # padding: masked out below
                lengths.append(pos + 1)
            first = last
        chunks: list[DecodeChunk] = []
        if bounds:
            tables = torch.tensor(table, dtype=torch.long, device=device)
            # sorted: a chunk's first (shortest) row decides whether any of its rows is padded
            padded = [lengths[first] != width * bs for first, _, width, _ in bounds]
            mask = None
            if any(padded):  # additive: -inf past each row's context, 0 within
                columns = max(width for _, _, width, _ in bounds) * bs
                past = torch.arange(columns, device=device) >= torch.tensor(lengths, device=device).unsqueeze(1)
                mask = torch.zeros(past.shape, dtype=self._dtype, device=device).masked_fill_(past, float("-inf"))
                mask = mask[:, None, None, :]
            for (first, last, width, offset), pad in zip(bounds, padded, strict=True):
                chunk_mask = mask[first:last, ..., :width * bs] if pad and mask is not None else None
                chunks.append(DecodeChunk(first, last, tables[offset:offset + (last - first) * width], chunk_mask))
        logits_index = [flat[i] for i, row in enumerate(singles) if row.sample]
        spans: list[PrefillSpan] = []
        for row in step.rows[step.num_single:]:
            blocks = requests[row.request_id].block_ids
            start_row = len(input_ids)
            pos, n = row.start, row.num_tokens
            input_ids.extend(row.token_ids)
            positions.extend(range(pos, pos + n))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(pos, pos + n))
            if pos == 0:
                spans.append(PrefillSpan(start_row, n, 0, None, None))
            else:  # later chunk of a long prompt: attend to the cached part as well
                context = pos + n
                span_blocks = torch.tensor(blocks[:-(-context // bs)], dtype=torch.long, device=device)
                mask = torch.ones(n, context, dtype=torch.bool, device=device).tril(diagonal=pos)
                spans.append(PrefillSpan(start_row, n, pos, span_blocks, mask))
            if row.sample:
                logits_index.append(start_row + n - 1)
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_single=len(singles),
            chunks=chunks,
            spans=spans,
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
        )
