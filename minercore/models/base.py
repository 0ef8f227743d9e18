"""What every native model family is to the runtime (``CachedLM``), and the attention helpers they share."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kv.paged import CacheFactory
from ..kv.static import KVCache


class CachedLM(Protocol):
    """A model with a static KV cache, as ``runtime.native.ModelRunner`` drives it: ``gpt2.GPT2LM`` and
    ``llama.LlamaLM`` (the Llama family). An ``nn.Module`` (the runner moves and casts it)."""

    config: Any  # has vocab_size
    max_positions: int
    blocks: nn.ModuleList  # the transformer blocks, each with a ``step`` the decode and verify forwards call

    def describe(self) -> str: ...

    def setup_caches(self, max_batch: int, max_context: int, cache_factory: CacheFactory = KVCache) -> int:
        """Allocate caches for ``max_batch`` rows of ``max_context`` positions, each layer's built by
        ``cache_factory`` (the static cache unless a paged one is asked for); returns KV bytes per slot."""
        ...

    def forward(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, V) logits, no cache (the reference)."""
        ...

    def prefill(self, idx: Tensor, slots: int | Tensor, start: int = 0, last: Tensor | None = None) -> Tensor:
        """(B, T) right-padded prompt chunks at positions [start, start + T) -> (B, V) logits at each row's
        ``last`` index (default T - 1); their keys/values land in cache rows ``slots``."""
        ...

    def decode(self, tokens: Tensor, pos: Tensor, ctx: int) -> Tensor:
        """(b,) tokens at (b,) positions -> (b, V) logits over cache rows [0, b), positions [0, ctx)."""
        ...

    def verify(self, tokens: Tensor, pos: Tensor, ctx: int) -> Tensor:
        """(b, T) tokens at positions ``pos[i]`` ... ``pos[i] + T - 1`` -> (b, T, V) logits, each query seeing
        its row's cache up to its own position: a decode step of T tokens per row (speculative drafts checked
        in one forward). Cache rows [0, b), positions [0, ctx)."""
        ...


def verify_positions(pos: Tensor, t: int) -> Tensor:
    """(b, T) positions of a verify step's queries: row i's start ``pos[i]`` and the T - 1 after it."""
    return pos[:, None] + torch.arange(t, device=pos.device)


def verify_mask(at: Tensor, ctx: int) -> Tensor:
    """(b, 1, T, ctx) boolean mask: query (i, j) attends the keys at or before its position ``at[i, j]``."""
    return (torch.arange(ctx, device=at.device) <= at[..., None])[:, None]


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Causal attention of a prompt chunk's queries (positions [start, start + T)) over keys [0, start + T)."""
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[2]
    mask = torch.arange(start + t, device=q.device) <= torch.arange(start, start + t, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def prompt_rows(slots: int | Tensor, device: torch.device) -> Tensor:
    """Cache rows as a (B,) index tensor (one int slot is a batch of one)."""
    return torch.tensor([slots], device=device) if isinstance(slots, int) else slots
