"""Tiny random Hugging Face models the tests build (and save where a test needs a checkpoint directory): GPT-2
and the Llama family, seeded so that a test's reference model is the same on every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_llama_family(family: str, *, seed: int | None = None, **config: Any):
    """A transformers causal LM of ``family`` with ``config``'s fields, eval mode, float32; ``seed`` defaults
    to one derived from the family's name."""
    import transformers as tf

    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    torch.manual_seed(sum(map(ord, family)) if seed is None else seed)
    return model_cls(config_cls(**config)).eval()


def tiny_gpt2(directory: Path | None = None, *, seed: int = 0, **config: Any):
    """A transformers GPT2LMHeadModel with ``config``'s fields, eval mode; saved to ``directory`` if given."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    if directory is not None:
        model.save_pretrained(directory)
    return model
