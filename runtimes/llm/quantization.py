"""Weight-only int8 for the torch engine on CPU (`--option quantization=int8`).

    weight = quantize_int8(fp32_weight)      # Int8Weight: int8 [out, in] + fp32 scales [out]
    y = weight.linear(x, bias)               # what model.linear calls for such a weight

Each output channel (row) is quantized symmetrically: scale = max|row| / 127, q =
round(row / scale) in -127..127, so a row's largest weight is exact and zero stays zero.
The matmul is aten's `_weight_int8pack_mm`, which reads the int8 weight as it is (no
dequantized copy per step). Its CPU kernel is fast only for bfloat16 activations (for
float32 ones it takes a slow path, ~15x slower than oneDNN's fp32 matmul here), so the
activations are rounded to bfloat16 for the matmul, which accumulates in float32; the
fp32 scales are applied after, to the float32 result. Measured on this CPU (one thread,
[2048 x 1024] weight): 83 us vs 126 us for packed fp32 at 1 row, 443 vs 332 at 16 rows,
2137 vs 1321 at 64 rows: decode steps gain, big prefills pay a little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Int8Weight", "int8_supported", "quantize_int8"]


@dataclass
class Int8Weight:
    """An int8 linear weight [out, in] with one float32 scale per output channel."""

    q: torch.Tensor          # int8 [out, in]
    scale: torch.Tensor      # float32 [out]
    _ones: torch.Tensor      # bfloat16 [out]: the kernel's own scales (ours are applied after, in fp32)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.q, self._ones).float() * self.scale
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.q.shape[0])


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8 of a [out, in] weight (any float dtype, on CPU)."""
    if weight.dim() != 2:
        raise ValueError(f"an int8 weight must be 2-D [out, in], got shape {list(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    ones = torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device)
    return Int8Weight(q, scale.contiguous(), ones)


def int8_supported() -> str | None:
    """None if this torch can run int8 weights on CPU, else why not."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"torch {torch.__version__} has no aten._weight_int8pack_mm (torch >= 2.3 has it)"
    return None
