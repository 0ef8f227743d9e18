"""The paged KV cache's storage: one layer's keys and values in a pool of fixed-size blocks, found through a
block table, a drop-in for ``static.KVCache`` (same ``fill`` / ``append`` and return contract).

A slot owns no region: position p of slot s lives in block ``table[s, p // block_size]`` at offset
``p % block_size``, so memory follows the tokens actually held instead of ``max_context`` per slot, and a
block can later be shared by streams with a common prefix (``manager.KVCacheManager`` decides which block is
whose). The pools are allocated once and the table is a fixed-shape int64 tensor on the device, padded with the
null block 0, and edited in place: a compiled or CUDA-graph-captured step reads the new assignment without
retracing. Every layer's cache reads the same table tensor (one assignment per slot, not one per layer).

Positions a row has no block for (table entries still 0) and positions past the table's end read and write the
null block: what lands there is garbage no stream owns, which is harmless because the models mask every
position beyond a row's own length (the paged counterpart of the static cache's spare last position).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .block_pool import NULL_BLOCK
from .static import KVCache, Start, chunk_end, chunk_positions


def pool_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed pool tensor. On a CPU it is backed by an anonymous mapping, whose pages the OS provides zeroed
    when first written: the process's resident memory grows with the blocks streams have used, as llama.cpp's
    does, instead of taking the whole pool at start-up. (A device's memory is reserved up front either way.)"""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # Private: a page read before it is written maps the shared zero page instead of allocating one.
    mapping = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class PagedKVCache(nn.Module):
    """Keys and values of one layer in ``num_blocks`` blocks, (num_blocks, n_head, block_size, head_dim) each,
    addressed through ``table`` (max_batch, max_blocks_per_slot), which the caller owns and shares."""

    def __init__(self, num_blocks: int, block_size: int, table: Tensor, n_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.block_size = block_size
        # A plain attribute, not a buffer: a buffer per layer would become one copy per layer on ``.to()``,
        # and every layer must read the one table the caller edits.
        self.table = table
        shape = (num_blocks, n_head, block_size, head_dim)
        self.register_buffer("k", pool_zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", pool_zeros(shape, dtype, device), persistent=False)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position costs in this layer: a key and a value per head, as in the static cache."""
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()

    def _write(self, tables: Tensor, at: Tensor, k: Tensor, v: Tensor) -> None:
        """Store (B, H, T, D) ``k``, ``v`` at positions ``at`` (B, T) of the rows whose table rows are ``tables``."""
        capacity = tables.shape[1] * self.block_size
        column = at.clamp(max=capacity - 1) // self.block_size
        blocks = torch.where(at < capacity, tables.gather(1, column), NULL_BLOCK)
        offsets = at % self.block_size
        # Two advanced indices around a slice: the indexed shape is (B, T, H, D), hence the transposes.
        self.k[blocks, :, offsets] = k.transpose(1, 2)
        self.v[blocks, :, offsets] = v.transpose(1, 2)

    def _read(self, tables: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Positions [0, n) of the rows whose table rows are ``tables``, gathered into (B, H, n, D) tensors."""
        # Ceiling division without negation: a negated symbol breaks dynamo's reuse of a nested compile region.
        blocks = tables[:, :(n + self.block_size - 1) // self.block_size]

        def gather(pool: Tensor) -> Tensor:
            # (B, blocks, H, block_size, D) -> (B, H, blocks * block_size, D): the blocks laid end to end.
            return pool[blocks].transpose(1, 2).flatten(2, 3)[:, :, :n]

        return gather(self.k), gather(self.v)

    def fill(self, slots: Tensor, start: Start, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write prompt chunks, (B, H, T, D), at positions [start, start + T) of rows ``slots`` (``start``: one
        for all rows or each row's own); return what their queries attend: the chunk itself from position 0,
        else the rows' positions up to the furthest row's end."""
        t = k.shape[2]
        tables = self.table[slots]
        self._write(tables, chunk_positions(start, t, k.device).expand(k.shape[0], t), k, v)
        if start == 0:
            return k, v
        return self._read(tables, chunk_end(start, t))

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``dst``'s keys and values made those of block ``src``."""
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]

    def append(self, pos: Tensor, k: Tensor, v: Tensor, ctx: int) -> tuple[Tensor, Tensor]:
        """Write row i's (H, T, D) step at positions ``pos[i]`` ... ``pos[i] + T - 1`` for rows [0, b) (T > 1:
        a speculative verify; positions past the table land in the null block); return those rows' first
        ``ctx`` positions."""
        self.write_step(pos, k, v)
        return self._read(self.table[:pos.shape[0]], ctx)

    def write_step(self, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """``append``'s write alone, for an attention that reads the blocks where they lie."""
        t = k.shape[2]
        self._write(self.table[:pos.shape[0]], pos[:, None] + torch.arange(t, device=pos.device), k, v)


LayerCache = KVCache | PagedKVCache
# What a model's ``setup_caches`` builds each layer's cache with: (max_batch, n_head, positions, head_dim, dtype,
# device), the static cache's constructor or ``PagedSpec.layer_cache``.
CacheFactory = Callable[[int, int, int, int, torch.dtype, torch.device], LayerCache]


@dataclass(frozen=True, eq=False)
class PagedSpec:
    """The layout all layers' paged caches share: the pool's size and block size, and the one block table.

    Pass ``layer_cache`` as a model's ``setup_caches(..., cache_factory=...)``; then ``set_blocks`` a slot's
    table row (from ``KVCacheManager.block_table``) before any step writes to it."""

    num_blocks: int
    block_size: int
    table: Tensor  # (max_batch, max_blocks_per_slot) int64 on the caches' device

    @classmethod
    def create(cls, num_blocks: int, block_size: int, max_batch: int, max_blocks_per_slot: int,
               device: torch.device) -> PagedSpec:
        """A spec whose table has every entry on the null block (no slot owns anything yet)."""
        table = torch.full((max_batch, max_blocks_per_slot), NULL_BLOCK, dtype=torch.int64, device=device)
        return cls(num_blocks, block_size, table)

    @property
    def max_blocks_per_slot(self) -> int:
        return self.table.shape[1]

    def layer_cache(self, max_batch: int, n_head: int, positions: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device) -> PagedKVCache:
        """One layer's cache over this spec (a ``CacheFactory``). Refuses a table with another number of rows
        than ``max_batch``, or too few columns for ``positions``: the model would attend positions no table
        entry can name."""
        if self.table.shape[0] != max_batch:
            raise ValueError(f"the block table has {self.table.shape[0]} rows, the model asks for {max_batch}")
        if self.max_blocks_per_slot * self.block_size < positions:
            raise ValueError(f"{self.max_blocks_per_slot} blocks of {self.block_size} per slot hold fewer than "
                             f"the {positions} positions the model asks for")
        return PagedKVCache(self.num_blocks, self.block_size, self.table, n_head, head_dim, dtype, device)

    def move_row(self, src: int, dst: int) -> None:
        """Row ``src``'s blocks to row ``dst``, and ``src`` onto the null block: on the device, ordered after the
        step in flight (which still reads the old rows)."""
        self.table[dst] = self.table[src]
        self.table[src] = NULL_BLOCK

    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        """Point ``slot``'s table row at ``blocks`` (block i holds positions [i * block_size, (i + 1) *
        block_size)), the rest at the null block, in place so that captured graphs see it."""
        if len(blocks) > self.max_blocks_per_slot:
            raise ValueError(f"{len(blocks)} blocks for a table row of {self.max_blocks_per_slot}")
        if any(not 0 <= block < self.num_blocks for block in blocks):
            raise ValueError(f"block ids must lie in [0, {self.num_blocks}), got {list(blocks)}")
        row = torch.full((self.max_blocks_per_slot,), NULL_BLOCK, dtype=torch.int64)
        row[:len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        if self.table.is_cuda:
            # Pinned and asynchronous, queued behind the step in flight (which still reads the old row): a
            # pageable copy would make the host wait for that step. The caching host allocator keeps the
            # pinned row until the copy has run.
            row = row.pin_memory()
        self.table[slot].copy_(row, non_blocking=True)
