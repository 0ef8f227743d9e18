"""Callers that leave mid-stream: the generation is cancelled and its slot freed within a decode step or two of
the disconnect (counted in engine steps, each slowed to 50 ms), while the other streams finish exactly.

The miner runs in-process over the real tiny engine, so the test reads the engine's own stats.
"""

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp
from helpers import SignedRequest, new_keypair, running_miner, sign, stream_prompt, target, tiny_engine
from runner_wrappers import SlowRunner

from minercore.contract.generation import EngineStats
from minercore.engine import Engine

STEP_S = 0.05
# A disconnect seen mid-step is handled when the next step starts: the step under way plus one.
MAX_STEPS_TO_FREE = 2
LONG = " ".join(f"token{i}" for i in range(300))  # ~600 tokens: 30 s to echo, far longer than any test waits
# ~70 tokens each: 3.5 s, so that they run across every disconnect here.
OTHERS = [f"other stream {i}: " + " ".join(["Crème brûlée, 東京, 😀 — fine."] * 4) for i in range(3)]


def paced_engine(max_batch: int = 8) -> Engine:
    return tiny_engine(max_batch=max_batch, max_context=1024, runner_wrapper=lambda runner: SlowRunner(runner, STEP_S))


async def until(engine: Engine, condition: Callable[[EngineStats], bool], within: float = 10.0) -> EngineStats:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stats = engine.stats()
        if condition(stats):
            return stats
        await asyncio.sleep(0.005)
    raise AssertionError(f"not reached in {within}s: {engine.stats()}")


def start_others(miner) -> list[asyncio.Task]:
    return [asyncio.create_task(stream_prompt(target(miner), [prompt], wallet=new_keypair(), timeout=120))
            for prompt in OTHERS]


async def assert_others_exact(others: list[asyncio.Task]) -> None:
    results = await asyncio.gather(*others)
    assert [(r.status_code, r.text) for r in results] == [(200, prompt) for prompt in OTHERS]


def json_headers(request: SignedRequest) -> dict[str, str]:
    return {**request.headers, "content-type": "application/json"}


async def open_stream(miner, session: aiohttp.ClientSession, prompt: str = LONG,
                      **post_options) -> aiohttp.ClientResponse:
    """A signed request (declared timeout 60 s, so the engine's deadline is far away) whose text has started."""
    request = await sign(miner, [prompt], ["user"], timeout=60.0)
    response = await session.post(request.url, headers=json_headers(request), data=json.dumps(request.body).encode(),
                                  **post_options)
    assert response.status == 200
    assert await response.content.readany()
    return response


async def test_a_client_that_closes_mid_stream_frees_its_slot_within_a_step(tmp_path):
    engine = paced_engine()
    async with running_miner(tmp_path, engine=engine) as miner:
        others = start_others(miner)
        async with aiohttp.ClientSession() as session:
            response = await open_stream(miner, session)
            await until(engine, lambda s: s.active == 1 + len(OTHERS))
            steps_at_close = engine.stats().steps
            response.close()  # drops the connection
        freed = await until(engine, lambda s: s.cancelled == 1)
        assert freed.steps - steps_at_close <= MAX_STEPS_TO_FREE, (steps_at_close, freed)
        assert freed.active == len(OTHERS)  # the slot is free; the others still run
        await assert_others_exact(others)
    end = engine.stats()
    assert (end.active, end.queued, end.cancelled, end.failed, end.completed) == (0, 0, 1, 0, len(OTHERS))


async def test_a_client_whose_read_timeout_fires_frees_its_slot_within_a_step(tmp_path):
    engine = paced_engine()
    async with running_miner(tmp_path, engine=engine) as miner:
        others = start_others(miner)
        async with aiohttp.ClientSession() as session:
            response = await open_stream(miner, session, timeout=aiohttp.ClientTimeout(total=1.0))
            try:
                while await response.content.readany():
                    pass
                raise AssertionError("a 30 s echo ended within the client's 1 s timeout")
            except TimeoutError:
                pass
            finally:
                response.close()
            steps_at_timeout = engine.stats().steps
        freed = await until(engine, lambda s: s.cancelled == 1)
        assert freed.steps - steps_at_timeout <= MAX_STEPS_TO_FREE, (steps_at_timeout, freed)
        await assert_others_exact(others)
    assert engine.stats().active == 0


async def test_a_short_timeout_gets_the_text_so_far_and_frees_its_slot_within_a_step(tmp_path):
    engine = paced_engine()
    async with running_miner(tmp_path, "--stream.deadline_margin", "0.3", engine=engine) as miner:
        others = start_others(miner)
        cut_short = await stream_prompt(target(miner), [LONG], wallet=new_keypair(), timeout=1.5)
        steps_at_end = engine.stats().steps
        # Ended by the miner 0.3 s before the caller's timeout: a clean answer whose text is a prefix.
        assert cut_short.ok and cut_short.text and LONG.startswith(cut_short.text) and cut_short.text != LONG
        freed = await until(engine, lambda s: s.active == len(OTHERS))
        assert freed.steps - steps_at_end <= MAX_STEPS_TO_FREE, (steps_at_end, freed)
        await assert_others_exact(others)
    end = engine.stats()
    assert (end.active, end.failed, end.cancelled + end.completed) == (0, 0, 1 + len(OTHERS))


async def test_a_caller_that_leaves_while_queued_leaks_nothing(tmp_path):
    """Waiting for a slot, a request has no stream to watch yet: it is cancelled as soon as it gets one."""
    engine = paced_engine(max_batch=1)
    async with running_miner(tmp_path, engine=engine) as miner:
        async with aiohttp.ClientSession() as session:
            running = await open_stream(miner, session)
            request = await sign(miner, ["queued, then gone"], ["user"])
            queued = asyncio.create_task(session.post(request.url, headers=json_headers(request),
                                                      data=json.dumps(request.body).encode()))
            await until(engine, lambda s: s.queued == 1)
            queued.cancel()  # the caller gives up while waiting
            await asyncio.gather(queued, return_exceptions=True)
            running.close()
        await until(engine, lambda s: s.active == 0 and s.queued == 0 and s.cancelled == 2)
        after = await stream_prompt(target(miner), ["next"], wallet=new_keypair())
        assert after.ok and after.text == "next"
