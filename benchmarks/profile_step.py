"""Where a decode step's time goes: SmolLM2-135M-Instruct from its GGUF at the serving defaults, one batch-1 and one
batch-8 greedy step, split by torch.profiler into the matrix products (dense and quantized linears), attention
and everything else (norms, rotary, sampling, the glue between kernels, the host's own work).

    python benchmarks/profile_step.py [--threads N] [--compile on|off] [--quant auto|none|int8|int4] [--steps N]
        [--batches 1,8]

Prints a markdown table for RESULTS.md. The step's wall time is measured outside the profiler (its overhead
stays out of it); the profiler's self CPU times split it. In a compiled step inductor's own fused loops are not
ops the profiler names, so they count as "other"; the matrix products it calls out to still are.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from minercore.contract.config import ModelOptions
from minercore.models.loading import embedded
from minercore.runtime.build import build_model_runner
from minercore.runtime.sampling import SlotParams

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_weight_int4pack_mm_for_cpu",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm",
              "aten::_weight_int4pack_mm_with_scales_and_zeros", "minercore::int4_rows_mm",
              "minercore::q8_rows_mm", "minercore::q4_rows_mm", "minercore::q4_i8_rows_mm", "minercore::q8_i8_rows_mm",
              # a block's products with the norms, activation and residual adds around them (block_step)
              "minercore::norm_linear", "minercore::block_tail"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                 "aten::_flash_attention_forward", "minercore::step_attention", "minercore::step_attention_paged"}
PROMPT = "Write a long essay about the history of bridges, their engineering and the people who built them."


def split(prof) -> dict[str, float]:
    """Self CPU microseconds of the matrix products, the attention kernels, and the whole profile."""
    totals = {"matmul": 0.0, "attention": 0.0, "all": 0.0}
    for event in prof.key_averages():
        totals["all"] += event.self_cpu_time_total
        if event.key in MATMUL_OPS:
            totals["matmul"] += event.self_cpu_time_total
        elif event.key in ATTENTION_OPS:
            totals["attention"] += event.self_cpu_time_total
    return totals


def measure(runner, prompt: list[int], batch: int, steps: int) -> dict[str, float]:
    slots = np.arange(batch)
    runner.prefill_batch(list(slots), [prompt] * batch, [SlotParams(echo=False)] * batch)
    for _ in range(3):
        runner.decode(slots)
    started = time.perf_counter()
    for _ in range(steps):
        runner.decode(slots)
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.decode(slots)
    parts = split(prof)
    for slot in slots:
        runner.release(int(slot))
    matmul = parts["matmul"] / 1e3 / steps
    attention = parts["attention"] / 1e3 / steps
    return {"wall_ms": wall_ms, "matmul_ms": matmul, "attention_ms": attention,
            "other_ms": max(0.0, wall_ms - matmul - attention)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: minercore's default)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes to profile")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    from minercore.text.tokenizer import load_tokenizer

    path = embedded.resolve("smollm2-135m-instruct")
    options = ModelOptions(path=path, mode="generate", compile=args.compile, quant=args.quant, dtype=args.dtype,
                           threads=args.threads, max_context=1024)
    runner = build_model_runner(options, max_batch=max(batches), eos_id=2)
    prompt = load_tokenizer(path).encode(PROMPT)
    warm = runner.warmup()
    print(f"# {runner.description}; torch threads {torch.get_num_threads()}; warmup {warm:.1f} s; "
          f"{args.steps} steps a row, prompt {len(prompt)} tokens")
    print("| batch | step (ms) | matrix products (ms) | attention (ms) | everything else (ms) | step / products |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        row = measure(runner, prompt, batch, args.steps)
        print(f"| {batch} | {row['wall_ms']:.1f} | {row['matmul_ms']:.1f} | {row['attention_ms']:.2f} | "
              f"{row['other_ms']:.1f} | {row['wall_ms'] / max(row['matmul_ms'], 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
