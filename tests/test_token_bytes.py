"""token_bytes_table against tokenizer.decode: GPT-2 (exact) and tiny SentencePiece-style tokenizers."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from minercore.text.token_bytes import token_bytes_table
from minercore.text.tokenizer import load_tokenizer

GPT2 = load_tokenizer("gpt2")
GPT2_TABLES = {skip: token_bytes_table(GPT2, skip_special_tokens=skip) for skip in (True, False)}


def joined(table: list[bytes], ids: list[int]) -> str:
    return b"".join(table[i] for i in ids).decode("utf-8", "replace")


# --- GPT-2 (byte-level BPE): exact ---------------------------------------------------------------------


def test_gpt2_table_shape() -> None:
    table = GPT2_TABLES[True]
    assert len(table) == len(GPT2) == 50257
    assert all(isinstance(piece, bytes) for piece in table)
    eos = GPT2.eos_token_id
    assert table[eos] == b""
    assert GPT2_TABLES[False][eos] == b"<|endoftext|>"
    assert [table[i] for i in GPT2.encode("Hello world")] == [b"Hello", b" world"]
    # Byte-level tokens are raw bytes, not their printable stand-ins ("Ġ" is the space byte).
    assert table[GPT2.convert_tokens_to_ids("Ġ")] == b" "
    assert table[GPT2.convert_tokens_to_ids("Ċ")] == b"\n"


def test_gpt2_backend_objects_give_the_same_table() -> None:
    backend = GPT2.backend_tokenizer  # a `tokenizers.implementations` wrapper here
    raw = backend._tokenizer if hasattr(backend, "_tokenizer") else backend
    assert isinstance(raw, Tokenizer)
    assert token_bytes_table(backend) == GPT2_TABLES[True]
    assert token_bytes_table(raw) == GPT2_TABLES[True]


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 50256), max_size=60), skip=st.booleans())
def test_gpt2_random_ids_match_decode(ids: list[int], skip: bool) -> None:
    expected = GPT2.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert joined(GPT2_TABLES[skip], ids) == expected


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=80))
def test_gpt2_text_round_trips(text: str) -> None:
    ids = GPT2.encode(text)
    assert joined(GPT2_TABLES[False], ids) == text


def test_gpt2_added_tokens_follow_decode() -> None:
    tok = copy.deepcopy(GPT2)
    # In-alphabet characters are read as bytes even in added tokens ("é" is byte 0xE9, invalid alone);
    # a token with any character outside the alphabet stays plain UTF-8.
    tok.add_tokens(["é-tok", "ĠĠx", "日本"])
    tok.add_special_tokens({"additional_special_tokens": ["<Ġsp>"]})
    added = tok.convert_tokens_to_ids(["é-tok", "ĠĠx", "日本", "<Ġsp>"])
    for skip in (True, False):
        table = token_bytes_table(tok, skip_special_tokens=skip)
        assert len(table) == len(tok) == 50261
        ids = [40, *added, 40, added[0], 13]
        assert joined(table, ids) == tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert token_bytes_table(tok)[added[2]] == "日本".encode()


# --- SentencePiece-style ------------------------------------------------------------------------------

WORDS = ["▁", "▁hi", "▁there", "hi", "a", "b", "▁▁", "x▁y", "é", "中", "▁the▁end"]


def sp_tokenizer(decoder: Any) -> Tokenizer:
    """A Llama-like vocabulary: specials, 256 byte-fallback tokens, a few pieces with "▁"."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in WORDS:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if decoder is not None:
        tok.decoder = decoder
    return tok


LLAMA = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                           decoders.Strip(" ", 1, 0)])
METASPACE_BYTES = decoders.Sequence([decoders.Metaspace(prepend_scheme="never"), decoders.ByteFallback(),
                                     decoders.Fuse()])
STRIP_EACH = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0), decoders.Fuse()])
SP_DECODERS = {
    "llama": LLAMA,
    "metaspace": decoders.Metaspace(),
    "metaspace_never": decoders.Metaspace(prepend_scheme="never"),
    "metaspace_bytes": METASPACE_BYTES,
    "strip_each": STRIP_EACH,
}
BYTE_FALLBACK = {"llama", "metaspace_bytes"}


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    return [tok.token_to_id(f"<0x{b:02X}>") for b in text.encode()]


@st.composite
def sp_ids(draw: st.DrawFn, tok: Tokenizer, byte_fallback: bool) -> list[int]:
    """Ids whose decode is valid UTF-8 and whose first token has no "▁": the exact case."""
    ids = [tok.token_to_id("a")]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["word", "special", "char"] if byte_fallback else ["word", "special"]))
        if kind == "word":
            ids.append(tok.token_to_id(draw(st.sampled_from(WORDS))))
        elif kind == "special":
            ids.append(draw(st.sampled_from([0, 1, 2])))
        else:
            # A whole character as byte-fallback tokens.
            ids += byte_ids(tok, draw(st.characters()))
    return ids


@pytest.mark.parametrize("name", sorted(SP_DECODERS))
@settings(max_examples=60, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_sentencepiece_exact_cases(name: str, data: st.DataObject, skip: bool) -> None:
    tok = sp_tokenizer(SP_DECODERS[name])
    ids = data.draw(sp_ids(tok, name in BYTE_FALLBACK))
    table = token_bytes_table(tok, skip_special_tokens=skip)
    assert joined(table, ids) == tok.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_pieces() -> None:
    tok = sp_tokenizer(LLAMA)
    table = token_bytes_table(tok)
    assert len(table) == tok.get_vocab_size(with_added_tokens=True)
    assert table[tok.token_to_id("▁hi")] == b" hi"
    assert table[tok.token_to_id("x▁y")] == b"x y"
    assert table[tok.token_to_id("<0x41>")] == b"A"
    assert table[tok.token_to_id("<0xE4>")] == b"\xe4"
    assert table[1] == b""
    assert token_bytes_table(tok, skip_special_tokens=False)[1] == b"<s>"
    # Without a ByteFallback decoder, byte tokens are just text.
    assert token_bytes_table(sp_tokenizer(decoders.Metaspace()))[tok.token_to_id("<0x41>")] == b"<0x41>"


def test_strip_before_fuse_trims_every_token() -> None:
    tok = sp_tokenizer(STRIP_EACH)
    ids = [tok.token_to_id(w) for w in ["▁hi", "▁▁", "▁there", "a"]]
    assert joined(token_bytes_table(tok), ids) == tok.decode(ids) == "hi therea"


@pytest.mark.parametrize(("name", "exact"), [("llama", False), ("metaspace", False), ("metaspace_never", True)])
def test_sentencepiece_first_token_space_is_approximate(name: str, exact: bool) -> None:
    """Documented: decoders that drop the first token's leading space keep it in the table."""
    tok = sp_tokenizer(SP_DECODERS[name])
    ids = [tok.token_to_id("▁hi"), tok.token_to_id("▁there")]
    expected = tok.decode(ids)
    assert joined(token_bytes_table(tok), ids) == (expected if exact else " " + expected)


def test_invalid_byte_fallback_runs_are_approximate() -> None:
    """Documented: ByteFallback gives one U+FFFD per byte token, UTF-8 replacement one per maximal subpart."""
    tok = sp_tokenizer(LLAMA)
    ids = [tok.token_to_id("a"), *byte_ids(tok, "中")[:2], tok.token_to_id("b")]
    assert tok.decode(ids) == "a\ufffd\ufffdb"
    assert joined(token_bytes_table(tok), ids) == "a\ufffdb"


def test_transformers_wrapper_uses_len_tokenizer() -> None:
    raw = sp_tokenizer(LLAMA)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw)
    assert token_bytes_table(wrapped) == token_bytes_table(raw)
    assert len(token_bytes_table(wrapped)) == len(wrapped)


@pytest.mark.parametrize("decoder", [
    decoders.WordPiece(),
    decoders.BPEDecoder(),
    decoders.CTC(),
    decoders.Sequence([decoders.Replace(Regex("▁+"), " "), decoders.Fuse()]),
    None,
], ids=["wordpiece", "bpe_suffix", "ctc", "regex_replace", "no_decoder"])
def test_unmappable_decoders_raise(decoder: Any) -> None:
    with pytest.raises(ValueError, match="token"):
        token_bytes_table(sp_tokenizer(decoder))


def test_slow_tokenizers_raise() -> None:
    class Slow:
        def decode(self, ids: list[int]) -> str:
            return ""

    with pytest.raises(ValueError, match="fast"):
        token_bytes_table(Slow())
