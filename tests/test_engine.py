"""The engine on CPU with the tiny preset: exact echoes under concurrency, cancellation, deadlines, faults."""

import asyncio
import contextlib
import copy
import math
import threading

import pytest
from runner_wrappers import FaultyRunner, SlowRunner

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import (
    EngineClosed,
    EngineOverloaded,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)
from minercore.engine import Engine

MIXED = ["Hello, world!", "Ça va très bien, merci.", "世界你好，今天天气很好。", "👩‍👩‍👧‍👦 family 🇫🇷 flag 👍🏽",
         "مرحبا بالعالم", "naïve café résumé", "line one\nline two\r\n\ttabbed", "e\u0301 combining", "κόσμε",
         "<|endoftext|> is text here", "Zürich → Genève ✓"]


def prompt_for(i: int) -> str:
    return f"#{i}: " + " ".join(MIXED[(i + k) % len(MIXED)] for k in range(1 + i % 4))


async def collect(engine: Engine, request: GenerationRequest) -> tuple[str, str | None, object]:
    text, reason, stats = [], None, None
    async for piece in engine.generate(request):
        text.append(piece.text)
        reason, stats = piece.finish_reason, piece.stats
    return "".join(text), reason, stats


@contextlib.asynccontextmanager
async def running(runner_wrapper=None, **engine_options):
    """The tiny model's engine; ``runner_wrapper`` wraps the runner the engine would build (64 slots unless
    ``max_batch`` says, its KV cache as the options say)."""
    engine = Engine(ModelOptions(preset="tiny", compile="off", max_context=2048),
                    EngineOptions(**{"max_batch": 64, **engine_options}))
    if runner_wrapper is not None:
        from minercore.runtime.build import build_runner

        paged = engine.options.kv_cache == "paged"
        engine._runner = runner_wrapper(build_runner(engine.model_options, max_batch=engine.options.max_batch,
                                                     eos_id=50256,
                                                     kv_block_size=engine.options.kv_block_size if paged else 0))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown(grace=0)


async def test_64_concurrent_echoes_are_exact():
    async with running(max_batch=64) as engine:
        prompts = [prompt_for(i) for i in range(64)]
        results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in prompts))
        for prompt, (text, reason, stats) in zip(prompts, results, strict=True):
            assert text == prompt
            assert reason == "eos"
            assert stats.tokens == stats.prompt_tokens + 1  # the prompt, then EOS
            assert stats.ttft_s is not None and stats.ttft_s <= stats.duration_s
        final = engine.stats()
        assert (final.active, final.queued, final.completed) == (0, 0, 64)
        assert final.tokens == sum(s.tokens for _, _, s in results)


async def test_messages_echo_the_last_message():
    async with running() as engine:
        request = GenerationRequest(messages=[{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "Ünïcödé 🙂"}])
        assert (await collect(engine, request))[0] == "Ünïcödé 🙂"


async def test_cancelled_consumer_frees_its_slot_within_one_step():
    async with running(runner_wrapper=SlowRunner) as engine:
        other = asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(3))))
        async with contextlib.aclosing(engine.generate(GenerationRequest(prompt=prompt_for(5) * 20))) as stream:
            await anext(stream)
            steps_at_cancel = engine.stats().steps
        while engine.stats().active > 1 or engine.stats().cancelled == 0:
            await asyncio.sleep(0.001)
        assert engine.stats().steps <= steps_at_cancel + 1
        assert (await other)[0] == prompt_for(3)
        assert engine.stats().active == 0


async def test_consumer_task_cancelled_mid_stream():
    async with running(runner_wrapper=SlowRunner) as engine:
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(GenerationRequest(prompt=prompt_for(7) * 20)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(1000):
            if engine.stats().active == 0:
                break
            await asyncio.sleep(0.005)
        assert engine.stats().active == 0
        assert engine.stats().cancelled == 1


async def test_deadline_ends_only_its_own_request():
    async with running(runner_wrapper=SlowRunner) as engine:
        slow = collect(engine, GenerationRequest(prompt=prompt_for(1) * 30, timeout=0.3))
        normal = collect(engine, GenerationRequest(prompt=prompt_for(2)))
        (slow_text, slow_reason, _), (text, reason, _) = await asyncio.gather(slow, normal)
        assert slow_reason == "deadline"
        assert (prompt_for(1) * 30).startswith(slow_text) and len(slow_text) < len(prompt_for(1) * 30)
        assert (text, reason) == (prompt_for(2), "eos")


async def test_expired_while_queued():
    async with running(runner_wrapper=SlowRunner, max_batch=1) as engine:
        long = asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(0) * 10)))
        await asyncio.sleep(0.05)
        text, reason, _ = await collect(engine, GenerationRequest(prompt="never started", timeout=0.01))
        assert (text, reason) == ("", "deadline")
        assert not long.done()  # it expired while every slot was busy, not when one freed up
        assert engine.stats().queued == 0
        assert (await long)[1] == "eos"


async def test_ids_past_the_tokenizer_from_a_padded_vocabulary_decode_to_nothing():
    class PaddedVocabulary(SlowRunner):
        """A model whose vocabulary is padded past the tokenizer's and that samples a padding id once."""

        vocab_size = 50304

        def collect(self, step):
            ids = self._runner.collect(step)
            if not self.padded_once:
                self.padded_once = True
                ids[0] = 50300
            return ids

    def padded(runner):
        wrapper = PaddedVocabulary(runner, delay=0)
        wrapper.padded_once = False
        return wrapper

    async with running(runner_wrapper=padded) as engine:
        text, reason, stats = await collect(engine, GenerationRequest(prompt="padded vocabulary"))
        ids = engine.tokenizer.encode("padded vocabulary")
        # The second output token (the first decode step's) was the padding id: it decodes to nothing.
        assert text == engine.tokenizer.decode(ids[:1] + ids[2:])
        assert (reason, stats.tokens, engine.stats().failed) == ("eos", len(ids) + 1, 0)


async def test_chat_template_errors_are_invalid_requests():
    from minercore.text.tokenizer import load_tokenizer

    tokenizer = copy.copy(load_tokenizer())
    tokenizer.chat_template = "{{ raise_exception('conversation roles must alternate') }}"
    engine = Engine(ModelOptions(preset="tiny", compile="off", mode="generate", max_context=256), EngineOptions(),
                    tokenizer=tokenizer)
    await engine.start()
    try:
        with pytest.raises(InvalidRequest, match="chat template: conversation roles must alternate"):
            await collect(engine, GenerationRequest(messages=[{"role": "user", "content": "hi"}]))
    finally:
        await engine.shutdown(grace=0)


async def test_step_exception_fails_only_that_steps_requests():
    def faulty(runner):
        return FaultyRunner(runner, fail_decode_at={3})

    async with running(runner_wrapper=faulty, max_batch=2) as engine:
        in_step = [asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(i) * 3))) for i in (1, 2)]
        queued = asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(4))))
        for task in in_step:
            with pytest.raises(GenerationFailed, match="out of memory"):
                await task
        assert (await queued)[0] == prompt_for(4)
        assert (await collect(engine, GenerationRequest(prompt="after the fault ✓")))[0] == "after the fault ✓"
        stats = engine.stats()
        assert (stats.failed, stats.active) == (2, 0)


async def test_a_fault_read_back_with_a_steps_ids_fails_only_the_running_requests():
    """A device fault surfaces when a step's ids are collected (with overlap, after the next step was launched):
    the running requests fail, the step in flight is dropped, and the engine serves the next request exactly."""

    class FaultOnCollect(SlowRunner):
        collected = 0

        def collect(self, step):
            self.collected += 1
            if self.collected == 4:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
            return self._runner.collect(step)

    async with running(runner_wrapper=lambda runner: FaultOnCollect(runner, delay=0.002), max_batch=2) as engine:
        in_step = [asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(i) * 3))) for i in (1, 2)]
        for task in in_step:
            with pytest.raises(GenerationFailed, match="illegal memory access"):
                await task
        assert (await collect(engine, GenerationRequest(prompt="after the fault ✓")))[0] == "after the fault ✓"
        stats = engine.stats()
        assert (stats.failed, stats.active) == (2, 0)


async def test_prefill_exception_fails_only_that_request():
    def faulty(runner):  # fails the prefill of any one-token prompt
        return FaultyRunner(runner, fail_prefill_for={1})

    bad_prompt = "x"

    async with running(runner_wrapper=faulty) as engine:
        good = asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(9))))
        with pytest.raises(GenerationFailed, match="prefill exploded"):
            await collect(engine, GenerationRequest(prompt=bad_prompt))
        assert (await good)[0] == prompt_for(9)


async def test_queue_full_rejection_is_immediate():
    async with running(runner_wrapper=SlowRunner, max_batch=2, max_queue=2) as engine:
        streams = [engine.generate(GenerationRequest(prompt=prompt_for(i) * 20)) for i in range(4)]
        firsts = [asyncio.create_task(anext(s)) for s in streams]
        await asyncio.sleep(0.05)
        rejected = engine.generate(GenerationRequest(prompt="one too many"))
        with pytest.raises(EngineOverloaded, match="2 slots are busy and 2 requests are already waiting"):
            await anext(rejected)
        assert engine.stats().rejected == 1
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def test_waiting_requests_are_admitted_by_priority():
    async with running(runner_wrapper=SlowRunner, max_batch=1) as engine:
        order = []

        async def tracked(name, priority):
            await collect(engine, GenerationRequest(prompt=name, priority=priority))
            order.append(name)

        blocker = asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(0) * 5)))
        await asyncio.sleep(0.05)
        tasks = [asyncio.create_task(tracked(name, p)) for name, p in [("low", 1.0), ("high", 9.0), ("mid", 5.0),
                                                                        ("mid-later", 5.0)]]
        await asyncio.gather(blocker, *tasks)
        assert order == ["high", "mid", "mid-later", "low"]


@pytest.mark.parametrize("request_, message", [
    (GenerationRequest(prompt=""), "prompt is empty"),
    (GenerationRequest(messages=[]), "non-empty list"),
    (GenerationRequest(messages=[{"role": "user", "content": 3}]), "'content': str"),
    (GenerationRequest(prompt="a", prompt_ids=[1]), "exactly one"),
    (GenerationRequest(prompt_ids=[50257]), r"token ids in \[0, 50257\)"),
    (GenerationRequest(prompt="lone \ud800 surrogate"), "lone surrogate"),
    (GenerationRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=-1)), "positive integer"),
    (GenerationRequest(prompt="hi", sampling=SamplingParams(temperature=math.nan)), "finite number"),
    (GenerationRequest(prompt="hi", sampling=SamplingParams(top_p=0.0)), r"top_p must be in \(0, 1\]"),
    (GenerationRequest(prompt="hi", sampling=SamplingParams(stop=("",))), "non-empty strings"),
    (GenerationRequest(prompt="word " * 3000), "the model's context is 2048 tokens"),
    (GenerationRequest(prompt="y" * 2_000_001), "the limit is 2000000"),
])
async def test_invalid_requests_get_clear_errors(request_, message):
    async with running(max_prompt_chars=2_000_000) as engine:
        with pytest.raises(InvalidRequest, match=message):
            await collect(engine, request_)
        assert (await collect(engine, GenerationRequest(prompt="still serving")))[0] == "still serving"


async def test_stop_strings_and_length():
    async with running() as engine:
        text, reason, _ = await collect(engine, GenerationRequest(
            prompt="alpha beta STOP gamma", sampling=SamplingParams(stop=("STOP",))))
        assert (text, reason) == ("alpha beta ", "stop")
        text, reason, stats = await collect(engine, GenerationRequest(
            prompt="one two three four five", sampling=SamplingParams(max_new_tokens=3)))
        assert (text, reason, stats.tokens) == ("one two three", "length", 3)


async def test_shutdown_drains_then_cancels_and_refuses_new_work():
    engine = Engine(ModelOptions(preset="tiny", compile="off", max_context=2048), EngineOptions())
    await engine.start()
    short = asyncio.create_task(collect(engine, GenerationRequest(prompt="short one")))
    await asyncio.sleep(0)
    await engine.shutdown(grace=5.0)
    assert (await short)[:2] == ("short one", "eos")
    with pytest.raises(EngineClosed):
        await collect(engine, GenerationRequest(prompt="too late"))


async def test_shutdown_past_grace_cancels_running_streams():
    async with running(runner_wrapper=SlowRunner) as engine:
        long = asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(2) * 15)))
        await asyncio.sleep(0.1)
        await engine.shutdown(grace=0.05)
        text, reason, _ = await long
        assert reason == "cancelled"
        assert (prompt_for(2) * 15).startswith(text)


async def test_model_work_never_runs_on_the_event_loop():
    calls = []

    class RecordingRunner(SlowRunner):
        def prefill(self, slot, prompt_ids, params):
            calls.append(threading.get_ident())
            return self._runner.prefill(slot, prompt_ids, params)

        def launch(self, slots):
            calls.append(threading.get_ident())
            return self._runner.launch(slots)

        def collect(self, step):
            calls.append(threading.get_ident())
            return self._runner.collect(step)

    async with running(runner_wrapper=lambda r: RecordingRunner(r, delay=0), max_batch=64) as engine:
        await asyncio.gather(*(collect(engine, GenerationRequest(prompt=prompt_for(i))) for i in range(64)))
    assert len(calls) > 64
    assert threading.get_ident() not in calls
    assert set(calls) == {engine._thread.ident}


async def test_long_prompts_are_prefilled_in_chunks_while_streams_decode():
    """prefill_tokens 16: prompts of ~60-120 tokens take several steps each; every echo stays exact, a stream
    that is already decoding keeps getting tokens in between, and a request cancelled mid-prefill frees its slot."""
    async with running(runner_wrapper=SlowRunner, max_batch=4, prefill_tokens=16) as engine:
        short = asyncio.create_task(collect(engine, GenerationRequest(prompt=prompt_for(0) * 6)))
        await asyncio.sleep(0.3)
        long_prompts = [" ".join(MIXED) + f" #{i}" for i in range(3)]
        decoded_before = engine.stats().tokens
        results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in long_prompts))
        assert [text for text, _, _ in results] == long_prompts
        assert all(reason == "eos" for _, reason, _ in results)
        assert (await short)[0] == prompt_for(0) * 6
        assert engine.stats().tokens > decoded_before
        stream = engine.generate(GenerationRequest(prompt=" ".join(MIXED) * 2))
        task = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await task
        await stream.aclose()
        for _ in range(200):
            if engine.stats().active == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().active == 0
        assert (await collect(engine, GenerationRequest(prompt="after")))[0] == "after"


def test_prompts_prefilled_together_have_similar_lengths():
    from minercore.engine.scheduler import prefill_groups

    class Job:
        def __init__(self, n, cached=0):
            self.prompt_ids, self.cached = [0] * n, cached

    lengths = (10, 2000, 12, 9, 1900, 300, 11, 250, 1)
    jobs = [Job(n) for n in lengths]
    groups = [[len(j.prompt_ids) for j in g] for g in prefill_groups(jobs, max_tokens=8192)]
    assert sorted(n for g in groups for n in g) == sorted(lengths)
    for group in groups:  # padding to the group's longest costs at most 1.5x its own tokens
        assert len(group) * max(group) <= 1.5 * sum(group)
    assert [1900, 2000] in groups and [250, 300] in groups
    # A runner saturated by 600 tokens gets no batch larger than that; with 0, every prompt goes alone.
    assert [[len(j.prompt_ids) for j in g] for g in prefill_groups(jobs, max_tokens=600)][-3:] == [
        [250, 300], [1900], [2000]]
    assert all(len(g) == 1 for g in prefill_groups(jobs, max_tokens=0))
    # A prefix-cache hit computes only its prompt's rest: that is what it is grouped and padded by.
    hits = [Job(2010, cached=2000), Job(12), Job(1950, cached=1936), Job(300)]
    assert [[len(j.prompt_ids) - j.cached for j in g] for g in prefill_groups(hits, max_tokens=8192)] == [
        [10, 12, 14], [300]]


def test_wait_queue_orders_by_priority_then_arrival_and_takes_out_the_expired():
    from minercore.engine.scheduler import Job, WaitQueue

    def job(seq, priority=0.0, deadline=None, n=4):
        return Job(f"r{seq}", [0] * n, None, None, deadline, priority, seq, None)

    queue = WaitQueue()
    late, urgent, long_, gone = job(0), job(1, priority=5.0), job(2, priority=1.0, n=50), job(3, deadline=1.0)
    for j in (late, urgent, long_, gone):
        queue.push(j)
    assert queue.pop_next(now=0.0, room=100) == (urgent, [])
    # The next one's prompt is longer than the room left: nothing behind it goes first, and it keeps its place.
    assert queue.pop_next(now=0.0, room=10) == (None, [])
    assert queue.pop_next(now=0.0, room=100) == (long_, [])
    queue.push(long_)  # requeued: back in front of the later arrivals of its priority
    assert queue.pop_next(now=0.0, room=100) == (long_, [])
    assert queue.pop_expired(now=2.0) == [gone] and len(queue) == 1 and gone not in queue
    stale = job(4, priority=9.0, deadline=1.0)  # in front of the queue, and past its deadline
    queue.push(stale)
    assert queue.pop_next(now=2.0, room=100) == (late, [stale])
    assert queue.drain() == [] and not queue


class Recording(SlowRunner):
    """Logs every launch, collect and prefill (whole or a chunk) in order, so a test can see what was in flight
    when."""

    def __init__(self, runner):
        super().__init__(runner, delay=0.002)
        self.log = []

    def launch(self, slots):
        step = super().launch(slots)
        self.log.append(("launch", id(step), tuple(slots.tolist())))
        return step

    def collect(self, step):
        self.log.append(("collect", id(step)))
        return self._runner.collect(step)

    def prefill(self, slot, prompt_ids, params):
        self.log.append(("prefill", slot))
        return self._runner.prefill(slot, prompt_ids, params)

    def prefill_chunk(self, slot, *args, **kwargs):
        self.log.append(("prefill", slot))  # a prompt from its prefix-cache offset, or one of its chunks
        return self._runner.prefill_chunk(slot, *args, **kwargs)


def in_flight_at(log, index):
    """The steps launched and not yet collected at ``log[index]``: {step: slots}."""
    flying = {}
    for event in log[:index]:
        if event[0] == "launch":
            flying[event[1]] = event[2]
        elif event[0] == "collect":
            flying.pop(event[1], None)
    return flying


async def test_overlap_drops_the_extra_id_of_a_stream_that_ended():
    """A length-limited stream ends at step N while step N+1, launched before N was read, still holds its slot:
    that id never reaches the caller, the text and counts stay exact, and its neighbour is untouched."""
    recording = None

    def wrap(runner):
        nonlocal recording
        recording = Recording(runner)
        return recording

    async with running(runner_wrapper=wrap, max_batch=4) as engine:
        short = collect(engine, GenerationRequest(prompt="one two three four five six",
                                                  sampling=SamplingParams(max_new_tokens=3)))
        long = collect(engine, GenerationRequest(prompt=prompt_for(6)))
        (text, reason, stats), (long_text, long_reason, long_stats) = await asyncio.gather(short, long)
        assert (text, reason, stats.tokens) == ("one two three", "length", 3)
        assert (long_text, long_reason) == (prompt_for(6), "eos")
        assert engine.stats().tokens == 3 + long_stats.tokens
    short_slot = next(event[1] for event in recording.log if event[0] == "prefill")
    launches = [event for event in recording.log if event[0] == "launch" and short_slot in event[2]]
    # Two decode ids end the short stream (prefill gave the first); the third launch is the discarded one.
    assert len(launches) == 3
    assert any(len(in_flight_at(recording.log, i)) == 2 for i in range(len(recording.log)))


@pytest.mark.parametrize("overlap", [True, False])
async def test_a_slot_reused_while_its_last_step_is_in_flight_serves_only_its_new_stream(overlap):
    """One slot, queued requests: each next request is prefilled into the slot while (with overlap) the step
    holding the previous stream's extra id is still in flight. Every stream comes out exact."""
    recording = None

    def wrap(runner):
        nonlocal recording
        recording = Recording(runner)
        return recording

    async with running(runner_wrapper=wrap, max_batch=1, overlap=overlap) as engine:
        prompts = [prompt_for(i) for i in range(4)]
        results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in prompts))
        assert [(text, reason) for text, reason, _ in results] == [(p, "eos") for p in prompts]
        assert [stats.tokens for _, _, stats in results] == [stats.prompt_tokens + 1 for _, _, stats in results]
    prefills = [i for i, event in enumerate(recording.log) if event[0] == "prefill"]
    reused_in_flight = [i for i in prefills[1:] if 0 in sum(in_flight_at(recording.log, i).values(), ())]
    assert len(reused_in_flight) == (3 if overlap else 0)


async def test_prompts_that_fit_a_prefill_step_are_never_split():
    """prefill_tokens 16: prompts of 9-16 tokens go whole (one waits a step rather than be split into what is
    left of this one and the rest); only the prompt longer than a step is prefilled in chunks."""
    chunks = []

    class Recording(SlowRunner):
        def prefill_chunk(self, slot, prompt_ids, params, start, end):
            chunks.append((len(prompt_ids), start, end))
            return self._runner.prefill_chunk(slot, prompt_ids, params, start, end)

    from minercore.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    short = ["naïve café résumé, Zürich → Genève", "streams of text, ça coule 流れる", "Zürich → Genève ✓ and back"]
    long = " ".join(MIXED)
    assert all(8 < len(tokenizer.encode(p)) <= 16 for p in short) and len(tokenizer.encode(long)) > 16
    async with running(runner_wrapper=Recording, max_batch=4, prefill_tokens=16) as engine:
        results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in [*short, long]))
    assert [text for text, _, _ in results] == [*short, long]
    chunked = {n for n, _, _ in chunks}  # prompt lengths as the engine encodes them (specials stay text)
    assert len(chunked) == 1 and chunked.pop() > 16
