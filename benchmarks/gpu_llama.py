"""The device check's ``llama`` phase: the Llama-3-8B shape (random weights, bfloat16) in the native backend.

``run(out, smoke)`` returns the phase's results (``benchmarks/gpu_check.py`` calls it; it also runs alone:
``python benchmarks/gpu_llama.py [--smoke]``):

- ``weight_bytes`` and ``copy_gbps``: the device's copy bandwidth, measured here (bytes read + written per
  second copying a 1 GiB buffer), so ``read_limit_tok_s`` = copy bandwidth / weight bytes is the batch-1 decode
  rate if every step did nothing but read the weights once;
- ``batch1_tok_s`` (one stream, greedy, compiled decode steps) and its ratio to that limit (target >= 0.85);
- ``batch64_tok_s`` (64 streams) against transformers' ``generate`` with a static cache on the same weights,
  the same prompts and the same number of new tokens (``hf_static_batch64_tok_s``);
- ``greedy_agreement``: the fraction of the first 16 greedy batch-1 tokens equal to transformers' (bfloat16
  rounding may legitimately split near-ties; float32 parity is tests/test_llama.py's job).

``smoke``: a tiny shape on the CPU, eager, a few steps: proves the phase still runs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minercore.models.llama import LlamaConfig, LlamaLM, rope_frequencies
from minercore.models.presets import LLAMA_PRESETS as PRESETS
from minercore.runtime.build import CUDA_AUTO_GRAPHS
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import SlotParams

PROMPT, NEW, MAX_BATCH = 32, 128, 64
TARGET_OF_LIMIT = 0.85


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes moved (read + written) per second by device-to-device copies of an ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - started)


def hf_twin(model: LlamaLM, config: LlamaConfig):
    """transformers' LlamaForCausalLM holding the same weights (allocated empty, then copied on the device)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    weight = model.embed_tokens.weight
    hf_config = HFConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layer,
                         num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                         head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
                         max_position_embeddings=config.max_positions, rope_theta=config.rope_theta,
                         tie_word_embeddings=config.tie_embeddings)
    with torch.device("meta"):
        twin = LlamaForCausalLM(hf_config)
    twin = twin.to(dtype=weight.dtype).to_empty(device=weight.device).eval()
    twin.tie_weights()
    views = model.checkpoint_views()
    for name, param in twin.named_parameters():
        param.data.copy_(views[name.removeprefix("model.")])
    for name, buffer in twin.named_buffers():  # RoPE inverse frequencies: empty after to_empty
        if name.endswith("inv_freq"):
            buffer.copy_(rope_frequencies(config))
    return twin


def native_generate(runner: ModelRunner, prompts: np.ndarray, new: int) -> tuple[np.ndarray, float]:
    """Greedy: prefill every row, then ``new - 1`` decode steps; returns the ids and the decode seconds."""
    slots = np.arange(len(prompts))
    first = runner.prefill_batch(slots.tolist(), prompts.tolist(), [SlotParams(echo=False)] * len(prompts))
    out = [np.array(first)]
    sync(runner.device)
    started = time.perf_counter()
    for _ in range(new - 1):
        out.append(runner.decode(slots))
    seconds = time.perf_counter() - started
    for slot in slots.tolist():
        runner.release(slot)
    return np.stack(out, axis=1), seconds


def hf_generate(twin, prompts: np.ndarray, new: int) -> tuple[np.ndarray, float]:
    ids = torch.as_tensor(prompts, device=twin.device)
    sync(twin.device)
    started = time.perf_counter()
    out = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, cache_implementation="static", pad_token_id=0)
    sync(twin.device)
    return out[:, prompts.shape[1]:].cpu().numpy(), time.perf_counter() - started


def run(out: Path | None, smoke: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if smoke:
        config = replace(PRESETS["llama-tiny"], vocab_size=512, max_positions=256)
        prompt, new, batch = 8, 8, 4
    else:
        config = PRESETS["llama3-8b"]
        prompt, new, batch = PROMPT, NEW, MAX_BATCH
    result: dict[str, Any] = {"shape": "llama-tiny (smoke)" if smoke else "llama3-8b", "device": str(device),
                              "dtype": str(dtype).removeprefix("torch."), "prompt": prompt, "new_tokens": new}
    model = LlamaLM.random(config, seed=0, device=device, dtype=dtype)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    copy_gbps = copy_bandwidth(device, (1 << 30) if cuda else (64 << 20), 20 if cuda else 3) / 1e9
    limit = copy_gbps * 1e9 / weight_bytes
    result.update(weight_bytes=weight_bytes, copy_gbps=round(copy_gbps, 1), read_limit_tok_s=round(limit, 1))

    # What serving picks on this device (graphs=auto, attention=auto), at the two batch sizes measured only:
    # every further batch bucket would cost a compile and a capture of the 8B step.
    graphs = CUDA_AUTO_GRAPHS if cuda else "off"
    runner = ModelRunner(model, max_batch=batch, max_context=prompt + new + 1, eos_id=0, device=device,
                         dtype=dtype, compile=cuda, kinds=(0,), name=result["shape"], graphs=graphs,
                         attention="masked" if graphs == "manual" else "bucketed", batch_buckets=(1, batch))
    result.update(graphs=graphs, attention=runner.attention)
    result["warmup_s"] = round(runner.warmup(), 1)  # compiles, and records every step shape's CUDA graph
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt))
    native_generate(runner, prompts[:1], new)
    ours1, seconds = native_generate(runner, prompts[:1], new)
    batch1 = (new - 1) / seconds
    result.update(batch1_tok_s=round(batch1, 1), batch1_over_limit=round(batch1 / limit, 3),
                  batch1_meets_target=batch1 >= TARGET_OF_LIMIT * limit)
    native_generate(runner, prompts, new)
    _, seconds = native_generate(runner, prompts, new)
    result.update(batch64_tok_s=round(batch * (new - 1) / seconds, 1), batch=batch)
    if out is not None:  # the phase's partial results survive a time limit hit in transformers below
        (Path(out) / "llama_partial.json").write_text(json.dumps(result, indent=2))

    twin = hf_twin(model, config)
    theirs1, _ = hf_generate(twin, prompts[:1], min(new, 16))
    agree = int((ours1[0, :theirs1.shape[1]] == theirs1[0]).sum())
    result["greedy_agreement"] = agree / theirs1.shape[1]
    hf_generate(twin, prompts, new)  # static cache allocation (and transformers' own compile, if it does)
    _, seconds = hf_generate(twin, prompts, new)
    hf_rate = batch * new / seconds  # includes the prefill: transformers' generate does not split it out
    result.update(hf_static_batch64_tok_s=round(hf_rate, 1),
                  batch64_over_hf=round(result["batch64_tok_s"] / hf_rate, 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="directory for the partial results file")
    args = parser.parse_args()
    with torch.inference_mode():
        print(json.dumps(run(args.out, args.smoke), indent=2))


if __name__ == "__main__":
    main()
