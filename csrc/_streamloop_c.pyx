# cython: language_level=3
# Annotations document the API (as in the twin); they must not make Cython reject numpy integers.
# cython: annotation_typing=False
"""Compiled stream loop; ``minercore/_streamloop_py.py`` is its pure-Python twin (same API and events).

Layout: the id → bytes table is one bytes blob plus an offsets array, and every stream owns a malloc'd
buffer holding only the bytes it has not released yet. Per token the loop does a bounds-free table
lookup and a memcpy; Python objects are made only when text is released (one
``PyUnicode_DecodeUTF8(..., "replace")`` per chunk). Inputs are validated once per ``step`` before the
unchecked loop runs (boundscheck/wraparound are off for this module).

Stop strings are matched on UTF-8 bytes; the twin's module docstring explains why that equals matching
the decoded text.
"""

from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove

import operator
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

FINISH_REASONS = (None, "eos", "stop", "length")
cdef object _EOS = FINISH_REASONS[1]
cdef object _STOP = FINISH_REASONS[2]
cdef object _LENGTH = FINISH_REASONS[3]

# First allocation of a stream buffer; it doubles as needed.
cdef Py_ssize_t _MIN_BUFFER = 256
# Buffers that grew past this during a stream are not kept for the slot's next stream.
cdef Py_ssize_t _KEEP_BUFFER = 1 << 16


cdef struct Stream:
    char* buf               # bytes not released yet
    Py_ssize_t length
    Py_ssize_t cap
    Py_ssize_t count        # tokens consumed
    Py_ssize_t limit        # max_new_tokens
    # The token count at which to look again: min(the flush_tokens rule, limit). 0 until the first
    # release, so the first releasable text goes out at once.
    Py_ssize_t check_at
    double deadline         # clock value at which the time rule releases text
    int64_t stamp           # the last step() that listed this slot; catches a slot listed twice
    char* stops             # stop strings back to back, UTF-8
    Py_ssize_t* stop_len
    Py_ssize_t n_stops      # 0: no stop search at all for this stream
    bint include_stop
    bint strip_first_space  # until the stream's first byte arrives: drop it if it is a space (see add)
    bint active


cdef object _int64_array(object values, str what):
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D integer array, got {arr.ndim} dimensions")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D integer array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


cdef int _int64_view(object values, Py_buffer* view, str what) except -1:
    """A 1-D C-contiguous native int64 view of ``values``; the engine's arrays need no copy."""
    cdef bint ok = False
    try:
        PyObject_GetBuffer(values, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
        ok = True
    except (TypeError, ValueError, BufferError):
        pass
    if ok:
        if (view.ndim == 1 and view.itemsize == 8 and view.format != NULL
                and (view.format[0] == b'l' or view.format[0] == b'q') and view.format[1] == 0):
            return 0
        PyBuffer_Release(view)
    PyObject_GetBuffer(_int64_array(values, what), view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    return 0


cdef inline Py_ssize_t _complete_len(const unsigned char* b, Py_ssize_t n) noexcept nogil:
    """Length of ``b`` without a trailing UTF-8 sequence that is valid so far but incomplete.

    Only such a tail may still turn into a character; anything else invalid is final and decodes to
    U+FFFD exactly where ``bytes.decode("utf-8", "replace")`` puts it.
    """
    cdef Py_ssize_t j = n - 1
    cdef Py_ssize_t lowest = n - 3  # an incomplete sequence is at most 3 bytes long
    cdef Py_ssize_t need
    cdef unsigned char lead, second
    if lowest < 0:
        lowest = 0
    while j >= lowest and (b[j] & 0xC0) == 0x80:
        j -= 1
    if j < lowest:
        return n
    lead = b[j]
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
        second = b[j + 1]
        if ((lead == 0xE0 and second < 0xA0) or (lead == 0xED and second > 0x9F)
                or (lead == 0xF0 and second < 0x90) or (lead == 0xF4 and second > 0x8F)):
            return n
    return j


cdef Py_ssize_t _stop_cut(Stream* st, Py_ssize_t old) noexcept nogil:
    """Where the stream's text ends if the bytes after ``old`` completed a stop string, else -1.

    Only matches ending in the new bytes are new; among them the earliest start wins (then the
    shortest string, which completed first).
    """
    cdef Py_ssize_t best = -1, best_len = 0
    cdef Py_ssize_t k, j, last, length
    cdef const char* s = st.stops
    for k in range(st.n_stops):
        length = st.stop_len[k]
        j = old - length + 1
        if j < 0:
            j = 0
        last = st.length - length
        if best >= 0 and last > best:
            last = best
        while j <= last:
            if st.buf[j] == s[0] and memcmp(st.buf + j, s, length) == 0:
                if best < 0 or j < best or length < best_len:
                    best = j
                    best_len = length
                break
            j += 1
        s += length
    if best >= 0 and st.include_stop:
        return best + best_len
    return best


cdef Py_ssize_t _stop_holdback(Stream* st) noexcept nogil:
    """Length of the longest suffix that is a proper prefix of a stop string: it may still become one."""
    cdef Py_ssize_t best = 0
    cdef Py_ssize_t i, k, top
    cdef const char* s = st.stops
    for i in range(st.n_stops):
        top = st.stop_len[i] - 1
        if top > st.length:
            top = st.length
        k = top
        while k > best:
            if memcmp(st.buf + st.length - k, s, k) == 0:
                best = k
                break
            k -= 1
        s += st.stop_len[i]
    return best


cdef class StreamTable:
    """Incremental detokenization and stop/length/EOS handling for up to ``max_streams`` streams.

    One instance serves a whole batch: the engine calls :meth:`step` once per decode step with the new
    token of every listed stream. ``now`` values are ``time.monotonic()`` seconds. Not thread-safe.
    """

    cdef readonly Py_ssize_t max_streams
    cdef readonly Py_ssize_t active_count
    cdef bytes _blob             # every token's bytes back to back
    cdef const char* _tbl
    cdef Py_ssize_t* _off        # token i is _tbl[_off[i]:_off[i + 1]]
    cdef Py_ssize_t _ntok
    cdef int64_t _eos            # -1 when there is none: ids are validated >= 0
    cdef Py_ssize_t _flush_tokens
    cdef double _flush_s
    cdef int64_t _stamp
    cdef Stream* _streams
    cdef object _clock

    def __cinit__(self, token_bytes: Sequence[bytes], max_streams: int, *, eos_id: int | None = None,
                  flush_tokens: int = 16, flush_ms: float = 50.0):
        cdef Py_ssize_t i, pos = 0
        parts = []
        for piece in token_bytes:
            if not isinstance(piece, (bytes, bytearray)):
                raise TypeError(f"token_bytes entries must be bytes, got {type(piece).__name__}")
            parts.append(bytes(piece))
        if not parts:
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
            if not 0 <= eos_id < len(parts):
                raise ValueError(f"eos_id {eos_id} is outside the token table (size {len(parts)})")
        self._ntok = len(parts)
        self._off = <Py_ssize_t*>malloc((self._ntok + 1) * sizeof(Py_ssize_t))
        self._streams = <Stream*>calloc(max_streams, sizeof(Stream))
        if self._off == NULL or self._streams == NULL:
            raise MemoryError()
        for i in range(self._ntok):
            self._off[i] = pos
            pos += len(<bytes>parts[i])
        self._off[self._ntok] = pos
        self._blob = b"".join(parts)
        self._tbl = PyBytes_AS_STRING(self._blob)
        self.max_streams = max_streams
        self._eos = -1 if eos_id is None else eos_id
        # Counts never get near sys.maxsize, so clamping there changes nothing but avoids OverflowError.
        self._flush_tokens = min(flush_tokens, sys.maxsize)
        self._flush_s = flush_ms / 1000.0
        self._clock = time.monotonic

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._streams != NULL:
            for i in range(self.max_streams):
                free(self._streams[i].buf)
                free(self._streams[i].stops)
                free(self._streams[i].stop_len)
            free(self._streams)
        free(self._off)

    cdef Py_ssize_t _slot(self, slot) except -1:
        slot = operator.index(slot)
        if not 0 <= slot < self.max_streams:
            raise ValueError(f"slot {slot} is out of range [0, {self.max_streams})")
        return slot

    def is_active(self, slot: int) -> bool:
        return bool(self._streams[self._slot(slot)].active)

    def add(self, slot: int, *, max_new_tokens: int, stop: Sequence[str] = (), include_stop: bool = False,
            strip_first_space: bool = False, now: float | None = None) -> None:
        """Start a stream in ``slot``; ``now`` starts its flush clock. A bare ``str`` is one stop string.

        ``strip_first_space`` drops the stream's first byte if it is a space, as SentencePiece-style decoders
        drop the space their normalizer put before the first word
        (:func:`minercore.token_bytes.strips_first_space`). Stop strings, hold-back and chunking see the
        text without it.
        """
        cdef Py_ssize_t s = self._slot(slot)
        cdef Stream* st = &self._streams[s]
        cdef Py_ssize_t i, limit, total = 0, pos = 0
        cdef bytes enc
        if st.active:
            raise ValueError(f"slot {s} is already active")
        max_new_tokens = operator.index(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = min(max_new_tokens, sys.maxsize)
        if isinstance(stop, str):
            stop = (stop,)
        encoded = []
        for text in stop:
            if not isinstance(text, str):
                raise TypeError(f"stop strings must be str, got {type(text).__name__}")
            if not text:
                raise ValueError("stop strings must not be empty")
            try:
                enc = text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"stop string {text!r} is not valid Unicode: {exc}") from None
            encoded.append(enc)
            total += len(enc)
        t = self._clock() if now is None else float(now)
        if encoded:
            st.stops = <char*>malloc(total)
            st.stop_len = <Py_ssize_t*>malloc(len(encoded) * sizeof(Py_ssize_t))
            if st.stops == NULL or st.stop_len == NULL:
                free(st.stops)
                free(st.stop_len)
                st.stops = NULL
                st.stop_len = NULL
                raise MemoryError()
            for i in range(len(encoded)):
                enc = encoded[i]
                memcpy(st.stops + pos, PyBytes_AS_STRING(enc), len(enc))
                st.stop_len[i] = len(enc)
                pos += len(enc)
        st.n_stops = len(encoded)
        st.include_stop = bool(include_stop)
        st.strip_first_space = bool(strip_first_space)
        st.length = 0
        st.count = 0
        st.limit = limit
        st.check_at = 0
        st.deadline = t + self._flush_s
        st.active = True
        self.active_count += 1

    cdef void _drop(self, Stream* st) noexcept:
        st.active = False
        st.length = 0
        st.n_stops = 0
        free(st.stops)
        free(st.stop_len)
        st.stops = NULL
        st.stop_len = NULL
        if st.cap > _KEEP_BUFFER:
            free(st.buf)
            st.buf = NULL
            st.cap = 0
        self.active_count -= 1

    cdef str _end(self, Stream* st, Py_ssize_t cut):
        text = PyUnicode_DecodeUTF8(st.buf, cut, "replace")
        self._drop(st)
        return text

    def finish(self, slot: int, *, drop_incomplete: bool = False) -> str:
        """All text still pending (held-back stop prefixes included); frees the slot.

        A trailing incomplete UTF-8 sequence becomes U+FFFD, as a full decode would render it, unless
        ``drop_incomplete``: a stream cut short (deadline, cancel) never finished that character.
        """
        cdef Py_ssize_t s = self._slot(slot)
        cdef Stream* st = &self._streams[s]
        if not st.active:
            raise ValueError(f"slot {s} is not active")
        if drop_incomplete:
            return self._end(st, _complete_len(<const unsigned char*>st.buf, st.length))
        return self._end(st, st.length)

    def release(self, slot: int) -> None:
        """Free ``slot`` without output; nothing happens if it is not active."""
        cdef Stream* st = &self._streams[self._slot(slot)]
        if st.active:
            self._drop(st)

    def _pending_bytes(self, slot: int) -> int:
        """Bytes held for ``slot`` (tests use it to check the per-stream memory bound)."""
        return self._streams[self._slot(slot)].length

    cdef int _validate(self, const int64_t* slots, const int64_t* ids, Py_ssize_t n) except -1:
        cdef Py_ssize_t i
        cdef int64_t s
        cdef Stream* st
        for i in range(n):
            s = slots[i]
            if s < 0 or s >= self.max_streams:
                raise ValueError(f"slot {s} is out of range [0, {self.max_streams})")
            if not self._streams[s].active:
                raise ValueError(f"slot {s} is not active")
        self._stamp += 1
        for i in range(n):
            st = &self._streams[slots[i]]
            if st.stamp == self._stamp:
                raise ValueError("a slot is listed more than once in one step")
            st.stamp = self._stamp
        for i in range(n):
            if ids[i] < 0 or ids[i] >= self._ntok:
                raise ValueError(f"token id {ids[i]} is outside the token table (size {self._ntok})")
        return 0

    cdef int _grow(self, Stream* st, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = st.cap if st.cap else _MIN_BUFFER
        cdef char* grown
        while cap < need:
            cap *= 2
        grown = <char*>realloc(st.buf, cap)
        if grown == NULL:
            raise MemoryError()
        st.buf = grown
        st.cap = cap
        return 0

    cdef int _flush(self, list events, int64_t slot, Stream* st, double now) except -1:
        cdef Py_ssize_t cut = _complete_len(<const unsigned char*>st.buf, st.length)
        cdef Py_ssize_t held
        if st.n_stops:
            held = st.length - _stop_holdback(st)
            if held < cut:
                cut = held
        if cut == 0:
            return 0
        events.append((slot, PyUnicode_DecodeUTF8(st.buf, cut, "replace"), None))
        st.length -= cut
        memmove(st.buf, st.buf + cut, st.length)
        # Written so that a huge flush_tokens cannot overflow.
        if self._flush_tokens < st.limit - st.count:
            st.check_at = st.count + self._flush_tokens
        else:
            st.check_at = st.limit
        st.deadline = now + self._flush_s
        return 0

    cdef int _run(self, const int64_t* slots, const int64_t* ids, Py_ssize_t n, double now,
                  list events) except -1:
        cdef Py_ssize_t i, nb, old, cut
        cdef int64_t tid
        cdef const char* piece
        cdef Stream* st
        cdef Stream* streams = self._streams
        cdef const Py_ssize_t* off = self._off
        for i in range(n):
            st = &streams[slots[i]]
            tid = ids[i]
            st.count += 1
            if tid == self._eos:
                events.append((slots[i], self._end(st, st.length), _EOS))
                continue
            piece = self._tbl + off[tid]
            nb = off[tid + 1] - off[tid]
            if st.strip_first_space and nb:
                st.strip_first_space = False
                if piece[0] == b' ':
                    piece += 1
                    nb -= 1
            if nb:
                old = st.length
                if old + nb > st.cap:
                    self._grow(st, old + nb)
                memcpy(st.buf + old, piece, nb)
                st.length = old + nb
                if st.n_stops:
                    cut = _stop_cut(st, old)
                    if cut >= 0:
                        events.append((slots[i], self._end(st, cut), _STOP))
                        continue
            if st.count >= st.check_at or now >= st.deadline:
                if st.count == st.limit:
                    events.append((slots[i], self._end(st, st.length), _LENGTH))
                elif st.length:
                    self._flush(events, slots[i], st, now)
        return 0

    def step(self, slots: Any, ids: Any, now: float | None = None) -> list[tuple[int, str, str | None]]:
        """Feed one token to each listed stream; events for streams that release text or finish."""
        cdef Py_buffer sv, iv
        cdef Py_ssize_t n
        cdef double t
        cdef list events = []
        _int64_view(slots, &sv, "slots")
        try:
            _int64_view(ids, &iv, "ids")
            try:
                n = sv.shape[0]
                if n != iv.shape[0]:
                    raise ValueError(f"slots and ids differ in length ({n} != {iv.shape[0]})")
                if n:
                    self._validate(<const int64_t*>sv.buf, <const int64_t*>iv.buf, n)
                    t = self._clock() if now is None else float(now)
                    self._run(<const int64_t*>sv.buf, <const int64_t*>iv.buf, n, t, events)
            finally:
                PyBuffer_Release(&iv)
        finally:
            PyBuffer_Release(&sv)
        return events
