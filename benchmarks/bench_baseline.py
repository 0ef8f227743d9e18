"""Group ``baseline``: minercore against what a miner would write with transformers, same checkpoint, same work.

The checkpoint is ``llama-tiny``'s shape (a Llama with GPT-2's vocabulary) saved as a Hugging Face directory
with random weights. The work is echo: prefill the prompt, then one forward per output token with the logits
steered onto the prompt (then EOS), so both sides pay for every step and must return the prompt exactly.

``impl``:

- ``transformers``: the streaming template: per request, a thread running ``model.generate`` with a
  ``TextIteratorStreamer`` and a ``LogitsProcessor`` that steers the logits (greedy), the caller iterating the
  streamer. Concurrent requests are concurrent threads on the one model.
- ``minercore``: the native backend on that directory (``path``), compiled, continuous batching.

extra_info: ``median_ttft_s`` (request to first text), ``tokens_per_s`` (all streams' tokens / wall time of the
round), ``exact`` (every stream's text equals its prompt). The 8-stream minercore entry carries the ratios to
transformers measured in the same run (targets: tokens/s >= 8x, median TTFT <= 0.35x).

    pytest benchmarks/bench_baseline.py --benchmark-only -p no:cacheprovider -s
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest
import torch

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine
from minercore.models.presets import LLAMA_PRESETS as PRESETS
from minercore.text.tokenizer import load_tokenizer

PROMPT_TOKENS = 256
WORDS = ("Validators score what miners stream back.", "Crème brûlée, Zürich, São Paulo.", "東京は日本の首都です。",
         "Emoji: 😀 🎉 👍🏽", "and more words to echo back,")
MEASURED: dict[tuple[str, int], dict[str, float]] = {}


def prompts(streams: int) -> list[str]:
    """Distinct prompts of about PROMPT_TOKENS GPT-2 tokens."""
    tokenizer = load_tokenizer("gpt2")
    out = []
    for i in range(streams):
        text, k = f"{i}:", 0
        while len(tokenizer.encode(text)) < PROMPT_TOKENS:
            text += " " + WORDS[(i + k) % len(WORDS)]
            k += 1
        out.append(text)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = PRESETS["llama-tiny"]
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                         head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=2048,
                         rope_theta=c.rope_theta, tie_word_embeddings=True, eos_token_id=50256, bos_token_id=50256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# ---- the transformers miner ----

def _echo_processor(target: list[int], prompt_len: int):
    from transformers import LogitsProcessor

    class EchoOntoPrompt(LogitsProcessor):
        """Output j is target[j]: the model's scores are computed, then the target gets +inf."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            j = input_ids.shape[1] - prompt_len
            scores[:, target[min(j, len(target) - 1)]] = float("inf")
            return scores

    return EchoOntoPrompt()


def transformers_stream(model, tokenizer, prompt: str, started: float, out: dict) -> None:
    from transformers import TextIteratorStreamer

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    target = [*ids[0].tolist(), tokenizer.eos_token_id]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, kwargs=dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target), do_sample=False,
        streamer=streamer, logits_processor=[_echo_processor(target, ids.shape[1])], pad_token_id=0,
        eos_token_id=tokenizer.eos_token_id))
    worker.start()
    text, ttft = [], None
    for piece in streamer:
        if piece and ttft is None:
            ttft = time.perf_counter() - started
        text.append(piece)
    worker.join()
    out.update(text="".join(text), ttft=ttft, tokens=len(target))


def run_transformers(model, tokenizer, work: list[str]) -> dict:
    started = time.perf_counter()
    results = [{} for _ in work]
    threads = [threading.Thread(target=transformers_stream, args=(model, tokenizer, p, started, r))
               for p, r in zip(work, results, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(work, results, time.perf_counter() - started)


# ---- minercore ----

async def minercore_stream(engine: Engine, prompt: str, started: float, out: dict) -> None:
    text, ttft = [], None
    async for piece in engine.generate(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=4096))):
        if piece.text and ttft is None:
            ttft = time.perf_counter() - started
        text.append(piece.text)
        if piece.stats is not None:
            out["tokens"] = piece.stats.tokens
    out.update(text="".join(text), ttft=ttft)


async def run_minercore(engine: Engine, work: list[str]) -> dict:
    started = time.perf_counter()
    results = [{} for _ in work]
    await asyncio.gather(*(minercore_stream(engine, p, started, r) for p, r in zip(work, results, strict=True)))
    return _summary(work, results, time.perf_counter() - started)


def _summary(work: list[str], results: list[dict], wall: float) -> dict:
    return {"median_ttft_s": statistics.median(r["ttft"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "exact": all(r["text"] == p for p, r in zip(work, results, strict=True))}


@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("impl", ["transformers", "minercore"])
def test_baseline(benchmark, checkpoint, impl: str, streams: int) -> None:
    work = prompts(streams)
    if impl == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        tokenizer = load_tokenizer("gpt2")
        run_transformers(model, tokenizer, work[:1])  # warm-up
        measured = benchmark.pedantic(lambda: run_transformers(model, tokenizer, work), rounds=1, iterations=1)
    else:
        engine = Engine(ModelOptions(path=str(checkpoint), device="cpu", dtype="float32", max_context=1024),
                        EngineOptions(max_batch=8))
        loop = asyncio.new_event_loop()
        loop.run_until_complete(engine.start())
        try:
            loop.run_until_complete(run_minercore(engine, work))  # warm-up
            measured = benchmark.pedantic(lambda: loop.run_until_complete(run_minercore(engine, work)), rounds=1,
                                          iterations=1)
        finally:
            loop.run_until_complete(engine.shutdown(grace=0))
            loop.close()
    MEASURED[impl, streams] = measured
    benchmark.group = "baseline"
    benchmark.extra_info.update(impl=impl, streams=streams, prompt_tokens=PROMPT_TOKENS, **measured)
    base = MEASURED.get(("transformers", streams))
    if impl == "minercore" and base is not None:
        benchmark.extra_info.update(tokens_per_s_ratio=measured["tokens_per_s"] / base["tokens_per_s"],
                                    ttft_ratio=measured["median_ttft_s"] / base["median_ttft_s"])
    print(f"\n{impl:>12} x{streams}: " + ", ".join(f"{k} {v:.4g}" for k, v in benchmark.extra_info.items()
                                                 if isinstance(v, float)) + f", exact {measured['exact']}")
    assert impl == "transformers" or measured["exact"]
