"""What every native model family is to the runtime (``CachedLM``), and the attention helpers they share."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kv.paged import CacheFactory, LayerCache, PagedKVCache
from ..kv.static import KVCache, Start, chunk_positions
from . import step_attention


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

    def prefill(self, idx: Tensor, slots: int | Tensor, start: Start = 0, last: Tensor | None = None) -> Tensor:
        """(B, T) right-padded prompt chunks at positions [start, start + T) (``start``: one for all rows or each
        row's own) -> (B, V) logits at each row's ``last`` index (default T - 1); their keys/values land in
        cache rows ``slots``."""
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


def cached_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, pos: Tensor, t: int,
                     groups: int = 1) -> Tensor:
    """Attention of a decode or verify step's queries over their rows' cached keys: ``mask`` (B, 1, t, ctx)
    True where a row's query attends; ``pos`` each row's first position and ``t`` the step's positions per row;
    ``groups`` query heads share each KV head, their rows following one another (row ``g * t + j`` of a KV
    head). On a CPU in float32 the step kernel, which gives a query the same bits in any batch, context bucket
    and verify width (``step_attention``); elsewhere torch's fused attention."""
    if step_attention.usable(q):
        return torch.ops.minercore.step_attention(q, keys, values, verify_positions(pos, t))
    if t > 1 and groups > 1:  # each query head's t rows take the row's t masks in turn
        b, ctx = mask.shape[0], mask.shape[-1]
        mask = mask.expand(b, groups, t, ctx).reshape(b, 1, groups * t, ctx)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def step_over_cache(cache: LayerCache, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, pos: Tensor, ctx: int,
                    groups: int = 1) -> Tensor:
    """A decode or verify step's keys and values written into ``cache``, then ``cached_attention`` of its queries
    over their rows' first ``ctx`` positions. On a CPU in float32 the step kernel reads a paged cache's blocks
    where they lie: the same bits as over a gathered copy of them, without making the copy in every layer."""
    t = k.shape[2]
    if isinstance(cache, PagedKVCache) and step_attention.usable(q):
        cache.write_step(pos, k, v)
        return torch.ops.minercore.step_attention_paged(q, cache.k, cache.v, cache.table[:q.shape[0]],
                                                        verify_positions(pos, t), ctx)
    keys, values = cache.append(pos, k, v, ctx)
    return cached_attention(q, keys, values, mask, pos, t, groups)


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, start: Start, lengths: list[int] | None = None) -> Tensor:
    """Causal attention of a prompt chunk's queries (positions [start, start + T), ``start`` one for all rows
    or each row's own) over keys [0, start + T) (a row's keys past that, the other rows' reach, are not seen).

    ``lengths``: each row's real length in a right-padded batch. Each row then attends at its own length, in the
    very shapes it would have alone: the attention kernels round a row differently when its keys are padded
    (their blocking follows the key count), and a batch must not change a prompt's numbers by a single bit.
    The padding positions' outputs are zeros (nothing reads them)."""
    b, t = q.shape[0], q.shape[2]
    starts = [start] * b if isinstance(start, int) else list(start)
    if lengths is not None and (len(set(starts)) > 1 or any(n != t for n in lengths)):
        y = torch.zeros_like(q)
        for i, (first, n) in enumerate(zip(starts, lengths, strict=True)):
            end = first + n
            y[i:i + 1, :, :n] = _causal_attention(q[i:i + 1, :, :n], k[i:i + 1, :, :end], v[i:i + 1, :, :end], first)
        return y
    if len(set(starts)) > 1:  # one fused call: each query sees its row's keys up to its own position
        mask = torch.arange(k.shape[2], device=q.device) <= chunk_positions(starts, t, q.device)[..., None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return _causal_attention(q, k[:, :, :starts[0] + t], v[:, :, :starts[0] + t], starts[0])


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[2]
    mask = torch.arange(start + t, device=q.device) <= torch.arange(start, start + t, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def prompt_lengths(last: Tensor | None) -> list[int] | None:
    """Each row's real length from the index of its last position (``CachedLM.prefill``'s ``last``), for
    ``prompt_attention`` on a CPU, where a row's bits matter to int8 rows; None elsewhere (one fused call)."""
    return None if last is None or last.device.type != "cpu" else (last + 1).tolist()


def prompt_rows(slots: int | Tensor, device: torch.device) -> Tensor:
    """Cache rows as a (B,) index tensor (one int slot is a batch of one)."""
    return torch.tensor([slots], device=device) if isinstance(slots, int) else slots
