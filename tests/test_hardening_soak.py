"""The soak in its short form: the offline miner in a child process, 16 callers for 8 s (the full soak,
``python benchmarks/soak.py --duration 60 --streams 64``, is run by hand; its figures are in RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_loses_nothing_and_leaks_nothing():
    out = subprocess.run([sys.executable, "benchmarks/soak.py", "--duration", "8", "--streams", "16", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert out.stdout, out.stderr[-4000:]
    summary = json.loads(out.stdout)
    assert summary["problems"] == [], summary
    assert out.returncode == 0
    assert summary["requests"] >= 16 and summary["exact"] == summary["requests"] and summary["failed"] == 0
    assert summary["engine_completed"] == summary["requests"]
    assert (summary["engine_failed"], summary["engine_cancelled"]) == (0, 0)
    assert (summary["engine_active_end"], summary["engine_queued_end"]) == (0, 0)
    assert summary["tasks_end"] == summary["tasks_idle"]
    assert summary["rss_growth_pct"] < 5.0
    assert summary["miner_exit_code"] == 0
