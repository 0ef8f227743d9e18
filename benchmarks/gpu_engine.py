"""Engine overhead on a GPU: the engine's aggregate tokens/s versus the raw decode loop, same workload.

Workload: ``streams`` echo requests of ``prompt`` tokens, each producing ``new`` tokens (length-limited), on
the ``gpt2`` preset. The raw loop prefills every slot and calls ``runner.decode`` for all slots per step,
with nothing else; the engine adds admission, the stream loop, mailboxes and the asyncio hand-off.
Target (H100): engine >= 0.9x raw tokens/s at 64 and 256 streams.

    python benchmarks/gpu_engine.py                   # CUDA, gpt2, streams 64 and 256
    python benchmarks/gpu_engine.py --smoke           # CPU, tiny, small sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import time

import numpy as np
import torch

from minercore.config import EngineOptions, ModelOptions
from minercore.engine import Engine
from minercore.generation import GenerationRequest, SamplingParams
from minercore.runners import build_runner
from minercore.sampling import SlotParams
from minercore.tokenizer import load_tokenizer


def workload(streams: int, prompt_tokens: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 50000, prompt_tokens).tolist() for _ in range(streams)]


def raw_tokens_per_s(runner, prompts: list[list[int]], new: int) -> float:
    params = SlotParams(echo=True)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for slot, prompt in enumerate(prompts):
        runner.prefill(slot, prompt, params)
    slots = np.arange(len(prompts), dtype=np.int64)
    for _ in range(new - 1):
        runner.decode(slots)
    sync()
    elapsed = time.perf_counter() - start
    for slot in range(len(prompts)):
        runner.release(slot)
    return len(prompts) * new / elapsed


async def engine_tokens_per_s(engine: Engine, prompts: list[list[int]], new: int) -> float:
    sampling = SamplingParams(max_new_tokens=new)

    async def one(prompt: list[int]) -> int:
        async for piece in engine.generate(GenerationRequest(prompt_ids=prompt, sampling=sampling)):
            if piece.stats is not None:
                return piece.stats.tokens
        return 0

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    elapsed = time.perf_counter() - start
    assert tokens == len(prompts) * new, tokens
    return tokens / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, small sizes")
    parser.add_argument("--streams", type=int, nargs="+", default=None)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    args = parser.parse_args()
    if args.smoke:
        options = ModelOptions(preset="tiny", device="cpu", max_context=256)
        streams, args.prompt, args.new = args.streams or [4, 16], 32, 32
    else:
        options = ModelOptions(preset="gpt2", device="cuda", max_context=args.prompt + args.new)
        streams = args.streams or [64, 256]
    eos = load_tokenizer().eos_token_id
    print(f"# engine vs raw decode loop — {datetime.date.today()}, {platform.node()}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else 'cpu'}")
    print("| streams | raw tok/s | engine tok/s | engine / raw |\n|---|---|---|---|")
    for n in streams:
        prompts = workload(n, args.prompt)
        runner = build_runner(options, max_batch=n, eos_id=eos)
        runner.warmup()
        raw_tokens_per_s(runner, prompts, args.new)  # first pass: any remaining lazy compilation
        raw = raw_tokens_per_s(runner, prompts, args.new)
        engine = Engine(options, EngineOptions(max_batch=n, max_new_tokens=args.new), runner=runner)
        await engine.start()
        await engine_tokens_per_s(engine, prompts, args.new)
        through_engine = await engine_tokens_per_s(engine, prompts, args.new)
        await engine.shutdown(grace=0)
        print(f"| {n} | {raw:,.0f} | {through_engine:,.0f} | {through_engine / raw:.2f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
