"""Group ``prefill``: 8 simultaneous 2,000-token prompts arriving while a stream is decoding (llama-tiny, CPU).

``impl``:

- ``sequential``: each prompt prefilled alone and all of them before the next decode step (minercore before
  batched and chunked prefill; the runner's ``prefill_batch`` and ``prefill_chunk`` are hidden from the engine);
- ``batched``: the 8 prompts in one padded forward (``prefill_batch_tokens`` raised past 16,000), still all
  before the next decode step;
- ``chunked``: the defaults: at most ``prefill_tokens`` (2,048) prompt tokens per engine step, batches of at most
  the runner's ``prefill_batch_tokens`` (256 on a CPU: these prompts go one at a time); ``chunked-512``: 512.

extra_info: ``median_ttft_s`` and ``max_ttft_s`` over the 8 prompts (submission to first text), and the
inter-token gaps of the stream that was already running when the burst arrived (``running_max_gap_s``, the
stall the burst causes it) and of all streams after their first token (``p50_gap_s``, ``max_gap_s``). Text is
flushed per token (``flush_tokens`` 1) so that gaps are token gaps. Every echo is asserted exact.

    pytest benchmarks/bench_prefill.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine
from minercore.runtime.build import build_runner

PROMPTS, PROMPT_TOKENS, RUNNING_TOKENS = 8, 2000, 1000
NEW_TOKENS = 16  # per burst prompt after its first: the gaps while the other prompts are still prefilling


class WholePromptsOnly:
    """The runner with only ``prefill``: the engine prefills one prompt at a time, whole."""

    def __init__(self, runner) -> None:
        self._runner = runner

    def __getattr__(self, name: str):
        if name in ("prefill_batch", "prefill_chunk"):
            raise AttributeError(name)
        return getattr(self._runner, name)


def ids(seed: int, n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 50000, n).tolist()


async def timed_stream(engine: Engine, prompt_ids: list[int], max_new_tokens: int) -> list[float]:
    """Arrival time of every piece, the submission time first."""
    times = [time.perf_counter()]
    request = GenerationRequest(prompt_ids=prompt_ids, sampling=SamplingParams(max_new_tokens=max_new_tokens))
    async for piece in engine.generate(request):
        if piece.text:
            times.append(time.perf_counter())
    return times


async def burst(engine: Engine) -> dict[str, float]:
    # Echo: a stream's output is its prompt, so the running stream's prompt is as long as its output.
    running = asyncio.create_task(timed_stream(engine, ids(99, RUNNING_TOKENS), RUNNING_TOKENS))
    await asyncio.sleep(0.5)  # the running stream is decoding
    arrived = time.perf_counter()
    streams = await asyncio.gather(*(timed_stream(engine, ids(i, PROMPT_TOKENS), NEW_TOKENS + 1)
                                     for i in range(PROMPTS)))
    background = await running
    ttfts = [s[1] - s[0] for s in streams]
    gaps = [b - a for s in streams for a, b in zip(s[1:], s[2:], strict=False)]
    during = [b - a for a, b in zip(background[1:], background[2:], strict=False) if b >= arrived]
    return {"median_ttft_s": statistics.median(ttfts), "max_ttft_s": max(ttfts),
            "p50_gap_s": statistics.median(gaps), "max_gap_s": max(gaps),
            "running_max_gap_s": max(during) if during else 0.0}


@pytest.mark.parametrize("impl", ["sequential", "batched", "chunked", "chunked-512"])
def test_prefill_burst(benchmark, impl: str) -> None:
    options = ModelOptions(preset="llama-tiny", device="cpu", dtype="float32", compile="off", max_context=2048)
    budget = {"chunked": 2048, "chunked-512": 512}.get(impl, 1 << 30)
    engine_options = EngineOptions(max_batch=16, flush_tokens=1, prefill_tokens=budget)
    runner = build_runner(options, max_batch=engine_options.max_batch, eos_id=50256)
    if impl == "batched":
        runner.prefill_batch_tokens = PROMPTS * PROMPT_TOKENS
    engine = Engine(options, engine_options, runner=WholePromptsOnly(runner) if impl == "sequential" else runner)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    try:
        measured = loop.run_until_complete(burst(engine))  # warm-up round
        measured = benchmark.pedantic(lambda: loop.run_until_complete(burst(engine)), rounds=2, iterations=1)
    finally:
        loop.run_until_complete(engine.shutdown(grace=0))
        loop.close()
    benchmark.group = "prefill"
    benchmark.extra_info.update(impl=impl, prompts=PROMPTS, prompt_tokens=PROMPT_TOKENS,
                                **{k: round(v, 4) for k, v in measured.items()})
    print(f"\n{impl:>10}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in measured.items()))
