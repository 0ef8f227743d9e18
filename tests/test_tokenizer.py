"""The bundled GPT-2 tokenizer: offline, loaded once, exact round trips."""

from hypothesis import given, settings
from hypothesis import strategies as st

from minercore.text.tokenizer import gpt2_vocab_size, load_tokenizer

# Lone surrogates cannot be encoded as UTF-8, so they are not text a tokenizer can see.
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


def test_gpt2_identity():
    tok = load_tokenizer()
    assert tok.eos_token_id == 50256
    assert len(tok) == 50257 == gpt2_vocab_size()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.decode([50256], skip_special_tokens=True) == ""


def test_loaded_once_per_process():
    assert load_tokenizer() is load_tokenizer("gpt2")


@settings(max_examples=300, deadline=None)
@given(unicode_text)
def test_round_trip_arbitrary_unicode(text):
    tok = load_tokenizer()
    assert tok.decode(tok.encode(text), clean_up_tokenization_spaces=False) == text


def test_round_trip_hard_cases():
    tok = load_tokenizer()
    for text in ["Ç", "世界", "👩‍👩‍👧‍👦", "🇫🇷🇯🇵", "👍🏽", "e\u0301", "مرحبا", "\x00\x07\r\n\t", "  lead", "trail  "]:
        assert tok.decode(tok.encode(text), clean_up_tokenization_spaces=False) == text


def test_hugging_face_tokenizer_from_local_directory(tmp_path):
    tok = load_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("minercore ✓") == tok.encode("minercore ✓")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))
