"""The device check's ``speculative`` phase: the runner's verify step on the Llama-3-8B shape (random weights,
bfloat16, compiled), against its plain decode step.

``run(out, smoke)`` returns the phase's results (``benchmarks/gpu_check.py`` calls it; it also runs alone:
``python benchmarks/gpu_speculative.py [--smoke]``):

- ``decode_step_ms`` and ``verify_step_ms`` at batch 1 and 8 (k = 8 drafts per row, so 9 positions): what a
  verify step costs against the step it replaces; ``tokens_per_s_plain`` / ``tokens_per_s_verified`` the rates
  when every draft is accepted (an echo) and ``speedup`` their ratio;
- ``agreement``: greedy ids emitted by verify steps fed plain decoding's own next ids as drafts, against those
  ids (1.0 in exact arithmetic; bfloat16's (k + 1)-wide products may split a near-tie), and ``accepted`` the
  share of those drafts the model accepted.

``smoke``: the tiny Llama shape on the CPU, eager, a few steps: proves the phase still runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minercore.models.llama import LlamaLM
from minercore.models.presets import LLAMA_PRESETS
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import GREEDY, SlotParams

K = 8
PROMPT = 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(smoke: bool, max_batch: int, new: int) -> ModelRunner:
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    config = LLAMA_PRESETS["llama-tiny" if smoke else "llama3-8b"]
    model = LlamaLM.random(config, seed=0, device=device, dtype=dtype)
    return ModelRunner(model, max_batch=max_batch, max_context=PROMPT + new + K + 1, eos_id=config.vocab_size - 1,
                       device=device, dtype=dtype, compile=not smoke, kinds=(GREEDY,), speculative_tokens=K,
                       name="llama3-8b (random)" if not smoke else "llama-tiny (random)")


def prefill(runner: ModelRunner, batch: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    for slot in range(runner.max_batch):
        runner.release(slot)
    return [[runner.prefill(slot, rng.integers(0, runner.vocab_size - 1, PROMPT).tolist(), SlotParams(echo=False))]
            for slot in range(batch)]


def measure(runner: ModelRunner, batch: int, new: int) -> dict[str, Any]:
    slots = np.arange(batch, dtype=np.int64)
    plain = prefill(runner, batch)
    sync(runner.device)
    started = time.perf_counter()
    for _ in range(new - 1):
        for row, token in enumerate(runner.decode(slots)):
            plain[row].append(int(token))
    decode_s = (time.perf_counter() - started) / (new - 1)
    got = prefill(runner, batch)
    steps, accepted, drafted = 0, 0, 0
    sync(runner.device)
    started = time.perf_counter()
    while min(len(g) for g in got) < new:
        drafts = np.zeros((batch, K), dtype=np.int64)
        lengths = np.zeros(batch, dtype=np.int64)
        for row in range(batch):
            right = plain[row][len(got[row]):len(got[row]) + K]
            drafts[row, :len(right)] = right
            lengths[row] = len(right)
        chosen, emitted = runner.verify(slots, drafts, lengths)
        for row in range(batch):
            got[row].extend(int(i) for i in chosen[row, :emitted[row]])
        steps += 1
        drafted += int(lengths.sum())
        accepted += int((emitted - 1).sum())
    verify_s = (time.perf_counter() - started) / steps
    agree = float(np.mean([np.mean(np.array(g[:new]) == np.array(p[:new])) for g, p in zip(got, plain,
                                                                                          strict=True)]))
    plain_rate = batch / decode_s
    verified_rate = batch * new / (verify_s * steps)
    return {"batch": batch, "decode_step_ms": round(decode_s * 1e3, 3), "verify_step_ms": round(verify_s * 1e3, 3),
            "tokens_per_s_plain": round(plain_rate, 1), "tokens_per_s_verified": round(verified_rate, 1),
            "speedup": round(verified_rate / plain_rate, 2), "agreement": round(agree, 4),
            "accepted": round(accepted / max(drafted, 1), 4)}


def run(out: Path, smoke: bool) -> dict[str, Any]:
    new = 12 if smoke else 128
    batches = (1, 2) if smoke else (1, 8)
    runner = build(smoke, max(batches), new)
    warm = runner.warmup()
    rows = [measure(runner, batch, new) for batch in batches]
    return {"model": runner.description, "k": K, "warmup_s": round(warm, 1), "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    with torch.inference_mode():
        print(json.dumps(run(args.out, args.smoke), indent=1))
