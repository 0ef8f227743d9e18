"""Decode throughput of the simulated runner, eager vs compiled (group ``decode``).

    pytest benchmarks/bench_decode.py --benchmark-only -p no:cacheprovider

A round is ``STEPS`` decode steps for ``streams`` echo streams (128-token prompts, prefilled in the untimed
setup); ``extra_info["tokens"]`` is the tokens a round produces, so tokens/s = tokens / mean. Compilation
happens in ``runner.warmup()``, outside the timed part. The ``tiny`` group runs on CPU; with CUDA, the
``gpt2`` preset groups run too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minercore.config import ModelOptions
from minercore.model import PRESETS
from minercore.runners import Runner, build_runner
from minercore.sampling import SlotParams

PROMPT = 128
STEPS = 32


def _build(preset: str, device: str, impl: str, max_batch: int) -> Runner:
    # Echo mode: only the greedy step is compiled. The preset's full context, so bucketing keeps it cheap.
    options = ModelOptions(preset=preset, device=device, compile="on" if impl == "compiled" else "off",
                           max_context=PRESETS[preset].n_positions)
    runner = build_runner(options, max_batch=max_batch, eos_id=50256)
    runner.warmup()
    return runner


@pytest.fixture(scope="module")
def runners():
    """``runners(preset, device, impl, max_batch)``: built and warmed once per module, freed after it."""
    cache: dict[tuple, Runner] = {}

    def get(*key) -> Runner:
        if key not in cache:
            cache[key] = _build(*key)
        return cache[key]

    yield get
    cache.clear()


def _bench(benchmark, runner, impl: str, streams: int) -> None:
    slots = np.arange(streams, dtype=np.int64)
    rng = np.random.default_rng(0)

    def setup() -> None:
        for slot in range(streams):
            runner.release(slot)
            runner.prefill(slot, rng.integers(0, 50000, PROMPT).tolist(), SlotParams())

    def round_() -> None:
        for _ in range(STEPS):
            runner.decode(slots)

    benchmark.extra_info.update(impl=impl, tokens=STEPS * streams, streams=streams, device=str(runner.device),
                                description=runner.description)
    benchmark.pedantic(round_, setup=setup, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="decode")
@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_decode_tiny_cpu(benchmark, runners, impl: str, streams: int) -> None:
    _bench(benchmark, runners("tiny", "cpu", impl, 8), impl, streams)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the gpt2-preset decode groups need a CUDA device")
@pytest.mark.benchmark(group="decode-gpt2-cuda")
@pytest.mark.parametrize("streams", [1, 64, 256])
@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_decode_gpt2_cuda(benchmark, runners, impl: str, streams: int) -> None:
    _bench(benchmark, runners("gpt2", "cuda", impl, 256), impl, streams)
