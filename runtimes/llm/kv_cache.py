"""The KV cache: a fixed pool of blocks, sized once from a memory budget, never grown.

    pool = BlockPool(num_blocks=1024, block_size=16)
    blocks = pool.allocate(pool.blocks_for(prompt_len + max_tokens))   # None: does not fit now
    ...
    pool.free(blocks)                                                   # on finish or cancel
    pool.usage                                                          # 0..1, for load figures

    cache = KVCache(num_layers, pool.num_blocks, block_size, kv_heads, head_dim, dtype, device)
    cache.write(layer, slot_mapping, k, v)           # new tokens' K/V, by slot
    cache.gather_keys(layer, block_ids)              # some blocks (a decode chunk's, a prompt's), for attention

A token at position p of a sequence lives in slot blocks[p // block_size] * block_size +
p % block_size. A sequence gets the blocks for its whole budget (prompt + max_tokens) when
it is admitted, so a running sequence can never run out of cache and nothing is ever
preempted; the scheduler admits a request only when its blocks are free (else it
queues). Blocks return to the pool the moment a sequence finishes or is cancelled.
"""

from __future__ import annotations

from collections import deque

import torch


class BlockPool:
    """Bookkeeping of free and used cache blocks (no tensors)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the blocks held by sequences, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks, or None when fewer are free (nothing is taken then)."""
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
        blocks.clear()


def blocks_for_budget(budget_bytes: int, block_size: int, kv_elements_per_token: int, dtype: torch.dtype) -> int:
    """How many blocks fit in a memory budget (K and V of every layer)."""
    element = torch.empty((), dtype=dtype).element_size()
    return int(budget_bytes // (block_size * kv_elements_per_token * element))


class KVCache:
    """The K and V tensors of every layer: [layers, blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # zeros, not empty: padded gathers read unused slots, which must hold finite numbers
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self._slot_shape = (num_blocks * block_size, num_kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[layer].view(self._slot_shape).index_copy_(0, slots, k)
        self.values[layer].view(self._slot_shape).index_copy_(0, slots, v)

    def gather_keys(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """[len(blocks), block_size, kv_heads, head_dim]"""
        return self.keys[layer].index_select(0, blocks)

    def gather_values(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        return self.values[layer].index_select(0, blocks)
