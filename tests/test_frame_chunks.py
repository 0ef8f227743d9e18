"""The frame-chunk cache (runtime/frame_chunks.py, csrc/frame_chunks.c): chunks a thread's frames leave are kept
for the next call that needs one, and nothing else changes."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from minercore.runtime import frame_chunks

pytestmark = pytest.mark.skipif(frame_chunks._cache is None, reason="the frame-chunk cache needs its build")


def depth(n: int) -> int:
    return 0 if n == 0 else 1 + depth(n - 1)


def test_freed_chunks_are_kept_and_reused_and_calls_still_compute() -> None:
    assert frame_chunks.keep_frame_chunks()
    assert frame_chunks.keep_frame_chunks()  # a second install changes nothing
    assert depth(900) == 900  # several chunks deep, then back
    kept = frame_chunks.kept()
    assert 1 <= kept <= 8
    results = []
    worker = threading.Thread(target=lambda: results.append(depth(600)))
    worker.start()
    worker.join()
    assert results == [600]
    assert depth(900) == 900 and frame_chunks.kept() == kept  # the same chunks taken and given back


def test_a_process_with_the_cache_runs_and_exits_cleanly() -> None:
    code = ("import sys; sys.setrecursionlimit(20000)\n"
            "from minercore.runtime.frame_chunks import keep_frame_chunks, kept\n"
            "def d(n): return 0 if n == 0 else 1 + d(n - 1)\n"
            "assert keep_frame_chunks()\n"
            "print(sum(d(k) for k in range(0, 12000, 7)), kept())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    total, kept = out.stdout.split()
    assert int(total) == sum(range(0, 12000, 7)) and 1 <= int(kept) <= 8
