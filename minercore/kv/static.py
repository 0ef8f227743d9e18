"""The static KV cache: every slot owns ``positions`` keys and values per layer from the start (the reference the
paged cache of the coming issue is tested against)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# A prompt chunk's first position: one for every row, or each row's own (a batch of prompts whose prefixes
# were found in the prefix cache to different lengths).
Start = int | Sequence[int]


def chunk_positions(start: Start, t: int, device: torch.device) -> Tensor:
    """The positions of a T-position prompt chunk: (1, T) from one start, (B, T) from each row's own."""
    first = torch.tensor([start] if isinstance(start, int) else list(start), device=device)
    return first[:, None] + torch.arange(t, device=device)


def chunk_end(start: Start, t: int) -> int:
    """One past the last position any row of a T-position chunk from ``start`` holds (padding included)."""
    return (start if isinstance(start, int) else max(start)) + t


class KVCache(nn.Module):
    """Keys and values of every slot for one layer, allocated once: (max_batch, n_head, positions, head_dim)."""

    def __init__(self, max_batch: int, n_head: int, positions: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (max_batch, n_head, positions, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def fill(self, slots: Tensor, start: Start, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write prompt chunks, (B, H, T, D), at positions [start, start + T) of rows ``slots`` (``start``: one
        for all rows or each row's own); return what their queries attend: the chunk itself from position 0,
        else the rows' positions up to the furthest row's end. A row's padding past the cache's end lands on
        its spare last position, which no step attends."""
        end = chunk_end(start, k.shape[2])
        if isinstance(start, int):
            self.k[slots, :, start:end] = k
            self.v[slots, :, start:end] = v
            if start == 0:
                return k, v
        else:
            at = chunk_positions(start, k.shape[2], k.device).clamp(max=self.k.shape[2] - 1)
            self.k[slots[:, None], :, at] = k.transpose(1, 2)
            self.v[slots[:, None], :, at] = v.transpose(1, 2)
            end = min(end, self.k.shape[2])
        return self.k[slots, :, :end], self.v[slots, :, :end]

    def append(self, pos: Tensor, k: Tensor, v: Tensor, ctx: int) -> tuple[Tensor, Tensor]:
        """Write row i's (H, T, D) step at positions ``pos[i]`` ... ``pos[i] + T - 1`` for rows [0, b) (T > 1:
        a speculative verify, whose positions past the cache's end land on its spare last position, which no
        step attends); return views of their first ``ctx`` positions (views, not gathers: the batch bucket is a
        prefix of the cache rows)."""
        b, t = pos.shape[0], k.shape[2]
        rows = torch.arange(b, device=pos.device)
        if t == 1:
            self.k[rows, :, pos] = k[:, :, 0]
            self.v[rows, :, pos] = v[:, :, 0]
        else:
            at = (pos[:, None] + torch.arange(t, device=pos.device)).clamp(max=self.k.shape[2] - 1)
            self.k[rows[:, None], :, at] = k.transpose(1, 2)
            self.v[rows[:, None], :, at] = v.transpose(1, 2)
        return self.k[:b, :, :ctx], self.v[:b, :, :ctx]
