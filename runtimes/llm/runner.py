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
from modelgw.runtimes.llm.model import Decoder, PrefillSpan, StepBatch
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


class ModelRunner(StepRunner):
    """The torch runner: the Decoder over the paged KVCache."""

    def __init__(self, model: Decoder, cache: KVCache) -> None:
        super().__init__(cache.block_size, model.device)
        self.model = model
        self.cache = cache

    def forward(self, step: ScheduledStep) -> torch.Tensor:
        return self.model.forward(self.build(step), self.cache)

    def build(self, step: ScheduledStep) -> StepBatch:
        bs = self.block_size
        device = self.device
        requests = self._requests
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_index: list[int] = []
        # single rows: one token each, attended together over a padded block table
        singles = step.rows[:step.num_single]
        single_blocks = single_mask = None
        if singles:
            contexts = [row.start + 1 for row in singles]
            width = -(-max(contexts) // bs)  # blocks per row, padded
            table: list[int] = []
            for i, row in enumerate(singles):
                blocks = requests[row.request_id].block_ids
                pos = row.start
                input_ids.extend(row.token_ids)
                positions.append(pos)
                slots.append(blocks[pos // bs] * bs + pos % bs)
                used = blocks[:width]
                table.extend(used)
                table.extend([used[0]] * (width - len(used)))  # padding: masked out below
                if row.sample:
                    logits_index.append(i)
            single_blocks = torch.tensor(table, dtype=torch.long, device=device)
            lengths = torch.tensor(contexts, dtype=torch.long, device=device)
            single_mask = (torch.arange(width * bs, device=device).unsqueeze(0) < lengths.unsqueeze(1))
            single_mask = single_mask[:, None, None, :]
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
            single_blocks=single_blocks,
            single_mask=single_mask,
            spans=spans,
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
        )
