"""A compact Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

One forward pass runs one scheduler step: the new tokens of every scheduled sequence,
flattened into one [T, hidden] batch, so every projection is a single matmul over all of
them. Only attention looks at sequences separately:

- "single" rows (decode steps; one new token per sequence) come sorted by context length
  and are attended in `DecodeChunk`s of similar length: each chunk gathers only its own
  rows' used blocks (padded to the chunk's longest row, not the batch's) into a
  [rows, kv_heads, L, head_dim] batch for one scaled_dot_product_attention, with an
  additive mask (built once per step, shared by all layers) where lengths differ. On the
  CPU a chunk's gathered K/V is kept to about what the caches hold (runner.DECODE_CHUNK_BYTES):
  the gather and the attention that reads it back then stay in cache instead of going
  through memory twice, which is what a whole-batch gather did at high concurrency;
- multi-token chunks (prefill, possibly chunked) are attended one sequence each, causally,
  against the cache when earlier chunks of the prompt are already in it.

Logits are computed for the rows the sampler needs only (`StepBatch.logits_index`).
Weights are plain tensors (no nn.Module): q/k/v are fused into one projection, and so are
gate/up, which saves matmul calls per layer. On the CPU in float32 the projection
weights are kept in oneDNN's blocked layout (`pack_linear_weight`): the decode step is
a chain of few-row matmuls, and these run about twice as fast as F.linear's there. With
quantization="int8" they are int8 instead (quantization.Int8Weight; `linear` takes both).
In float32 the residual adds ride on the packed matmuls (oneDNN's sum post-op), and the
RMSNorms and the rotary embedding are written with as few ops as give the same float32
results: between two matmuls every op pays for caches the weights just swept (measured: the
first op after a matmul takes several times its cost alone), so fewer ops is what counts.
The model runner owns the cache tensors and builds the StepBatch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import ModelConfig, RopeConfig
from modelgw.runtimes.llm.kv_cache import KVCache
from modelgw.runtimes.llm.quantization import Int8Weight, quantize_int8


@dataclass
class PrefillSpan:
    """A multi-token chunk of one sequence in the flat batch."""

    start: int                      # first row in the flat batch
    length: int                     # rows (new tokens)
    context_start: int              # position of the first new token (tokens already cached)
    blocks: torch.Tensor | None     # the sequence's cache blocks, when context_start > 0
    mask: torch.Tensor | None       # [length, context_start + length] bool, when context_start > 0


@dataclass
class DecodeChunk:
    """Single rows start..stop-1 of the flat batch, attended together."""

    start: int
    stop: int
    blocks: torch.Tensor            # [(stop - start) * width] block ids, row by row (padded)
    mask: torch.Tensor | None       # [stop - start, 1, 1, width * block_size] additive (0 / -inf); None: no padding


@dataclass
class StepBatch:
    """Everything one forward pass needs, as tensors on the model's device."""

    input_ids: torch.Tensor                 # [T]
    positions: torch.Tensor                 # [T]
    slot_mapping: torch.Tensor              # [T]: where each new token's K/V goes in the cache
    num_single: int = 0                     # rows 0..num_single-1: one token of one sequence each
    chunks: list[DecodeChunk] = field(default_factory=list)  # those rows, in DecodeChunks covering them
    spans: list[PrefillSpan] = field(default_factory=list)
    logits_index: torch.Tensor | None = None    # [S] rows whose next-token logits are wanted


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int,
                             max_len: int) -> torch.Tensor:
    """The rotary inverse frequencies for the config's scaling, as transformers computes them.

    "dynamic" (NTK) scaling is applied statically for the served context: within
    max_position_embeddings it is the default rope (exactly what transformers does there);
    for a longer max_len the base is scaled once for max_len, as vLLM does, since cached
    keys cannot be re-rotated."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base = rope.theta
    if rope.type == "dynamic" and max_len > max_position_embeddings:
        factor = rope.factor
        base = base * ((factor * max_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** exponent)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        original = rope.original_max_position_embeddings or max_position_embeddings
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_len, head_dim] float32, in transformers' rotate-half layout."""
    inv_freq = rope_inverse_frequencies(config.rope, config.head_dim, config.max_position_embeddings, max_len)
    positions = torch.arange(max_len, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout when that helps (float32 on a CPU whose torch
    has oneDNN), else as it is. Use it with `linear`."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available()
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 16)  # 16: the row count it is tuned for
    except RuntimeError:
        return weight


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (+ residual), for plain, `pack_linear_weight`-packed or int8 (quantization.py)
    weights. A packed weight adds the residual inside oneDNN's matmul (a fused post-op, the
    same float32 sum), which saves an op per residual connection."""
    if isinstance(weight, Int8Weight):
        y = weight.linear(x, bias)
    elif weight.is_mkldnn:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    else:
        y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor | Int8Weight
    qkv_bias: torch.Tensor | None
    o: torch.Tensor | Int8Weight
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor | Int8Weight
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | Int8Weight
    down_bias: torch.Tensor | None


class Decoder:
    """The decoder's weights and forward pass. Build with `Decoder.from_weights`."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor | Int8Weight, max_len: int) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.device = embed.device
        self.dtype = embed.dtype
        cos, sin = rope_tables(config, max_len)
        # transformers casts cos/sin to the activations' dtype before rotating: same here
        self.cos = cos.to(self.device, self.dtype)
        self.sin = sin.to(self.device, self.dtype)
        # sin with rotate_half's negation folded in (-x2 * s == x2 * -s exactly): the rotation
        # is then a plain swap of the halves, one op fewer per layer
        half = config.head_dim // 2
        self.sin_signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.eps = config.rms_norm_eps

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: dict[str, Any], *, max_len: int,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     quantization: str = "none") -> Decoder:
        """From Hugging Face tensor names (model.layers.N.self_attn.q_proj.weight, ...).
        quantization="int8": the projections and an untied lm_head as Int8Weight (CPU)."""

        def maybe(name: str) -> torch.Tensor | None:
            tensor = weights.pop(name, None)
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        def take(name: str) -> torch.Tensor:
            tensor = maybe(name)
            if tensor is None:
                raise ModelLoadError(f"the checkpoint lacks the weight '{name}'")
            return tensor

        def maybe_fused(names: list[str]) -> torch.Tensor | None:
            parts = [maybe(n) for n in names]
            present = [p for p in parts if p is not None]
            if not present:
                return None
            if len(present) < len(parts):
                raise ModelLoadError(f"the checkpoint has only some of {', '.join(names)}")
            return torch.cat(present, dim=0).contiguous()

        def fused(names: list[str]) -> torch.Tensor:
            tensor = maybe_fused(names)
            if tensor is None:
                raise ModelLoadError(f"the checkpoint lacks the weight '{names[0]}'")
            return tensor

        embed = take("model.embed_tokens.weight")
        if embed.shape[0] != config.vocab_size or embed.shape[1] != config.hidden_size:
            raise ModelLoadError(
                f"model.embed_tokens.weight has shape {list(embed.shape)}, config.json says "
                f"[{config.vocab_size}, {config.hidden_size}]"
            )
        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn = [f"{p}self_attn.{x}_proj" for x in ("q", "k", "v")]
            mlp = [f"{p}mlp.{x}_proj" for x in ("gate", "up")]
            qkv = fused([f"{n}.weight" for n in attn])
            expected = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
            if qkv.shape != (expected, config.hidden_size):
                raise ModelLoadError(
                    f"layer {i}: q/k/v projections have {qkv.shape[0]} rows in all, "
                    f"config.json implies {expected}"
                )
            layers.append(LayerWeights(
                input_norm=take(f"{p}input_layernorm.weight"),
                qkv=qkv,
                qkv_bias=maybe_fused([f"{n}.bias" for n in attn]),
                o=take(f"{p}self_attn.o_proj.weight"),
                o_bias=maybe(f"{p}self_attn.o_proj.bias"),
                post_norm=take(f"{p}post_attention_layernorm.weight"),
                gate_up=fused([f"{n}.weight" for n in mlp]),
                gate_up_bias=maybe_fused([f"{n}.bias" for n in mlp]),
                down=take(f"{p}mlp.down_proj.weight"),
                down_bias=maybe(f"{p}mlp.down_proj.bias"),
            ))
        prepare: Callable[[torch.Tensor], torch.Tensor | Int8Weight] = (
            quantize_int8 if quantization == "int8" else pack_linear_weight)
        for layer in layers:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(layer, name, prepare(getattr(layer, name)))
        norm = take("model.norm.weight")
        lm_head = maybe("lm_head.weight") if config.tie_word_embeddings else take("lm_head.weight")
        # a tied head stays the embedding itself: a packed (or int8) copy would add to its memory
        lm_head = embed if lm_head is None else prepare(lm_head)
        return cls(config, embed, layers, norm, lm_head, max_len)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # F.rms_norm's own float32 math (x * rsqrt(mean(x^2) + eps) * weight, the same
            # results), written out: its CPU composite dispatches some twenty ops, these five
            return torch.mul(x, torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))).mul_(weight)
        # in float32, like transformers' LlamaRMSNorm, then back to the activations' dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Run the step's tokens through the model, writing their K/V into the cache;
        returns float32 logits [S, vocab] for batch.logits_index."""
        tokens = batch.input_ids.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = self.q_size, self.kv_size
        x = F.embedding(batch.input_ids, self.embed)
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, head_dim], shared by all layers
        sin = self.sin_signed[batch.positions].unsqueeze(1)
        half = head_dim // 2
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm)
            qkv = linear(h, layer.qkv, layer.qkv_bias)
            qk = qkv[:, : q_size + kv_size].view(tokens, heads + kv_heads, head_dim)
            # q and k rotated in one go: qk * cos + rotate_half(qk) * sin, in place where it can be
            qk = (qk * cos).add_(torch.cat((qk[..., half:], qk[..., :half]), dim=-1).mul_(sin))
            q = qk[:, :heads]
            k = qk[:, heads:]
            v = qkv[:, q_size + kv_size:].view(tokens, kv_heads, head_dim)
            cache.write(index, batch.slot_mapping, k, v)
            attn = self._attention(index, q, k, v, batch, cache)
            x = linear(attn, layer.o, layer.o_bias, residual=x)
            h = self._rms_norm(x, layer.post_norm)
            gate, up = linear(h, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            x = linear(F.silu(gate).mul_(up), layer.down, layer.down_bias, residual=x)
        if batch.logits_index is not None:
            x = x[batch.logits_index]
        x = self._rms_norm(x, self.norm)
        return linear(x, self.lm_head).float()

    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   batch: StepBatch, cache: KVCache) -> torch.Tensor:
        tokens = q.shape[0]
        kv_heads, head_dim = self.num_kv_heads, self.head_dim
        single = batch.num_single
        if single == tokens:  # decode only: the common case, no scatter into `out`
            return self._attend_singles(layer, q, batch, cache).reshape(tokens, -1)
        out = torch.empty_like(q)
        if single:
            out[:single] = self._attend_singles(layer, q[:single], batch, cache)
        for span in batch.spans:
            rows = slice(span.start, span.start + span.length)
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
            if span.blocks is None:  # the whole context is this chunk: plain causal attention
                ks = k[rows].transpose(0, 1).unsqueeze(0)
                vs = v[rows].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                context = span.context_start + span.length
                ks = cache.gather_keys(layer, span.blocks).view(-1, kv_heads, head_dim)[:context]
                vs = cache.gather_values(layer, span.blocks).view(-1, kv_heads, head_dim)[:context]
                o = F.scaled_dot_product_attention(
                    qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
                    attn_mask=span.mask, enable_gqa=True,
                )
            out[rows] = o[0].transpose(0, 1)
        return out.reshape(tokens, -1)

    def _attend_singles(self, layer: int, q: torch.Tensor, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """One query per sequence against its cached context: [n, heads, head_dim]."""
        kv_heads, head_dim, heads = self.num_kv_heads, self.head_dim, self.num_heads
        # grouped-query attention without repeating K/V: the query heads sharing a kv head
        # become that head's "query positions" (one token each, no causal mask among them)
        grouped = q.reshape(q.shape[0], kv_heads, heads // kv_heads, head_dim)
        outs = []
        for chunk in batch.chunks:
            rows = chunk.stop - chunk.start
            k = cache.gather_keys(layer, chunk.blocks).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
            v = cache.gather_values(layer, chunk.blocks).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(grouped[chunk.start:chunk.stop], k, v, attn_mask=chunk.mask))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return o.reshape(-1, heads, head_dim)
