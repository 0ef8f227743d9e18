"""``python -m minercore info`` (environment report as JSON)."""

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


def info(device: str = "auto", dtype: str = "auto", tokenizer: str = "gpt2") -> dict:
    """Everything an operator's bug report needs, without importing bittensor (it is slow and noisy)."""
    import torch

    from . import __version__, streamloop
    from .device import dtype_name, select
    from .tokenizer import load_tokenizer, tokenizer_source

    chosen_device, chosen_dtype = select(device, dtype)
    tok = load_tokenizer(tokenizer)
    return {
        "version": __version__,
        "stream_loop": streamloop.IMPLEMENTATION,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": str(chosen_device),
        "dtype": dtype_name(chosen_dtype),
        "bittensor": _package_version("bittensor"),
        "tokenizer": tokenizer_source(tokenizer),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minercore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_cmd = commands.add_parser("info", help="print the environment minercore sees as one JSON object")
    info_cmd.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    info_cmd.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    info_cmd.add_argument("--tokenizer", default="gpt2", help="gpt2 (bundled) or a Hugging Face name/directory")
    args = parser.parse_args(argv)

    from .device import DeviceError

    try:
        report = info(args.device, args.dtype, args.tokenizer)
    except (DeviceError, ValueError) as exc:
        print(f"minercore: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
