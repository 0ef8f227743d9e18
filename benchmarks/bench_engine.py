"""Group ``engine``: aggregate tokens/s of concurrent echo streams, batched versus one request at a time.

``impl`` is ``batched`` (all streams submitted at once: continuous batching) or ``sequential`` (the same
requests through the same engine, each awaited before the next). tokens/s = extra_info["tokens"] / mean.
"""

import asyncio

import pytest

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest
from minercore.engine import Engine

PROMPT_WORDS = ("Streams of text", "ça coule", "流れる文字", "🚰💬", "and more words to echo back")


def prompts(streams: int) -> list[str]:
    return [f"{i}: " + " ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(12)) for i in range(streams)]


async def echo(engine: Engine, prompt: str) -> int:
    text, tokens = [], 0
    async for piece in engine.generate(GenerationRequest(prompt=prompt)):
        text.append(piece.text)
        if piece.stats is not None:
            tokens = piece.stats.tokens
    assert "".join(text) == prompt
    return tokens


@pytest.fixture(scope="module")
def engine_loop():
    loop = asyncio.new_event_loop()
    engine = Engine(ModelOptions(preset="tiny", max_context=1024), EngineOptions(max_batch=64))
    loop.run_until_complete(engine.start())
    yield engine, loop
    loop.run_until_complete(engine.shutdown(grace=0))
    loop.close()


@pytest.mark.parametrize("impl", ["batched", "sequential"])
@pytest.mark.parametrize("streams", [1, 8, 64])
def test_engine_throughput(benchmark, engine_loop, impl, streams):
    engine, loop = engine_loop
    work = prompts(streams)

    async def batched() -> int:
        return sum(await asyncio.gather(*(echo(engine, p) for p in work)))

    async def sequential() -> int:
        return sum([await echo(engine, p) for p in work])

    run = batched if impl == "batched" else sequential
    tokens = loop.run_until_complete(run())  # warm-up round, also counts the tokens a round produces
    benchmark.group = "engine"
    benchmark.extra_info.update(impl=impl, streams=streams, tokens=tokens)
    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=3, iterations=1)
