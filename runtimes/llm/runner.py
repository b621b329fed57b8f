"""The model runner: a scheduled step -> tensors -> one forward pass -> logits.

It owns the KV cache tensors and knows where each sequence's tokens live in them (from
the blocks the scheduler gave the sequence); it knows nothing about queues, sampling or
text. After `execute`, the step's sequences have their new tokens in the cache
(`num_computed` advanced), and the logits rows are those of `step.sampling`, in order.
"""

from __future__ import annotations

import torch

from modelgw.runtimes.llm.kv_cache import KVCache
from modelgw.runtimes.llm.model import Decoder, PrefillSpan, StepBatch
from modelgw.runtimes.llm.scheduler import ScheduledStep


class ModelRunner:
    def __init__(self, model: Decoder, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.device = model.device

    def execute(self, step: ScheduledStep) -> torch.Tensor:
        """Run the step; float32 logits [len(step.sampling), vocab]."""
        batch = self.build(step)
        logits = self.model.forward(batch, self.cache)
        for seq, n in step.work:
            seq.num_computed += n
        return logits

    def build(self, step: ScheduledStep) -> StepBatch:
        bs = self.block_size
        device = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_index: list[int] = []
        # single rows: one token each, attended together over a padded block table
        singles = step.work[:step.num_single]
        single_blocks = single_mask = None
        if singles:
            contexts = [seq.num_computed + 1 for seq, _ in singles]
            width = -(-max(contexts) // bs)  # blocks per row, padded
            table: list[int] = []
            for row, (seq, _) in enumerate(singles):
                pos = seq.num_computed
                input_ids.extend(seq.tokens(pos, 1))
                positions.append(pos)
                slots.append(seq.blocks[pos // bs] * bs + pos % bs)
                used = seq.blocks[:width]
                table.extend(used)
                table.extend([used[0]] * (width - len(used)))  # padding: masked out below
                if pos + 1 == seq.num_tokens:
                    logits_index.append(row)
            single_blocks = torch.tensor(table, dtype=torch.long, device=device)
            lengths = torch.tensor(contexts, dtype=torch.long, device=device)
            single_mask = (torch.arange(width * bs, device=device).unsqueeze(0) < lengths.unsqueeze(1))
            single_mask = single_mask[:, None, None, :]
        spans: list[PrefillSpan] = []
        for seq, n in step.work[step.num_single:]:
            start_row = len(input_ids)
            pos = seq.num_computed
            input_ids.extend(seq.tokens(pos, n))
            positions.extend(range(pos, pos + n))
            blocks = seq.blocks
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(pos, pos + n))
            if pos == 0:
                spans.append(PrefillSpan(start_row, n, 0, None, None))
            else:  # later chunk of a long prompt: attend to the cached part as well
                context = pos + n
                span_blocks = torch.tensor(blocks[:-(-context // bs)], dtype=torch.long, device=device)
                mask = torch.ones(n, context, dtype=torch.bool, device=device).tril(diagonal=pos)
                spans.append(PrefillSpan(start_row, n, pos, span_blocks, mask))
            if pos + n == seq.num_tokens:
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
