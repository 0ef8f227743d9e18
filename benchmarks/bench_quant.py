"""Decode step time with weight-only quantization on the CPU (group ``quant``): llama-tiny, compiled, echo streams,
dense float32 and bfloat16 weights against int8 and int4 (g32) weights with bfloat16 activations, side by side.

    pytest benchmarks/bench_quant.py --benchmark-only -p no:cacheprovider

A round is ``STEPS`` decode steps for ``streams`` echo streams (128-token prompts, prefilled in the untimed
setup); ``extra_info["tokens"]`` is the tokens a round produces, so tokens/s = tokens / mean and the step time is
mean / STEPS. Compilation happens in ``runner.warmup()``, outside the timed part. llama-tiny's step is mostly its
50257 x 128 head (tied, quantized as its own copy).
"""

from __future__ import annotations

import numpy as np
import pytest

from minercore.contract.config import ModelOptions
from minercore.runtime.build import build_runner
from minercore.runtime.protocol import Runner
from minercore.runtime.sampling import SlotParams

PROMPT = 128
STEPS = 32
VARIANTS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
            "int4": ("bfloat16", "int4")}


@pytest.fixture(scope="module")
def runners():
    """``runners(variant)``: built and warmed once per module, freed after it."""
    cache: dict[str, Runner] = {}

    def get(variant: str) -> Runner:
        if variant not in cache:
            dtype, quant = VARIANTS[variant]
            options = ModelOptions(preset="llama-tiny", device="cpu", dtype=dtype, quant=quant, compile="on",
                                   max_context=512)
            cache[variant] = build_runner(options, max_batch=8, eos_id=50256)
            cache[variant].warmup()
        return cache[variant]

    yield get
    cache.clear()


@pytest.mark.benchmark(group="quant")
@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_quant_cpu(benchmark, runners, variant: str, streams: int) -> None:
    runner = runners(variant)
    slots = np.arange(streams, dtype=np.int64)
    rng = np.random.default_rng(0)

    def setup() -> None:
        for slot in range(streams):
            runner.release(slot)
            runner.prefill(slot, rng.integers(0, 50000, PROMPT).tolist(), SlotParams())

    def round_() -> None:
        for _ in range(STEPS):
            runner.decode(slots)

    benchmark.extra_info.update(variant=variant, tokens=STEPS * streams, streams=streams,
                                description=runner.description)
    benchmark.pedantic(round_, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
