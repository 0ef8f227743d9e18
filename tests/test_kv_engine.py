"""The paged KV cache in the engine (``--engine.kv_cache paged``): the same text as the static cache, prompts whose
leading blocks were seen before prefilled only from there, admission by the blocks a request needs, and every
block back in the pool when requests end, however they end."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from helpers import GPT2_EOS, MIXED, collect, prefill_from_offsets
from runner_wrappers import SlowRunner

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, InvalidRequest, SamplingParams
from minercore.engine import Engine
from minercore.miner import config as miner_config
from minercore.models.presets import build_preset
from minercore.runtime.build import build_runner
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import SlotParams
from minercore.serve.metrics import Metrics

BLOCK = 16
K = 4  # speculative drafts: verify steps write several positions into the blocks at once


def engine(kv_cache: str, *, preset: str = "tiny", mode: str = "generate", max_batch: int = 4,
           pool_positions: int = 0, step_delay: float = 0.0, **options) -> Engine:
    """The preset's engine on CPU; ``pool_positions``: the paged pool's size in positions (0: the default);
    ``step_delay``: seconds each decode step sleeps first (requests arriving meanwhile are admitted together)."""
    model = ModelOptions(preset=preset, compile="off", device="cpu", dtype="float32", max_context=512, mode=mode)
    engine_options = EngineOptions(max_batch=max_batch, kv_cache=kv_cache, kv_block_size=BLOCK,
                                   speculative_tokens=K, **options)
    per_position = 0
    if pool_positions:
        probe = build_preset(preset, 0, torch.device("cpu"), torch.float32)
        per_position = probe.setup_caches(1, 1) // 2
    runner = build_runner(model, max_batch=max_batch, eos_id=GPT2_EOS,
                          speculative_tokens=K if engine_options.speculative == "ngram" else 0,
                          kv_block_size=BLOCK if kv_cache == "paged" else 0,
                          kv_cache_bytes=pool_positions * per_position)
    runner.verify_tokens = 64  # wide enough for every stream here to draft
    return Engine(model, engine_options, runner=SlowRunner(runner, step_delay) if step_delay else runner)


async def answers(kv_cache: str, requests: list[GenerationRequest], *, sequential: bool = False,
                  **kwargs) -> tuple[list[tuple[str, str | None]], object]:
    running = engine(kv_cache, **kwargs)
    await running.start()
    try:
        if sequential:
            results = [await collect(running, r) for r in requests]
        else:
            results = list(await asyncio.gather(*(collect(running, r) for r in requests)))
        return results, running.stats()
    finally:
        await running.shutdown(grace=0)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
async def test_paged_generates_what_the_static_cache_does(preset) -> None:
    """Greedy and sampled rows, prompts of 3 to 300 tokens (chunked over 64-token steps) sharing 4 slots, with
    speculative verify steps writing several positions at a time: the same text, and every block back."""
    requests = [GenerationRequest(prompt_ids=[(7 * i + j) % 50000 + 1 for j in range(length)],
                                  sampling=SamplingParams(max_new_tokens=40, temperature=0.0 if i % 2 else 0.8,
                                                          seed=i, ignore_eos=True))
                for i, length in enumerate((3, 17, 120, 300, 33, 64))]
    static, _ = await answers("static", requests, preset=preset, prefill_tokens=64)
    paged, stats = await answers("paged", requests, preset=preset, prefill_tokens=64)
    assert paged == static
    assert all(len(text) > 0 for text, _ in paged)
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free > 0


async def test_echo_is_exact_through_the_paged_cache() -> None:
    prompts = [" ".join([MIXED] * (i + 1)) for i in range(5)] + ["x"]
    results, stats = await answers("paged", [GenerationRequest(prompt=p) for p in prompts], mode="echo")
    assert [text for text, _ in results] == prompts
    assert stats.kv_blocks_used == 0


async def test_a_repeated_prefix_is_found_and_only_the_rest_is_prefilled() -> None:
    """A 100-token system text before each of four questions, sent one after another: from the second on, its six
    full blocks come from the cache (hits), and the answers equal the static cache's and prefix caching off's."""
    system = [(31 * j) % 50000 + 5 for j in range(100)]
    requests = [GenerationRequest(prompt_ids=system + [1000 + 7 * i + j for j in range(10 + i)],
                                  sampling=SamplingParams(max_new_tokens=24, ignore_eos=True)) for i in range(4)]
    static, _ = await answers("static", requests, preset="llama-tiny", sequential=True)
    cached, with_cache = await answers("paged", requests, preset="llama-tiny", sequential=True)
    uncached, without = await answers("paged", requests, preset="llama-tiny", sequential=True, prefix_cache=False)
    assert cached == static == uncached
    assert with_cache.prefix_hit_blocks == 3 * (100 // BLOCK)
    assert without.prefix_hit_blocks == 0 and without.kv_blocks_cached == 0
    assert with_cache.kv_blocks_cached > 0 and with_cache.kv_blocks_used == 0


async def test_requests_wait_for_blocks_and_one_larger_than_the_pool_is_refused() -> None:
    """A pool of 10 blocks (160 positions) and 4 slots: a 200-token prompt gets InvalidRequest at once; a longer
    answer than the pool holds is cut to it; three requests of 6 blocks each (50-token prompts, 40-token
    answers) start as their prompts fit, the pool never holds more than it has, the latest admitted is
    preempted when the others need its blocks, and each answers as it does alone."""
    pool = 10 * BLOCK
    running = engine("paged", pool_positions=pool)
    await running.start()
    try:
        with pytest.raises(InvalidRequest, match="KV cache holds at most"):
            await collect(running, GenerationRequest(prompt_ids=list(range(1, 201))))
        text, reason = await collect(running, GenerationRequest(
            prompt_ids=list(range(1, 101)), sampling=SamplingParams(max_new_tokens=500, ignore_eos=True)))
        assert reason == "length" and running.stats().tokens == pool - 100
        requests = [GenerationRequest(prompt_ids=[(11 * i + j) % 50000 + 1 for j in range(50)],
                                      sampling=SamplingParams(max_new_tokens=40, ignore_eos=True)) for i in range(3)]
        seen = []

        async def watch() -> None:
            while True:
                stats = running.stats()
                seen.append((stats.active, stats.kv_blocks_used))
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        together = await asyncio.gather(*(collect(running, r) for r in requests))
        watcher.cancel()
        assert max(active for active, _ in seen) >= 2 and max(used for _, used in seen) <= 10
        stats = running.stats()
        assert stats.kv_preemptions >= 1 and stats.kv_blocks_used == 0
    finally:
        await running.shutdown(grace=0)
    alone = [(await answers("static", [r]))[0][0] for r in requests]
    assert list(together) == alone


PREEMPTED = [  # prompts of 20 to 90 tokens, 60-token answers: each 5 to 10 blocks, 8 together in a 16-block pool
    GenerationRequest(prompt_ids=[(13 * i + 7 * j) % 50000 + 1 for j in range(20 + 10 * i)],
                      sampling=SamplingParams(max_new_tokens=60, ignore_eos=True, seed=i,
                                              temperature=(0.0, 0.9, 0.7)[i % 3], top_k=(0, 0, 40)[i % 3]))
    for i in range(8)]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
async def test_a_preempted_stream_continues_exactly_where_it_stopped(preset) -> None:
    """Eight greedy, sampled and top-k streams in a pool of 16 blocks, where their answers need 60: streams are
    preempted and resumed over and over, some mid-draft, and each text equals the static cache's."""
    static, _ = await answers("static", PREEMPTED, preset=preset)
    paged, stats = await answers("paged", PREEMPTED, preset=preset, pool_positions=16 * BLOCK)
    assert stats.kv_preemptions >= 3 and stats.kv_blocks_used == 0
    assert paged == static and all(reason == "length" for _, reason in paged)


async def test_echo_is_exact_when_streams_are_preempted() -> None:
    """Echo rows are steered by their prompt: a resumed echo stream goes on with the prompt's next token."""
    prompts = [" ".join([MIXED] * (i + 1)) for i in range(4)]
    results, stats = await answers("paged", [GenerationRequest(prompt=p) for p in prompts], mode="echo",
                                   pool_positions=24 * BLOCK)
    assert stats.kv_preemptions >= 1
    assert [text for text, _ in results] == prompts


async def test_preempted_streams_give_everything_back_when_cancelled() -> None:
    """Callers that leave while one of their streams waits preempted: every slot and block comes back, and the
    engine answers the next request as before."""
    running = engine("paged", pool_positions=16 * BLOCK)
    requests = [GenerationRequest(prompt_ids=[(17 * i + j) % 50000 + 1 for j in range(40)],
                                  sampling=SamplingParams(max_new_tokens=150, ignore_eos=True)) for i in range(4)]
    await running.start()
    try:
        streams = [running.generate(r) for r in requests]
        await asyncio.gather(*(anext(stream) for stream in streams))
        for _ in range(1000):
            if running._preempted:  # the model thread's list, only looked at
                break
            await asyncio.sleep(0.005)
        assert running._preempted
        for stream in streams:
            await stream.aclose()
        for _ in range(200):
            if running.stats().active == 0:
                break
            await asyncio.sleep(0.02)
        stats = running.stats()
        assert stats.active == 0 and stats.kv_blocks_used == 0 and stats.cancelled == len(requests)
        assert await collect(running, PREEMPTED[0]) == (await answers("static", PREEMPTED[:1]))[0][0]
    finally:
        await running.shutdown(grace=0)


async def test_cancelled_and_expired_requests_give_their_blocks_back() -> None:
    running = engine("paged", max_batch=2)
    await running.start()
    try:
        long = GenerationRequest(prompt_ids=list(range(1, 301)), sampling=SamplingParams(max_new_tokens=200,
                                                                                        ignore_eos=True))
        stream = running.generate(long)
        await anext(stream)
        await stream.aclose()  # the caller leaves mid-answer
        expired = GenerationRequest(prompt_ids=list(range(1, 301)), timeout=0.05,
                                    sampling=SamplingParams(max_new_tokens=200, ignore_eos=True))
        _, reason = await collect(running, expired)
        assert reason == "deadline"
        for _ in range(100):
            if running.stats().active == 0:
                break
            await asyncio.sleep(0.02)
        stats = running.stats()
        assert stats.active == 0 and stats.kv_blocks_used == 0
    finally:
        await running.shutdown(grace=0)


def test_a_cached_prefix_needs_the_paged_cache() -> None:
    model = build_preset("tiny", 0, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, max_batch=1, max_context=64, eos_id=GPT2_EOS, device=torch.device("cpu"),
                         dtype=torch.float32, compile=False)
    with pytest.raises(ValueError, match="needs the paged KV cache"):
        runner.prefill_chunk(0, list(range(1, 40)), SlotParams(echo=False), 16, 39, cached=16)


def test_the_kv_options_are_parsed_and_checked() -> None:
    _, defaults = miner_config.core_options(miner_config.build_config(["--offline"]))
    assert (defaults.kv_cache, defaults.kv_cache_gb, defaults.kv_memory_fraction, defaults.max_batch) == (
        "paged", 0.0, 0.9, 0)
    _, options = miner_config.core_options(miner_config.build_config([
        "--offline", "--engine.kv_cache", "static", "--engine.kv_block_size", "32", "--engine.kv_cache_gb", "0.5",
        "--engine.prefix_cache", "off", "--engine.kv_memory_fraction", "0.75"]))
    assert (options.kv_cache, options.kv_block_size, options.kv_cache_gb, options.prefix_cache,
            options.kv_memory_fraction) == ("static", 32, 0.5, False, 0.75)
    for bad in ({"kv_cache": "vram"}, {"kv_block_size": 0}, {"kv_cache_gb": -1.0}, {"kv_cache_gb": float("nan")},
                {"kv_memory_fraction": 0.0}, {"kv_memory_fraction": 1.5}, {"max_batch": -1}):
        with pytest.raises(ValueError):
            EngineOptions(**bad)


async def test_the_default_engine_on_a_cpu_pages_its_kv_over_64_slots() -> None:
    """No KV or batch options: 64 slots over a paged pool of their full contexts (the tiny model's need less than
    the CPU's 1 GiB), prefix caching on, answering as the static cache does."""
    model = ModelOptions(preset="tiny", compile="off", device="cpu", dtype="float32", max_context=256,
                         mode="generate")
    running = Engine(model)
    await running.start()
    try:
        runner = running._runner
        assert running.options.max_batch == runner.max_batch == 64
        assert 64 * 257 - BLOCK < runner.kv_pool_bytes // runner.kv_bytes_per_position <= 64 * 257
        request = GenerationRequest(prompt_ids=list(range(1, 40)), sampling=SamplingParams(max_new_tokens=12))
        text = await collect(running, request)
        assert running.stats().kv_blocks_used == 0 and running.stats().kv_blocks_cached >= 2
    finally:
        await running.shutdown(grace=0)
    assert text == (await answers("static", [request]))[0][0]


async def test_the_prefix_cache_reaches_the_metrics() -> None:
    running = engine("paged")
    await running.start()
    try:
        request = GenerationRequest(prompt_ids=list(range(1, 70)), sampling=SamplingParams(max_new_tokens=4))
        for _ in range(2):
            await collect(running, request)
        metrics = Metrics()
        metrics.sample(running)
        values = {field: gauge._value.get() for field, gauge in metrics.kv.items()}
        assert values["prefix_hit_blocks"] == 4 and values["prefix_miss_blocks"] == 4
        assert values["kv_blocks_used"] == 0 and values["kv_blocks_cached"] >= 4 and values["kv_blocks_free"] > 0
        assert running.stats().as_dict()["prefix_hit_blocks"] == 4  # what /health shows
    finally:
        await running.shutdown(grace=0)


SYSTEM = ("You are a careful assistant for a team of river engineers. Answer in plain words, name the units you "
          "use, and say when a question needs a measurement you do not have. ") * 4
QUESTIONS = ["How fast does a flood wave travel?", "What is a weir for?", "Why do rivers meander?"]


async def test_the_real_model_answers_the_same_through_pages_and_the_prefix_cache() -> None:
    """SmolLM2 in float32, greedy: three chats behind one system prompt, at once and then again one by one
    (their system blocks now cached, and each chat's last block, filled by its first answer, copied for its
    leading tokens): the static cache's text every time."""
    from minercore.models.loading import embedded

    path = embedded.resolve("smollm2-135m-instruct")
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    requests = [GenerationRequest(messages=chat, sampling=SamplingParams(max_new_tokens=24)) for chat in chats]
    results = {}
    for kv_cache in ("static", "paged"):
        running = Engine(ModelOptions(path=path, mode="generate", dtype="float32", quant="none", compile="off",
                                      max_context=512), EngineOptions(max_batch=4, kv_cache=kv_cache))
        await running.start()
        try:
            together = await asyncio.gather(*(collect(running, r) for r in requests))
            alone = [await collect(running, r) for r in requests]
            results[kv_cache] = (list(together), alone, running.stats())
        finally:
            await running.shutdown(grace=0)
    assert results["paged"][:2] == results["static"][:2]
    assert results["paged"][0] == results["paged"][1]
    assert results["paged"][2].prefix_hit_blocks >= 3 * 4  # each later chat found its system blocks
    assert results["paged"][2].prefix_partial_hits >= 3  # and, asked again, the start of its last block


def test_a_released_slot_writes_nothing_into_blocks_it_no_longer_owns() -> None:
    """Rows below the batch bucket compute in every step, free ones too: once a slot is released its table row
    must name no block, or its stale position lands in the blocks of whoever holds them next."""
    model = ModelOptions(preset="tiny", compile="off", device="cpu", dtype="float32", max_context=128)
    runner = build_runner(model, max_batch=4, eos_id=GPT2_EOS, kv_block_size=BLOCK, kv_cache_bytes=1 << 22)
    params = SlotParams(echo=False, min_new=100)
    for slot, blocks in ((0, [1, 2]), (1, [3, 4]), (2, [5, 6])):
        runner.assign_blocks(slot, blocks)
        runner.prefill(slot, [(7 * slot + j) % 500 + 1 for j in range(20)], params)
    for _ in range(3):
        runner.decode(np.array([0, 1, 2]))
    runner.release(1)  # its row would write position 23 next: block 4, offset 7
    runner.assign_blocks(3, [3, 4])
    runner.prefill(3, list(range(100, 130)), params)
    pools = [block.attn.cache for block in runner.model.blocks]
    before = [(cache.k[3:5].clone(), cache.v[3:5].clone()) for cache in pools]
    for _ in range(2):
        runner.decode(np.array([0, 2, 3]))  # batch bucket 4: the free row computes too
    for cache, (k, v) in zip(pools, before, strict=True):
        # slot 3's prompt, positions [0, 30): block 3 whole and block 4's first 14 positions, as prefilled
        assert torch.equal(cache.k[3], k[0]) and torch.equal(cache.k[4, :, :14], k[1, :, :14])
        assert torch.equal(cache.v[3], v[0]) and torch.equal(cache.v[4, :, :14], v[1, :, :14])


def test_live_rows_pack_as_streams_end_and_every_stream_goes_on_as_alone() -> None:
    """Streams ending below live ones free rows there: the highest live row moves down into each, so the
    streams left step in the smallest batch bucket that holds their number, not their highest slot, and a new
    stream takes the lowest free row. Every stream's ids (greedy, sampled and filtered, through plain and verify
    steps, across the moves) stay the ids it gets alone."""
    model = ModelOptions(preset="tiny", compile="off", device="cpu", dtype="float32", max_context=128)

    def build() -> ModelRunner:
        return build_runner(model, max_batch=8, eos_id=GPT2_EOS, kv_block_size=BLOCK, kv_cache_bytes=1 << 24,
                            speculative_tokens=3)

    runner, alone = build(), build()
    assert runner.kv_paged.num_blocks > 9 * 8
    prompts = [[(11 * s + j) % 500 + 1 for j in range(12 + s)] for s in range(9)]
    params = [SlotParams(echo=False, min_new=100, temperature=0.0 if s % 3 == 0 else 0.9, seed=s,
                         top_k=20 if s % 3 == 2 else 0) for s in range(9)]
    stream_of: dict[int, int] = {}  # slot -> stream
    ids: dict[int, list[int]] = {}

    def start(slot: int, stream: int) -> None:
        runner.assign_blocks(slot, range(1 + 8 * stream, 1 + 8 * (stream + 1)))  # each stream its own blocks
        stream_of[slot] = stream
        ids[stream] = [runner.prefill(slot, prompts[stream], params[stream])]

    buckets: list[int] = []
    run_step = runner._run_step
    runner._run_step = lambda b, ctx, kind: (buckets.append(b), run_step(b, ctx, kind))[1]

    def decode(steps: int) -> None:
        slots = np.array(sorted(stream_of))
        for _ in range(steps):
            for slot, token in zip(slots, runner.decode(slots), strict=True):
                ids[stream_of[int(slot)]].append(int(token))

    def end(*slots: int) -> None:
        for slot in slots:
            runner.release(slot)
            del stream_of[slot]

    for slot in range(8):
        start(slot, slot)
    decode(3)
    end(0, 3, 5, 6)
    buckets.clear()
    decode(3)
    assert buckets == [4, 4, 4]  # slots 1, 2, 4 and 7: 4 rows, not the 8 that slot 7 would need
    slots = np.array(sorted(stream_of))
    drafts = np.array([[(7 * s + j) % 500 + 1 for j in range(3)] for s in slots])
    ids[stream_of[int(slots[0])]].append(int(runner.decode(slots[:1])[0]))  # one stream a step ahead
    chosen, emitted = runner.verify(slots, drafts, np.array([3, 0, 2, 1]))
    for slot, row, n in zip(slots, chosen, emitted, strict=True):
        ids[stream_of[int(slot)]].extend(int(t) for t in row[:n])
    start(0, 8)  # the lowest free slot; its row is the lowest free one, 4
    buckets.clear()
    decode(2)
    assert buckets == [8, 8]  # 5 streams
    end(2, 7)
    buckets.clear()
    decode(3)
    assert buckets == [4, 4, 4]
    for stream, got in ids.items():
        alone.assign_blocks(0, range(1, 9))
        want = [alone.prefill(0, prompts[stream], params[stream])]
        while len(want) < len(got):
            want.append(int(alone.decode(np.array([0]))[0]))
        alone.release(0)
        assert got == want, stream


PROMPTS = [[(13 * i + 7 * j) % 500 + 1 for j in range(n)] for i, n in enumerate((40, 23, 61, 9))]
OFFSETS = [16, 0, 48, 3]  # what each slot's blocks hold already (any count: the runner computes from there)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_prompts_prefilled_together_from_their_own_cached_offsets_go_on_as_each_alone(preset) -> None:
    """Four prompts whose slots hold different leading positions (a prefix-cache hit each, one none) computed from
    there in one padded forward: each row's keys and values, first id and next ids (greedy and sampled) as it gets
    alone from its offset."""
    model = ModelOptions(preset=preset, compile="off", device="cpu", dtype="float32", max_context=128)
    params = [SlotParams(echo=False, min_new=100, temperature=0.0 if s % 2 else 0.9, seed=s) for s in range(4)]

    def run(together: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
        runner = build_runner(model, max_batch=4, eos_id=GPT2_EOS, kv_block_size=BLOCK, kv_cache_bytes=1 << 22)
        firsts = prefill_from_offsets(runner, PROMPTS, params, OFFSETS, blocks_per_slot=5, together=together)
        caches = [(block.attn if hasattr(block, "attn") else block.self_attn).cache for block in runner.model.blocks]
        written = [torch.cat([cache.k[1 + 5 * s:6 + 5 * s].transpose(0, 1).flatten(1, 2)[:, :len(p)]
                              for cache in caches]) for s, p in enumerate(PROMPTS)]
        ids = [[first] for first in firsts]
        for _ in range(12):
            for row, token in zip(ids, runner.decode(np.arange(4)), strict=True):
                row.append(int(token))
        return ids, written

    together, alone = run(True), run(False)
    assert together[0] == alone[0]
    for got, want in zip(together[1], alone[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_batch_from_cached_offsets_is_refused_what_it_cannot_do() -> None:
    model = ModelOptions(preset="tiny", compile="off", device="cpu", dtype="float32", max_context=128)
    paged = build_runner(model, max_batch=2, eos_id=GPT2_EOS, kv_block_size=BLOCK, kv_cache_bytes=1 << 22)
    static = build_runner(model, max_batch=2, eos_id=GPT2_EOS)
    prompts, params = [list(range(1, 20)), list(range(1, 9))], [SlotParams(echo=False)] * 2
    for cached, message in (([0], "an offset in"), ([19, 0], "an offset in"), ([-1, 0], "an offset in")):
        with pytest.raises(ValueError, match=message):
            paged.prefill_batch([0, 1], prompts, params, cached=cached)
    with pytest.raises(ValueError, match="needs the paged KV cache"):
        static.prefill_batch([0, 1], prompts, params, cached=[16, 0])


async def test_prompts_behind_a_cached_prefix_are_prefilled_together_from_their_offsets() -> None:
    """A system text's blocks cached by a first request; then three requests behind it at once: one forward
    computes only their rests, each from the cached offset, and the answers are the static cache's."""
    system = [(31 * j) % 50000 + 5 for j in range(100)]
    first = GenerationRequest(prompt_ids=system + [999], sampling=SamplingParams(max_new_tokens=40, ignore_eos=True))
    requests = [GenerationRequest(prompt_ids=system + [1000 + 7 * i + j for j in range(5 + 3 * i)],
                                  sampling=SamplingParams(max_new_tokens=16, ignore_eos=True)) for i in range(3)]
    static, _ = await answers("static", requests, preset="llama-tiny", sequential=True)
    running = engine("paged", preset="llama-tiny", step_delay=0.02)
    batches = []
    prefill_batch = running._runner.prefill_batch

    def recorded(slots, prompts, params, **kwargs):
        batches.append(kwargs.get("cached"))
        return prefill_batch(slots, prompts, params, **kwargs)

    running._runner.prefill_batch = recorded
    await running.start()
    try:
        streaming = asyncio.create_task(collect(running, first))
        while running.stats().active == 0:  # its prompt is in: its blocks are cached
            await asyncio.sleep(0.005)
        together = list(await asyncio.gather(*(collect(running, r) for r in requests)))
        await streaming
    finally:
        await running.shutdown(grace=0)
    assert together == static
    assert [96, 96, 96] in batches


def count_prefilled(running: Engine) -> list[int]:
    """Patch the engine's runner to log how many positions each prefill call computes."""
    computed: list[int] = []
    runner = running._runner
    prefill, prefill_chunk, prefill_batch = runner.prefill, runner.prefill_chunk, runner.prefill_batch

    def whole(slot, prompt_ids, params):
        computed.append(len(prompt_ids))
        return prefill(slot, prompt_ids, params)

    def chunk(slot, prompt_ids, params, start, end, **kwargs):
        computed.append(end - start)
        return prefill_chunk(slot, prompt_ids, params, start, end, **kwargs)

    def batch(slots, prompts, params, cached=None):
        computed.append(sum(len(p) for p in prompts) - sum(cached or ()))
        return prefill_batch(slots, prompts, params, cached=cached)

    runner.prefill, runner.prefill_chunk, runner.prefill_batch = whole, chunk, batch
    return computed


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
async def test_a_prompt_asked_again_computes_one_token_from_a_copy_of_its_last_block(preset) -> None:
    """A 37-token prompt answered with 24 tokens leaves its third block (5 prompt tokens, then its answer)
    cached. Asked again, it computes only its last token, from a copy of that block; a prompt sharing its first
    30 tokens computes from position 30 (a copy of the second block). The answers are the static cache's and
    prefix caching off's, and every block goes back."""
    prompt = [(13 * j) % 50000 + 3 for j in range(37)]
    requests = [GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=24, ignore_eos=True))
                for ids in (prompt, prompt, prompt[:30] + [7] * 10)]
    static, _ = await answers("static", requests, preset=preset, sequential=True)
    uncached, _ = await answers("paged", requests, preset=preset, sequential=True, prefix_cache=False)
    running = engine("paged", preset=preset)
    computed = count_prefilled(running)
    await running.start()
    try:
        cached = [await collect(running, r) for r in requests]
        stats = running.stats()
    finally:
        await running.shutdown(grace=0)
    assert cached == static == uncached
    assert computed == [37, 1, 10]
    assert (stats.prefix_hit_blocks, stats.prefix_partial_hits) == (2 + 1, 2)
    assert stats.kv_blocks_used == 0
