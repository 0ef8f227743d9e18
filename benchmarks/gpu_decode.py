"""minercore's compiled decode against Hugging Face ``generate`` on the same random gpt2-preset weights.

    python benchmarks/gpu_decode.py            # CUDA: batch 1, 64, 256; prompt 128; 256 new tokens; bf16
    python benchmarks/gpu_decode.py --smoke    # CPU, tiny preset, tiny sizes: proves the script still runs

Needs torch, transformers and minercore only (no internet: the weights are random, made here). In order:
1. correctness on the device: compiled vs eager minercore, and minercore vs HF greedy, in float32;
2. throughput in the serving dtype: minercore compiled (and eager), HF generate eager (dynamic cache) and
   HF generate with ``cache_implementation="static"`` (auto-compiled by transformers on CUDA).
Prints a markdown table. Decode tok/s counts the tokens after the first (which comes from the prefill);
for HF, decode time = generate(new) - generate(1). The KV cache is sized to prompt + new, like gpt-fast.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minercore.model import PRESETS, describe, load_gpt2
from minercore.runner import ModelRunner
from minercore.sampling import GREEDY, SlotParams

TARGETS = {1: 3_000, 64: 60_000, 256: 120_000}  # H100, bf16, gpt2 preset: decode tok/s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, tiny sizes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf-static", action="store_true", help="skip HF static cache (compile per batch)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtype, args.preset, args.batches, args.prompt, args.new = (
            "cpu", "float32", "tiny", "1,2", 8, 8)
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_random_gpt2(preset: str, seed: int, directory: Path) -> None:
    """The preset's shape as a Hugging Face GPT-2 checkpoint, so both sides load identical weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = PRESETS[preset]
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                        n_embd=c.n_embd)
    GPT2LMHeadModel(config).save_pretrained(directory)


def prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab - 1, (batch, length))


def minercore_generate(runner: ModelRunner, ids: np.ndarray, new: int, params: SlotParams) -> tuple:
    """(tokens (batch, new), prefill seconds, decode seconds): prefill every slot, then new - 1 steps."""
    batch = ids.shape[0]
    for slot in range(runner.max_batch):
        runner.release(slot)
    started = time.perf_counter()
    first = [runner.prefill(slot, ids[slot].tolist(), params) for slot in range(batch)]
    sync(runner.device)
    prefilled = time.perf_counter()
    slots = np.arange(batch, dtype=np.int64)
    steps = [runner.decode(slots) for _ in range(new - 1)]
    sync(runner.device)
    done = time.perf_counter()
    return np.column_stack([first, *steps]), prefilled - started, done - prefilled


def hf_generate(model, ids: np.ndarray, new: int, **kwargs) -> tuple:
    """(tokens (batch, new), seconds) for greedy HF generate of exactly ``new`` tokens: no EOS id, so it
    neither stops early nor bends the argmax (as min_new_tokens would), like minercore's greedy rows."""
    inputs = torch.as_tensor(ids, device=model.device)
    sync(model.device)
    started = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=model.config.vocab_size - 1, **kwargs)
    sync(model.device)
    return out[:, ids.shape[1]:].cpu().numpy(), time.perf_counter() - started


def make_runner(directory: Path, args, dtype: torch.dtype, compile: bool) -> ModelRunner:
    return ModelRunner(load_gpt2(str(directory)), max_batch=max(args.batches), max_context=args.prompt + args.new,
                       eos_id=PRESETS[args.preset].vocab_size - 1, device=torch.device(args.device), dtype=dtype,
                       compile=compile, kinds=(GREEDY,), name=f"{args.preset} (random, seed {args.seed})")


def correctness(directory: Path, args, report: list[str]) -> bool:
    from transformers import GPT2LMHeadModel

    batch, steps = min(8, max(args.batches)), min(32, args.new)
    ids = prompts(batch, args.prompt, PRESETS[args.preset].vocab_size, args.seed + 1)
    greedy = SlotParams(echo=False)
    eager = make_runner(directory, args, torch.float32, compile=False)
    reference, _, _ = minercore_generate(eager, ids, steps, greedy)
    del eager
    compiled = make_runner(directory, args, torch.float32, compile=True)
    got, _, _ = minercore_generate(compiled, ids, steps, greedy)
    del compiled
    hf = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).to(args.device).eval()
    hf_ids, _ = hf_generate(hf, ids, steps)
    del hf
    compiled_match = float((got == reference).mean())
    hf_match = float((hf_ids == reference).mean())
    report.append(f"- correctness (float32, batch {batch}, {steps} greedy tokens): compiled == eager on "
                  f"{compiled_match:.1%} of tokens; minercore == HF generate on {hf_match:.1%}")
    return compiled_match >= 0.99 and hf_match >= 0.99


def throughput(directory: Path, args, dtype: torch.dtype, report: list[str]) -> list[tuple]:
    from transformers import GPT2LMHeadModel

    rows = []
    vocab = PRESETS[args.preset].vocab_size
    for compile in (True, False):
        runner = make_runner(directory, args, dtype, compile=compile)
        warm = runner.warmup()
        if compile:
            what = "compile + CUDA graphs" if runner.device.type == "cuda" else "compile"
            report.append(f"- minercore: {runner.description}; warmup ({what}) {warm:.1f} s")
            formula = 2 * PRESETS[args.preset].n_layer * runner.max_context * PRESETS[args.preset].n_embd * (
                torch.tensor([], dtype=dtype).element_size())
            report.append(f"- KV cache bytes per slot: {runner.kv_cache_bytes_per_slot:,} (formula 2·layers·"
                          f"context·width·bytes = {formula:,}; ratio {runner.kv_cache_bytes_per_slot / formula:.3f})")
        for batch in args.batches:
            ids = prompts(batch, args.prompt, vocab, args.seed + batch)
            minercore_generate(runner, ids[:, :8], 4, SlotParams())  # warms the eager prefill's kernels
            _, prefill_s, decode_s = minercore_generate(runner, ids, args.new, SlotParams())
            rows.append((f"minercore {'compiled' if compile else 'eager'}", batch, decode_s, prefill_s + decode_s))
        del runner
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    hf = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).to(args.device).eval()
    variants = [("HF generate eager", {})]
    if not args.skip_hf_static:
        variants.append(("HF generate static", {"cache_implementation": "static"}))
    for name, kwargs in variants:
        for batch in args.batches:
            ids = prompts(batch, args.prompt, vocab, args.seed + batch)
            hf_generate(hf, ids, args.new, **kwargs)  # warm-up (static: compiles for this shape)
            _, one = hf_generate(hf, ids, 1, **kwargs)
            _, total = hf_generate(hf, ids, args.new, **kwargs)
            rows.append((name, batch, max(total - one, 1e-9), total))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = [f"## minercore decode benchmark{' (smoke)' if args.smoke else ''}", "",
              f"- device: {name} ({device}); torch {torch.__version__}; transformers {transformers.__version__}; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
              f"- model: {args.preset} preset [{describe(PRESETS[args.preset])}], random weights (seed {args.seed}), "
              f"{args.dtype}; prompt {args.prompt}, {args.new} new tokens, greedy"]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        directory = Path(tmp)
        save_random_gpt2(args.preset, args.seed, directory)
        correct = correctness(directory, args, report)
        rows = throughput(directory, args, dtype, report)
    report += ["", "| impl | batch | decode tok/s | ms/step | end-to-end s | target tok/s |",
               "|---|---:|---:|---:|---:|---:|"]
    missed = []
    for impl, batch, decode_s, total_s in rows:
        rate = batch * (args.new - 1) / decode_s
        target = TARGETS.get(batch) if impl == "minercore compiled" and not args.smoke else None
        mark = "" if target is None else f"{target:,} {'ok' if rate >= target else 'MISSED'}"
        if target is not None and rate < target:
            missed.append(batch)
        report.append(f"| {impl} | {batch} | {rate:,.0f} | {decode_s / (args.new - 1) * 1e3:.3f} | "
                      f"{total_s:.2f} | {mark} |")
    print("\n".join(report))
    if not correct:
        print("\nFAILED: compiled and eager (or HF) disagree", file=sys.stderr)
        return 1
    if missed:
        print(f"\nnote: below target at batch {missed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
