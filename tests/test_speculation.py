"""Prompt-lookup speculative decoding: the drafts (engine/speculation.py), the runner's verify step and the engine
around it. Every output is exactly what plain decoding gives; only the number of forwards changes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from helpers import GPT2_EOS, MIXED, collect

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine
from minercore.engine.speculation import Drafter, StepCosts, verify_width
from minercore.models.presets import build_preset
from minercore.runtime.build import build_runner
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import ContextOverflow, SlotParams
from minercore.serve.metrics import Metrics

CPU = torch.device("cpu")
K = 4


# ---- drafts ------------------------------------------------------------------------------------------------------
def drafter(**kwargs) -> Drafter:
    return Drafter(4, 64, K, echo=False, eos_id=0, **kwargs)


def test_the_draft_follows_the_latest_longest_match() -> None:
    d = drafter()
    # ... 7 8 9 | 1 2 ... 5 6 | 1 2 3 -> the suffix "1 2 3" last occurred at the start; "2 3" alone later.
    d.start(0, [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2], max_new_tokens=32)
    d.extend(np.array([0]), np.array([3]))
    drafts, lengths = d.propose(np.array([0]))
    assert lengths.tolist() == [K] and drafts[0].tolist() == [4, 5, 9, 2]
    d.start(1, [5, 6, 7, 5, 6], max_new_tokens=32)  # "5 6" occurred once before: its continuation, to the end
    drafts, lengths = d.propose(np.array([1]))
    assert lengths.tolist() == [3] and drafts[0, :3].tolist() == [7, 5, 6]


def test_no_match_means_no_draft_and_a_pause_that_grows() -> None:
    d = drafter()
    d.start(2, [1, 2, 3, 4], max_new_tokens=32)
    slots = np.array([2])
    assert d.propose(slots)[1].tolist() == [0]
    assert not d.wants(slots)  # waits 2 steps
    d.skip(slots)
    assert not d.wants(slots)
    d.skip(slots)
    assert d.wants(slots)
    assert d.propose(slots)[1].tolist() == [0]  # the second miss in a row waits 4
    for _ in range(3):
        d.skip(slots)
        assert not d.wants(slots)
    d.skip(slots)
    assert d.wants(slots)


def test_a_rejected_draft_backs_off_and_an_accepted_one_resets() -> None:
    d = drafter()
    d.start(0, [1, 2, 1, 2, 1, 2], max_new_tokens=32)
    slots = np.array([0])
    drafts, lengths = d.propose(slots)
    assert lengths[0] > 0
    d.record(slots, lengths, np.array([1]))  # nothing accepted
    assert not d.wants(slots) and (d.drafted, d.accepted, d.verify_steps) == (int(lengths[0]), 0, 1)
    d.skip(slots)
    d.skip(slots)
    drafts, lengths = d.propose(slots)
    d.record(slots, lengths, np.array([3]))
    assert d.wants(slots) and d.accepted == 2


def test_drafts_stop_at_the_answers_length_and_the_context() -> None:
    d = drafter()
    d.start(0, [1, 2, 1, 2, 1, 2, 1], max_new_tokens=3)
    d.extend(np.array([0]), np.array([2]))  # 1 of 3 outputs: the verify may emit 2 more, so 1 draft
    assert d.propose(np.array([0]))[1].tolist() == [1]
    d.start(1, [1, 2] * 31, max_new_tokens=10)
    d.extend(np.array([1]), np.array([1]))
    assert d.propose(np.array([1]))[1].tolist() == [1]  # 63 of 64 positions: room for one
    d.extend(np.array([1]), np.array([2]))
    assert d.propose(np.array([1]))[1].tolist() == [0]


def test_an_echo_drafts_its_prompt_then_eos() -> None:
    d = Drafter(2, 64, K, echo=True, eos_id=99)
    d.start(0, [5, 6, 7, 8, 9, 10], max_new_tokens=32)
    d.extend(np.array([0]), np.array([5]))
    drafts, lengths = d.propose(np.array([0]))
    assert drafts[0].tolist() == [6, 7, 8, 9] and lengths[0] == K
    for output in (6, 7, 8, 9):
        d.extend(np.array([0]), np.array([output]))
    drafts, lengths = d.propose(np.array([0]))
    assert drafts[0, :2].tolist() == [10, 99] and lengths[0] == 2


def test_expected_ids_count_the_drafting_slots_by_their_acceptance() -> None:
    d = drafter()
    for slot in (0, 1):
        d.start(slot, [1, 2, 1, 2, 1, 2], max_new_tokens=32)
    slots = np.array([0, 1])
    assert d.expected_ids(slots, 4) == 2 + 2 * 4 * 0.5  # a new stream: half its draft, until it verifies
    drafts, lengths = d.propose(slots)
    d.record(slots, lengths, lengths + 1)  # both accept every draft
    assert d.expected_ids(slots, 4) == pytest.approx(2 + 2 * 4 * (0.5 + 0.3 * 0.5))
    drafts, lengths = d.propose(slots)
    d.record(slots, lengths, np.array([lengths[0] + 1, 1]))  # slot 1 accepts nothing and backs off
    assert not d.wants(np.array([1]))
    assert d.expected_ids(slots, 4) == pytest.approx(2 + 4 * (0.65 + 0.3 * 0.35))


def test_a_verify_step_is_taken_when_its_measured_cost_pays() -> None:
    costs = StepCosts(recheck_after=3)
    assert costs.pays(4, 4.0)  # never timed at 4 rows: tried once
    costs.record_verify(4, 0.030)
    assert not costs.pays(4, 12.0)  # the plain step's cost is not known yet: decode plainly first
    costs.record_plain(4, 0.010)
    # 4 ids in 10 ms against a verify step's 30 ms: it pays with more than 12 ids, not with fewer.
    assert costs.pays(4, 13.0)
    assert [costs.pays(4, 11.0) for _ in range(4)] == [False, False, False, True]  # then checked again
    assert costs.declined_steps == 3
    costs.record_verify(4, 0.010)  # running means: a cheaper verify step moves it a fifth of the way
    assert costs.pays(4, 11.0) and not costs.pays(4, 4.0)


def test_a_verify_step_is_weighed_by_the_share_of_its_predicted_ids_that_verify_steps_realised() -> None:
    costs = StepCosts()
    costs.record_plain(8, 0.010)
    costs.record_verify(8, 0.030, expected_ids=32.0, emitted_ids=32)  # as predicted: 32 ids in 30 ms pay
    assert costs.pays(8, 32.0)
    for _ in range(20):  # steps of 8 rows keep emitting half the ids their rows' acceptance predicted
        costs.record_verify(8, 0.030, expected_ids=32.0, emitted_ids=16)
    assert not costs.pays(8, 32.0)  # about 16 ids in 30 ms against 8 in 10 ms
    assert costs.pays(8, 56.0)
    assert costs.pays(4, 4.0)  # another row count keeps its own record (never timed: tried once)


# ---- the runner's verify step ----------------------------------------------------------------------------------
def runner(preset: str, k: int = K) -> ModelRunner:
    model = build_preset(preset, 0, CPU, torch.float32)
    return ModelRunner(model, max_batch=4, max_context=128, eos_id=0, device=CPU, dtype=torch.float32,
                       compile=False, speculative_tokens=k)


PARAMS = {"greedy": SlotParams(echo=False), "echo": SlotParams(echo=True),
          "sampled": SlotParams(echo=False, temperature=0.9, seed=7),
          "filtered": SlotParams(echo=False, temperature=0.8, top_k=20, top_p=0.9, seed=3),
          "min_new": SlotParams(echo=False, temperature=1.0, seed=11, min_new=40)}
PROMPTS = ([3, 17, 99, 4, 3, 17], [250, 251, 252], [7] * 9)
SLOTS = np.array([0, 1, 3])


def plain(preset: str, params: SlotParams, n: int) -> dict[int, list[int]]:
    r = runner(preset)
    out = {int(s): [r.prefill(int(s), p, params)] for s, p in zip(SLOTS, PROMPTS, strict=True)}
    for _ in range(n - 1):
        for s, i in zip(SLOTS, r.decode(SLOTS), strict=True):
            out[int(s)].append(int(i))
    return out


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("kind", list(PARAMS))
def test_verified_ids_are_plain_decodings_whatever_the_drafts(preset, kind) -> None:
    """Right drafts (plain decoding's own next ids), wrong ones and none, in one batch: every emitted id is the
    plain one at its position, and right drafts are all accepted."""
    params = PARAMS[kind]
    expected = plain(preset, params, 48)
    r = runner(preset)
    got = {int(s): [r.prefill(int(s), p, params)] for s, p in zip(SLOTS, PROMPTS, strict=True)}
    rng = np.random.default_rng(0)
    while min(len(v) for v in got.values()) < 40:
        so_far = len(got[0])
        right = so_far + K < len(expected[0])
        drafts, lengths = np.zeros((3, K), dtype=np.int64), np.array([K if right else 0, 2, 0])
        if right:
            drafts[0] = expected[0][so_far:so_far + K]
        drafts[1, :2] = rng.integers(0, 256, 2)  # almost surely wrong
        chosen, emitted = r.verify(SLOTS, drafts, lengths)
        assert emitted[0] == (K + 1 if right else 1) and emitted[2] == 1
        for row, s in enumerate(SLOTS.tolist()):
            got[s].extend(int(i) for i in chosen[row, :emitted[row]])
    for s in got:
        assert got[s][:40] == expected[s][:40]


def test_verify_refuses_what_it_cannot_do() -> None:
    r = runner("tiny")
    r.prefill(0, [1, 2, 3], SlotParams(echo=False))
    with pytest.raises(ValueError, match="prefilled"):
        r.verify(np.array([1]), np.zeros((1, K), dtype=np.int64), np.array([1]))
    with pytest.raises(ValueError, match="lengths"):
        r.verify(np.array([0]), np.zeros((1, K), dtype=np.int64), np.array([K + 1]))
    with pytest.raises(ValueError, match="draft ids"):
        r.verify(np.array([0]), np.full((1, K), 10**6, dtype=np.int64), np.array([1]))
    r.prefill(1, list(range(1, 126)), SlotParams(echo=False))
    with pytest.raises(ContextOverflow, match="max_context"):
        r.verify(np.array([1]), np.ones((1, K), dtype=np.int64), np.array([3]))
    plain_runner = ModelRunner(build_preset("tiny", 0, CPU, torch.float32), max_batch=1, max_context=32, eos_id=0,
                               device=CPU, dtype=torch.float32, compile=False)
    with pytest.raises(ValueError, match="without speculative_tokens"):
        plain_runner.verify(np.array([0]), np.zeros((1, 1), dtype=np.int64), np.array([0]))


def test_eager_verify_steps_through_compiled_blocks_match_plain_decoding() -> None:
    """compile_blocks on the paged cache: a verify step's forward is compiled (its own graphs, the blocks one
    nested region, compiled by warmup), its glue eager, and it keeps plain decoding's ids."""
    from torch._dynamo.utils import counters

    model = build_preset("llama-tiny", 0, CPU, torch.float32)
    compiled = ModelRunner(model, max_batch=2, max_context=128, eos_id=0, device=CPU, dtype=torch.float32,
                           compile=True, speculative_tokens=K, kinds=(0,), compile_blocks=True, kv_block_size=16)
    compiled.assign_blocks(0, list(range(1, 9)))
    compiled.warmup()
    graphs = counters["stats"]["unique_graphs"]
    expected = plain("llama-tiny", PARAMS["greedy"], 24)[0]
    got = [compiled.prefill(0, PROMPTS[0], PARAMS["greedy"])]
    while len(got) < 24:
        right = expected[len(got):len(got) + K] if len(got) % 2 else []  # verify steps and plain ones in turn
        drafts = np.array([right + [0] * (K - len(right))])
        chosen, emitted = compiled.verify(np.array([0]), drafts, np.array([len(right)]))
        assert emitted[0] == len(right) + 1
        got.extend(int(i) for i in chosen[0, :emitted[0]])
        got.extend(compiled.decode(np.array([0])).tolist())
    assert got[:24] == expected[:24]
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(("preset", "kv_block_size"), [("tiny", 0), ("llama-tiny", 0), ("llama-tiny", 16)])
def test_compiled_blocks_verify_every_width_and_batch_without_a_compile_after_warmup(preset, kv_block_size) -> None:
    """The engine narrows the drafts as the batch grows: every width from 1 to k, at batch 1 and above, runs on
    what warmup compiled (a compile at serving time stalls every stream). With the paged cache, max_batch equals
    the warm-up width: sizes dynamo would otherwise tie together."""
    from torch._dynamo.utils import counters

    runner = ModelRunner(build_preset(preset, 0, CPU, torch.float32), max_batch=K, max_context=128, eos_id=0,
                         device=CPU, dtype=torch.float32, compile=True, speculative_tokens=K, kinds=(0,),
                         compile_blocks=True, kv_block_size=kv_block_size)
    runner.warmup()
    graphs = counters["stats"]["unique_graphs"]
    for rows in (1, 3):
        slots = np.arange(rows)
        for slot in slots if kv_block_size else ():  # each its own blocks, as the engine's manager gives them
            runner.assign_blocks(int(slot), range(1 + slot * 8, 1 + (slot + 1) * 8))
        runner.prefill_batch(list(slots), [PROMPTS[0]] * rows, [PARAMS["greedy"]] * rows)
        for width in range(1, K + 1):
            no_drafts = np.zeros(rows, dtype=np.int64)
            chosen, emitted = runner.verify(slots, np.zeros((rows, width), dtype=np.int64), no_drafts)
            assert chosen.shape == (rows, width + 1) and (emitted == 1).all()
        for slot in slots:
            runner.release(int(slot))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_verify_steps_match_eager() -> None:
    model = build_preset("llama-tiny", 0, CPU, torch.float32)
    compiled = ModelRunner(model, max_batch=2, max_context=128, eos_id=0, device=CPU, dtype=torch.float32,
                           compile=True, speculative_tokens=K, kinds=(0,), compile_verify=True)
    compiled.warmup()
    expected = plain("llama-tiny", PARAMS["greedy"], 20)[0]
    got = [compiled.prefill(0, PROMPTS[0], PARAMS["greedy"])]
    while len(got) < 20:
        right = expected[len(got):len(got) + K]
        drafts = np.array([right + [0] * (K - len(right))])
        chosen, emitted = compiled.verify(np.array([0]), drafts, np.array([len(right)]))
        assert emitted[0] == len(right) + 1
        got.extend(int(i) for i in chosen[0, :emitted[0]])
    assert got[:20] == expected


# ---- the engine --------------------------------------------------------------------------------------------------
async def started(speculative: str, mode: str = "echo", verify_tokens: int = 64, **options) -> Engine:
    """The tiny model's engine; ``verify_tokens`` wide enough for every stream of these tests to draft."""
    model = ModelOptions(preset="tiny", compile="off", device="cpu", max_context=2048, mode=mode)
    engine_options = EngineOptions(**{"max_batch": 64, **options}, speculative=speculative, speculative_tokens=K)
    paged = engine_options.kv_cache == "paged"
    runner = build_runner(model, max_batch=engine_options.max_batch, eos_id=GPT2_EOS,
                          speculative_tokens=K if speculative == "ngram" else 0,
                          kv_block_size=engine_options.kv_block_size if paged else 0)
    runner.verify_tokens = verify_tokens
    engine = Engine(model, engine_options, runner=runner)
    await engine.start()
    return engine


async def test_echo_is_exact_with_several_tokens_per_forward() -> None:
    engine = await started("ngram", max_batch=8)
    try:
        # The flags: 240 tokens, inside the default max_new_tokens.
        prompts = [" ".join(MIXED[i:] + MIXED[:i]) for i in range(6)] + ["x", "🇫🇷" * 40]
        results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in prompts))
        assert [text for text, _ in results] == prompts
        assert all(reason == "eos" for _, reason in results)
        stats = engine.stats()
        assert stats.verify_steps > 0 and stats.accepted_tokens == stats.draft_tokens
        assert stats.tokens > 3 * stats.steps  # most forwards emitted K + 1 ids
    finally:
        await engine.shutdown(grace=0)


@pytest.mark.parametrize("sampling", [SamplingParams(stop=("STOP",)), SamplingParams(max_new_tokens=7),
                                      SamplingParams(stop=("ve",), include_stop=True)])
async def test_a_stream_that_ends_inside_an_accepted_run_ends_where_plain_decoding_ends(sampling) -> None:
    prompt = "alpha beta gamma delta STOP epsilon five six seven"
    answers = []
    for speculative in ("off", "ngram"):
        engine = await started(speculative)
        try:
            answers.append(await collect(engine, GenerationRequest(prompt=prompt, sampling=sampling)))
            assert engine.stats().active == 0
        finally:
            await engine.shutdown(grace=0)
    assert answers[0] == answers[1]


async def test_generated_text_is_the_same_with_and_without_speculation_batched() -> None:
    """The tiny random model in generate mode, greedy and sampled rows together: its text repeats itself, so some
    rows draft and others do not."""
    requests = [GenerationRequest(prompt=f"{i} " + MIXED[i], sampling=SamplingParams(
        max_new_tokens=48, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True)) for i in range(6)]
    answers = []
    for speculative in ("off", "ngram"):
        engine = await started(speculative, mode="generate", max_batch=4)
        try:
            answers.append(await asyncio.gather(*(collect(engine, r) for r in requests)))
            verified = engine.stats().verify_steps
        finally:
            await engine.shutdown(grace=0)
    assert answers[0] == answers[1]
    assert verified > 0


def test_drafts_narrow_as_streams_are_added_and_stop_past_the_verify_budget() -> None:
    assert [verify_width(8, 16, n) for n in (1, 2, 3, 4, 8, 9)] == [8, 7, 4, 3, 1, 0]
    # A runner that pads drafts to two a row gets two where one would fit: the same positions computed.
    assert [verify_width(8, 16, n, min_width=2) for n in (4, 8, 9)] == [3, 2, 0]
    assert verify_width(1, 16, 8, min_width=2) == 1


async def test_past_the_verify_budget_streams_decode_plainly_and_exactly() -> None:
    engine = await started("ngram", max_batch=8, verify_tokens=1)
    try:
        prompts = [f"{i} " + " ".join(MIXED) for i in range(3)]
        results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in prompts))
        assert [text for text, _ in results] == prompts
        assert engine.stats().verify_steps == 0
    finally:
        await engine.shutdown(grace=0)


async def test_streams_decode_plainly_and_exactly_where_verify_steps_cost_more_than_they_bring() -> None:
    """A verify step measured at many plain steps' cost is declined (only checked again now and then), and the
    text is the same; measured cheap, the same echo verifies."""
    prompts = [f"{i} " + " ".join(MIXED) for i in range(3)]
    for expensive in (True, False):
        engine = await started("ngram", max_batch=8)
        try:
            for rows in range(1, 9):
                engine._step_costs.record_plain(rows, 0.001)
                engine._step_costs.record_verify(rows, 1.0 if expensive else 0.001)
            results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in prompts))
            assert [text for text, _ in results] == prompts
            stats = engine.stats()
            if expensive:
                assert stats.verify_declined > 0
                assert stats.verify_steps <= stats.verify_declined // engine._step_costs.recheck_after + 1
            else:
                assert stats.tokens > 3 * stats.steps  # most forwards emitted K + 1 ids
        finally:
            await engine.shutdown(grace=0)


async def test_cancellation_and_deadlines_while_speculating_free_the_slot() -> None:
    engine = await started("ngram", max_batch=2)
    try:
        prompt = " ".join(MIXED) * 6
        pieces = engine.generate(GenerationRequest(prompt=prompt))
        first = await anext(pieces)
        await pieces.aclose()
        text, reason = await collect(engine, GenerationRequest(prompt=prompt, timeout=0.05))
        assert reason == "deadline" and prompt.startswith(text) and len(text) < len(prompt)
        for _ in range(100):
            if engine.stats().active == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().active == 0 and first.text
        assert (await collect(engine, GenerationRequest(prompt="still exact")))[0] == "still exact"
    finally:
        await engine.shutdown(grace=0)


async def test_acceptance_reaches_health_stats_and_metrics() -> None:
    engine = await started("ngram")
    try:
        await collect(engine, GenerationRequest(prompt=" ".join(MIXED)))
        metrics = Metrics()
        metrics.sample(engine)
        stats = engine.stats().as_dict()
        assert stats["verify_steps"] > 0 and stats["accepted_tokens"] == stats["draft_tokens"] > 0
        assert metrics.acceptance._value.get() == 1.0
        assert metrics.tokens_per_step._value.get() > 2
    finally:
        await engine.shutdown(grace=0)


def test_speculative_options_are_checked() -> None:
    with pytest.raises(ValueError, match="speculative must be one of off, ngram"):
        EngineOptions(speculative="eagle")
    with pytest.raises(ValueError, match="speculative_tokens"):
        EngineOptions(speculative_tokens=0)


# ---- the real model ----------------------------------------------------------------------------------------------
PARAGRAPH = ("The river rose slowly through the night, and by morning the low fields near the mill were under "
             "water. The miller's family carried sacks of grain to the upper floor.")
CODE = "def add(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
CHATS = [[{"role": "user", "content": f"Repeat the following paragraph exactly:\n\n{PARAGRAPH}"}],
         [{"role": "user", "content": f"Fix the bug in this code and show the whole corrected code:\n\n{CODE}"}],
         [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]]


@pytest.mark.parametrize(("quant", "activations"), [("none", "float"), ("auto", "int8")])
async def test_the_real_model_answers_the_same_with_and_without_speculation(quant, activations) -> None:
    """SmolLM2 in float32, greedy, the three chats at once (input-grounded ones that draft, an open-ended one
    that mostly does not): the same text either way. Dense float32 weights, and the file's blocks times int8 rows,
    whose rounding turns any last-bit difference between a verify step and a decode step into other tokens: the
    step attention gives a query the same bits in either."""
    from minercore.models import q4_i8_rows, step_attention
    from minercore.models.loading import embedded

    if activations == "int8" and not (q4_i8_rows.AVAILABLE and step_attention.AVAILABLE):
        pytest.skip("int8 rows and the step attention kernel need AVX2, FMA and their build")
    path = embedded.resolve("smollm2-135m-instruct")
    answers, verified = [], []
    for speculative in ("off", "ngram"):
        engine = Engine(ModelOptions(path=path, mode="generate", dtype="float32", quant=quant, compile="off",
                                     max_context=512, activations=activations),
                        EngineOptions(max_batch=4, speculative=speculative))
        await engine.start()
        try:
            answers.append(await asyncio.gather(*(collect(engine, GenerationRequest(
                messages=chat, sampling=SamplingParams(max_new_tokens=64))) for chat in CHATS)))
            verified.append(engine.stats())
        finally:
            await engine.shutdown(grace=0)
    assert answers[0] == answers[1]
    assert PARAGRAPH[:60] in answers[1][0][0]
    assert verified[0].verify_steps == 0 and verified[1].accepted_tokens > 32
