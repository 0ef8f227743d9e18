"""Group ``paged``: the paged KV cache with prefix caching against the static cache, side by side in one run, on
SmolLM2-135M-Instruct from its GGUF at the serving defaults (in-process, greedy).

- ``test_shared_system_prompt[static|paged]``: one ~1,400-token system prompt before 8 different questions, sent
  one after another, 16-token answers. extra_info: ``first_ttft_s``, ``later_ttft_median_s`` (the last 7),
  their ``ratio``, and for ``paged`` ``identical`` (every answer equal to the static cache's), ``same_answers``
  (how many are) and ``prefix_hit_blocks``.
- ``test_streams[static|paged]``: 16 concurrent chats of 64-token answers; ``tokens_per_s`` (tokens over the
  round's wall time, median over rounds), for ``paged`` ``over_static``, ``identical`` and ``same_answers``.
- ``test_staggered[static|paged]``: 16 concurrent chats whose answers end at different times (every other one
  stops at a quarter of the length, ``ignore_eos``), so the long half finishes in the odd slots alone.
  ``tokens_per_s`` as above, and for ``paged`` ``over_static`` and ``identical``. The paged runner packs the live
  rows as streams end, so that tail steps 8 rows; the static cache keeps each stream in its slot's row and steps
  16.
- ``test_many_chats[static|paged|small-pool]``: 256 short chat requests at once into 16 slots, 32-token answers;
  ``small-pool`` is the paged cache with a pool of ``SMALL_POOL_POSITIONS`` (about two thirds of what 16 whole
  answers need), where streams are preempted and resumed. ``answered`` (requests that finished), ``preemptions``,
  ``tokens_per_s``, and for the paged kinds ``same_answers`` as the static cache's.

Both engines report the KV memory they hold (``kv_bytes``): the static cache's is every slot at ``max_context``;
the paged pool is ``--engine.kv_cache_gb`` (here 0.5). Untimed (the test suite's single pass) the prompts are
shorter, the answers 8 tokens and the model eager: it proves they run.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import pytest

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine

# The static cache prefills the whole system prompt for every question (5.4 s each on two cores), and each engine
# compiles its decode steps first: more than pytest's default 600 s for the module's first test.
pytestmark = pytest.mark.timeout(1800)
KINDS = ("static", "paged")
POOL_GB = 0.5
SMALL_POOL_POSITIONS = 1024
MANY = 256
STREAMS = 16
ROUNDS = 3
SYSTEM_SENTENCE = ("You answer questions for the operators of a small hydroelectric plant on a mountain river; "
                   "you name the units you use, you say which measurement a question needs when you do not have "
                   "it, and you keep every answer short and plain. ")
QUESTIONS = ["How fast does a flood wave travel?", "What is a weir for?", "Why do rivers meander?",
             "How is turbine efficiency measured?", "What does a fish ladder need?", "When should a gate open?",
             "How much power does one cubic metre per second give?", "What is head loss?",
             "Why does sediment build up behind a dam?", "How often should a penstock be inspected?",
             "What is a tailrace?", "How do operators forecast inflow?", "What causes cavitation?",
             "How is a spillway sized?", "What is minimum environmental flow?", "Why do generators need cooling?"]
OPEN = ["Write a short story about a robot who learns to paint.", "Describe a busy market in a small town.",
        "Explain why the sky is blue to a child.", "Write a letter to a friend about a trip to the sea."]
MEASURED: dict[tuple, dict] = {}


class Engines:
    """One engine at a time (``static``, ``paged`` or ``small-pool``), started on demand: several alive in one
    process would each keep their model thread's OpenMP workers, more than the cores, which slows them all
    (RESULTS.md)."""

    def __init__(self, model: ModelOptions) -> None:
        self.model = model
        self.loop = asyncio.new_event_loop()
        self.kind: str | None = None
        self.engine: Engine | None = None
        self._bytes_a_position: float | None = None  # the paged pool's, which sizes the small pool

    def get(self, kind: str) -> Engine:
        if kind != self.kind:
            gb = POOL_GB
            if kind == "small-pool":
                if self._bytes_a_position is None:
                    self.get("paged")
                gb = SMALL_POOL_POSITIONS * self._bytes_a_position / 2**30
            self.close()
            engine = Engine(self.model, EngineOptions(max_batch=STREAMS, kv_cache="static" if kind == "static"
                                                      else "paged", kv_cache_gb=gb))
            self.loop.run_until_complete(engine.start())
            if kind == "paged":
                runner = engine._runner
                self._bytes_a_position = runner.kv_pool_bytes / ((runner.kv_paged.num_blocks - 1)
                                                                 * runner.kv_paged.block_size)
            self.engine, self.kind = engine, kind
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.loop.run_until_complete(self.engine.shutdown(grace=0))
            self.engine = self.kind = None


@pytest.fixture(scope="module")
def engines(request):
    from minercore.models.loading import embedded

    timed = request.config.getoption("benchmark_only")
    built = Engines(ModelOptions(path=embedded.resolve("smollm2-135m-instruct"), mode="generate",
                                 compile="auto" if timed else "off"))
    yield built
    built.close()
    built.loop.close()


def kv_bytes(engine: Engine) -> int:
    runner = engine._runner
    if getattr(runner, "kv_paged", None) is not None:
        return runner.kv_pool_bytes
    return runner.kv_cache_bytes_per_slot * runner.max_batch


async def answer(engine: Engine, messages: list[dict], tokens: int, ignore_eos: bool = False) -> tuple[str, float]:
    started = time.perf_counter()
    ttft, parts = None, []
    sampling = SamplingParams(max_new_tokens=tokens, ignore_eos=ignore_eos)
    async for piece in engine.generate(GenerationRequest(messages=messages, sampling=sampling)):
        if ttft is None and piece.text:
            ttft = time.perf_counter() - started
        parts.append(piece.text)
    return "".join(parts), ttft if ttft is not None else time.perf_counter() - started


@pytest.mark.parametrize("kind", KINDS)
def test_shared_system_prompt(benchmark, request, engines, kind):
    engine, loop = engines.get(kind), engines.loop
    timed = request.config.getoption("benchmark_only")
    system = SYSTEM_SENTENCE * (30 if timed else 6)  # 1,381 tokens timed
    tokens = 16 if timed else 8
    questions = QUESTIONS[:8] if timed else QUESTIONS[:3]
    results: list[tuple[str, float]] = []
    before = engine.stats()

    async def run() -> None:
        for question in questions:
            results.append(await answer(engine, [{"role": "system", "content": system},
                                                 {"role": "user", "content": question}], tokens))

    benchmark.group = "paged"
    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=1, iterations=1)
    ttfts = [ttft for _, ttft in results]
    later = statistics.median(ttfts[1:])
    texts = [text for text, _ in results]
    MEASURED["prefix", kind] = {"texts": texts}
    system_tokens = len(engine.tokenizer.encode(system))
    benchmark.extra_info.update(kind=kind, system_tokens=system_tokens, questions=len(questions),
                                first_ttft_s=ttfts[0], later_ttft_median_s=later, ratio=later / ttfts[0],
                                kv_bytes=kv_bytes(engine))
    if kind == "paged":
        stats = engine.stats()
        static_texts = MEASURED["prefix", "static"]["texts"]
        benchmark.extra_info.update(identical=texts == static_texts,
                                    same_answers=sum(a == b for a, b in zip(texts, static_texts, strict=True)),
                                    prefix_hit_blocks=stats.prefix_hit_blocks - before.prefix_hit_blocks)
    print(f"\nshared system prompt ({system_tokens} tokens), {kind}: first TTFT {ttfts[0]:.3f} s, later median "
          f"{later:.3f} s (x{later / ttfts[0]:.2f})", file=sys.stderr)


def concurrent_rounds(benchmark, engines: Engines, engine: Engine, chats: list[list[dict]], lengths: list[int],
                      timed: bool, ignore_eos: bool = False) -> tuple[float, list[str]]:
    """The chats at once, answers of ``lengths`` tokens, as the benchmark's rounds (after an untimed one when
    timed): the median tokens/s over the rounds and the last round's answers."""
    rates: list[float] = []
    texts: list[str] = []

    async def together() -> list[tuple[str, float]]:
        return await asyncio.gather(*(answer(engine, chat, n, ignore_eos)
                                      for chat, n in zip(chats, lengths, strict=True)))

    def run_round() -> None:
        before = engine.stats().tokens
        started = time.perf_counter()
        texts[:] = [text for text, _ in engines.loop.run_until_complete(together())]
        rates.append((engine.stats().tokens - before) / (time.perf_counter() - started))

    if timed:
        run_round()
        rates.clear()
    benchmark.group = "paged"
    benchmark.pedantic(run_round, rounds=ROUNDS if timed else 1, iterations=1)
    return statistics.median(rates), texts


@pytest.mark.parametrize("kind", KINDS)
def test_streams(benchmark, request, engines, kind):
    engine = engines.get(kind)
    timed = request.config.getoption("benchmark_only")
    tokens = 64 if timed else 8
    chats = [[{"role": "user", "content": OPEN[i % len(OPEN)] + f" (number {i})"}] for i in range(STREAMS)]
    rate, texts = concurrent_rounds(benchmark, engines, engine, chats, [tokens] * STREAMS, timed)
    MEASURED["streams", kind] = {"tokens_per_s": rate, "texts": list(texts)}
    benchmark.extra_info.update(kind=kind, streams=STREAMS, tokens_per_answer=tokens, tokens_per_s=rate,
                                kv_bytes=kv_bytes(engine))
    static = MEASURED.get(("streams", "static"))
    if kind == "paged" and static is not None:
        benchmark.extra_info.update(over_static=rate / static["tokens_per_s"], identical=texts == static["texts"],
                                    same_answers=sum(a == b for a, b in zip(texts, static["texts"], strict=True)))
        print(f"\n{STREAMS} streams paged: {rate:.0f} tok/s, x{rate / static['tokens_per_s']:.2f} of static, "
              f"identical {texts == static['texts']}", file=sys.stderr)


@pytest.mark.parametrize("kind", KINDS)
def test_staggered(benchmark, request, engines, kind):
    engine = engines.get(kind)
    timed = request.config.getoption("benchmark_only")
    long = 128 if timed else 8
    chats = [[{"role": "user", "content": OPEN[i % len(OPEN)] + f" (number {i})"}] for i in range(STREAMS)]
    lengths = [long if i % 2 else long // 4 for i in range(STREAMS)]
    rate, texts = concurrent_rounds(benchmark, engines, engine, chats, lengths, timed, ignore_eos=True)
    MEASURED["staggered", kind] = {"tokens_per_s": rate, "texts": list(texts)}
    benchmark.extra_info.update(kind=kind, streams=STREAMS, tokens_per_answer=lengths[:2], tokens_per_s=rate)
    static = MEASURED.get(("staggered", "static"))
    if kind == "paged" and static is not None:
        benchmark.extra_info.update(over_static=rate / static["tokens_per_s"], identical=texts == static["texts"])
        print(f"\n{STREAMS} staggered streams paged: {rate:.0f} tok/s, x{rate / static['tokens_per_s']:.2f} "
              f"of static, identical {texts == static['texts']}", file=sys.stderr)


@pytest.mark.parametrize("kind", [*KINDS, "small-pool"])
def test_many_chats(benchmark, request, engines, kind):
    engine, loop = engines.get(kind), engines.loop
    timed = request.config.getoption("benchmark_only")
    count, tokens = (MANY, 32) if timed else (24, 8)
    chats = [[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} Question {i}."}] for i in range(count)]
    results: list[str | None] = []

    async def one(chat: list[dict]) -> str | None:
        try:
            return (await answer(engine, chat, tokens))[0]
        except Exception as exc:  # noqa: BLE001 - counted as not answered, and said
            print(f"\nnot answered: {exc!r}", file=sys.stderr)
            return None

    async def run() -> None:
        results[:] = await asyncio.gather(*(one(chat) for chat in chats))

    before = engine.stats()
    started = time.perf_counter()
    benchmark.group = "paged"
    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=1, iterations=1)
    wall = time.perf_counter() - started
    stats = engine.stats()
    answered = sum(text is not None for text in results)
    MEASURED["many", kind] = {"texts": list(results)}
    benchmark.extra_info.update(kind=kind, requests=count, answered=answered, tokens_per_answer=tokens,
                                tokens_per_s=(stats.tokens - before.tokens) / wall,
                                preemptions=stats.kv_preemptions - before.kv_preemptions, kv_bytes=kv_bytes(engine))
    static = MEASURED.get(("many", "static"))
    if kind != "static" and static is not None:
        benchmark.extra_info["same_answers"] = sum(a == b for a, b in zip(results, static["texts"], strict=True))
    print(f"\n{count} chats, {kind}: {answered} answered, {benchmark.extra_info['tokens_per_s']:.0f} tok/s, "
          f"{benchmark.extra_info['preemptions']} preemptions, same answers as static: "
          f"{benchmark.extra_info.get('same_answers', '-')}", file=sys.stderr)
    assert answered == count
