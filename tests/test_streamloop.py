"""The stream table, compiled and pure Python, against ``tokenizer.decode`` and against each other."""

from __future__ import annotations

import codecs
import importlib
import itertools
import math
import os
import random
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streamloop_corpus import CORPUS

from minercore.text import _streamloop_py
from minercore.text.token_bytes import token_bytes_table
from minercore.text.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer("gpt2")
EOS = TOKENIZER.eos_token_id
TABLES = {skip: token_bytes_table(TOKENIZER, skip_special_tokens=skip) for skip in (True, False)}
VOCAB = len(TABLES[True])
# One token per byte value: GPT-2 has all 256, which lets tests spell any byte sequence.
BYTE_TOKEN = {b: TABLES[True].index(bytes([b])) for b in range(256)}


def _compiled() -> ModuleType:
    try:
        return importlib.import_module("minercore.text._streamloop_c")
    except ImportError as exc:
        # CI always builds the extension, so a missing one is a failure, never a skip.
        pytest.fail(f"compiled stream loop is not built ({exc}); run `python setup.py build_ext --inplace`")


@pytest.fixture(scope="module", params=["python", "cython"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _streamloop_py if request.param == "python" else _compiled()


@pytest.fixture(scope="module")
def other(impl: ModuleType) -> ModuleType:
    """The other implementation, for event-by-event comparison."""
    return _compiled() if impl is _streamloop_py else _streamloop_py


def test_import_site_picks_the_compiled_loop() -> None:
    from minercore.text import streamloop

    if os.environ.get("MINERCORE_NO_EXTENSIONS", "") not in ("", "0"):
        assert streamloop.IMPLEMENTATION == "python"
    else:
        assert streamloop.IMPLEMENTATION == "cython"
        assert streamloop.StreamTable is _compiled().StreamTable


def test_finish_reasons(impl: ModuleType) -> None:
    assert impl.FINISH_REASONS == (None, "eos", "stop", "length")


# --- driving streams and the reference ----------------------------------------------------------------


@dataclass
class Spec:
    ids: list[int]
    max_new_tokens: int = 10**6
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    strip_first_space: bool = False


def ids_of(text: str) -> list[int]:
    return TOKENIZER.encode(text)


def arr(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def drive(mod: ModuleType, specs: list[Spec], *, skip: bool = True, eos_id: int | None = None,
          flush_tokens: int = 16, flush_ms: float = 50.0, nows: list[float] | None = None,
          ) -> list[tuple[int, int, str, str | None]]:
    """Step all streams together, one token each per step, then finish() the unfinished ones.

    Returns ``(step, slot, text, reason)`` events, reason "finish" for finish(). After every step each
    stream's pending bytes are checked against the memory bound.
    """
    table = TABLES[skip]
    nows = nows or [float(i) for i in range(max((len(s.ids) for s in specs), default=0) + 2)]
    tab = mod.StreamTable(table, len(specs) + 1, eos_id=eos_id, flush_tokens=flush_tokens, flush_ms=flush_ms)
    for slot, spec in enumerate(specs):
        tab.add(slot, max_new_tokens=spec.max_new_tokens, stop=spec.stop, include_stop=spec.include_stop,
                strip_first_space=spec.strip_first_space, now=nows[0])
    events: list[tuple[int, int, str, str | None]] = []
    since_release = [0] * len(specs)
    hold = [max([len(s.encode()) - 1 for s in spec.stop] + [3]) for spec in specs]
    for step in itertools.count():
        live = [s for s, spec in enumerate(specs) if tab.is_active(s) and step < len(spec.ids)]
        if not live:
            break
        ids = [specs[s].ids[step] for s in live]
        for s, tid in zip(live, ids, strict=True):
            since_release[s] += 0 if tid == eos_id else len(table[tid])
        for slot, text, reason in tab.step(arr(live), arr(ids), nows[step + 1]):
            events.append((step, slot, text, reason))
            since_release[slot] = 0
        for s in live:
            # Per-stream memory: what came in since the last release plus a held-back tail, never the history.
            assert tab._pending_bytes(s) <= since_release[s] + hold[s]
    for slot in range(len(specs)):
        if tab.is_active(slot):
            events.append((-1, slot, tab.finish(slot), "finish"))
    assert tab.active_count == 0
    return events


def decode(ids: list[int], skip: bool = True, strip_first_space: bool = False) -> str:
    """``tokenizer.decode``; with ``strip_first_space`` less one leading space, as SentencePiece-style decoders
    give the text (GPT-2's keeps it)."""
    text = TOKENIZER.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    return text.removeprefix(" ") if strip_first_space else text


def earliest_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    hits = [(text.find(s), len(s), s) for s in stops if s in text]
    return min(hits)[::2] if hits else None


def reference(spec: Spec, *, skip: bool = True, eos_id: int | None = None) -> tuple[str, str]:
    """(text, reason) straight from tokenizer.decode on the ids the stream consumes; stop strings are matched on
    the decoded text, so with ``strip_first_space`` never on the dropped space."""
    strip = spec.strip_first_space
    limit = min(len(spec.ids), spec.max_new_tokens)
    for k in range(1, limit + 1):
        if spec.ids[k - 1] == eos_id:
            return decode(spec.ids[:k - 1], skip, strip), "eos"
        if spec.stop:
            text = decode(spec.ids[:k], skip, strip)
            hit = earliest_stop(text, spec.stop)
            if hit:
                pos, stop = hit
                return text[:pos] + (stop if spec.include_stop else ""), "stop"
    return decode(spec.ids[:limit], skip, strip), ("length" if limit == spec.max_new_tokens else "finish")


def check_stream(events: list[tuple[int, int, str, str | None]], slot: int, spec: Spec, **kw: Any) -> None:
    mine = [(text, reason) for _, s, text, reason in events if s == slot]
    assert mine, "every stream ends with an event"
    text, reason = reference(spec, **kw)
    assert "".join(t for t, _ in mine) == text
    assert mine[-1][1] == reason
    assert all(r is None for _, r in mine[:-1])
    for piece, _ in mine[:-1]:
        assert piece, "only a final event may be empty"
    for piece, _ in mine:
        # Whole characters only: a piece survives a strict UTF-8 round trip (lone surrogates do not).
        assert piece.encode("utf-8").decode("utf-8") == piece


# --- property tests -----------------------------------------------------------------------------------

random_ids = st.lists(st.integers(0, VOCAB - 1), max_size=40)
text_ids = st.text(max_size=40).map(ids_of)
# Texts that begin with spaces, for the first space a flagged stream drops.
spaced_text = st.tuples(st.integers(0, 2), st.text(max_size=40)).map(lambda n_text: " " * n_text[0] + n_text[1])
spaced_text_ids = spaced_text.map(ids_of)
stop_text = st.text(min_size=1, max_size=4).filter(lambda s: "\ufffd" not in s)
# One clock reading per step: text_ids can yield up to 4 tokens per character (one per UTF-8 byte) of 40.
nows_st = st.builds(
    lambda start, steps: list(itertools.accumulate(steps, initial=start)),
    st.floats(0, 1e4, allow_nan=False), st.lists(st.sampled_from([0.0, 0.001, 0.004, 0.02, 0.05, 0.3]),
                                                  min_size=161, max_size=161))
flush_ms_st = st.sampled_from([0.0, 1.0, 5.0, 50.0, math.inf])


@st.composite
def stream_specs(draw: st.DrawFn, ids_st: st.SearchStrategy[list[int]], skip: bool) -> Spec:
    ids = draw(ids_st)
    full = decode(ids, skip)
    stops: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        if full and draw(st.booleans()):
            # Cut from the text itself so that the stop string really occurs.
            i = draw(st.integers(0, len(full) - 1))
            piece = full[i:i + draw(st.integers(1, 6))]
            if "\ufffd" not in piece:
                stops.append(piece)
        else:
            stops.append(draw(stop_text))
    return Spec(ids, max_new_tokens=draw(st.integers(1, 50)), stop=tuple(stops), include_stop=draw(st.booleans()),
                strip_first_space=draw(st.booleans()))


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    skip = draw(st.booleans())
    ids_st = st.one_of(random_ids, text_ids, spaced_text_ids)
    return {
        "specs": draw(st.lists(stream_specs(ids_st, skip), min_size=1, max_size=3)),
        "skip": skip,
        "eos_id": draw(st.sampled_from([None, None, EOS])),
        "flush_tokens": draw(st.integers(1, 8)),
        "flush_ms": draw(flush_ms_st),
        "nows": draw(nows_st),
    }


@settings(max_examples=150, deadline=None)
@given(batch=batches())
def test_stream_matches_decode(impl: ModuleType, other: ModuleType, batch: dict[str, Any]) -> None:
    events = drive(impl, **batch)
    for slot, spec in enumerate(batch["specs"]):
        check_stream(events, slot, spec, skip=batch["skip"], eos_id=batch["eos_id"])
    assert drive(other, **batch) == events


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB - 1), max_size=300), flush_tokens=st.integers(1, 20),
       flush_ms=flush_ms_st, nows=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=302, max_size=302))
def test_long_random_streams_without_stops(impl: ModuleType, other: ModuleType, ids: list[int],
                                           flush_tokens: int, flush_ms: float, nows: list[float]) -> None:
    # `now` need not even be monotonic for the output to be exact: timing only moves chunk boundaries.
    kw = {"flush_tokens": flush_tokens, "flush_ms": flush_ms, "nows": nows}
    events = drive(impl, [Spec(ids)], **kw)
    check_stream(events, 0, Spec(ids))
    assert drive(other, [Spec(ids)], **kw) == events


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200), flush_tokens=st.integers(1, 6))
def test_text_round_trips(impl: ModuleType, text: str, flush_tokens: int) -> None:
    events = drive(impl, [Spec(ids_of(text))], flush_tokens=flush_tokens)
    assert "".join(e[2] for e in events) == decode(ids_of(text))


@settings(max_examples=100, deadline=None)
@given(text=spaced_text, data=st.data(), include_stop=st.booleans(), flush_tokens=st.integers(1, 6))
def test_strip_first_space_drops_exactly_one_leading_space(impl: ModuleType, other: ModuleType, text: str,
                                                           data: st.DataObject, include_stop: bool,
                                                           flush_tokens: int) -> None:
    """A flagged stream's text is the unflagged one less one leading space, and its stop strings only ever see
    that text: a stop taken from the start of the unflagged text, dropped space included, must not match there."""
    ids = ids_of(text)
    prefix_stop = st.integers(1, 6).map(lambda n: text[:n]).filter(lambda s: s and "\ufffd" not in s)
    stops = tuple(data.draw(st.lists(st.one_of(stop_text, prefix_stop), max_size=3)))
    unflagged = "".join(e[2] for e in drive(impl, [Spec(ids)], flush_tokens=flush_tokens))
    assert unflagged == text  # GPT-2 round-trips text
    flagged = Spec(ids, stop=stops, include_stop=include_stop, strip_first_space=True)
    events = drive(impl, [flagged, Spec(ids, strip_first_space=True), Spec(ids, stop=stops)],
                   flush_tokens=flush_tokens)
    # Slot 0 ends as decode of the text less one leading space would (stops included); slot 1 has no stops.
    check_stream(events, 0, flagged)
    assert "".join(t for _, slot, t, _ in events if slot == 1) == unflagged.removeprefix(" ")
    # An unflagged stream in the same table keeps its space.
    check_stream(events, 2, Spec(ids, stop=stops))
    assert drive(other, [flagged, Spec(ids, strip_first_space=True), Spec(ids, stop=stops)],
                 flush_tokens=flush_tokens) == events


# --- corpus -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("skip", [True, False])
def test_corpus(impl: ModuleType, name: str, skip: bool) -> None:
    ids = ids_of(CORPUS[name])
    for flush_tokens in (1, 3, 16):
        events = drive(impl, [Spec(ids)], skip=skip, flush_tokens=flush_tokens)
        check_stream(events, 0, Spec(ids), skip=skip)


def test_corpus_streams_batched_with_stops(impl: ModuleType, other: ModuleType) -> None:
    specs = [Spec(ids_of(text), stop=(text[len(text) // 2:len(text) // 2 + 2],), include_stop=i % 2 == 0)
             for i, text in enumerate(CORPUS.values())]
    events = drive(impl, specs, flush_tokens=2)
    for slot, spec in enumerate(specs):
        check_stream(events, slot, spec)
    assert drive(other, specs, flush_tokens=2) == events


def test_invalid_utf8_garbage(impl: ModuleType) -> None:
    """Random non-ASCII byte tokens: mostly invalid UTF-8, which must show U+FFFD where decode puts it."""
    rng = random.Random(1234)
    high = [BYTE_TOKEN[b] for b in range(0x80, 0x100)]
    multi = [i for i, b in enumerate(TABLES[True]) if b and b[-1] >= 0x80 and not b.isascii()]
    for _ in range(50):
        ids = [rng.choice(high if rng.random() < 0.6 else multi) for _ in range(rng.randrange(1, 60))]
        events = drive(impl, [Spec(ids)], flush_tokens=rng.randrange(1, 4))
        check_stream(events, 0, Spec(ids))


# --- UTF-8 hold-back against the stdlib incremental decoder ------------------------------------------

EDGE_BYTES = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1,
              0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]


def test_utf8_holdback_matches_incremental_decoder(impl: ModuleType) -> None:
    """After each byte, exactly the bytes CPython's incremental decoder buffers are held, and what is
    released equals what it returned so far."""
    tab = impl.StreamTable([bytes([b]) for b in range(256)], 1, flush_tokens=1, flush_ms=math.inf)
    slot = arr([0])
    byte_ids = [arr([b]) for b in range(256)]
    for seq in itertools.chain(itertools.product(range(256), repeat=2), itertools.product(EDGE_BYTES, repeat=3)):
        tab.add(0, max_new_tokens=10, now=0.0)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        out = expected = ""
        for b in seq:
            out += "".join(e[1] for e in tab.step(slot, byte_ids[b], 0.0))
            expected += dec.decode(bytes([b]))
            state = dec.getstate()[0]
            if len(state) == 2 and state[0] == 0xED and state[1] >= 0xA0:
                # CPython buffers a truncated surrogate for its surrogatepass handler; as UTF-8 it is
                # already invalid (ED takes 80-9F), and what follows decodes the same either way.
                expected += state.decode("utf-8", "replace")
                dec.reset()
            assert tab._pending_bytes(0) == len(dec.getstate()[0]), seq
            assert out == expected, seq
        assert out + tab.finish(0) == bytes(seq).decode("utf-8", "replace")


@pytest.mark.parametrize(("data", "held"), [
    (b"\xe0", 1), (b"\xe0\x80", 0), (b"\xe0\x9f", 0), (b"\xe0\xa0", 2), (b"\xed\x9f", 2), (b"\xed\xa0", 0),
    (b"\xf0\x8f", 0), (b"\xf0\x90", 2), (b"\xf4\x8f\xbf", 3), (b"\xf4\x90", 0), (b"\xf5", 0), (b"\xff", 0),
    (b"\xc0", 0), (b"\xc1", 0), (b"\xc2", 1), (b"a\xe4\xb8", 2), (b"\x80\x80\x80", 0), (b"\xf0\x9f\x98", 3),
    (b"\xf0\x9f\x98\x80", 0), (b"\xe4\xb8\xad", 0),
])
def test_utf8_holdback_table(impl: ModuleType, data: bytes, held: int) -> None:
    tab = impl.StreamTable([data, b"x"], 1, flush_tokens=1)
    tab.add(0, max_new_tokens=5, now=0.0)
    events = tab.step(arr([0]), arr([0]), 0.0)
    assert tab._pending_bytes(0) == held
    released = "".join(e[1] for e in events)
    assert released == data[:len(data) - held].decode("utf-8", "replace")
    assert released + tab.finish(0) == data.decode("utf-8", "replace")


# --- stop conditions ----------------------------------------------------------------------------------


def run(mod: ModuleType, ids: list[int], *, flush_tokens: int = 1, eos_id: int | None = None,
        table: list[bytes] | None = None, **add: Any) -> list[tuple[str, str | None]]:
    """One stream, one token per step; (text, reason) events, then ("...", "finish") if still active."""
    tab = mod.StreamTable(table or TABLES[True], 1, eos_id=eos_id, flush_tokens=flush_tokens, flush_ms=math.inf)
    add.setdefault("max_new_tokens", 1000)
    tab.add(0, now=0.0, **add)
    out: list[tuple[str, str | None]] = []
    for tid in ids:
        if not tab.is_active(0):
            break
        out += [(text, reason) for _, text, reason in tab.step(arr([0]), arr([tid]), 1.0)]
    if tab.is_active(0):
        out.append((tab.finish(0), "finish"))
    return out


def test_eos_ends_without_its_text(impl: ModuleType) -> None:
    ids = ids_of("Hello world") + [EOS] + ids_of(" never seen")
    table = TABLES[False]  # EOS would read "<|endoftext|>" here: it must still not be released
    events = run(impl, ids, eos_id=EOS, table=table, flush_tokens=100)
    assert events == [("Hello", None), (" world", "eos")]


def test_eos_on_last_token_wins_over_length(impl: ModuleType) -> None:
    ids = ids_of("one two") + [EOS]
    assert run(impl, ids, eos_id=EOS, max_new_tokens=3, flush_tokens=100)[-1] == (" two", "eos")


def test_eos_id_none_treats_eos_as_text(impl: ModuleType) -> None:
    events = run(impl, ids_of("a") + [EOS] + ids_of("b"), table=TABLES[False], flush_tokens=100)
    assert "".join(t for t, _ in events) == "a<|endoftext|>b"
    assert events[-1][1] == "finish"


def test_length(impl: ModuleType) -> None:
    ids = ids_of("one two three four")
    events = run(impl, ids, max_new_tokens=3, flush_tokens=100)
    assert events == [("one", None), (" two three", "length")]


def test_length_one(impl: ModuleType) -> None:
    assert run(impl, ids_of("one two"), max_new_tokens=1) == [("one", "length")]


def test_stop_across_token_boundary(impl: ModuleType) -> None:
    ids = ids_of("Hello world, foo")  # Hello | ␣world | , | ␣foo
    # "Hello" goes out but for its "o", which may start "o w".
    assert run(impl, ids, stop=("o w",)) == [("Hell", None), ("", "stop")]
    assert run(impl, ids, stop=("o w",), include_stop=True) == [("Hell", None), ("o w", "stop")]


def test_stop_wins_over_length_on_last_token(impl: ModuleType) -> None:
    ids = ids_of("Hello world, foo")
    assert run(impl, ids, stop=("world",), max_new_tokens=2, flush_tokens=100) == [("Hello", None), (" ", "stop")]


def test_stop_held_back_until_decided(impl: ModuleType) -> None:
    ids = ids_of("Hello world, foo")
    # " world" could still grow into "world!!": only "Hello " may go out until "," rules it out.
    events = run(impl, ids, stop=("world!!",))
    assert events == [("Hello", None), (" ", None), ("world,", None), (" foo", None), ("", "finish")]


def test_unfinished_stop_prefix_released_by_finish(impl: ModuleType) -> None:
    events = run(impl, ids_of("Hello world"), stop=("world!!",))
    assert events == [("Hello", None), (" ", None), ("world", "finish")]


def test_stop_at_the_very_start(impl: ModuleType) -> None:
    assert run(impl, ids_of("Hello world"), stop=("Hel",)) == [("", "stop")]
    assert run(impl, ids_of("Hello world"), stop=("Hel",), include_stop=True) == [("Hel", "stop")]


def test_earliest_stop_start_wins(impl: ModuleType) -> None:
    table = [b"abcd", b"x", b"ab", b"c"]
    assert run(impl, [1, 0], table=table, stop=("bc", "abcd")) == [("x", None), ("", "stop")]
    assert run(impl, [1, 0], table=table, stop=("bc", "abcd"), include_stop=True) == [("x", None), ("abcd", "stop")]
    # Same start: the shorter string completed first.
    assert run(impl, [0], table=table, stop=("abc", "ab"), include_stop=True) == [("ab", "stop")]
    # Token by token, "bc" completes before "abcd" could.
    assert run(impl, [1, 2, 3], table=table, stop=("bc", "abcd")) == [("x", None), ("a", "stop")]


def test_multibyte_stop_split_inside_a_character(impl: ModuleType) -> None:
    ids = ids_of("ok 😀 then")
    # The emoji is split across two tokens.
    assert [TABLES[True][i] for i in ids] == [b"ok", b" \xf0\x9f\x98", b"\x80", b" then"]
    # The emoji's first three bytes are held both as an incomplete character and as a stop prefix.
    assert run(impl, ids, stop=("😀",)) == [("ok", None), (" ", None), ("", "stop")]
    assert run(impl, ids, stop=("😀 t",), include_stop=True) == [("ok", None), (" ", None), ("😀 t", "stop")]


def test_bare_string_is_one_stop(impl: ModuleType) -> None:
    assert run(impl, ids_of("Hello world"), stop="lo w") == [("Hel", None), ("", "stop")]


def test_streams_without_stops_do_not_hold_text(impl: ModuleType) -> None:
    events = run(impl, ids_of("Hello world"))
    assert events == [("Hello", None), (" world", None), ("", "finish")]


# --- the first space of SentencePiece-style text ----------------------------------------------------------


def test_first_space_is_dropped_before_stop_strings_see_it(impl: ModuleType) -> None:
    ids = ids_of(" hello world")  # ␣hello | ␣world: as a "▁hello▁world" Llama 2 stream reads
    assert run(impl, ids, stop=(" hello",)) == [("", "stop")]
    assert run(impl, ids, stop=(" hello",), strip_first_space=True) == [("hello", None), (" world", None),
                                                                          ("", "finish")]
    assert run(impl, ids, stop=(" world",), strip_first_space=True) == [("hello", None), ("", "stop")]
    assert run(impl, ids, stop=("hello",), include_stop=True, strip_first_space=True) == [("hello", "stop")]


def test_first_space_is_not_held_back(impl: ModuleType) -> None:
    # Unflagged, the space may begin " x" and waits; flagged, it is no text at all.
    table = [b" ", b"x"]
    assert run(impl, [0, 1], table=table, stop=(" x",)) == [("", "stop")]
    assert run(impl, [0, 1], table=table, stop=(" x",), strip_first_space=True) == [("x", None), ("", "finish")]
    tab = impl.StreamTable(table, 1, flush_tokens=1)
    tab.add(0, max_new_tokens=10, stop=(" x",), strip_first_space=True, now=0.0)
    assert tab.step(arr([0]), arr([0]), 0.0) == []
    assert tab._pending_bytes(0) == 0


def test_exactly_one_leading_space_is_dropped(impl: ModuleType) -> None:
    flagged = {"strip_first_space": True}
    assert run(impl, ids_of("  two"), **flagged) == [(" two", None), ("", "finish")]  # ␣ | ␣two
    assert run(impl, ids_of("a b"), **flagged) == [("a", None), (" b", None), ("", "finish")]
    assert run(impl, ids_of(" "), **flagged) == [("", "finish")]
    # The space of a later token stays, even when every earlier token was empty.
    assert run(impl, [0, 1, 0], table=[b"", b" x"], **flagged) == [("x", None), ("", "finish")]
    assert run(impl, [1, 1], table=[b"", b" x"], **flagged) == [("x", None), (" x", None), ("", "finish")]
    # A multi-byte first character is whole text: nothing but U+0020 is dropped.
    assert run(impl, ids_of("\u3000x"), **flagged)[0][0] == "\u3000"


def test_first_space_with_length_eos_and_finish(impl: ModuleType) -> None:
    flagged = {"strip_first_space": True}
    assert run(impl, ids_of(" one two"), max_new_tokens=1, **flagged) == [("one", "length")]
    assert run(impl, ids_of(" one") + [EOS], eos_id=EOS, flush_tokens=100, **flagged) == [("one", None),
                                                                                           ("", "eos")]
    # Held back by a stop prefix, then finished (a deadline): the held text is the first and loses its space.
    tab = impl.StreamTable([b" \xe4\xb8", b"\x96"], 1, flush_tokens=1)
    tab.add(0, max_new_tokens=10, stop=("\u4e16!",), strip_first_space=True, now=0.0)
    assert tab.step(arr([0]), arr([0]), 0.0) == []
    assert tab._pending_bytes(0) == 2
    assert tab.finish(0, drop_incomplete=True) == ""
    tab.add(0, max_new_tokens=10, stop=("\u4e16!",), strip_first_space=True, now=0.0)
    tab.step(arr([0]), arr([0]), 0.0)
    assert tab.step(arr([0]), arr([1]), 0.0) == []
    assert tab.finish(0) == "\u4e16"


def test_first_space_flag_is_per_stream(impl: ModuleType) -> None:
    tab = impl.StreamTable([b" a", b" b"], 2, flush_tokens=1)
    tab.add(0, max_new_tokens=10, strip_first_space=True, now=0.0)
    tab.add(1, max_new_tokens=10, now=0.0)
    assert tab.step(arr([0, 1]), arr([0, 0]), 0.0) == [(0, "a", None), (1, " a", None)]
    assert tab.step(arr([0, 1]), arr([1, 1]), 0.0) == [(0, " b", None), (1, " b", None)]
    tab.release(0)
    # A slot's next stream starts with its own flag, not the last stream's.
    tab.add(0, max_new_tokens=10, now=0.0)
    assert tab.step(arr([0]), arr([0]), 0.0) == [(0, " a", None)]
    tab.release(0)
    tab.add(0, max_new_tokens=10, strip_first_space=True, now=0.0)
    assert tab.step(arr([0]), arr([1]), 0.0) == [(0, "b", None)]


# --- chunking policy ----------------------------------------------------------------------------------

LETTERS = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz"]


def test_flush_tokens(impl: ModuleType) -> None:
    tab = impl.StreamTable(LETTERS, 1, flush_tokens=4, flush_ms=math.inf)
    tab.add(0, max_new_tokens=100, now=0.0)
    got = [tab.step(arr([0]), arr([i]), 0.0) for i in range(10)]
    # The first text goes out at once; then every 4 tokens.
    assert got == [[(0, "a", None)], [], [], [], [(0, "bcde", None)], [], [], [], [(0, "fghi", None)], []]
    assert tab.finish(0) == "j"


def test_flush_ms(impl: ModuleType) -> None:
    tab = impl.StreamTable(LETTERS, 1, flush_tokens=1000, flush_ms=250.0)
    tab.add(0, max_new_tokens=100, now=1.0)
    # The first text goes out at once; then whatever is pending each time 250 ms have passed.
    steps = [(1.0, "a"), (1.125, ""), (1.25, "bc"), (1.375, ""), (1.5, "de"), (1.625, ""), (2.5, "fg")]
    for i, (now, expected) in enumerate(steps):
        events = tab.step(arr([0]), arr([i]), now)
        assert "".join(e[1] for e in events) == expected, now


def test_flush_clock_restarts_at_each_release(impl: ModuleType) -> None:
    tab = impl.StreamTable([b"", b"a"], 1, flush_tokens=1000, flush_ms=100.0)
    tab.add(0, max_new_tokens=100, now=5.0)
    assert tab.step(arr([0]), arr([0]), 5.05) == []  # a token without text releases nothing
    assert tab.step(arr([0]), arr([1]), 5.06) == [(0, "a", None)]  # first text at once
    assert tab.step(arr([0]), arr([1]), 5.1) == []
    assert tab.step(arr([0]), arr([1]), 5.2) == [(0, "aa", None)]


def test_first_text_waits_for_a_whole_character(impl: ModuleType) -> None:
    tab = impl.StreamTable([b"\xe4", b"\xb8", b"\xad", b"z"], 1, flush_tokens=1000, flush_ms=math.inf)
    tab.add(0, max_new_tokens=100, now=0.0)
    assert tab.step(arr([0]), arr([0]), 0.0) == []
    assert tab.step(arr([0]), arr([1]), 0.0) == []
    assert tab.step(arr([0]), arr([2]), 0.0) == [(0, "中", None)]
    assert tab.step(arr([0]), arr([3]), 0.0) == []
    assert tab.finish(0) == "z"


def test_flush_never_splits_a_character(impl: ModuleType) -> None:
    tab = impl.StreamTable([b"a", b"\xf0\x9f", b"\x98\x80"], 1, flush_tokens=1, flush_ms=0.0)
    tab.add(0, max_new_tokens=100, now=0.0)
    assert tab.step(arr([0]), arr([0]), 1.0) == [(0, "a", None)]
    assert tab.step(arr([0]), arr([1]), 2.0) == []
    assert tab.step(arr([0]), arr([2]), 3.0) == [(0, "😀", None)]


def test_events_follow_slot_order(impl: ModuleType) -> None:
    tab = impl.StreamTable(LETTERS, 4, flush_tokens=1)
    for slot in (0, 2, 3):
        tab.add(slot, max_new_tokens=2 if slot == 2 else 10, now=0.0)
    assert tab.step(arr([3, 0, 2]), arr([0, 1, 2]), 0.0) == [(3, "a", None), (0, "b", None), (2, "c", None)]
    assert tab.step(arr([2, 3]), arr([3, 4]), 0.0) == [(2, "d", "length"), (3, "e", None)]
    assert tab.active_count == 2


def test_finish_and_release(impl: ModuleType) -> None:
    tab = impl.StreamTable([b"ab", b"\xe4"], 2, flush_tokens=100)
    assert tab.max_streams == 2
    tab.add(0, max_new_tokens=10, stop=("bab!",), now=0.0)
    tab.add(1, max_new_tokens=10, now=0.0)
    assert tab.active_count == 2
    assert tab.step(arr([0, 1]), arr([0, 0]), 0.0) == [(0, "a", None), (1, "ab", None)]
    tab.step(arr([0, 1]), arr([0, 1]), 0.0)
    # finish releases the held stop prefix and decodes the broken tail.
    assert tab.finish(0) == "bab"
    assert tab.finish(1) == "\ufffd"
    assert not tab.is_active(0)
    assert tab.active_count == 0
    with pytest.raises(ValueError, match="not active"):
        tab.finish(0)
    tab.release(0)  # no-op on an inactive slot
    tab.add(0, max_new_tokens=10, now=0.0)
    tab.step(arr([0]), arr([0]), 0.0)
    tab.step(arr([0]), arr([0]), 0.0)
    tab.release(0)
    assert tab.active_count == 0
    # A reused slot starts clean: nothing from the released stream leaks into the next one.
    tab.add(0, max_new_tokens=1, now=0.0)
    assert tab._pending_bytes(0) == 0
    assert tab.step(arr([0]), arr([1]), 0.0) == [(0, "\ufffd", "length")]
    tab.add(0, max_new_tokens=1, now=0.0)  # a finished stream's slot is free at once
    assert tab.is_active(0)


def test_finish_can_drop_an_incomplete_character(impl: ModuleType) -> None:
    # A stream cut short (deadline, cancel) ends at its last complete character instead of U+FFFD.
    tab = impl.StreamTable([b"a\xe4\xb8", b"\xe4\xb8\x96", b"\xff"], 3, flush_tokens=100)
    for slot in range(3):
        tab.add(slot, max_new_tokens=10, now=0.0)
    assert tab.step(arr([0, 1, 2]), arr([0, 1, 2]), 0.0) == [(0, "a", None), (1, "世", None), (2, "\ufffd", None)]
    tab.step(arr([1, 2]), arr([0, 2]), 0.0)
    assert tab.finish(0, drop_incomplete=True) == ""
    assert tab.finish(1, drop_incomplete=True) == "a"
    assert tab.finish(2, drop_incomplete=True) == "\ufffd"  # invalid, not incomplete: it is text already
    assert tab.active_count == 0


def test_finished_slot_can_be_re_added_in_the_same_step_loop(impl: ModuleType) -> None:
    tab = impl.StreamTable(LETTERS, 1, flush_tokens=100)
    for round_ in range(3):
        tab.add(0, max_new_tokens=2, now=0.0)
        got = tab.step(arr([0]), arr([round_]), 0.0) + tab.step(arr([0]), arr([round_ + 1]), 0.0)
        assert got == [(0, LETTERS[round_].decode(), None), (0, LETTERS[round_ + 1].decode(), "length")]


def test_memory_stays_bounded_over_a_long_stream(impl: ModuleType) -> None:
    ids = ids_of("".join(CORPUS.values()))
    ids = (ids * (20000 // len(ids) + 1))[:20000]
    tab = impl.StreamTable(TABLES[True], 1, flush_tokens=8, flush_ms=math.inf)
    tab.add(0, max_new_tokens=len(ids) + 1, stop=("never occurs \x01",), now=0.0)
    longest = max(len(TABLES[True][i]) for i in ids)
    peak = 0
    for tid in ids:
        tab.step(arr([0]), arr([tid]), 0.0)
        peak = max(peak, tab._pending_bytes(0))
    assert peak <= 8 * longest + len("never occurs \x01")


def test_inputs_other_than_int64_arrays(impl: ModuleType) -> None:
    ids = ids_of("Hello world, foo bar")
    tab = impl.StreamTable(TABLES[True], 2, flush_tokens=1)
    tab.add(1, max_new_tokens=100, now=0.0)
    out = []
    for i, tid in enumerate(ids):
        form = i % 4
        slots: Any = [[1], np.array([1], dtype=np.int32), (1,), np.array([1, 1])[::2]][form]
        tokens: Any = [[tid], np.array([tid], dtype=np.uint16), (tid,), np.array([tid, 0])[::2]][form]
        out += tab.step(slots, tokens, 0.0)
    assert "".join(e[1] for e in out) == decode(ids)
    assert tab.step(np.array([], dtype=np.int64), [], 0.0) == []


# --- errors -------------------------------------------------------------------------------------------


def test_constructor_errors(impl: ModuleType) -> None:
    table = TABLES[True]
    with pytest.raises(ValueError):
        impl.StreamTable(table, 0)
    with pytest.raises(ValueError):
        impl.StreamTable(table, 1, flush_tokens=0)
    with pytest.raises(ValueError):
        impl.StreamTable(table, 1, flush_ms=-1.0)
    with pytest.raises(ValueError):
        impl.StreamTable(table, 1, flush_ms=math.nan)
    with pytest.raises(ValueError):
        impl.StreamTable(table, 1, eos_id=len(table))
    with pytest.raises(ValueError):
        impl.StreamTable([], 1)
    with pytest.raises(TypeError):
        impl.StreamTable(["text"], 1)


def test_add_errors(impl: ModuleType) -> None:
    tab = impl.StreamTable(LETTERS, 2)
    tab.add(0, max_new_tokens=1)
    with pytest.raises(ValueError, match="already active"):
        tab.add(0, max_new_tokens=1)
    for slot in (-1, 2, 10**30):
        with pytest.raises(ValueError, match="out of range"):
            tab.add(slot, max_new_tokens=1)
    with pytest.raises(ValueError):
        tab.add(1, max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        tab.add(1, max_new_tokens=1, stop=("ok", ""))
    with pytest.raises(ValueError):
        tab.add(1, max_new_tokens=1, stop=("\ud800",))
    # A failed add leaves the slot free.
    assert not tab.is_active(1)
    assert tab.active_count == 1
    for call in (tab.is_active, tab.finish, tab.release):
        with pytest.raises(ValueError, match="out of range"):
            call(2)


def test_step_errors_leave_state_untouched(impl: ModuleType) -> None:
    tab = impl.StreamTable(LETTERS, 3, flush_tokens=1)
    tab.add(0, max_new_tokens=5, now=0.0)
    tab.add(1, max_new_tokens=5, now=0.0)
    bad = [
        (arr([0, 1]), arr([0])),  # length mismatch
        (arr([0]), arr([len(LETTERS)])),  # id past the table
        (arr([0]), arr([-1])),
        (arr([0, 1]), arr([0, -1])),
        (arr([2]), arr([0])),  # inactive slot
        (arr([0, 2]), arr([0, 0])),
        (arr([3]), arr([0])),  # out of range
        (arr([0, -1]), arr([0, 0])),
        (arr([0, 0]), arr([0, 1])),  # duplicate slot
        (np.zeros((1, 1), dtype=np.int64), arr([0])),  # not 1-D
        (arr([0]), np.array([0.5])),  # not integers
    ]
    for slots, ids in bad:
        with pytest.raises(ValueError):
            tab.step(slots, ids, 0.0)
    # Nothing was consumed by the failed calls: max_new_tokens=5 still allows 4 quiet tokens.
    for _ in range(4):
        assert [e[2] for e in tab.step(arr([0, 1]), arr([0, 1]), 0.0)] == [None, None]
    assert [e[2] for e in tab.step(arr([0, 1]), arr([0, 1]), 0.0)] == ["length", "length"]


def test_read_only_attributes(impl: ModuleType) -> None:
    tab = impl.StreamTable(LETTERS, 2)
    with pytest.raises(AttributeError):
        tab.max_streams = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        tab.active_count = 3  # type: ignore[misc]
