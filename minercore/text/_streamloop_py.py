"""Pure-Python twin of ``csrc/_streamloop_c.pyx``: same API, same events for the same inputs and ``now``.

Each stream keeps only bytes it has not released yet. A step appends each token's bytes (from the table
built by :func:`minercore.token_bytes.token_bytes_table`) and releases the longest prefix that is whole
UTF-8 characters and cannot be part of a stop string, when the chunking policy says so.

Stop strings are matched on UTF-8 bytes. For a valid UTF-8 stop string that equals matching on the
decoded text: its first byte is never a continuation byte (0x80-0xBF), and every decoded unit (a
character, or one U+FFFD for a maximal invalid subpart) is a non-continuation byte followed only by
continuation bytes, so a byte match always starts on a unit boundary and decodes to the stop string
itself. The one difference: a stop string containing U+FFFD matches only a literal U+FFFD from the
model, not the replacement for invalid bytes.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["FINISH_REASONS", "StreamTable"]

FINISH_REASONS: tuple[str | None, ...] = (None, "eos", "stop", "length")
_EOS, _STOP, _LENGTH = FINISH_REASONS[1:]
_INT64 = np.dtype(np.int64)
_ndarray = np.ndarray
_monotonic = time.monotonic


def _int_list(values: Any, what: str) -> list[int]:
    """Slow path of :meth:`StreamTable.step` for anything but a 1-D native int64 array."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D integer array, got {arr.ndim} dimensions")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64).tolist()


def _complete_len(buf: bytearray) -> int:
    """Length of ``buf`` without a trailing UTF-8 sequence that is valid so far but incomplete.

    Only such a tail may still turn into a character; anything else invalid is final and decodes to
    U+FFFD exactly where ``bytes.decode("utf-8", "replace")`` puts it.
    """
    n = len(buf)
    j = n - 1
    lowest = max(n - 3, 0)  # an incomplete sequence is at most 3 bytes long
    while j >= lowest and 0x80 <= buf[j] < 0xC0:
        j -= 1
    if j < lowest:
        return n
    lead = buf[j]
    if 0xC2 <= lead <= 0xDF:
        need = 2
    elif 0xE0 <= lead <= 0xEF:
        need = 3
    elif 0xF0 <= lead <= 0xF4:
        need = 4
    else:
        return n
    if n - j >= need:
        return n
    if n - j >= 2:
        # Well-formed second bytes (Unicode table 3-7): these leads narrow the 0x80-0xBF range.
        second = buf[j + 1]
        if lead == 0xE0:
            ok = second >= 0xA0
        elif lead == 0xED:
            ok = second <= 0x9F
        elif lead == 0xF0:
            ok = second >= 0x90
        elif lead == 0xF4:
            ok = second <= 0x8F
        else:
            ok = True
        if not ok:
            return n
    return j


class _Stream:
    """One active stream. Slotted attributes cost about what a local list index does."""

    __slots__ = ("buf", "count", "limit", "check_at", "deadline", "stops", "include_stop", "strip_first_space",
                 "plain")

    def __init__(self, limit: int, deadline: float, stops: tuple[bytes, ...], include_stop: bool,
                 strip_first_space: bool) -> None:
        self.buf = bytearray()  # bytes not released yet
        self.count = 0  # tokens consumed
        self.limit = limit
        # The token count at which to look again: min(the flush_tokens rule, limit). 0 until the first
        # release, so the first releasable text goes out at once.
        self.check_at = 0
        self.deadline = deadline  # clock value at which the time rule releases text
        # None without stop strings: cheaper to test than an empty tuple.
        self.stops = stops or None
        self.include_stop = include_stop
        # Until the stream's first byte arrives: drop it if it is a space (see StreamTable.add).
        self.strip_first_space = strip_first_space
        # Token bytes are appended as they are (no stop strings, no first space to drop): the one per-token test.
        self.plain = self.stops is None and not strip_first_space

    def first_bytes(self, piece: bytes) -> bytes:
        """The stream's first non-empty piece without its leading space; from here on only stops are special."""
        self.strip_first_space = False
        self.plain = self.stops is None
        return piece[1:] if piece[0] == 0x20 else piece


def _stop_cut(st: _Stream, old: int) -> int:
    """Where the stream's text ends if the bytes after ``old`` completed a stop string, else -1.

    Only matches ending in the new bytes are new; among them the earliest start wins (then the
    shortest string, which completed first).
    """
    buf = st.buf
    best = -1
    best_len = 0
    for s in st.stops:
        at = buf.find(s, max(old - len(s) + 1, 0))
        if at >= 0 and (best < 0 or at < best or (at == best and len(s) < best_len)):
            best = at
            best_len = len(s)
    if best >= 0 and st.include_stop:
        return best + best_len
    return best


def _stop_holdback(st: _Stream) -> int:
    """Length of the longest suffix that is a proper prefix of a stop string: it may still become one."""
    buf = st.buf
    n = len(buf)
    best = 0
    for s in st.stops:
        # Candidate starts, leftmost (longest suffix) first, where the stop's first byte occurs.
        at = buf.find(s[0], max(n - len(s) + 1, 0))
        while at >= 0 and n - at > best:
            if s.startswith(buf[at:]):
                best = n - at
                break
            at = buf.find(s[0], at + 1)
    return best


class StreamTable:
    """Incremental detokenization and stop/length/EOS handling for up to ``max_streams`` streams.

    One instance serves a whole batch: the engine calls :meth:`step` once per decode step with the new
    token of every listed stream. ``now`` values are ``time.monotonic()`` seconds. Not thread-safe.
    """

    def __init__(self, token_bytes: Sequence[bytes], max_streams: int, *, eos_id: int | None = None,
                 flush_tokens: int = 16, flush_ms: float = 50.0) -> None:
        table = []
        for piece in token_bytes:
            if not isinstance(piece, (bytes, bytearray)):
                raise TypeError(f"token_bytes entries must be bytes, got {type(piece).__name__}")
            table.append(bytes(piece))
        if not table:
            raise ValueError("token_bytes is empty")
        max_streams = operator.index(max_streams)
        flush_tokens = operator.index(flush_tokens)
        flush_ms = float(flush_ms)
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if flush_tokens < 1:
            raise ValueError(f"flush_tokens must be >= 1, got {flush_tokens}")
        if not flush_ms >= 0.0:
            raise ValueError(f"flush_ms must be >= 0, got {flush_ms}")
        if eos_id is not None:
            eos_id = operator.index(eos_id)
            if not 0 <= eos_id < len(table):
                raise ValueError(f"eos_id {eos_id} is outside the token table (size {len(table)})")
        self._table = table
        self._ntok = len(table)
        self._max_streams = max_streams
        # Ids are validated >= 0, so -1 never matches: one int comparison per token either way.
        self._eos = -1 if eos_id is None else eos_id
        self._flush_tokens = flush_tokens
        self._flush_s = flush_ms / 1000.0
        # Both views of the active slots: the list for indexing, the set for C-speed batch checks.
        self._streams: list[_Stream | None] = [None] * max_streams
        self._active: set[int] = set()

    @property
    def max_streams(self) -> int:
        return self._max_streams

    @property
    def active_count(self) -> int:
        return len(self._active)

    def _slot(self, slot: Any) -> int:
        slot = operator.index(slot)
        if not 0 <= slot < self._max_streams:
            raise ValueError(f"slot {slot} is out of range [0, {self._max_streams})")
        return slot

    def is_active(self, slot: int) -> bool:
        return self._slot(slot) in self._active

    def add(self, slot: int, *, max_new_tokens: int, stop: Sequence[str] = (), include_stop: bool = False,
            strip_first_space: bool = False, now: float | None = None) -> None:
        """Start a stream in ``slot``; ``now`` starts its flush clock. A bare ``str`` is one stop string.

        ``strip_first_space`` drops the stream's first byte if it is a space, as SentencePiece-style decoders
        drop the space their normalizer put before the first word
        (:func:`minercore.token_bytes.strips_first_space`). Stop strings, hold-back and chunking see the
        text without it.
        """
        slot = self._slot(slot)
        if slot in self._active:
            raise ValueError(f"slot {slot} is already active")
        max_new_tokens = operator.index(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if isinstance(stop, str):
            stop = (stop,)
        encoded = []
        for text in stop:
            if not isinstance(text, str):
                raise TypeError(f"stop strings must be str, got {type(text).__name__}")
            if not text:
                raise ValueError("stop strings must not be empty")
            try:
                encoded.append(text.encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise ValueError(f"stop string {text!r} is not valid Unicode: {exc}") from None
        now = _monotonic() if now is None else float(now)
        self._streams[slot] = _Stream(max_new_tokens, now + self._flush_s, tuple(encoded), bool(include_stop),
                                     bool(strip_first_space))
        self._active.add(slot)

    def _end(self, slot: int, cut: int) -> str:
        buf = self._streams[slot].buf
        text = (buf if cut == len(buf) else buf[:cut]).decode("utf-8", "replace")
        self._streams[slot] = None
        self._active.discard(slot)
        return text

    def finish(self, slot: int, *, drop_incomplete: bool = False) -> str:
        """All text still pending (held-back stop prefixes included); frees the slot.

        A trailing incomplete UTF-8 sequence becomes U+FFFD, as a full decode would render it, unless
        ``drop_incomplete``: a stream cut short (deadline, cancel) never finished that character.
        """
        slot = self._slot(slot)
        if slot not in self._active:
            raise ValueError(f"slot {slot} is not active")
        buf = self._streams[slot].buf
        return self._end(slot, _complete_len(buf) if drop_incomplete else len(buf))

    def release(self, slot: int) -> None:
        """Free ``slot`` without output; nothing happens if it is not active."""
        slot = self._slot(slot)
        if slot in self._active:
            self._streams[slot] = None
            self._active.discard(slot)

    def _pending_bytes(self, slot: int) -> int:
        """Bytes held for ``slot`` (tests use it to check the per-stream memory bound)."""
        st = self._streams[self._slot(slot)]
        return 0 if st is None else len(st.buf)

    def _flush(self, st: _Stream, count: int, now: float) -> str | None:
        buf = st.buf
        if not buf:
            return None
        # Most chunks end in ASCII; only other endings need the UTF-8 tail check.
        cut = len(buf) if buf[-1] < 0x80 else _complete_len(buf)
        if st.stops is not None:
            held = len(buf) - _stop_holdback(st)
            if held < cut:
                cut = held
        if not cut:
            return None
        if cut == len(buf):
            text = buf.decode("utf-8", "replace")
            buf.clear()
        else:
            text = buf[:cut].decode("utf-8", "replace")
            del buf[:cut]
        flush_at = count + self._flush_tokens
        st.check_at = flush_at if flush_at < st.limit else st.limit
        st.deadline = now + self._flush_s
        return text

    def step(self, slots: Any, ids: Any, now: float | None = None) -> list[tuple[int, str, str | None]]:
        """Feed one token to each listed stream; events for streams that release text or finish."""
        # The engine's arrays take the inline fast path: this runs once per decode step.
        if (type(slots) is _ndarray and type(ids) is _ndarray and slots.dtype is _INT64 and ids.dtype is _INT64
                and slots.ndim == 1 and ids.ndim == 1):
            slot_list = slots.tolist()
            id_list = ids.tolist()
        else:
            slot_list = _int_list(slots, "slots")
            id_list = _int_list(ids, "ids")
        n = len(slot_list)
        if n != len(id_list):
            raise ValueError(f"slots and ids differ in length ({n} != {len(id_list)})")
        if not n:
            return []
        now = _monotonic() if now is None else float(now)
        if n == 1:
            slot = slot_list[0]
            tid = id_list[0]
            if slot not in self._active or not 0 <= tid < self._ntok:
                self._reject(slot_list, id_list)
            st = self._streams[slot]
            count = st.count + 1
            # A lone plain stream's token that can end nothing (no EOS, length not reached) skips the loop
            # set-up below, which costs as much as the token itself.
            if tid != self._eos and st.plain and count < st.limit:
                st.count = count
                st.buf += self._table[tid]
                if count < st.check_at and now < st.deadline:
                    return []
                text = self._flush(st, count, now)
                return [] if text is None else [(slot, text, None)]
        else:
            self._validate(slot_list, id_list)
        table = self._table
        eos = self._eos
        streams = self._streams
        events: list[tuple[int, str, str | None]] = []
        for slot, tid in zip(slot_list, id_list):  # noqa: B905 - lengths checked above
            st = streams[slot]
            count = st.count + 1
            st.count = count
            if tid == eos:
                events.append((slot, self._end(slot, len(st.buf)), _EOS))
                continue
            piece = table[tid]
            if piece:
                if st.plain:
                    st.buf += piece
                else:
                    if st.strip_first_space:
                        piece = st.first_bytes(piece)
                    old = len(st.buf)
                    st.buf += piece
                    cut = -1 if st.stops is None else _stop_cut(st, old)
                    if cut >= 0:
                        events.append((slot, self._end(slot, cut), _STOP))
                        continue
            if count >= st.check_at or now >= st.deadline:
                if count == st.limit:
                    events.append((slot, self._end(slot, len(st.buf)), _LENGTH))
                else:
                    text = self._flush(st, count, now)
                    if text is not None:
                        events.append((slot, text, None))
        return events

    def _validate(self, slot_list: list[int], id_list: list[int]) -> None:
        unique = set(slot_list)
        if (not unique <= self._active or len(unique) != len(slot_list)
                or min(id_list) < 0 or max(id_list) >= self._ntok):
            self._reject(slot_list, id_list)

    def _reject(self, slot_list: list[int], id_list: list[int]) -> None:
        """Raise the ValueError for the first problem, in the compiled loop's order."""
        for slot in slot_list:
            if not 0 <= slot < self._max_streams:
                raise ValueError(f"slot {slot} is out of range [0, {self._max_streams})")
            if slot not in self._active:
                raise ValueError(f"slot {slot} is not active")
        if len(set(slot_list)) != len(slot_list):
            raise ValueError("a slot is listed more than once in one step")
        for tid in id_list:
            if not 0 <= tid < self._ntok:
                raise ValueError(f"token id {tid} is outside the token table (size {self._ntok})")
