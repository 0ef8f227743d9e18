"""The device check's ``gguf`` phase: a GGUF checkpoint loaded by the native core onto the device and decoded.

``run(out, smoke)`` returns the phase's results (``benchmarks/gpu_check.py`` calls it; alone:
``python benchmarks/gpu_gguf.py [--smoke]``). It writes a Llama-shaped GGUF with random Q4_0 matrices (a
1.2B-parameter shape, about 0.7 GB; smoke: a tiny one), then reports:

- ``load_s`` and ``host_peak_rss_growth_mb``: loading it onto the device in bfloat16, tensor by tensor
  (dequantized on the host, copied to the device): the host's peak should grow by about one float32 tensor,
  not by the model;
- ``batch1_tok_s`` and ``batch16_tok_s``: greedy decode of the loaded model, compiled as serving compiles it.

Needs the ``gguf`` package: on a machine without network, carry its wheel in ``.whl/`` (``pip download
--no-deps gguf -d .whl``); without it the phase says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minercore.runtime.build import CUDA_AUTO_GRAPHS
from minercore.runtime.native import ModelRunner
from minercore.runtime.sampling import SlotParams

PROMPT, NEW = 32, 128
SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=32000)
SMOKE_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512)


def write_random_gguf(path: Path, shape: dict[str, int]) -> int:
    """A llama GGUF with random Q4_0 matrices (small fp16 scales) and unit F32 norms; returns its size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    q4 = GGMLQuantizationType.Q4_0
    block, size = GGML_QUANT_SIZES[q4]
    rng = np.random.default_rng(0)
    h, kv = shape["hidden"], shape["kv_heads"] * shape["hidden"] // shape["heads"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(shape["layers"])
    writer.add_context_length(4096)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(shape["ffn"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        data[..., 0:2] = np.array([0.002], dtype=np.float16).view(np.uint8)
        writer.add_tensor(name, data.reshape(rows, -1), raw_dtype=q4)

    matrix("token_embd.weight", shape["vocab"], h)
    writer.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(shape["layers"]):
        for name, rows, cols in (("attn_q", h, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, h),
                                 ("ffn_gate", shape["ffn"], h), ("ffn_up", shape["ffn"], h),
                                 ("ffn_down", h, shape["ffn"])):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.stat().st_size


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def decode_rate(runner: ModelRunner, batch: int, vocab: int) -> float:
    prompts = np.random.default_rng(batch).integers(0, vocab, (batch, PROMPT)).tolist()
    for _ in range(2):  # the first round warms what warmup left
        slots = np.arange(batch)
        runner.prefill_batch(slots.tolist(), prompts, [SlotParams(echo=False)] * batch)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        started = time.perf_counter()
        for _ in range(NEW - 1):
            runner.decode(slots)
        seconds = time.perf_counter() - started
        for slot in slots.tolist():
            runner.release(slot)
    return batch * (NEW - 1) / seconds


def run(out: Path | None, smoke: bool) -> dict[str, Any]:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return {"status": "gguf package not installed: carry its wheel in .whl/ (pip download --no-deps gguf)"}
    from minercore.models.loading.gguf import load_gguf

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SMOKE_SHAPE if smoke else SHAPE
    result: dict[str, Any] = {"shape": shape, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        path = Path(scratch) / "random-q4_0.gguf"
        started = time.perf_counter()
        result["file_mb"] = round(write_random_gguf(path, shape) / 1e6, 1)
        result["write_s"] = round(time.perf_counter() - started, 1)
        before = _peak_rss_mb()
        started = time.perf_counter()
        model = load_gguf(path, device=device, dtype=dtype)
        if cuda:
            torch.cuda.synchronize(device)
        result["load_s"] = round(time.perf_counter() - started, 1)
        result["host_peak_rss_growth_mb"] = round(_peak_rss_mb() - before, 1)
        result["weight_mb"] = round(sum(p.nbytes for p in model.parameters()) / 1e6, 1)
    batches = (1, 4) if smoke else (1, 16)
    graphs = CUDA_AUTO_GRAPHS if cuda else "off"
    runner = ModelRunner(model, max_batch=batches[-1], max_context=PROMPT + NEW + 1, eos_id=0, device=device,
                         dtype=dtype, compile=cuda, kinds=(0,), name="random q4_0 gguf", graphs=graphs,
                         attention="masked" if graphs == "manual" else "bucketed", batch_buckets=batches)
    result["warmup_s"] = round(runner.warmup(), 1)
    for batch in batches:
        result[f"batch{batch}_tok_s"] = round(decode_rate(runner, batch, model.config.vocab_size), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    args = parser.parse_args()
    with torch.inference_mode():
        print(json.dumps(run(None, args.smoke), indent=2))


if __name__ == "__main__":
    main()
