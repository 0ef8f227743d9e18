"""The Llama family (Llama 2/3/3.1/3.2, SmolLM2, TinyLlama, Qwen2/2.5, Qwen3, Mistral) with a static KV cache.

Architecture: token embedding, pre-RMSNorm blocks of grouped-query attention with rotary position embeddings
(Hugging Face's "rotate half" layout, so checkpoints load as they are) and a SwiGLU MLP, final RMSNorm, LM head
(tied to the embedding or not). The members differ only in switches of ``LlamaConfig``: q/k/v biases (Qwen2),
per-head q/k RMSNorm (Qwen3), an explicit ``head_dim``, Llama 3.1's RoPE scaling, Mistral's sliding window
(refused beyond the window: within it, sliding attention is full attention).

The entry points are those of ``gpt2.GPT2LM`` (``base.CachedLM``, what ``ModelRunner``
drives): ``forward``, ``prefill``, ``decode`` and ``setup_caches``. Module and parameter names are Hugging Face's
without the ``model.`` prefix, except that q/k/v and gate/up are fused into one matrix each; ``checkpoint_views``
maps every checkpoint tensor name onto its parameter or row block; ``minercore.models.loading`` reads each
tensor of a safetensors or GGUF checkpoint once straight into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract.config import LLAMA_MODEL_TYPES
from ..kv.paged import CacheFactory, LayerCache, PagedKVCache
from ..kv.static import KVCache, Start, chunk_end, chunk_positions
from . import block_step, step_attention
from .base import prompt_attention, prompt_lengths, prompt_rows, step_over_cache, verify_mask, verify_positions

FAMILIES = LLAMA_MODEL_TYPES  # config.json model_type values this module serves (gpt2 is gpt2.py's)


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (``rope_type: "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclass(frozen=True)
class LlamaConfig:
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF's form of Llama 3.1 scaling: a divisor per frequency
    max_positions: int = 4096
    qkv_bias: bool = False  # Qwen2 (and Llama's attention_bias, with o_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1, Qwen with use_sliding_window

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> LlamaConfig:
        """From a config.json dict; ValueError naming the feature for anything this module would get wrong."""
        family = raw.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not a Llama-family model ({', '.join(FAMILIES)})")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{family}: hidden_act {act!r} is not supported (SwiGLU needs silu)")
        heads = raw["num_attention_heads"]
        # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta and rope_scaling.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = Llama3RopeScaling(rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                        rope["original_max_position_embeddings"])
        elif rope_type != "default":
            raise ValueError(f"{family}: rope_type {rope_type!r} is not supported (default and llama3 are)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{family}: partial rotary embeddings are not supported")
        window = raw.get("sliding_window")
        if family in ("qwen2", "qwen3"):
            sliding = raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or ())
            window = window if sliding else None
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            family=family, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            n_layer=raw["num_hidden_layers"], n_head=heads, n_kv_head=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"], rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            max_positions=raw.get("max_position_embeddings", 4096),
            qkv_bias=family == "qwen2" or attention_bias, o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)), qk_norm=family == "qwen3",
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)), sliding_window=window)

    def n_params(self) -> int:
        d, q, kv = self.hidden_size, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        attention = d * (q + 2 * kv) + q * d
        layer = attention + 3 * d * self.intermediate_size + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layer * layer + self.vocab_size * d + head + d


def rope_frequencies(config: LlamaConfig) -> Tensor:
    """(head_dim / 2,) float32 inverse frequencies, Llama 3.1-scaled when the config says so."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_freq_factors is not None:
        return inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated smoothly.
    low_wavelen = s.original_max_positions / s.low_freq_factor
    high_wavelen = s.original_max_positions / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(config: LlamaConfig, positions: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin, (positions, head_dim) each: computed in float32, then cast (as transformers does)."""
    freqs = torch.arange(positions, device=device).float()[:, None] * rope_frequencies(config).to(device)[None]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) ``x`` by (B or 1, 1, T, D) angles, pairing dimension i with i + D/2."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalised in float32 and scaled in the input's dtype, as the checkpoints were trained.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, q, kv = config.hidden_size, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        # q, k and v in one matrix (one read of x, one larger GEMV per decode step); checkpoints' separate
        # q_proj/k_proj/v_proj load into its row blocks (see LlamaLM.checkpoint_views).
        self.qkv_proj = nn.Linear(d, q + 2 * kv, bias=config.qkv_bias)
        self.split = (q, kv, kv)
        self.o_proj = nn.Linear(q, d, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.cache: LayerCache | None = None

    def _heads(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._rotated(self.qkv_proj(x), cos, sin)

    def _rotated(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, q + 2 kv) projections -> q, k, v as (B, heads, T, head_dim), q and k rotated."""
        b, t, _ = qkv.shape
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim)
        k = k.view(b, t, self.n_kv_head, self.head_dim)
        v = v.view(b, t, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _merge(self, y: Tensor) -> Tensor:
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor | None = None, start: Start = 0,
                lengths: list[int] | None = None) -> Tensor:
        q, k, v = self._heads(x, cos, sin)
        if slots is not None:
            k, v = self.cache.fill(slots, start, k, v)
        groups = self.n_head // self.n_kv_head
        # Prefill is compute-bound: repeating the KV heads up to the query heads costs little here.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return self._merge(prompt_attention(q, k, v, start, lengths))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mask: Tensor, ctx: int) -> Tensor:
        return self._merge(self.step_heads(self.qkv_proj(x), cos, sin, pos, mask, ctx))

    def cached_queries(self, qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor) -> Tensor:
        """A step's keys and values from its (b, t, q + 2 kv) projections written into its paged cache, for an
        attention that reads the blocks where they lie; returns its rotated queries grouped by KV head (b, kv heads,
        groups * t, head_dim), as ``step_heads`` gives them to the attention."""
        q, k, v = self._rotated(qkv, cos, sin)
        self.cache.write_step(pos, k, v)
        b, _, t, _ = q.shape
        return q.reshape(b, self.n_kv_head, self.n_head // self.n_kv_head * t, self.head_dim)

    def step_heads(self, qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mask: Tensor, ctx: int) -> Tensor:
        """A decode or verify step's attention from its (b, t, q + 2 kv) projections, its keys and values cached:
        (b, heads, t, head_dim)."""
        q, k, v = self._rotated(qkv, cos, sin)
        b, _, t, _ = q.shape
        groups = self.n_head // self.n_kv_head
        # Decode is bandwidth-bound: never copy the cache per query head. The query heads sharing a KV head
        # become that head's rows (query i uses KV head i // groups, as in transformers' repeat_kv); with T
        # queries per row (a verify step) each head's T rows follow one another.
        grouped = q.reshape(b, self.n_kv_head, groups * t, self.head_dim)
        y = step_over_cache(self.cache, grouped, k, v, mask, pos, ctx, groups)
        return y.view(b, self.n_head, t, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = nn.Linear(d, 2 * m, bias=bias)  # gate rows, then up rows: one GEMV for both
        self.down_proj = nn.Linear(m, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor | None = None, start: Start = 0,
                lengths: list[int] | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, start, lengths)
        return x + self.mlp(self.post_attention_layernorm(x))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mask: Tensor, ctx: int) -> Tensor:
        attn, mlp = self.self_attn, self.mlp
        if attn.q_norm is None and block_step.fusable(x, attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                      mlp.down_proj):
            norm, post = self.input_layernorm, self.post_attention_layernorm
            qkv = block_step.norm_linear(x, norm.weight, norm.eps, attn.qkv_proj)
            if isinstance(attn.cache, PagedKVCache) and step_attention.usable(x):
                # The attention in the tail's call too, reading the blocks where they lie.
                q = attn.cached_queries(qkv, cos, sin, pos)
                cache = attn.cache
                return block_step.attend_block_tail(x, q, cache.k, cache.v, cache.table[:q.shape[0]],
                                                    verify_positions(pos, x.shape[1]), ctx, attn.o_proj, post.weight,
                                                    post.eps, mlp.gate_up_proj, mlp.down_proj)
            y = attn.step_heads(qkv, cos, sin, pos, mask, ctx)
            return block_step.block_tail(x, y.transpose(1, 2).reshape(*x.shape[:2], -1), attn.o_proj, post.weight,
                                         post.eps, mlp.gate_up_proj, mlp.down_proj)
        x = x + self.self_attn.step(self.input_layernorm(x), cos, sin, pos, mask, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # (positions, head_dim) RoPE angles, set by setup_caches; buffers, so CUDA graphs read them in place.
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def empty(cls, config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaLM:
        """Parameters allocated on ``device`` in ``dtype`` and left uninitialised: built on the meta device, so
        no full-size float32 copy ever exists on the host."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype=dtype).to_empty(device=device)
        model.tie_weights()  # to_empty makes a tied parameter two tensors
        return model

    @classmethod
    def random(cls, config: LlamaConfig, seed: int = 0, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> LlamaLM:
        """Random weights (normal, std 0.02; norms 1; biases 0) from ``seed``, drawn on ``device`` (the same
        seed gives different weights on different device types)."""
        device = torch.device(device)
        model = cls.empty(config, device, dtype)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.normal_(std=0.02, generator=generator)
        return model

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, named ``layers`` as in the checkpoints."""
        return self.layers

    @property
    def max_positions(self) -> int:
        return self.config.max_positions

    def checkpoint_views(self) -> dict[str, Tensor]:
        """Hugging Face tensor name (without ``model.``) -> the parameter, or the rows of a fused parameter,
        that holds it. Loading writes each checkpoint tensor into its view; a tied head is the embedding."""
        views = {name: param for name, param in self.named_parameters()  # a tied head: embed_tokens only
                 if ".qkv_proj." not in name and ".gate_up_proj." not in name}
        for i, layer in enumerate(self.layers):
            for fused, parts, sizes in (
                    (layer.self_attn.qkv_proj, ("q_proj", "k_proj", "v_proj"), layer.self_attn.split),
                    (layer.mlp.gate_up_proj, ("gate_proj", "up_proj"), (self.config.intermediate_size,) * 2)):
                module = "self_attn" if parts[0] == "q_proj" else "mlp"
                for kind in ("weight", "bias"):
                    tensor = getattr(fused, kind)
                    if tensor is not None:
                        for part, rows in zip(parts, tensor.split(sizes), strict=True):
                            views[f"layers.{i}.{module}.{part}.{kind}"] = rows
        return views

    def describe(self) -> str:
        c = self.config
        return (f"{c.family} {c.n_layer}x{c.hidden_size} ({c.n_head} heads, {c.n_kv_head} KV), "
                f"vocab {c.vocab_size}, {c.n_params() / 1e6:.1f}M params")

    def setup_caches(self, max_batch: int, max_context: int, cache_factory: CacheFactory = KVCache) -> int:
        """Allocate every layer's cache (KV heads only; static, or what ``cache_factory`` builds, see
        GPT2LM.setup_caches) and the RoPE table; returns KV bytes per slot of ``max_context``."""
        c = self.config
        if max_context > c.max_positions:
            raise ValueError(f"max_context {max_context} exceeds the model's {c.max_positions} positions; "
                             f"use max_context <= {c.max_positions}")
        if c.sliding_window is not None and max_context > c.sliding_window:
            raise ValueError(f"{c.family}: sliding-window attention ({c.sliding_window} positions) is not "
                             f"implemented; use max_context <= {c.sliding_window}, where it equals full attention")
        weight = self.embed_tokens.weight
        positions = max_context + 1  # one spare position: see GPT2LM.setup_caches
        for layer in self.layers:
            layer.self_attn.cache = cache_factory(max_batch, c.n_kv_head, positions, c.head_dim, weight.dtype,
                                                  weight.device)
        self.cos, self.sin = rope_table(c, positions, weight.device, weight.dtype)
        return 2 * c.n_layer * positions * c.n_kv_head * c.head_dim * weight.element_size()

    def _run(self, idx: Tensor, slots: Tensor | None, start: Start = 0, lengths: list[int] | None = None) -> Tensor:
        end = chunk_end(start, idx.shape[1])
        if not isinstance(start, int):  # each row's own positions; padding past the table takes its last angle
            at = chunk_positions(start, idx.shape[1], idx.device).clamp(max=self.cos.shape[0] - 1)
            cos, sin = self.cos[at][:, None], self.sin[at][:, None]
        elif self.cos is not None and end <= self.cos.shape[0]:
            cos, sin = self.cos[start:end], self.sin[start:end]
        else:
            cos, sin = rope_table(self.config, end, idx.device, self.embed_tokens.weight.dtype)
            cos, sin = cos[start:], sin[start:]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, slots, start, lengths)
        return self.norm(x)

    def forward(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, V) logits, recomputing everything; touches no cache."""
        return self.lm_head(self._run(idx, None))

    def prefill(self, idx: Tensor, slots: int | Tensor, start: Start = 0, last: Tensor | None = None) -> Tensor:
        """(B, T) prompt chunks at positions [start, start + T) (one start or each row's) -> (B, V) logits at
        index ``last`` of each row (default: the chunk's end); keys/values stored in cache rows ``slots`` (right
        padding: see GPT2LM.prefill)."""
        x = self._run(idx, prompt_rows(slots, idx.device), start, prompt_lengths(last))
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.lm_head(x)

    def decode(self, tokens: Tensor, pos: Tensor, ctx: int) -> Tensor:
        """(b,) tokens at (b,) positions -> (b, V) logits; row i uses cache row i, positions [0, ctx)."""
        x = self.embed_tokens(tokens)[:, None, :]
        cos, sin = self.cos[pos][:, None, None, :], self.sin[pos][:, None, None, :]
        mask = (torch.arange(ctx, device=pos.device) <= pos[:, None])[:, None, None, :]
        for layer in self.layers:
            x = layer.step(x, cos, sin, pos, mask, ctx)
        return self.lm_head(self.norm(x[:, 0]))

    def verify(self, tokens: Tensor, pos: Tensor, ctx: int) -> Tensor:
        """(b, T) tokens from (b,) positions -> (b, T, V) logits (``base.CachedLM.verify``)."""
        at = verify_positions(pos, tokens.shape[1])
        # Positions past the table (a padded draft at the context's end) read its last angle: never used.
        rope = at.clamp(max=self.cos.shape[0] - 1)
        cos, sin = self.cos[rope][:, None], self.sin[rope][:, None]
        x = self.embed_tokens(tokens)
        mask = verify_mask(at, ctx)
        for layer in self.layers:
            x = layer.step(x, cos, sin, pos, mask, ctx)
        return self.lm_head(self.norm(x))
