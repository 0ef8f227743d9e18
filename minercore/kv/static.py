"""The static KV cache: every slot owns ``positions`` keys and values per layer from the start (the reference the
paged cache of the coming issue is tested against)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of every slot for one layer, allocated once: (max_batch, n_head, positions, head_dim)."""

    def __init__(self, max_batch: int, n_head: int, positions: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (max_batch, n_head, positions, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def fill(self, slots: Tensor, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write prompt chunks, (B, H, T, D), at positions [start, start + T) of rows ``slots``; return what
        their queries attend: the chunk itself from position 0, else the rows' positions [0, start + T)."""
        end = start + k.shape[2]
        self.k[slots, :, start:end] = k
        self.v[slots, :, start:end] = v
        if start == 0:
            return k, v
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
