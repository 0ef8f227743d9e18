"""The random-weight models minercore serves by name (``--model.preset``): their shapes, and building one."""

from __future__ import annotations

import torch

from .base import CachedLM
from .gpt2 import GPT2LM, GPTConfig
from .llama import LlamaConfig, LlamaLM

# tiny: GPT-2's vocabulary (echo must reproduce any GPT-2 token) with a model small enough for 2 CPU cores;
# its cost per step is mostly the 128 x 50257 LM head.
# Named in contract.config.PRESET_NAMES too, so that command lines offer them without importing torch.
GPT2_PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_positions=4096, n_layer=2, n_head=4, n_embd=128),
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
}


# llama-tiny: GPT-2's vocabulary, so the bundled tokenizer echoes any text, at a size two CPU cores serve;
# llama3-8b: Llama-3-8B's shape (random weights: a GPU benchmark, not a model).
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(vocab_size=50257, hidden_size=128, n_layer=2, n_head=4, n_kv_head=2, head_dim=32,
                              intermediate_size=384, rms_norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, n_layer=32, n_head=32, n_kv_head=8, head_dim=128,
                             intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0, max_positions=8192),
}


def build_preset(name: str, seed: int, device: torch.device, dtype: torch.dtype) -> CachedLM:
    """The preset ``name`` with weights drawn from ``seed``."""
    if name in LLAMA_PRESETS:
        # Drawn on the device in the serving dtype: an 8B shape never exists in float32 on the host.
        return LlamaLM.random(LLAMA_PRESETS[name], seed, device, dtype)
    if name in GPT2_PRESETS:
        return GPT2LM.random(GPT2_PRESETS[name], seed=seed)
    raise ValueError(f"unknown preset {name!r}; expected one of {', '.join([*GPT2_PRESETS, *LLAMA_PRESETS])}")
