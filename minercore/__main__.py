"""``python -m minercore info`` (environment report as JSON) and ``python -m minercore serve`` (OpenAI API)."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def info(device: str = "auto", dtype: str = "auto", tokenizer: str = "gpt2", quant: str = "auto",
         path: str | None = None, threads: int = 0) -> dict:
    """Everything an operator's bug report needs, without importing bittensor (it is slow and noisy); with
    ``path``, what that checkpoint is (an embedded model's name is fetched)."""
    import torch

    from . import __version__
    from .contract.config import QUANT_CHOICES
    from .models import block_step, int4_rows, q4_i8_rows, q4_rows, q8_i8_rows, q8_rows, step_attention
    from .models.quant import kernel_dtype
    from .runtime import frame_chunks
    from .runtime.device import cpu_has_native_bf16, dtype_name, select, serving_threads, usable_cores
    from .text import streamloop
    from .text.tokenizer import load_tokenizer, tokenizer_for, tokenizer_source

    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    chosen_device, chosen_dtype = select(device, dtype)
    checkpoint = None
    if path:
        from .models.loading import inspect

        checkpoint = inspect(path)
        tokenizer = tokenizer_for(tokenizer, checkpoint.tokenizer)
    tok = load_tokenizer(tokenizer)
    # auto keeps a GGUF file's int4 blocks (models.loading.gguf), and quantizes nothing else.
    kernel_mode = {"none": None, "auto": "int4" if checkpoint is not None and checkpoint.format == "gguf"
                   else None}.get(quant, quant)
    report = {
        "version": __version__,
        "stream_loop": streamloop.IMPLEMENTATION,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": str(chosen_device),
        "dtype": dtype_name(chosen_dtype),
        "cpu_native_bf16": cpu_has_native_bf16(),  # what dtype auto goes by on a CPU
        "usable_cores": usable_cores(),
        "torch_threads": serving_threads(chosen_device, threads),  # what serving on this device sets (--threads)
        "quant": quant,
        # The dtype the quantized layers' kernels compute in (the CPU kernels want bfloat16 activations).
        "quant_kernel_dtype": None if kernel_mode is None else dtype_name(kernel_dtype(kernel_mode, chosen_device,
                                                                                       chosen_dtype)),
        # The compiled CPU kernels (csrc/) this machine runs: each needs its build and AVX2, FMA and F16C (int4_rows
        # AVX-512 BF16 too); without one, its layers take torch's kernels (block_step: one call per product).
        "cpu_kernels": {module.__name__.rsplit(".", 1)[-1]: module.AVAILABLE
                        for module in (q4_rows, q8_rows, q4_i8_rows, q8_i8_rows, int4_rows, step_attention,
                                       block_step)},
        # Whether the int8-row kernels take AVX-512 VNNI's dot products (the same bits as AVX2's, fewer instructions).
        "int8_rows_vnni": q4_i8_rows.VNNI and q8_i8_rows.VNNI,
        # What --model.activations auto gives a GGUF's Q4/Q8_0 layers on this device and dtype.
        "activations": "int8" if q4_i8_rows.usable(chosen_device, chosen_dtype) and step_attention.AVAILABLE
        else "float",
        # Whether frame chunks are kept for reuse here (runtime.frame_chunks; serving installs it).
        "frame_chunks": frame_chunks._cache is not None,
        "bittensor": _package_version("bittensor"),
        "tokenizer": tokenizer_source(tokenizer),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
    }
    if checkpoint is not None:
        report["checkpoint"] = {**checkpoint.as_dict(), "native": checkpoint.native}
    return report


def _add_serve(commands: argparse._SubParsersAction) -> None:
    from .contract.options import add_serve_arguments

    serve = commands.add_parser("serve", help="serve the engine (or an upstream) as an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help='the API\'s model id (default: the --path directory\'s name, else "minercore-<preset>")')
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics here (default: off)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_serve_arguments(serve)  # the core's options, from the table the miner's are built from too


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .contract.options import core_options
    from .serve.server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, engine = core_options(lambda option: getattr(args, option.name))
        serve(model, engine, host=args.host, port=args.port, served_model_name=args.served_model_name,
              metrics_port=args.metrics_port, log_level=args.log_level)
    except ValueError as exc:  # bad options: say so without a traceback
        print(f"minercore: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down cleanly
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minercore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_cmd = commands.add_parser("info", help="print the environment minercore sees as one JSON object")
    info_cmd.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    info_cmd.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    info_cmd.add_argument("--tokenizer", default="gpt2", help="gpt2 (bundled) or a Hugging Face name/directory")
    info_cmd.add_argument("--path", default=None,
                          help="also report this checkpoint: a directory, a .gguf file or smollm2-135m-instruct")
    info_cmd.add_argument("--quant", default="auto", help="auto|none|int8|int4: also report its kernels' dtype")
    info_cmd.add_argument("--threads", type=int, default=0,
                          help="report the torch threads serving would use with this --threads (0: the default)")
    _add_serve(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)

    from .runtime.device import DeviceError

    try:
        report = info(args.device, args.dtype, args.tokenizer, args.quant, args.path, args.threads)
    except (DeviceError, ValueError) as exc:
        print(f"minercore: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
