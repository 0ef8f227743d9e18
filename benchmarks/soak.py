"""Soak the offline miner: ``--streams`` concurrent callers for ``--duration`` seconds, every answer checked.

    python benchmarks/soak.py --duration 60 --streams 64          # the full soak (a markdown summary)
    python benchmarks/soak.py --duration 8 --streams 16 --json    # the short form that the tests run

The miner (the real ``Miner`` with the tiny simulated model on the CPU, offline, on loopback) runs in a child
process, so that its resident memory is its own: in one process the callers' memory (64 dendrites, their
sessions and histories) and their CPU time would be counted with the miner's. The parent samples the child's RSS
with psutil; the child reports what only it can see (the engine's counters, its asyncio task and thread counts)
as JSON lines in a stats file.

Each caller is one long-lived dendrite (bittensor 10; under 11 a btauth/1 OpenAI client) with its own hotkey, as a
validator runs, sending one request after the
other: a rotation of 24 prompts (15 to 420 GPT-2 tokens of prose, accents, CJK, emoji, newlines), each answer
compared with the prompt (the model echoes). Before the clock starts, every caller sends the longest prompt
once, so that the first touch of the engine's preallocated KV cache is not counted as growth.

Pass: no failed stream, every text exact, the engine idle at the end (no active or queued request), the asyncio
task count back to its idle value, and RSS growth between the first and the last 10 s (a quarter of the run if
shorter) under 5%. Exit status 0 on a pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 60.0
SAMPLE_EVERY_S = 0.5
WINDOW_S = 10.0
MAX_RSS_GROWTH = 0.05

TEXTS = ["Miners stream text back to validators as it is produced.", "Crème brûlée, naïve façade, Zürich, Kraków.",
         "東京は日本の首都です。", "我们今天去公园吧！", "한국어 문장입니다.", "😀🎉👩‍👩‍👧 🇯🇵 👍🏽",
         "line one\nline two\n\n\ttabbed", "e\u0301 combining marks and <|endoftext|> as text"]


def prompts() -> list[str]:
    """The rotation: 24 prompts of 15 to 420 GPT-2 tokens."""
    return [f"#{i} " + " ".join(TEXTS[(i + k) % len(TEXTS)] for k in range(1 + (i * 5) % 24)) for i in range(24)]


# ---- the child: the miner plus a stats reporter ---------------------------------------------------------------
def serve(stats_file: str, miner_args: list[str]) -> int:
    """Run the miner as ``neurons/miner.py`` does, writing a stats line every SAMPLE_EVERY_S seconds."""
    import psutil

    from minercore.miner.config import build_config
    from minercore.miner.neuron import Miner, setup_logging

    config = build_config(miner_args)
    setup_logging(config)
    miner = Miner(config)
    process = psutil.Process()

    async def report() -> None:
        with open(stats_file, "a", encoding="utf-8") as out:
            while True:
                if miner.info is not None:
                    sample = {"t": time.time(), "rss": process.memory_info().rss,
                              "tasks": len(asyncio.all_tasks()), "threads": threading.active_count(),
                              "engine": miner.engine.stats().as_dict()}
                    out.write(json.dumps(sample) + "\n")
                    out.flush()
                await asyncio.sleep(SAMPLE_EVERY_S)

    async def main() -> None:
        reporter = asyncio.create_task(report())
        try:
            await miner.run_until_signalled()
        finally:
            reporter.cancel()

    asyncio.run(main())
    return 0


# ---- the parent: callers, sampling, verdict ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _last_stats(path: Path) -> dict[str, Any] | None:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


async def _stats_after(path: Path, moment: float, within: float = 30.0) -> dict[str, Any]:
    """The child's first stats line written after ``moment`` (wall clock)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stats = _last_stats(path)
        if stats is not None and stats["t"] > moment:
            return stats
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the miner wrote no stats for {within:g}s")


async def _drive(target: Any, streams: int, duration: float, miner: Any, stats_file: Path) -> dict[str, Any]:
    """Warm up, then run the callers for ``duration`` seconds while sampling ``miner`` (a psutil.Process)."""
    import psutil

    from minercore.miner import client, sdk
    from minercore.text.tokenizer import load_tokenizer

    rotation = prompts()
    tokenizer = load_tokenizer("gpt2")
    tokens = {prompt: len(tokenizer.encode(prompt)) for prompt in rotation}
    longest = max(rotation, key=tokens.__getitem__)
    # bittensor 10: one long-lived dendrite per caller (StreamPrompting); 11: one hotkey per caller (btauth/1 OpenAI).
    callers = [client.make_dendrite(client.ephemeral_keypair()) if sdk.MAJOR == 10 else client.ephemeral_keypair()
               for _ in range(streams)]
    failures: list[str] = []
    results = {"requests": 0, "exact": 0, "tokens": 0}
    ttfts: list[float] = []
    try:
        async def check(caller: Any, prompt: str) -> None:
            if sdk.MAJOR == 10:
                result = await client.stream_prompt(target, [prompt], dendrite=caller, timeout=REQUEST_TIMEOUT_S)
            else:
                result = await client.stream_openai(target, [prompt], wallet=caller, timeout=REQUEST_TIMEOUT_S)
            results["requests"] += 1
            if not result.ok:
                failures.append(result.error or f"status {result.status_code}: {result.status_message}")
            elif result.text != prompt:
                failures.append(f"text differs: sent {len(prompt)} characters, got {len(result.text)}")
            else:
                results["exact"] += 1
                results["tokens"] += tokens[prompt]
                if result.ttft_s is not None:
                    ttfts.append(result.ttft_s)

        # Warm-up, not counted: the longest prompt on every caller at once, then each prompt of the rotation
        # once, so that every prefill shape the load will send has run (a bfloat16 CPU model's kernels cache
        # per-shape state on first use: growth that stops, not a leak).
        await asyncio.gather(*(check(caller, longest) for caller in callers))
        for group in range(0, len(rotation), streams):
            await asyncio.gather(*(check(callers[i % streams], prompt)
                                   for i, prompt in enumerate(rotation[group:group + streams])))
        if failures:
            raise RuntimeError(f"the warm-up failed: {failures[:3]}")
        results.update(requests=0, exact=0, tokens=0)
        ttfts.clear()
        await asyncio.sleep(2 * SAMPLE_EVERY_S)
        idle = await _stats_after(stats_file, time.time())

        rss: list[tuple[float, int]] = []
        callers_cpu, miner_cpu = psutil.Process().cpu_times(), miner.cpu_times()
        start = time.monotonic()
        stop_at = start + duration

        async def sample() -> None:
            while True:
                rss.append((time.monotonic() - start, miner.memory_info().rss))
                await asyncio.sleep(SAMPLE_EVERY_S)

        async def caller(index: int) -> None:
            turn = index
            while time.monotonic() < stop_at:
                await check(callers[index], rotation[turn % len(rotation)])
                turn += streams

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(caller(i) for i in range(streams)))
        wall = time.monotonic() - start
        sampler.cancel()
        callers_cpu_s = sum(psutil.Process().cpu_times()[:2]) - sum(callers_cpu[:2])
        miner_cpu_s = sum(miner.cpu_times()[:2]) - sum(miner_cpu[:2])
        await asyncio.sleep(2 * SAMPLE_EVERY_S)  # let in-flight cleanups finish before the last look
        end = await _stats_after(stats_file, time.time())
    finally:
        if sdk.MAJOR == 10:
            for dendrite in callers:
                await dendrite.aclose_session()

    window = min(WINDOW_S, duration / 4)
    first = [value for t, value in rss if t <= window]
    last = [value for t, value in rss if t >= duration - window]
    rss_first, rss_last = statistics.mean(first), statistics.mean(last)
    engine_idle, engine_end = idle["engine"], end["engine"]
    return {
        "streams": streams, "duration_s": duration, "wall_s": round(wall, 2),
        "requests": results["requests"], "failed": len(failures), "exact": results["exact"],
        "failures": failures[:10],
        "tokens": results["tokens"], "tokens_per_s": round(results["tokens"] / wall, 1),
        "requests_per_s": round(results["requests"] / wall, 2),
        "median_ttft_s": round(statistics.median(ttfts), 4) if ttfts else None,
        # CPU time over the load, in cores: where the 2 cores went (the callers are one Python process)
        "miner_cpu_cores": round(miner_cpu_s / wall, 2), "callers_cpu_cores": round(callers_cpu_s / wall, 2),
        "rss_window_s": window, "rss_first_mb": round(rss_first / 2**20, 1), "rss_last_mb": round(rss_last / 2**20, 1),
        "rss_growth_pct": round(100 * (rss_last - rss_first) / rss_first, 2),
        "engine_active_end": engine_end["active"], "engine_queued_end": engine_end["queued"],
        "engine_completed": engine_end["completed"] - engine_idle["completed"],
        "engine_failed": engine_end["failed"] - engine_idle["failed"],
        "engine_cancelled": engine_end["cancelled"] - engine_idle["cancelled"],
        "tasks_idle": idle["tasks"], "tasks_end": end["tasks"],
        "threads_idle": idle["threads"], "threads_end": end["threads"],
    }


def verdict(summary: dict[str, Any]) -> list[str]:
    """What failed the soak (empty on a pass)."""
    problems = []
    if summary["failed"]:
        problems.append(f"{summary['failed']} failed streams, e.g. {summary['failures'][:3]}")
    if summary["exact"] != summary["requests"] or not summary["requests"]:
        problems.append(f"{summary['exact']} of {summary['requests']} texts exact")
    if summary["engine_active_end"] or summary["engine_queued_end"]:
        problems.append(f"engine not idle at the end: {summary['engine_active_end']} active, "
                        f"{summary['engine_queued_end']} queued")
    if summary["tasks_end"] != summary["tasks_idle"]:
        problems.append(f"asyncio tasks: {summary['tasks_idle']} idle before, {summary['tasks_end']} at the end")
    if summary["rss_growth_pct"] >= 100 * MAX_RSS_GROWTH:
        problems.append(f"RSS grew {summary['rss_growth_pct']}% (limit {100 * MAX_RSS_GROWTH:g}%)")
    return problems


def run_soak(duration: float, streams: int, miner_args: list[str] | None = None) -> dict[str, Any]:
    """Start the miner in a child process, drive it, stop it; the summary (``problems`` empty on a pass)."""
    import psutil

    from minercore.miner import client

    with tempfile.TemporaryDirectory(prefix="minercore-soak-") as scratch:
        directory = Path(scratch)
        info_file, stats_file, log_file = directory / "axon.json", directory / "stats.jsonl", directory / "miner.log"
        args = ["--offline", "--axon.port", str(_free_port()), "--wallet.path", str(directory / "wallets"),
                "--axon.info_file", str(info_file), "--model.preset", "tiny", "--device", "cpu", *(miner_args or [])]
        with open(log_file, "wb") as log:
            child = subprocess.Popen([sys.executable, __file__, "--serve", str(stats_file), "--", *args], cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not info_file.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the miner did not start:\n{log_file.read_text(errors='replace')[-4000:]}")
                time.sleep(0.1)
            summary = asyncio.run(_drive(client.target_from_info_file(str(info_file)), streams, duration,
                                         psutil.Process(child.pid), stats_file))
        finally:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(60)
            if child.poll() is None:
                child.kill()
                child.wait()
        summary["miner_exit_code"] = child.returncode
        problems = verdict(summary)
        if child.returncode != 0:
            problems.append(f"the miner exited with {child.returncode}")
        summary["problems"] = problems
        if problems:  # what the miner said about it: the log goes with the scratch directory
            summary["miner_log"] = _notable_lines(log_file.read_text(errors="replace"))
        return summary


def _notable_lines(log: str, keep: int = 40) -> list[str]:
    """The miner log's warnings, errors and tracebacks (the last ``keep`` lines of them)."""
    notable, in_traceback = [], False
    for line in log.splitlines():
        in_traceback = line.startswith("Traceback") or (in_traceback and line[:1] in (" ", "\t"))
        if in_traceback or any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Error")):
            notable.append(line[:400])
    return notable[-keep:]


def markdown(summary: dict[str, Any]) -> str:
    rows = [("streams", summary["streams"]), ("duration (s)", summary["duration_s"]),
            ("requests completed", summary["requests"]), ("failed", summary["failed"]),
            ("exact", summary["exact"]), ("tokens echoed", summary["tokens"]),
            ("tokens/s", summary["tokens_per_s"]), ("requests/s", summary["requests_per_s"]),
            ("median TTFT (s)", summary["median_ttft_s"]),
            ("CPU cores used: miner / callers", f"{summary['miner_cpu_cores']} / {summary['callers_cpu_cores']}"),
            (f"RSS first {summary['rss_window_s']:g} s (MB)", summary["rss_first_mb"]),
            (f"RSS last {summary['rss_window_s']:g} s (MB)", summary["rss_last_mb"]),
            ("RSS growth (%)", summary["rss_growth_pct"]),
            ("engine active / queued at end", f"{summary['engine_active_end']} / {summary['engine_queued_end']}"),
            ("engine completed / failed / cancelled", f"{summary['engine_completed']} / {summary['engine_failed']} / "
                                                       f"{summary['engine_cancelled']}"),
            ("asyncio tasks idle / at end", f"{summary['tasks_idle']} / {summary['tasks_end']}"),
            ("threads idle / at end", f"{summary['threads_idle']} / {summary['threads_end']}"),
            ("verdict", "PASS" if not summary["problems"] else "FAIL: " + "; ".join(summary["problems"]))]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of load, after the warm-up.")
    parser.add_argument("--streams", type=int, default=64, help="Concurrent callers.")
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON instead of markdown.")
    parser.add_argument("miner_args", nargs="*", help="Extra miner options, after --.")
    options = parser.parse_args(argv)
    if options.duration <= 0 or options.streams < 1:
        parser.error("--duration must be > 0 and --streams >= 1")
    # bittensor 10's logger writes the callers' errors to standard output: while the soak runs, file descriptor 1
    # points at standard error, so that what is printed after it is the summary alone.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        summary = run_soak(options.duration, options.streams, options.miner_args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(summary, indent=2, ensure_ascii=False) if options.json else markdown(summary))
    return 0 if not summary["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
