"""The device check's ``paged`` phase: the paged KV cache on the Llama-3-8B shape (random weights, bfloat16), its
capacity and its decode speed against the static cache.

``run(out, smoke)`` returns the phase's results (``benchmarks/gpu_check.py`` calls it; it also runs alone:
``python benchmarks/gpu_paged.py [--smoke]``):

- ``capacity``: the pool the engine sizes by default on CUDA (``runtime.device.auto_kv_pool_bytes``: the memory
  free after the weights, up to 90% of the device's in use), allocated (so it is known to fit), and how many
  1,024- and 4,096-token streams it holds, against the static cache's slots of 4,096 positions each in the same
  memory;
- ``decode``: tokens/s of plain greedy decode steps at 64 and 256 streams (256-token prompts, max_context 1,024)
  with the static cache and with the paged one (blocks scattered over the pool), eager on both sides, and
  ``agreement`` (the paged ids against the static ones: 1.0 in exact arithmetic);
- ``resume``: a stream of a 1,024-token prompt preempted after 32 decode steps and resumed as the engine does
  (``prefill_chunk`` with ``prompt_len``): the time to recompute all its positions, and from its blocks kept in
  the prefix cache (all but the last, partial one), and whether each resumption's next id is the one
  uninterrupted decoding chose;
- ``hits``: 16 prompts behind one 512-token system text whose blocks an earlier request cached, each with its own
  tail: their rests prefilled in one forward, each row from its cached offset (what the engine does for prompts
  admitted together), against one ``prefill_chunk`` each; the times and whether both give the same first ids;
- ``repeats``: 16 prompts (a 512-token system text and its own tail each) answered for 32 steps, their prompt and
  answer blocks committed, then asked again: the manager finds each prompt's whole blocks and copies the start of
  its last one (``copy_block``), and their rests (one token each) are prefilled in one forward, against the rests
  past the whole blocks only (what the prefix cache gave before); the times, and whether both give the same first
  ids;
- ``pack``: 8 streams, those in even slots ending after a few steps, so that the runner moves the odd ones' state
  and block table rows down into the freed rows on the device, in stream order after the step in flight; each
  survivor's ids against the same stream decoded alone (``agreement``: 1.0 in exact arithmetic; moves read in
  the wrong order would give other text), and a step of the 4 moved streams against one of 4 that never moved.

``smoke``: the tiny Llama shape on the CPU, small batches, a 64 MiB pool: proves the phase still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minercore.kv.block_pool import BlockPool
from minercore.kv.manager import KVCacheManager
from minercore.models.llama import LlamaLM
from minercore.models.presets import LLAMA_PRESETS
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import GREEDY, SlotParams

BLOCK = 16
SMOKE_POOL_BYTES = 64 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runner_for(model: LlamaLM, device: torch.device, dtype: torch.dtype, max_batch: int, max_context: int,
               pool_bytes: int = 0, paged: bool = True) -> ModelRunner:
    return ModelRunner(model, max_batch=max_batch, max_context=max_context, eos_id=model.config.vocab_size - 1,
                       device=device, dtype=dtype, compile=False, kinds=(GREEDY,),
                       kv_block_size=BLOCK if paged else 0, kv_cache_bytes=pool_bytes)


def capacity(model: LlamaLM, device: torch.device, dtype: torch.dtype, smoke: bool) -> dict[str, Any]:
    pool = 0  # the engine's default on CUDA
    if smoke or device.type != "cuda":
        pool = SMOKE_POOL_BYTES
    else:
        gc.collect()
        torch.cuda.empty_cache()
    max_context = 128 if smoke else 4096
    runner = runner_for(model, device, dtype, max_batch=256, max_context=max_context, pool_bytes=pool)
    positions = runner.kv_pool_bytes // runner.kv_bytes_per_position
    result = {"pool_gib": round(runner.kv_pool_bytes / 2**30, 2), "blocks": runner.kv_paged.num_blocks - 1,
              "bytes_per_position": runner.kv_bytes_per_position,
              "static_slots_of_max_context": positions // (max_context + 1), "max_context": max_context}
    for length in (1024, 4096) if not smoke else (32, 128):
        result[f"paged_streams_of_{length}"] = positions // (-(-length // BLOCK) * BLOCK)
    del runner
    model.setup_caches(1, 1)  # drop the pool before the next phase
    return result


def decode(model: LlamaLM, device: torch.device, dtype: torch.dtype, batch: int, paged: bool, prompt: int,
           steps: int, max_context: int) -> tuple[float, list[list[int]]]:
    runner = runner_for(model, device, dtype, max_batch=batch, max_context=max_context, paged=paged)
    if paged:
        # Blocks handed out by a manager as streams grow side by side: each slot's blocks interleave with the
        # others' over the pool, as in serving.
        manager = KVCacheManager(BlockPool(runner.kv_paged.num_blocks, BLOCK), runner.kv_paged.max_blocks_per_slot,
                                 prefix_caching=False)
        total = prompt + steps + 2
        for slot in range(batch):
            manager.admit(slot, [1])
        for held in range(2 * BLOCK, total + BLOCK, BLOCK):
            for slot in range(batch):
                assert manager.append_slot(slot, min(held, total))
        for slot in range(batch):
            runner.assign_blocks(slot, manager.block_table(slot))
    rng = np.random.default_rng(0)
    ids = [[runner.prefill(slot, rng.integers(0, runner.vocab_size - 1, prompt).tolist(), SlotParams(echo=False))]
           for slot in range(batch)]
    slots = np.arange(batch, dtype=np.int64)
    runner.decode(slots)  # warm: the first step's allocations
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        for row, token in enumerate(runner.decode(slots)):
            ids[row].append(int(token))
    sync(device)
    rate = batch * steps / (time.perf_counter() - started)
    del runner
    model.setup_caches(1, 1)
    return rate, ids


def resume(model: LlamaLM, device: torch.device, dtype: torch.dtype, prompt: int, steps: int,
           max_context: int) -> dict[str, Any]:
    runner = runner_for(model, device, dtype, max_batch=1, max_context=max_context)
    manager = KVCacheManager(BlockPool(runner.kv_paged.num_blocks, BLOCK), runner.kv_paged.max_blocks_per_slot)
    params, slots = SlotParams(echo=False), np.zeros(1, dtype=np.int64)
    prompt_ids = np.random.default_rng(1).integers(0, runner.vocab_size - 1, prompt).tolist()
    manager.admit(0, prompt_ids, prompt + steps + 2)
    runner.assign_blocks(0, manager.block_table(0))
    handed = [runner.prefill(0, prompt_ids, params)]
    for _ in range(steps):
        handed.append(int(runner.decode(slots)[0]))
    expected = int(runner.decode(slots)[0])  # the step in flight at preemption: its id is computed again
    ids = prompt_ids + handed
    manager.commit(0, ids[:-1])  # what finished steps wrote
    runner.release(0)
    manager.preempt(0)
    cached = manager.admit(0, ids, len(ids) + 1)
    runner.assign_blocks(0, manager.block_table(0))
    result: dict[str, Any] = {"positions": len(ids), "cached_positions": cached}
    for name, start in (("full", 0), ("cached", cached)):
        times, firsts = [], []
        for _ in range(2):  # the first of each kind pays its first-call costs
            sync(device)
            started = time.perf_counter()
            firsts.append(runner.prefill_chunk(0, ids, params, start, len(ids), start, prompt_len=prompt))
            sync(device)
            times.append(time.perf_counter() - started)
        result[f"resume_{name}_ms"] = round(1e3 * times[-1], 2)
        result[f"same_next_id_{name}"] = all(first == expected for first in firsts)
    del runner
    model.setup_caches(1, 1)
    return result


def hits(model: LlamaLM, device: torch.device, dtype: torch.dtype, streams: int, system: int, tail: int,
         max_context: int) -> dict[str, Any]:
    runner = runner_for(model, device, dtype, max_batch=streams, max_context=max_context)
    rng = np.random.default_rng(2)
    shared = rng.integers(0, runner.vocab_size - 1, system).tolist()
    prompts = [shared + rng.integers(0, runner.vocab_size - 1, tail + s).tolist() for s in range(streams)]
    params, slots = [SlotParams(echo=False)] * streams, list(range(streams))
    result: dict[str, Any] = {"streams": streams, "system_positions": system}
    firsts: dict[str, list[int]] = {}
    for name in ("one_by_one", "together"):
        times = []
        for _ in range(2):  # the first of each kind pays its first-call costs
            manager = KVCacheManager(BlockPool(runner.kv_paged.num_blocks, BLOCK), runner.kv_paged.max_blocks_per_slot)
            manager.admit("earlier", shared + [0], system + 2)  # the request that wrote and cached the system text
            runner.assign_blocks(0, manager.block_table("earlier"))
            runner.prefill(0, shared + [0], params[0])
            manager.commit("earlier", shared)
            runner.release(0)
            manager.release("earlier")
            cached = []
            for slot, prompt in zip(slots, prompts, strict=True):
                cached.append(manager.admit(slot, prompt, len(prompt) + 2))
                runner.assign_blocks(slot, manager.block_table(slot))
            sync(device)
            started = time.perf_counter()
            if name == "together":
                firsts[name] = runner.prefill_batch(slots, prompts, params, cached=cached)
            else:
                firsts[name] = [runner.prefill_chunk(slot, prompt, params[slot], offset, len(prompt), cached=offset)
                                for slot, prompt, offset in zip(slots, prompts, cached, strict=True)]
            sync(device)
            times.append(time.perf_counter() - started)
            for slot in slots:
                runner.release(slot)
                manager.release(slot)
        result[f"{name}_ms"] = round(1e3 * times[-1], 2)
        result["cached_positions"] = cached[0]
    result["same_first_ids"] = float(np.mean(np.array(firsts["together"]) == np.array(firsts["one_by_one"])))
    del runner
    model.setup_caches(1, 1)
    return result


def repeats(model: LlamaLM, device: torch.device, dtype: torch.dtype, streams: int, system: int, tail: int,
            answer: int, max_context: int) -> dict[str, Any]:
    runner = runner_for(model, device, dtype, max_batch=streams, max_context=max_context)
    rng = np.random.default_rng(3)
    shared = rng.integers(0, runner.vocab_size - 1, system).tolist()
    prompts = [shared + rng.integers(0, runner.vocab_size - 1, tail + s).tolist() for s in range(streams)]
    params, slots = [SlotParams(echo=False)] * streams, list(range(streams))
    manager = KVCacheManager(BlockPool(runner.kv_paged.num_blocks, BLOCK), runner.kv_paged.max_blocks_per_slot,
                             copy_block=runner.copy_block)
    for slot, prompt in zip(slots, prompts, strict=True):  # the first time: answered, everything written cached
        manager.admit(slot, prompt, len(prompt) + answer + 1)
        runner.assign_blocks(slot, manager.block_table(slot))
    outputs = [[first] for first in runner.prefill_batch(slots, prompts, params)]
    for _ in range(answer - 1):
        for out, token in zip(outputs, runner.decode(np.array(slots)).tolist(), strict=True):
            out.append(token)
    for slot, prompt in zip(slots, prompts, strict=True):
        manager.commit(slot, prompt + outputs[slot][:-1])
        runner.release(slot)
        manager.release(slot)
    cached = [manager.admit(slot, prompt, len(prompt) + 2) for slot, prompt in zip(slots, prompts, strict=True)]
    result: dict[str, Any] = {"streams": streams, "prompt_positions": [len(prompts[0]), len(prompts[-1])],
                              "cached_positions": [min(cached), max(cached)]}
    firsts: dict[str, list[int]] = {}
    for name, offsets in (("whole_blocks", [c // BLOCK * BLOCK for c in cached]), ("inside_blocks", cached)):
        times = []
        for _ in range(2):  # the first of each kind pays its first-call costs
            for slot in slots:
                runner.assign_blocks(slot, manager.block_table(slot))
            sync(device)
            started = time.perf_counter()
            firsts[name] = runner.prefill_batch(slots, prompts, params, cached=offsets)
            sync(device)
            times.append(time.perf_counter() - started)
            for slot in slots:
                runner.release(slot)
        result[f"{name}_ms"] = round(1e3 * times[-1], 2)
    result["same_first_ids"] = float(np.mean(np.array(firsts["inside_blocks"]) == np.array(firsts["whole_blocks"])))
    del runner
    model.setup_caches(1, 1)
    return result


def pack(model: LlamaLM, device: torch.device, dtype: torch.dtype, prompt: int, short: int, long: int,
         max_context: int) -> dict[str, Any]:
    batch, params = 8, SlotParams(echo=False)
    runner = runner_for(model, device, dtype, max_batch=batch, max_context=max_context)
    manager = KVCacheManager(BlockPool(runner.kv_paged.num_blocks, BLOCK), runner.kv_paged.max_blocks_per_slot,
                             prefix_caching=False)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, runner.vocab_size - 1, prompt).tolist() for _ in range(batch)]

    def start(slot: int, stream: int) -> list[int]:
        manager.admit(slot, prompts[stream], prompt + long + 2)
        runner.assign_blocks(slot, manager.block_table(slot))
        return [runner.prefill(slot, prompts[stream], params)]

    def steps(ids: dict[int, list[int]], count: int) -> float:
        slots = np.array(sorted(ids), dtype=np.int64)
        sync(device)
        started = time.perf_counter()
        for _ in range(count):
            for slot, token in zip(slots, runner.decode(slots), strict=True):
                ids[int(slot)].append(int(token))
        sync(device)
        return 1e3 * (time.perf_counter() - started) / count

    def end(slots: list[int]) -> None:
        for slot in slots:
            runner.release(slot)
            manager.release(slot)

    ids = {slot: start(slot, slot) for slot in range(batch)}
    steps(ids, short)
    end(list(range(0, batch, 2)))
    moved = {slot: ids[slot] for slot in range(1, batch, 2)}
    moved_ms = steps(moved, long - short)
    end(list(moved))
    still = {slot: start(slot, 2 * slot + 1) for slot in range(batch // 2)}
    still_ms = steps(still, long - short)
    end(list(still))
    agree = []
    for slot, got in moved.items():
        alone = {0: start(0, slot)}
        steps(alone, len(got) - 1)
        end([0])
        agree.append(np.mean(np.array(alone[0]) == np.array(got)))
    model.setup_caches(1, 1)  # drop the pool before the next phase
    return {"agreement": round(float(np.mean(agree)), 4), "moved_step_ms": round(moved_ms, 2),
            "unmoved_step_ms": round(still_ms, 2)}


def run(out: Path, smoke: bool) -> dict[str, Any]:
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    config = LLAMA_PRESETS["llama-tiny" if smoke else "llama3-8b"]
    model = LlamaLM.random(config, seed=0, device=device, dtype=dtype)
    batches = (2, 4) if smoke else (64, 256)
    prompt, steps, max_context = (16, 4, 128) if smoke else (256, 32, 1024)
    rows = []
    with torch.inference_mode():
        room = capacity(model, device, dtype, smoke)
        for batch in batches:
            static_rate, static_ids = decode(model, device, dtype, batch, False, prompt, steps, max_context)
            paged_rate, paged_ids = decode(model, device, dtype, batch, True, prompt, steps, max_context)
            agree = float(np.mean([np.mean(np.array(p) == np.array(s)) for p, s in zip(paged_ids, static_ids,
                                                                                       strict=True)]))
            rows.append({"batch": batch, "tokens_per_s_static": round(static_rate, 1),
                         "tokens_per_s_paged": round(paged_rate, 1), "over_static": round(paged_rate / static_rate, 3),
                         "agreement": round(agree, 4)})
        resumed = resume(model, device, dtype, 40, 8, 128) if smoke else resume(model, device, dtype, 1024, 32, 2048)
        packed = pack(model, device, dtype, 16, 3, 10, 128) if smoke else pack(model, device, dtype, 256, 8, 40, 1024)
        hit = hits(model, device, dtype, 4, 40, 5, 128) if smoke else hits(model, device, dtype, 16, 512, 32, 1024)
        repeated = (repeats(model, device, dtype, 4, 40, 5, 12, 128) if smoke
                    else repeats(model, device, dtype, 16, 512, 32, 32, 1024))
    return {"model": f"{'llama-tiny' if smoke else 'llama3-8b'} (random), {str(dtype).removeprefix('torch.')}, eager",
            "block_size": BLOCK, "capacity": room, "decode": rows, "resume": resumed, "pack": packed, "hits": hit,
            "repeats": repeated}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.smoke), indent=1))
