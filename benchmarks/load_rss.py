"""Peak host memory while loading a checkpoint into the native backend, against its size.

    python benchmarks/load_rss.py [--dir /tmp/minercore-1b] [--dtype bfloat16] [--keep] [--transformers]
    python benchmarks/load_rss.py --gguf smollm2-135m-instruct [--dtype float32] [--int4]

Without ``--gguf``: writes a ~1B-parameter random-weight sharded safetensors checkpoint (one tensor in memory at
a time) and loads it. With it: loads that GGUF file (a path or an embedded model's name), dequantized into
``--dtype``, or with ``--int4`` its Q4_0/Q4_1 blocks kept as they are (``quant auto``). Each load runs in a fresh
child process per loader, which reports its peak RSS (``ru_maxrss``) above its RSS after imports. A loader that
holds one full copy of the weights needs about their size; two copies, twice that. The written checkpoint is
deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# ~1.1B parameters, Llama-3.2-1B-like proportions with a smaller vocabulary.
SHAPE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 2048,
         "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
         "tie_word_embeddings": False}

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
loader, directory, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if loader == "native":
    from minercore.models.loading.safetensors import load_llama
elif loader.startswith("gguf"):
    from minercore.models.loading.gguf import load_gguf
else:
    from transformers import AutoModelForCausalLM
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kib()
started = time.perf_counter()
if loader == "native":
    model = load_llama(directory, dtype=dtype)
elif loader.startswith("gguf"):
    model = load_gguf(directory, dtype=dtype, keep_int4=loader == "gguf-int4")
else:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
seconds = time.perf_counter() - started
held = [*model.parameters(), *model.buffers()]
print(json.dumps({"before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "after_kib": rss_kib(), "weight_bytes": sum(t.nbytes for t in held), "seconds": seconds}))
"""


def write_checkpoint(directory: Path, dtype_name: str, shard_bytes: int = 1 << 30) -> int:
    """A sharded checkpoint of SHAPE with N(0, 0.02) weights; returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    from minercore.models.llama import LlamaConfig, LlamaLM

    dtype = getattr(torch, dtype_name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**SHAPE, "torch_dtype": dtype_name}))
    with torch.device("meta"):
        names = {f"model.{n}" if n != "lm_head.weight" else n: p.shape
                 for n, p in LlamaLM(LlamaConfig.from_hf(SHAPE)).checkpoint_views().items()}
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_size, total, index = {}, {}, 0, 0, 0

    def flush() -> None:
        nonlocal shard, shard_size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_size, index = {}, 0, index + 1

    for name, shape in names.items():
        tensor = (torch.ones(shape) if name.endswith("norm.weight")
                  else torch.randn(shape, generator=generator) * 0.02).to(dtype)
        shard[name] = tensor
        shard_size += tensor.nbytes
        total += tensor.nbytes
        if shard_size >= shard_bytes:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def measure(loader: str, directory: Path, dtype_name: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, loader, str(directory), dtype_name], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"loading with {loader} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(loader: str, r: dict, reference_bytes: int, reference: str) -> None:
    gib = 1 << 30
    grown = (r["peak_kib"] - r["before_kib"]) * 1024
    print(f"{loader:>12}: {r['weight_bytes'] / 1e6:.0f} MB of weights in {r['seconds']:.1f} s; peak RSS "
          f"{r['peak_kib'] * 1024 / gib:.2f} GiB, {grown / 1e6:.0f} MB above post-import "
          f"({grown / reference_bytes:.2f}x the {reference}), {(r['after_kib'] - r['before_kib']) * 1024 / 1e6:.0f} MB "
          f"after loading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/minercore-1b")
    parser.add_argument("--gguf", help="a GGUF file or an embedded model's name, instead of a written checkpoint")
    parser.add_argument("--int4", action="store_true", help="with --gguf: keep Q4_0/Q4_1 blocks (quant auto)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for another run")
    parser.add_argument("--transformers", action="store_true", help="also measure AutoModelForCausalLM")
    args = parser.parse_args()
    if args.gguf:
        from minercore.models.loading import embedded

        path = Path(embedded.resolve(args.gguf))
        loader = "gguf-int4" if args.int4 else "gguf"
        print(f"checkpoint: {path}, {path.stat().st_size / 1e6:.1f} MB, into {args.dtype}")
        r = measure(loader, path, args.dtype)
        report(loader, r, r["weight_bytes"], "weights held")
        return
    directory = Path(args.dir)
    try:
        if (directory / "model.safetensors.index.json").exists():
            file_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        else:
            write_checkpoint(directory, args.dtype)
            file_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        print(f"checkpoint: {directory}, {args.dtype}, {file_bytes / (1 << 30):.2f} GiB in safetensors files")
        for loader in ("native", *(("transformers",) if args.transformers else ())):
            report(loader, measure(loader, directory, args.dtype), file_bytes, "file size")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
