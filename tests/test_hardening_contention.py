"""Deadlines on a busy machine: with every core spun by other processes, long-prompt callers with short timeouts
all get a clean 200 whose text is an exact prefix of their echo, ended before their timeout (the miner ends it
``--stream.deadline_margin`` before); and the engine's own deadline holds while a model step is far from done.

The miner runs as a subprocess (the tiny model, eager, to keep the start short), as on a miner box; the callers
run here, one connection pool per route as a validator keeps one.
"""

import asyncio
import gc
import os
import subprocess
import sys
import time

import pytest
from helpers import miner_process, mixed_prompt, new_keypair, tiny_engine
from runner_wrappers import SlowRunner

from minercore.contract.generation import FINISH_DEADLINE, GenerationRequest, SamplingParams
from minercore.miner import client

CALLERS = 64
PROMPT = mixed_prompt(2000)  # ~2,000 GPT-2 tokens: all 64 cannot be prefilled and echoed within the timeout
TIMEOUT_S = 10.0
HOG_LIMIT_S = 120  # each hog process ends itself after this, should the test process die without killing it


def spin_every_core(limit_s: float = HOG_LIMIT_S) -> list[subprocess.Popen]:
    """One busy process per core this process may use: the contention another tenant brings."""
    spin = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(len(os.sched_getaffinity(0)))]


@pytest.fixture
def cpu_hog():
    hogs = spin_every_core()
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.fixture
def callers_frozen():
    """The callers' own process holds torch and the test suite: a full collection of that heap takes 0.1-0.3 s
    here under the hog, and a caller stalled by its own collector would time out whatever the miner does. A
    validator's process is not this one, so its long-lived objects are frozen out of the collector while the
    callers run (the miner does the same for its own, in Engine.start)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def contended_miner(directory, *args: str):
    return miner_process(directory, "--model.max_context", "4096", "--model.compile", "off", *args)


@pytest.fixture(scope="module")
def miner(tmp_path_factory):
    with contended_miner(tmp_path_factory.mktemp("contention")) as running:
        yield running


# 64 bittensor-10 Dendrites in one starved process spend about 0.5 s signing and preparing every request before
# the first byte leaves (gather runs each forward's synchronous preparation in turn), and about as long again
# reading the 64 ends: caller time the miner cannot see, which is what its margin is for. That was on a Xeon; on a
# slower 2-core EPYC (Zen 3) the last callers' ends reached them 10.00-10.06 s after their start with 1.5 s.
DENDRITE_CALLERS_MARGIN_S = 2.5


@pytest.fixture
def miner_for_dendrites(tmp_path):
    with contended_miner(tmp_path, "--stream.deadline_margin", str(DENDRITE_CALLERS_MARGIN_S)) as running:
        yield running


def assert_all_ended_in_time(results: list) -> None:
    problems = [(i, r.status_code, r.error, round(r.duration_s, 3)) for i, r in enumerate(results)
                if not (r.ok and PROMPT.startswith(r.text) and r.duration_s < TIMEOUT_S)]
    assert not problems, problems


async def test_openai_callers_all_end_before_their_timeout_while_every_core_is_busy(miner, callers_frozen,
                                                                                    cpu_hog):
    assert all(hog.poll() is None for hog in cpu_hog)
    results = await client.stream_many(miner.target, [PROMPT] * CALLERS, wallet=new_keypair(), timeout=TIMEOUT_S,
                                       protocol="openai")
    assert all(hog.poll() is None for hog in cpu_hog)  # the contention lasted the whole run
    assert_all_ended_in_time(results)
    assert any(r.text != PROMPT for r in results)  # the deadline, not the echo's end, ended some answers


@pytest.mark.bt10
async def test_streamprompting_callers_all_end_before_their_timeout_while_every_core_is_busy(miner_for_dendrites,
                                                                                            callers_frozen, cpu_hog):
    results = await client.stream_many(miner_for_dendrites.target, [PROMPT] * CALLERS, wallet=new_keypair(),
                                       timeout=TIMEOUT_S, protocol="streamprompting")
    assert all(hog.poll() is None for hog in cpu_hog)
    assert_all_ended_in_time(results)
    assert any(r.text != PROMPT for r in results)


STEP_S = 2.0  # one decode step; the engine's model thread sees a deadline only between two


async def test_the_engines_deadline_holds_while_a_step_is_far_from_done():
    """generate's own timer ends the stream at its deadline with the text so far, without waiting for the model
    thread to reach a step boundary (here 2 s away), and the slot is freed at that boundary."""
    engine = tiny_engine(max_context=1024, runner_wrapper=lambda runner: SlowRunner(runner, STEP_S))
    await engine.start()
    try:
        timeout = 0.5
        started = time.monotonic()
        pieces = [piece async for piece in engine.generate(GenerationRequest(
            prompt="a prompt that takes several decode steps to echo", timeout=timeout,
            sampling=SamplingParams(max_new_tokens=64)))]
        ended = time.monotonic() - started
        assert pieces[-1].finish_reason == FINISH_DEADLINE
        text = "".join(piece.text for piece in pieces)
        assert "a prompt that takes several decode steps to echo".startswith(text)
        # On time: the first step after the prefill would only end 2 s after the start, well past the deadline.
        assert timeout <= ended < timeout + STEP_S / 4, ended
        deadline = time.monotonic() + 2 * STEP_S + 5
        while engine.stats().active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stats = engine.stats()
        assert (stats.active, stats.completed, stats.cancelled, stats.failed) == (0, 1, 0, 0)
    finally:
        await engine.shutdown(grace=0)
