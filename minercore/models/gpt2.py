"""A GPT-2-shaped language model with a static KV cache (random weights from a seed, or real GPT-2 weights:
``loading.safetensors.load_gpt2``).

Architecture: learned positional embeddings, pre-LayerNorm blocks, GELU(tanh) MLP 4x, final LayerNorm,
LM head tied to the token embedding. Three entry points:

- ``forward(idx)``: full causal recompute, no cache (the reference the cached paths are tested against);
- ``prefill(idx, slots, start, last)``: prompt chunks (right-padded), their keys/values written into rows
  ``slots`` of every layer's cache at positions [start, start + T);
- ``decode(tokens, pos, ctx)``: one new token for each of the first ``len(tokens)`` cache rows, each
  attending over its own row's first ``ctx`` positions (masked beyond its own position). With
  ``flex_attention`` set, FlexAttention with a block mask built from the positions visits only the key blocks
  up to each row's own position (as gpt-fast does), so one ``ctx`` serves every length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..kv.paged import CacheFactory, LayerCache
from ..kv.static import KVCache, Start, chunk_positions
from .base import prompt_attention, prompt_lengths, prompt_rows, step_over_cache, verify_mask, verify_positions

FLEX_BLOCK = 128  # keys per FlexAttention block: a row reads whole blocks up to the one holding its position


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> GPTConfig:
        """From a config.json dict; ValueError for a model this module would compute differently."""
        if raw.get("model_type") != "gpt2":
            raise ValueError(f"a {raw.get('model_type')!r} model, not a GPT-2-family checkpoint")
        if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 attention variants are not supported")
        if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation {raw['activation_function']!r} is not GELU(tanh)")
        return cls(vocab_size=raw["vocab_size"], n_positions=raw["n_positions"], n_layer=raw["n_layer"],
                   n_head=raw["n_head"], n_embd=raw["n_embd"], layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5))


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v as in GPT-2 checkpoints
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.cache: LayerCache | None = None

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        return tuple(z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))

    def _merge(self, y: Tensor) -> Tensor:
        b, _, t, _ = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: Tensor, slots: Tensor | None = None, start: Start = 0,
                lengths: list[int] | None = None) -> Tensor:
        q, k, v = self._heads(x)
        if slots is not None:
            k, v = self.cache.fill(slots, start, k, v)
        return self._merge(prompt_attention(q, k, v, start, lengths))

    def step(self, x: Tensor, pos: Tensor, mask: Tensor | BlockMask, ctx: int) -> Tensor:
        q, k, v = self._heads(x)
        if isinstance(mask, BlockMask):
            keys, values = self.cache.append(pos, k, v, ctx)
            if q.device.type == "cpu":
                # Inductor's CPU FlexAttention template (torch 2.13) fails to lower a query that is a view of the
                # projection's output; a copy of a few values per row sidesteps it. CUDA lowers the view.
                q = q.clone()
            return self._merge(flex_attention(q, keys, values, block_mask=mask))
        return self._merge(step_over_cache(self.cache, q, k, v, mask, pos, ctx))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, slots: Tensor | None = None, start: Start = 0,
                lengths: list[int] | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), slots, start, lengths)
        return x + self.mlp(self.ln_2(x))

    def step(self, x: Tensor, pos: Tensor, mask: Tensor | BlockMask, ctx: int) -> Tensor:
        x = x + self.attn.step(self.ln_1(x), pos, mask, ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2LM(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.flex_attention = False  # decode with FlexAttention over each row's own length (see the module doc)

    @classmethod
    def random(cls, config: GPTConfig, seed: int = 0) -> GPT2LM:
        """GPT-2's initialisation (normal, std 0.02) from ``seed``, on the CPU so every device gets the same
        weights."""
        model = cls(config)
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is model.lm_head:
                    continue  # tied to wte, initialised there
                nn.init.normal_(module.weight, std=0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        return model

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    def describe(self) -> str:
        return describe(self.config)

    def setup_caches(self, max_batch: int, max_context: int, cache_factory: CacheFactory = KVCache) -> int:
        """Allocate every layer's cache on the model's device and dtype (static, or what ``cache_factory``
        builds, e.g. ``kv.paged.PagedSpec.layer_cache``); returns KV bytes per slot of ``max_context``."""
        if max_context > self.config.n_positions:
            raise ValueError(f"max_context {max_context} exceeds the model's {self.config.n_positions} "
                             f"positions; use max_context <= {self.config.n_positions}")
        weight = self.wte.weight
        # One spare position, never written: an attended prefix (even all of max_context) is then never the
        # whole cache, whose view would be contiguous and make torch.compile specialise a second graph.
        positions = max_context + 1
        for block in self.blocks:
            block.attn.cache = cache_factory(max_batch, self.config.n_head, positions, self.config.head_dim,
                                             weight.dtype, weight.device)
        return 2 * self.config.n_layer * positions * self.config.n_embd * weight.element_size()

    def _embed(self, idx: Tensor, start: Start = 0) -> Tensor:
        if isinstance(start, int):
            positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        else:  # each row's own positions; padding past the table takes its last position
            positions = chunk_positions(start, idx.shape[1], idx.device).clamp(max=self.wpe.num_embeddings - 1)
        return self.wte(idx) + self.wpe(positions)

    def forward(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, V) logits, recomputing everything; touches no cache."""
        x = self._embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def prefill(self, idx: Tensor, slots: int | Tensor, start: Start = 0, last: Tensor | None = None) -> Tensor:
        """(B, T) prompt chunks at positions [start, start + T) (one start or each row's) -> (B, V) logits at
        index ``last`` of each row (default: the chunk's end); keys/values stored in cache rows ``slots``. Rows
        shorter than T are padded on the right: causal attention keeps padding out of their real positions, and
        decode overwrites it."""
        rows, lengths = prompt_rows(slots, idx.device), prompt_lengths(last)
        x = self._embed(idx, start)
        for block in self.blocks:
            x = block(x, rows, start, lengths)
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.lm_head(self.ln_f(x))

    def decode(self, tokens: Tensor, pos: Tensor, ctx: int) -> Tensor:
        """(b,) tokens at (b,) positions -> (b, V) logits; row i uses cache row i, positions [0, ctx)."""
        x = (self.wte(tokens) + self.wpe(pos))[:, None, :]
        if self.flex_attention:
            mask = row_length_mask(pos, ctx)
        else:
            # True = attend: each row sees its own positions up to and including the one being written.
            mask = (torch.arange(ctx, device=pos.device) <= pos[:, None])[:, None, None, :]
        for block in self.blocks:
            x = block.step(x, pos, mask, ctx)
        return self.lm_head(self.ln_f(x[:, 0]))

    def verify(self, tokens: Tensor, pos: Tensor, ctx: int) -> Tensor:
        """(b, T) tokens from (b,) positions -> (b, T, V) logits (``base.CachedLM.verify``)."""
        at = verify_positions(pos, tokens.shape[1])
        # Positions past the table (a padded draft at the context's end) read its last entry: never used.
        x = self.wte(tokens) + self.wpe(at.clamp(max=self.config.n_positions - 1))
        mask = verify_mask(at, ctx)
        for block in self.blocks:
            x = block.step(x, pos, mask, ctx)
        return self.lm_head(self.ln_f(x))


def row_length_mask(pos: Tensor, ctx: int) -> BlockMask:
    """A FlexAttention block mask for one query per row over ``ctx`` keys: row i visits the key blocks up to the
    one holding ``pos[i]`` and, inside that one, the keys at or before it. Plain tensor work, so it runs inside
    a compiled step and a CUDA graph."""
    rows = pos.shape[0]
    blocks = -(-ctx // FLEX_BLOCK)
    visited = (pos // FLEX_BLOCK + 1).to(torch.int32).view(rows, 1, 1)
    order = torch.arange(blocks, device=pos.device, dtype=torch.int32).expand(rows, 1, 1, blocks).contiguous()

    def visible(row: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        return key <= pos[row]

    return BlockMask.from_kv_blocks(visited, order, BLOCK_SIZE=FLEX_BLOCK, mask_mod=visible, seq_lengths=(1, ctx))


def describe(config: GPTConfig) -> str:
    """``12x768 (12 heads), vocab 50257, 124M params``: for the runner's one-line description."""
    c = config
    params = c.n_layer * (12 * c.n_embd ** 2 + 13 * c.n_embd) + (c.vocab_size + c.n_positions + 2) * c.n_embd
    return f"{c.n_layer}x{c.n_embd} ({c.n_head} heads), vocab {c.vocab_size}, {params / 1e6:.1f}M params"
