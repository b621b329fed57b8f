"""The decoder's step as one ONNX graph, with the paged KV cache as explicit inputs and outputs.

    modelgw llm export-onnx CHECKPOINT OUT.onnx            # or: export_onnx(checkpoint, path)

The graph runs one scheduler step, whatever mix of prefill chunks and decode rows it holds,
over the same block pool as the torch engine (kv_cache.py), so a runner feeds it the
scheduler's block ids unchanged:

    inputs   input_ids     int64 [T]           the step's new tokens, flattened
             positions     int64 [T]           each token's position in its sequence
             slot_mapping  int64 [T]           where each token's K/V goes: block * block_size + offset
             block_tables  int64 [T, W]        each token's sequence's block ids (padded with any
                                               valid block; positions > the token's are masked)
             logits_index  int64 [S]           rows whose next-token logits are wanted
             key_cache     float [layers, blocks, block_size, kv_heads, head_dim]
             value_cache   float (same)        = KVCache.keys / .values, layout unchanged
    outputs  logits        float32 [S, vocab]
             key_cache_out, value_cache_out    the caches with this step's K/V written

Why a block table per token rather than per sequence, or a slot cache: every token then
attends to positions 0..its own of its sequence's blocks, which is the causal mask for a
prefill chunk and the length mask for a decode row at once (`arange(W * block_size) <=
position`), so one graph with no per-sequence loop or ragged shape covers prefill, chunked
prefill, decode and mixed steps; and the cache stays the engine's block pool (no copy into
per-sequence slots, blocks allocated by the same scheduler). The price is that a prefill
of n tokens gathers n copies of its context: fine for verifying the export and for
onnxruntime on small models; a TensorRT build replaces the gather + attention with its
KV-cache and attention layers. Every dimension but the model's own and the block size (a
load-time constant of the engine, `--block-size`) is dynamic.

The graph is made by torch.onnx.export's dynamo exporter (torch.export + onnxscript), from
plain tensors (the Decoder's weights, unpacked from oneDNN's layout), checked with
onnx.checker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.model import Decoder
from modelgw.runtimes.llm.scheduler import ScheduledStep

INPUT_NAMES = ["input_ids", "positions", "slot_mapping", "block_tables", "logits_index", "key_cache", "value_cache"]
OUTPUT_NAMES = ["logits", "key_cache_out", "value_cache_out"]
OPSET = 18
PROTOBUF_LIMIT = 2**31 - 2**26   # bytes: 2 GiB less room for the graph itself


def _dense(weight: torch.Tensor | None) -> torch.Tensor | None:
    """A weight in plain layout (the Decoder keeps CPU fp32 weights in oneDNN's)."""
    if weight is None:
        return None
    return weight.to_dense() if weight.is_mkldnn else weight


class StepGraph(torch.nn.Module):
    """The Decoder's forward over explicit cache tensors, in ops that export to ONNX."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.num_layers = len(decoder.layers)
        self.num_heads = decoder.num_heads
        self.num_kv_heads = decoder.num_kv_heads
        self.head_dim = decoder.head_dim
        self.q_size = decoder.q_size
        self.kv_size = decoder.kv_size
        self.eps = decoder.eps
        self.register_buffer("embed", decoder.embed)
        self.register_buffer("cos", decoder.cos)
        self.register_buffer("sin", decoder.sin)
        self.register_buffer("norm", decoder.norm)
        self.register_buffer("lm_head", _dense(decoder.lm_head))
        for index, layer in enumerate(decoder.layers):
            for name in ("input_norm", "qkv", "qkv_bias", "o", "o_bias", "post_norm", "gate_up", "gate_up_bias",
                         "down", "down_bias"):
                tensor = _dense(getattr(layer, name))
                if tensor is not None:  # biases are optional (Qwen2 has q/k/v biases, Llama none)
                    self.register_buffer(f"layer{index}_{name}", tensor)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def _weight(self, index: int, name: str) -> torch.Tensor | None:
        """A layer's weight (a buffer, so that torch.export sees it as the module's state)."""
        name = f"layer{index}_{name}"
        return self.get_buffer(name) if name in self._buffers else None

    def _required(self, index: int, name: str) -> torch.Tensor:
        return self.get_buffer(f"layer{index}_{name}")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, logits_index: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = input_ids.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = self.q_size, self.kv_size
        block_shape = key_cache.shape[1:]  # [blocks, block_size, kv_heads, head_dim]
        x = F.embedding(input_ids, self.get_buffer("embed"))
        cos = self.get_buffer("cos")[positions].unsqueeze(1)
        sin = self.get_buffer("sin")[positions].unsqueeze(1)
        # which cached positions each token sees: its own and the earlier ones of its sequence
        context = block_tables.shape[1] * key_cache.shape[2]
        visible = torch.arange(context, device=positions.device).unsqueeze(0) <= positions.unsqueeze(1)
        bias = torch.where(visible, 0.0, float("-inf")).to(x.dtype)[:, None, None, :]  # [T, 1, 1, C]
        scale = head_dim ** -0.5
        new_keys = []
        new_values = []
        for index in range(self.num_layers):
            h = self._rms_norm(x, self._required(index, "input_norm"))
            qkv = F.linear(h, self._required(index, "qkv"), self._weight(index, "qkv_bias"))
            qk = qkv[:, : q_size + kv_size].reshape(tokens, heads + kv_heads, head_dim)
            half = head_dim // 2
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rotated * sin
            q = qk[:, :heads]
            k = qk[:, heads:]
            v = qkv[:, q_size + kv_size:].reshape(tokens, kv_heads, head_dim)
            # this step's K/V into the pool first: attention then reads them like any cached ones
            keys = key_cache[index].reshape(-1, kv_heads, head_dim).index_put((slot_mapping,), k)
            values = value_cache[index].reshape(-1, kv_heads, head_dim).index_put((slot_mapping,), v)
            keys = keys.reshape(block_shape)
            values = values.reshape(block_shape)
            new_keys.append(keys)
            new_values.append(values)
            # [T, W, block_size, kv_heads, head_dim] -> [T, kv_heads, C, head_dim]
            ctx_k = keys[block_tables].reshape(tokens, context, kv_heads, head_dim).transpose(1, 2)
            ctx_v = values[block_tables].reshape(tokens, context, kv_heads, head_dim).transpose(1, 2)
            # grouped-query attention: the query heads sharing a kv head attend as one group
            grouped = q.reshape(tokens, kv_heads, heads // kv_heads, head_dim)
            scores = torch.matmul(grouped, ctx_k.transpose(-1, -2)) * scale + bias  # [T, kvh, g, C]
            attn = torch.matmul(torch.softmax(scores, dim=-1), ctx_v).reshape(tokens, heads * head_dim)
            x = x + F.linear(attn, self._required(index, "o"), self._weight(index, "o_bias"))
            h = self._rms_norm(x, self._required(index, "post_norm"))
            gate_up = F.linear(h, self._required(index, "gate_up"), self._weight(index, "gate_up_bias"))
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, self._required(index, "down"), self._weight(index, "down_bias"))
        x = self._rms_norm(x[logits_index], self.get_buffer("norm"))
        logits = F.linear(x, self.get_buffer("lm_head")).float()
        return logits, torch.stack(new_keys), torch.stack(new_values)


def graph_inputs(step: ScheduledStep, block_ids: Mapping[str, list[int]], block_size: int) -> dict[str, np.ndarray]:
    """The graph's index inputs for a scheduled step (the cache tensors are the caller's):
    rows in step order, so logits come back one per `sample` row in row order, as the
    torch runner's do. block_ids: each running request's cache blocks."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    tables: list[list[int]] = []
    logits_index: list[int] = []
    width = max(-(-(row.start + row.num_tokens) // block_size) for row in step.rows)
    for row in step.rows:
        blocks = block_ids[row.request_id]
        table = blocks[:width] + [blocks[0]] * (width - min(width, len(blocks)))  # padding is masked out
        for offset, token in enumerate(row.token_ids):
            pos = row.start + offset
            input_ids.append(token)
            positions.append(pos)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
            tables.append(table)
        if row.sample:
            logits_index.append(len(input_ids) - 1)
    return {
        "input_ids": np.asarray(input_ids, dtype=np.int64),
        "positions": np.asarray(positions, dtype=np.int64),
        "slot_mapping": np.asarray(slots, dtype=np.int64),
        "block_tables": np.asarray(tables, dtype=np.int64).reshape(len(input_ids), width),
        "logits_index": np.asarray(logits_index, dtype=np.int64),
    }


def example_inputs(decoder: Decoder, num_blocks: int = 8, block_size: int = 4) -> tuple[torch.Tensor, ...]:
    """A small mixed step (a 3-token prefill chunk after 2 cached tokens, 2 decode rows)
    with sizes > 1 everywhere, so that torch.export keeps every dimension dynamic."""
    layers, kv_heads, head_dim = len(decoder.layers), decoder.num_kv_heads, decoder.head_dim
    cache_shape = (layers, num_blocks, block_size, kv_heads, head_dim)
    positions = torch.tensor([5, 6, 2, 3, 4], dtype=torch.long)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]], dtype=torch.long)
    slots = torch.tensor([t[p // block_size] * block_size + p % block_size
                          for t, p in zip(tables.tolist(), positions.tolist(), strict=True)], dtype=torch.long)
    return (torch.tensor([3, 4, 5, 6, 7], dtype=torch.long), positions, slots, tables,
            torch.tensor([0, 1, 4], dtype=torch.long),
            torch.zeros(cache_shape, dtype=decoder.dtype), torch.zeros(cache_shape, dtype=decoder.dtype))


def export_onnx(checkpoint: Checkpoint, out: str | Path, *, block_size: int = 16, max_len: int | None = None) -> Path:
    """Write the step graph of a checkpoint to `out` (fp32, CPU) and check it; returns the path.
    block_size: the KV cache's tokens per block (the engine's block_size); max_len: the
    longest position the graph serves (its rope tables), default the model's."""
    max_len = max_len or checkpoint.config.max_position_embeddings
    decoder = Decoder.from_weights(checkpoint.config, checkpoint.load_weights(), max_len=max_len)
    return export_decoder(decoder, out, block_size=block_size)


def export_decoder(decoder: Decoder, out: str | Path, *, block_size: int = 16) -> Path:
    """Write a Decoder's step graph for a cache of `block_size` tokens per block to `out`
    and check it with onnx.checker."""
    import onnx

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = StepGraph(decoder).eval()
    tokens = torch.export.Dim("tokens")
    rows = torch.export.Dim("logit_rows")
    width = torch.export.Dim("table_width")
    blocks = torch.export.Dim("num_blocks")
    cache_dims = {1: blocks}
    dynamic_shapes = ({0: tokens}, {0: tokens}, {0: tokens}, {0: tokens, 1: width}, {0: rows},
                      cache_dims, cache_dims)
    # the exporter's optimizer logs every rewrite at INFO: too much for a server's log
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                graph, example_inputs(decoder, block_size=block_size), dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, opset_version=OPSET, optimize=True,
                verbose=False, external_data=False,
            )
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    # protobuf holds at most 2 GiB: bigger models keep their weights in OUT.data beside it
    weight_bytes = sum(b.numel() * b.element_size() for b in graph.buffers())
    program.save(str(out), external_data=weight_bytes > PROTOBUF_LIMIT)
    onnx.checker.check_model(str(out), full_check=True)
    return out
