"""Group ``overlap``: does the engine keep the device busy? The real engine (model thread, stream loop,
mailboxes, event-loop delivery, one consumer per stream reading every piece) drives a stand-in runner whose
decode step takes ``D`` µs of "device" time on a background thread, collected later, as a GPU would run it.

    pytest benchmarks/bench_overlap.py --benchmark-only -p no:cacheprovider

The stand-in device is a timeline: a launched step starts when the device is free (or at its launch, if
later) and ends ``D`` µs after; a thread sleeps until then (releasing the GIL, as a kernel does) and sets the
step's event, which ``collect`` waits on. So the device runs back to back exactly when the host launches step
N+1 before step N ends, and idles through any host work done in between otherwise. Prefill waits for the
device to drain (as a real prefill's host sync does) and returns the first id at once.

A round: ``streams`` requests of ``TOKENS`` tokens each (length-limited; the ids cycle through real GPT-2
text, so the stream loop detokenizes words), submitted together. ``overlap`` on is the engine's default;
off (step N collected before step N+1 is launched) is measured beside it as the reference.
Target at D = 250 µs: steps/s >= 0.9 x 1e6 / D, with overlap, at 1, 64 and 256 streams.
extra_info: ``impl="engine"``, ``overlap``, ``streams``, ``steps`` (decode steps a round), ``device_step_us``,
``tokens`` (tokens a round delivers), ``steps_per_s`` and ``device_busy`` (device time / wall time), medians
over rounds.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import threading
import time

import numpy as np
import pytest
import torch

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine
from minercore.runtime.protocol import Launched
from minercore.text.tokenizer import load_tokenizer

DEVICE_STEP_US = 250
TOKENS = 256
ROUNDS = 5
TEXT = ("Validators score what miners stream back and how fast it arrives: every token, in order, on time. "
        "Crème brûlée in Zürich, 東京の天気, and an emoji or two 🚀🎉 keep the detokenizer honest. ") * 6


class StandInDevice:
    """A runner whose steps run on a simulated device: ``device_step_us`` each, back to back when queued."""

    compiled = False
    kv_cache_bytes_per_slot = weights_bytes = kv_bytes = 0

    def __init__(self, max_batch: int, vocab_size: int, eos_id: int, ids: list[int], device_step_us: float) -> None:
        self.max_batch, self.max_context, self.vocab_size, self.eos_id = max_batch, 1 << 20, vocab_size, eos_id
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.description = f"stand-in device, {device_step_us:.0f} us per step"
        self._ids = np.asarray(ids, dtype=np.int64)
        self._step_s = device_step_us / 1e6
        self._next = np.zeros(max_batch, dtype=np.int64)  # each slot's position in the id cycle
        self._free_at = 0.0  # when the device finishes the last step queued
        self._queue: collections.deque[tuple[float, threading.Event]] = collections.deque()
        self._work = threading.Condition()
        self.busy_s = 0.0  # device time spent on steps
        threading.Thread(target=self._device, name="stand-in-device", daemon=True).start()

    def _device(self) -> None:
        while True:
            with self._work:
                while not self._queue:
                    self._work.wait()
                done_at, done = self._queue.popleft()
            delay = done_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            done.set()

    def warmup(self) -> float:
        return 0.0

    def prefill(self, slot: int, prompt_ids, params) -> int:
        # A real prefill reads its first id back: the device drains first.
        delay = self._free_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        self._next[slot] = slot
        return self._take(np.array([slot]))[0]

    def _take(self, slots: np.ndarray) -> np.ndarray:
        ids = self._ids[self._next[slots] % len(self._ids)]
        self._next[slots] += 1
        return ids

    def launch(self, slots: np.ndarray) -> Launched:
        now = time.perf_counter()
        self._free_at = max(now, self._free_at) + self._step_s
        self.busy_s += self._step_s
        done = threading.Event()
        with self._work:
            self._queue.append((self._free_at, done))
            self._work.notify()
        return Launched(slots, self._take(slots), done)

    def collect(self, step: Launched) -> np.ndarray:
        step.ready.wait()
        return step.host_ids

    def decode(self, slots: np.ndarray) -> np.ndarray:
        return self.collect(self.launch(slots))

    def release(self, slot: int) -> None:
        pass


@pytest.fixture(scope="module")
def text_ids() -> list[int]:
    ids = load_tokenizer("gpt2").encode(TEXT)
    assert len(ids) >= TOKENS
    return ids


async def _round(engine: Engine, streams: int, expected: list[str]) -> None:
    sampling = SamplingParams(max_new_tokens=TOKENS)

    async def consume(prompt: list[int], text: str) -> None:
        got = []
        async for piece in engine.generate(GenerationRequest(prompt_ids=prompt, sampling=sampling)):
            got.append(piece.text)
        assert "".join(got) == text

    await asyncio.gather(*(consume([slot + 1], expected[slot]) for slot in range(streams)))


@pytest.mark.benchmark(group="overlap")
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap-on", "overlap-off"])
@pytest.mark.parametrize("streams", [1, 64, 256])
def test_engine_keeps_the_device_busy(benchmark, text_ids, streams: int, overlap: bool) -> None:
    tokenizer = load_tokenizer("gpt2")
    runner = StandInDevice(streams, len(tokenizer), tokenizer.eos_token_id, text_ids, DEVICE_STEP_US)
    # Slots are taken lowest first and each starts its cycle at its own slot number.
    expected = [tokenizer.decode([text_ids[(slot + k) % len(text_ids)] for k in range(TOKENS)])
                for slot in range(streams)]
    engine = Engine(ModelOptions(), EngineOptions(max_batch=streams, max_new_tokens=TOKENS, overlap=overlap),
                    runner=runner, tokenizer=tokenizer)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    rates, busy = [], []

    def one_round() -> None:
        steps, busy_before = engine.stats().steps, runner.busy_s
        started = time.perf_counter()
        loop.run_until_complete(_round(engine, streams, expected))
        wall = time.perf_counter() - started
        rates.append((engine.stats().steps - steps) / wall)
        busy.append((runner.busy_s - busy_before) / wall)

    try:
        one_round()  # warm-up: the stream loop's first calls, the event loop's first tasks
        rates.clear()
        busy.clear()
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        loop.run_until_complete(engine.shutdown(grace=0))
        loop.close()
    benchmark.extra_info.update(impl="engine", overlap=overlap, streams=streams, steps=TOKENS - 1,
                                device_step_us=DEVICE_STEP_US, tokens=streams * TOKENS,
                                steps_per_s=statistics.median(rates), device_busy=statistics.median(busy),
                                target_steps_per_s=0.9e6 / DEVICE_STEP_US)
