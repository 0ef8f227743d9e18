"""The id → bytes table that the stream loop detokenizes with.

``tokenizer.decode(ids)`` for the tokenizers handled here is "map every id to a piece, concatenate the pieces,
decode the bytes as UTF-8 with replacement". Building the per-id pieces once turns streaming detokenization
into appending bytes, which is what :class:`minercore.streamloop.StreamTable` does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import Tokenizer
from tokenizers.implementations import BaseTokenizer

__all__ = ["strips_first_space", "token_bytes_table"]

# Decoders that only rewrite each token on its own, so a per-token table reproduces them.
_PER_TOKEN_DECODERS = frozenset({"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"})
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet, inverted: printable char → byte.

    Byte-level BPE stores each byte as one printable character. Bytes that are already printable Latin-1
    (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 bytes, in increasing order,
    take the code points from U+0100 upwards.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shown = set(printable)
    alphabet = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in shown:
            alphabet[chr(0x100 + extra)] = b
            extra += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


def _backend(tokenizer: Any) -> tuple[Tokenizer, int]:
    """The Rust ``Tokenizer`` behind ``tokenizer`` and the table size (``len(tokenizer)`` for transformers)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, tokenizer.get_vocab_size(with_added_tokens=True)
    if isinstance(tokenizer, BaseTokenizer):
        raw = tokenizer._tokenizer
        return raw, raw.get_vocab_size(with_added_tokens=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"token_bytes_table needs a fast (Rust `tokenizers`) tokenizer, got {type(tokenizer).__name__}")
    if isinstance(backend, BaseTokenizer):
        backend = backend._tokenizer
    return backend, len(tokenizer)


def _decoder_steps(backend: Tokenizer) -> list[dict[str, Any]]:
    spec = json.loads(backend.to_str()).get("decoder")
    if spec is None:
        # Without a decoder, decode() joins tokens with spaces (WordPiece-style output without "##" handling).
        raise ValueError("tokenizer has no decoder; cannot map its tokens to bytes")
    steps = spec["decoders"] if spec["type"] == "Sequence" else [spec]
    for step in steps:
        if step["type"] not in _PER_TOKEN_DECODERS:
            raise ValueError(
                f"cannot build a token→bytes table for decoder {step['type']!r}; "
                f"supported: byte-level BPE and SentencePiece-style ({', '.join(sorted(_PER_TOKEN_DECODERS))})")
        if step["type"] == "Replace" and "String" not in step["pattern"]:
            raise ValueError("cannot build a token→bytes table for a regex Replace decoder")
    return steps


def _apply(steps: list[dict[str, Any]], token: str) -> bytes:
    """Run one token through the decoder chain; a piece turns into bytes at ByteLevel/ByteFallback."""
    piece: str | bytes = token
    fused = False
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":
            if isinstance(piece, str):
                try:
                    piece = bytes([_BYTE_LEVEL[c] for c in piece])
                except KeyError:
                    # tokenizers keeps a token with any char outside the alphabet as its plain UTF-8.
                    piece = piece.encode()
            # ByteLevel hands the next decoder one fused string.
            fused = True
        elif kind == "ByteFallback":
            if isinstance(piece, str) and len(piece) == 6 and (m := _BYTE_TOKEN.fullmatch(piece)):
                piece = bytes([int(m.group(1), 16)])
        elif kind == "Fuse":
            fused = True
        elif kind in ("Replace", "Metaspace"):
            old = step["pattern"]["String"] if kind == "Replace" else step["replacement"]
            new = step["content"] if kind == "Replace" else " "
            piece = piece.replace(old, new) if isinstance(piece, str) else piece.replace(old.encode(), new.encode())
        elif kind == "Strip" and not fused:
            # Before a Fuse, Strip trims every token; after it, only the ends of the whole text (approximated).
            content = step["content"] if isinstance(piece, str) else step["content"].encode()
            start, stop = step["start"], step["stop"]
            lead = 0
            while lead < start and piece[lead:lead + len(content)] == content:
                lead += len(content)
            end = len(piece)
            for _ in range(stop):
                if end > lead and piece[end - len(content):end] == content:
                    end -= len(content)
            piece = piece[lead:end]
    return piece if isinstance(piece, bytes) else piece.encode()


def token_bytes_table(tokenizer: Any, *, skip_special_tokens: bool = True) -> list[bytes]:
    """``table[id]`` = the bytes token ``id`` contributes to ``tokenizer.decode(ids)``; ``len(table)`` covers
    added tokens (``len(tokenizer)`` for a transformers tokenizer).

    Accepts a transformers fast tokenizer, a ``tokenizers.Tokenizer`` or a ``tokenizers`` implementation
    wrapper. Build it once per tokenizer; it is plain data.

    Exact (``b"".join(table[i] for i in ids).decode("utf-8", "replace") == tokenizer.decode(ids,
    skip_special_tokens=..., clean_up_tokenization_spaces=False)`` for every id sequence):

    * byte-level BPE (GPT-2, Llama 3, Qwen, ...): each token's characters map back through the byte-level
      alphabet; a token with a character outside it (some added tokens) is its UTF-8, as tokenizers does.
    * special tokens: ``b""`` when ``skip_special_tokens``, else what the decoder makes of their content
      (their UTF-8 for ordinary contents such as ``<|endoftext|>`` or ``<s>``). Added non-special tokens go
      through the decoder like any other token, as in ``decode``.
    * SentencePiece-style chains (Metaspace, or Replace "▁" → " " with ByteFallback and Fuse) for
      text that decodes to valid UTF-8, apart from the first token below.

    Approximate (best effort, SentencePiece-style only):

    * the first token of a ``decode`` call: Metaspace (unless ``prepend_scheme="never"``) drops its "▁",
      and a Strip after Fuse drops the leading space of the whole text. The table keeps that space, since a
      streamed token does not know whether it is first.
    * invalid byte-fallback runs: the ByteFallback decoder emits one U+FFFD per byte token, UTF-8
      replacement one per maximal invalid subpart, so such runs may show fewer U+FFFD.

    Raises ``ValueError`` for slow tokenizers and for decoders that join or rewrite across tokens
    (WordPiece, BPEDecoder, CTC, regex Replace, no decoder).
    """
    backend, size = _backend(tokenizer)
    steps = _decoder_steps(backend)
    special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    table: list[bytes] = []
    for i in range(size):
        token = backend.id_to_token(i)
        if token is None or (skip_special_tokens and i in special):
            # decode() drops ids it cannot map, and skipped specials add nothing.
            table.append(b"")
        else:
            table.append(_apply(steps, token))
    return table


def strips_first_space(tokenizer: Any) -> bool:
    """Whether ``decode`` drops one leading space of the whole text that the table keeps: SentencePiece-style
    decoders (a Strip after Fuse, as Llama 2's; Metaspace unless ``prepend_scheme="never"``), which undo the
    "▁" their normalizer put before the first word. A stream starting a ``decode`` drops it too
    (``StreamTable.add(strip_first_space=True)``), so echoed text equals the prompt."""
    backend, _ = _backend(tokenizer)
    fused = False
    for step in _decoder_steps(backend):
        kind = step["type"]
        fused = fused or kind in ("Fuse", "ByteLevel")
        strip_after_fuse = kind == "Strip" and fused and step["start"] >= 1 and step["content"] == " "
        prepended = (kind == "Metaspace" and step.get("prepend_scheme", "always") != "never"
                     and step.get("add_prefix_space", True))
        if strip_after_fuse or prepended:
            return True
    return False
