"""Decode throughput of the simulated runner, eager vs compiled (group ``decode``), and the compiled step's two
forms (group ``decode-steps``).

    pytest benchmarks/bench_decode.py --benchmark-only -p no:cacheprovider

A round is ``STEPS`` decode steps for ``streams`` echo streams (128-token prompts, prefilled in the untimed
setup); ``extra_info["tokens"]`` is the tokens a round produces, so tokens/s = tokens / mean. Compilation
happens in ``runner.warmup()``, outside the timed part. The ``tiny`` groups run on CPU; with CUDA, the
``gpt2`` preset groups run too.

``decode-steps`` compares, on the CPU, the step ``graphs=off`` compiles (``dynamic=True``, context buckets,
tokens advanced after the step) with the static-buffer step ``graphs=manual`` compiles (``dynamic=False``,
masked attention over the whole context, tokens advanced inside the step: the step CUDA graphs capture), both
at a 256-token context with batch buckets 1 and 8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minercore.contract.config import ModelOptions
from minercore.models.gpt2 import GPT2LM
from minercore.models.presets import GPT2_PRESETS as PRESETS
from minercore.runtime.build import build_runner
from minercore.runtime.native import ModelRunner
from minercore.runtime.protocol import Runner
from minercore.runtime.sampling import GREEDY, SlotParams

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


@pytest.fixture(scope="module")
def step_runners():
    """``step_runners(graphs)``: tiny preset, CPU, compiled, 256-token context, batch buckets 1 and 8."""
    cache: dict[str, Runner] = {}

    def get(graphs: str) -> Runner:
        if graphs not in cache:
            runner = ModelRunner(GPT2LM.random(PRESETS["tiny"]), max_batch=8, max_context=256, eos_id=50256,
                                 device=torch.device("cpu"), dtype=torch.float32, compile=True, kinds=(GREEDY,),
                                 graphs=graphs, attention="masked" if graphs == "manual" else "bucketed",
                                 batch_buckets=(1, 8))
            runner.warmup()
            cache[graphs] = runner
        return cache[graphs]

    yield get
    cache.clear()


@pytest.mark.benchmark(group="decode-steps")
@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("graphs", ["off", "manual"])
def test_decode_step_forms_tiny_cpu(benchmark, step_runners, graphs: str, streams: int) -> None:
    _bench(benchmark, step_runners(graphs), f"compiled-{graphs}", streams)
