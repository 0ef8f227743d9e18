"""The real miner (``neurons/miner.py --offline``) serving the embedded real model, SmolLM2-135M-Instruct from its
GGUF file, in generate mode: a btauth/1-signed chat completion and a StreamPrompting request (through a real
10.x Dendrite where bittensor 10 is installed) each answer with exactly transformers' greedy text for the same
chat, alone and at the same time, and the miner says what it serves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from helpers import miner_process, stream_prompt

from minercore.miner import client
from minercore.models.loading import embedded

NAME = "smollm2-135m-instruct"
MAX_NEW_TOKENS = 40  # the miner's ceiling (--engine.max_new_tokens): StreamPrompting's answers stop there too
TIMEOUT_S = 240.0
QUESTIONS = ["What is the capital of France, and what is it famous for?",
             "Write a Python function that returns the square of a number.",
             "Nenne drei Farben auf Deutsch."]


@pytest.fixture(scope="module")
def greedy_answer():
    """Transformers' greedy text for one user message through the file's chat template, cut at the end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = Path(embedded.resolve(NAME))
    model = AutoModelForCausalLM.from_pretrained(where.parent, gguf_file=where.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)

    @torch.no_grad()
    def answer(question: str) -> str:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False)[0, ids.shape[1]:].tolist()
        return tokenizer.decode(out[:out.index(2)] if 2 in out else out)

    return answer


@pytest.fixture(scope="module")
def miner(tmp_path_factory):
    # float32 and no quantization: the weights transformers computes with, so the greedy text is the same.
    with miner_process(tmp_path_factory.mktemp("real-miner"), "--model.path", NAME, "--model.mode", "generate",
                       "--dtype", "float32", "--model.quant", "none", "--model.compile", "off",
                       "--model.max_context", "1024", "--engine.max_batch", "4",
                       "--engine.max_new_tokens", str(MAX_NEW_TOKENS)) as running:
        yield running
        assert running.stop() == 0, running.log()


def caller():
    return client.ephemeral_keypair()


async def chat(miner, question: str) -> client.StreamResult:
    return await client.stream_openai(miner.target, [question], ["user"], wallet=caller(), timeout=TIMEOUT_S,
                                      temperature=0.0, max_tokens=MAX_NEW_TOKENS)


async def prompting(miner, question: str) -> client.StreamResult:
    return await stream_prompt(miner.target, [question], ["user"], wallet=caller(), timeout=TIMEOUT_S)


async def test_a_signed_chat_completion_is_transformers_greedy_answer(miner, greedy_answer):
    result = await chat(miner, QUESTIONS[0])
    assert result.ok, result
    assert result.text == greedy_answer(QUESTIONS[0]) and "Paris" in result.text


async def test_stream_prompting_answers_greedily_with_the_same_text(miner, greedy_answer):
    result = await prompting(miner, QUESTIONS[1])
    assert result.ok, result
    assert result.text == greedy_answer(QUESTIONS[1]) and "def " in result.text


async def test_both_routes_at_once_each_get_their_own_answer(miner, greedy_answer):
    results = await asyncio.gather(chat(miner, QUESTIONS[2]), prompting(miner, QUESTIONS[0]),
                                   chat(miner, QUESTIONS[1]), prompting(miner, QUESTIONS[2]))
    assert [r.status_code for r in results] == [200] * 4, results
    assert [r.text for r in results] == [greedy_answer(q) for q in (QUESTIONS[2], QUESTIONS[0], QUESTIONS[1],
                                                                    QUESTIONS[2])]


async def test_the_miner_says_what_it_serves(miner):
    assert await client.list_models(miner.target, wallet=caller()) == [NAME]  # the name the operator gave
    health = httpx.get(f"{client.base_url(miner.target)}/health").json()
    assert {k: health["serving"][k] for k in ("backend", "format", "architecture", "checkpoint_quantization",
                                              "quantization", "dtype")} == \
        {"backend": "native", "format": "gguf", "architecture": "llama", "checkpoint_quantization": "Q4_1",
         "quantization": "none", "dtype": "float32"}
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in miner.log()
