"""Streaming detokenization throughput: the stream table (compiled and pure Python) against per-stream
``tokenizers`` ``DecodeStream`` and the seed miner's ``decode([id])`` per token.

Every implementation does the whole job: one int64 array of new ids per decode step for all streams in,
the chunks each stream would send out. Tokens/s = ``extra_info["tokens"] / mean``::

    pytest benchmarks/bench_detok.py --benchmark-only --benchmark-group-by=param:streams \
        --benchmark-columns=mean,ops
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from tokenizers.decoders import DecodeStream
from tokenizers.implementations import BaseTokenizer

from minercore.text.token_bytes import token_bytes_table
from minercore.text.tokenizer import load_tokenizer

TOKENS_PER_STREAM = 2048
# Each stream starts this many tokens further into the text, so concurrent streams differ.
STREAM_OFFSET = 37
ROUNDS = {"cython": 20, "python": 5, "decodestream": 5, "seed": 3}
# A single stream's round is short and noisy on a shared machine: take more of them.
SINGLE_STREAM_ROUNDS = 10

MIXED_TEXT = (
    "Streaming a reply token by token means every chunk must be whole characters. The miner answers a "
    "validator's prompt with a few paragraphs of plain English, some code like `for i in range(10):`, "
    "numbers such as 3.14159 and 2,048, and the occasional list:\n- first item\n- second item\n\n"
    "Le café de la gare sert un crème brûlée délicieux; à Zürich, Müller bestellt Käsespätzle. "
    "¿Dónde está la estación? São Paulo é enorme. Ça va très bien, merci. Ærøskøbing ligger på Ærø.\n"
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。今日は天気がいいので公園に行きましょう。"
    "我们明天早上八点在图书馆见面，然后一起去吃午饭。한국어 문장도 조금 섞어 봅니다.\n"
    "Emoji time 😀🎉🚀 — family 👨‍👩‍👧‍👦, thumbs 👍🏽👍🏿, flags 🇯🇵🇫🇷🇧🇷, hearts ❤️‍🔥 and a "
    "keycap 1️⃣. The end of one paragraph.\n\n"
)


@pytest.fixture(scope="module")
def workload() -> dict[str, Any]:
    tokenizer = load_tokenizer("gpt2")
    table = token_bytes_table(tokenizer, skip_special_tokens=True)
    base = tokenizer.encode(MIXED_TEXT * 40)
    needed = TOKENS_PER_STREAM + STREAM_OFFSET * 300
    base = np.array((base * (needed // len(base) + 1))[:needed], dtype=np.int64)
    # Token positions that fall between characters. A stream that starts or ends inside a character
    # decodes to U+FFFD there, where DecodeStream (a baseline that must check out) differs.
    ends = np.cumsum([len(table[t]) for t in base])
    text = b"".join(table[t] for t in base)
    clean = [0] + [i + 1 for i, end in enumerate(ends[:-1]) if (text[end] & 0xC0) != 0x80]
    clean_set = set(clean)
    starts = [p for p in clean if p + TOKENS_PER_STREAM in clean_set or p + TOKENS_PER_STREAM == len(base)]
    raw = tokenizer.backend_tokenizer
    return {
        "tokenizer": tokenizer,
        # DecodeStream wants the Rust Tokenizer, not the `tokenizers.implementations` wrapper.
        "raw": raw._tokenizer if isinstance(raw, BaseTokenizer) else raw,
        "table": table,
        "eos": tokenizer.eos_token_id,
        "base": base,
        "starts": starts,
    }


def _stream_ids(wl: dict[str, Any], streams: int) -> np.ndarray:
    """ids[step, stream]: stream s starts at the first clean position at or after s * STREAM_OFFSET."""
    starts = wl["starts"]
    cols = []
    for s in range(streams):
        start = next(p for p in starts if p >= s * STREAM_OFFSET)
        cols.append(wl["base"][start:start + TOKENS_PER_STREAM])
    return np.stack(cols, axis=1)


def _table_job(rows: list[np.ndarray]) -> Callable[[Any], list[list[str]]]:
    streams = len(rows[0])
    slots = np.arange(streams, dtype=np.int64)

    def job(table: Any) -> list[list[str]]:
        chunks: list[list[str]] = [[] for _ in range(streams)]
        for slot in range(streams):
            table.add(slot, max_new_tokens=TOKENS_PER_STREAM)
        for row in rows:
            for slot, text, _ in table.step(slots, row):
                chunks[slot].append(text)
        return chunks

    return job


def _decodestream_job(wl: dict[str, Any], rows: list[np.ndarray]) -> Callable[[], list[list[str]]]:
    raw = wl["raw"]
    streams = len(rows[0])

    def job() -> list[list[str]]:
        decoders = [DecodeStream(skip_special_tokens=True) for _ in range(streams)]
        chunks: list[list[str]] = [[] for _ in range(streams)]
        for row in rows:
            for decoder, tid, out in zip(decoders, row.tolist(), chunks):  # noqa: B905 - the leanest loop
                text = decoder.step(raw, tid)
                if text is not None:
                    out.append(text)
        return chunks

    return job


def _seed_job(wl: dict[str, Any], rows: list[np.ndarray]) -> Callable[[], list[list[str]]]:
    decode = wl["tokenizer"].decode
    streams = len(rows[0])

    def job() -> list[list[str]]:
        chunks: list[list[str]] = [[] for _ in range(streams)]
        for row in rows:
            for tid, out in zip(row.tolist(), chunks):  # noqa: B905 - the leanest loop
                out.append(decode([tid], skip_special_tokens=True))
        return chunks

    return job


@pytest.mark.parametrize("impl", ["cython", "python", "decodestream", "seed"])
@pytest.mark.parametrize("streams", [1, 64, 256])
def test_detok(benchmark: Any, workload: dict[str, Any], impl: str, streams: int) -> None:
    ids = _stream_ids(workload, streams)
    # The engine hands over one contiguous int64 array of new ids per step.
    rows = [np.ascontiguousarray(row) for row in ids]
    rounds = ROUNDS[impl] * (SINGLE_STREAM_ROUNDS if streams == 1 else 1)
    benchmark.group = "detok"
    benchmark.extra_info.update(impl=impl, streams=streams, tokens=streams * TOKENS_PER_STREAM,
                                correct=impl != "seed")
    if impl in ("cython", "python"):
        # An ImportError fails the cython case: CI always builds the extension.
        module = importlib.import_module(f"minercore.text._streamloop_{'c' if impl == 'cython' else 'py'}")
        job = _table_job(rows)

        def fresh_table() -> tuple[tuple[Any], dict[str, Any]]:
            # Built once per tokenizer and engine in real use, so it stays out of the timing.
            return (module.StreamTable(workload["table"], streams, eos_id=workload["eos"]),), {}

        chunks = benchmark.pedantic(job, setup=fresh_table, rounds=rounds, warmup_rounds=1)
    else:
        job = _decodestream_job(workload, rows) if impl == "decodestream" else _seed_job(workload, rows)
        chunks = benchmark.pedantic(job, rounds=rounds, warmup_rounds=1)
    if impl != "seed":
        # The seed decodes each id alone, which breaks multi-byte characters: it is timed, not checked.
        decode = workload["tokenizer"].decode
        expected = [decode(ids[:, s].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
                    for s in range(streams)]
        assert ["".join(c) for c in chunks] == expected
