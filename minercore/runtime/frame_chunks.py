"""A cache in front of CPython's arena allocator for the chunks that hold a thread's frames.

CPython (3.11 on) takes a 16 KiB chunk for a thread's frames from the arena allocator (mmap) when the current one is
full, and hands it back (munmap) as soon as the last frame in it returns. Deep in the model thread's stack, a
compiled decode step calls its custom ops' Python bodies from a frame that can end near a chunk's end; every call
made from there then maps, faults and unmaps a chunk. In the engine that cost about 10 us per Python call inside the
op bodies and doubled a decode step (RESULTS.md). ``csrc/frame_chunks.c`` keeps a few freed chunks for reuse.
"""

from __future__ import annotations

import logging
import sys

try:
    from . import _frame_chunks as _cache  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: chunks come and go as CPython makes them
    _cache = None

log = logging.getLogger(__name__)


def keep_frame_chunks() -> bool:
    """Put the cache in place for this process (once; later calls do nothing). False where the extension is not
    built, or on a free-threaded build (the allocator is then called without a lock the cache could rely on)."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    if _cache is None or not gil:
        return False
    if _cache.install():
        log.debug("frame chunks: freed chunks are kept for reuse")
    return True


def kept() -> int:
    """How many freed blocks the cache holds now (0 without it)."""
    return _cache.kept() if _cache is not None else 0
