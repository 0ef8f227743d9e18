"""Group ``startup``: how long a runner takes to be ready to serve, cold (an empty inductor cache) and warm (the
cache the cold start left), compiling whole decode steps (``--model.compile on``) against one transformer
block and the samplers (``--model.compile blocks``, what ``auto`` is on a CPU), and what a decode step then
costs each.

    pytest benchmarks/bench_startup.py --benchmark-only -s -p no:cacheprovider

SmolLM2-135M-Instruct from its GGUF at the serving defaults otherwise (its Q4_1 blocks as int4, every sampling
kind, the paged KV cache, verify steps of 8 drafts, max_batch 8, max_context 1024, the default thread count).
Each start is a fresh process with TORCHINDUCTOR_CACHE_DIR in the test's own directory, so nothing of the cold start
is in memory for the warm one. extra_info: ``cold_s`` and ``warm_s`` (the runner's ``warmup``), ``step_ms_b1`` and
``step_ms_b8`` (median of 5 rounds of 10 greedy steps, measured in the warm process). Untimed (the suite's single
pass): llama-tiny, greedy only, and no step timing: it proves the benchmark runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(3600)  # a cold whole-step compile of SmolLM2 takes over 10 minutes here

CHILD = r"""
import json, statistics, sys, time
import numpy as np
from minercore.contract.config import EngineOptions, ModelOptions
from minercore.models.loading import embedded
from minercore.runtime.build import build_runner
from minercore.runtime.sampling import SlotParams

compile, timed = sys.argv[1], sys.argv[2] == "1"
if timed:
    options = ModelOptions(path=embedded.resolve("smollm2-135m-instruct"), mode="generate", compile=compile,
                           max_context=1024)
else:
    options = ModelOptions(preset="llama-tiny", mode="echo", compile=compile, max_context=256)
engine = EngineOptions()  # the serving defaults: paged KV, verify steps for the speculative drafts
runner = build_runner(options, max_batch=8, eos_id=0, kv_block_size=engine.kv_block_size,
                      speculative_tokens=engine.speculative_tokens)
result = {"warmup_s": runner.warmup(), "description": runner.description}
if timed:
    prompt = list(range(100, 140))
    per_slot = (runner.kv_paged.num_blocks - 1) // 8
    for slot in range(8):  # each slot its own blocks, as the engine's manager would give them
        runner.assign_blocks(slot, range(1 + slot * per_slot, 1 + (slot + 1) * per_slot))
    for batch in (1, 8):
        slots = np.arange(batch)
        runner.prefill_batch(list(slots), [prompt] * batch, [SlotParams(echo=False)] * batch)
        for _ in range(3):
            runner.decode(slots)
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(10):
                runner.decode(slots)
            rounds.append((time.perf_counter() - started) / 10 * 1e3)
        result[f"step_ms_b{batch}"] = round(statistics.median(rounds), 1)
        for slot in slots:
            runner.release(int(slot))
print("RESULT " + json.dumps(result))
"""


def start(compile: str, cache: str, timed: bool) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    done = subprocess.run([sys.executable, "-c", CHILD, compile, "1" if timed else "0"], env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("compile", ["on", "blocks"])
def test_startup(benchmark, request, tmp_path, compile) -> None:
    timed = request.config.getoption("benchmark_only")
    benchmark.group = "startup"
    cache = str(tmp_path / "inductor")
    measured: dict = {}

    def cold_then_warm() -> None:
        measured["cold"] = start(compile, cache, timed)
        measured["warm"] = start(compile, cache, timed)

    benchmark.pedantic(cold_then_warm, rounds=1, iterations=1)
    cold, warm = measured["cold"], measured["warm"]
    benchmark.extra_info.update(compile=compile, cold_s=round(cold["warmup_s"], 1), warm_s=round(warm["warmup_s"], 1),
                                runner=warm["description"])
    benchmark.extra_info.update({k: v for k, v in warm.items() if k.startswith("step_ms")})
    print(f"\nstartup {compile}: {json.dumps(benchmark.extra_info)}")
    assert warm["warmup_s"] >= 0 and cold["warmup_s"] >= 0
