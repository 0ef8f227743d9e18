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


def _add_serve(commands: argparse._SubParsersAction) -> None:
    from .config import EngineOptions, ModelOptions

    model, engine = ModelOptions(), EngineOptions()
    serve = commands.add_parser("serve", help="serve the engine (or an upstream) as an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help='the API\'s model id (default: the --path directory\'s name, else "minercore-<preset>")')
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics here (default: off)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--backend", default=model.backend, choices=("native", "simulated", "hf", "upstream"),
                       help="native: the compiled core (GPT-2, Llama family; simulated is an alias); hf: transformers")
    serve.add_argument("--preset", default=model.preset,
                       help="native without --path, random weights: tiny | gpt2 | gpt2-medium | llama-tiny | llama3-8b")
    serve.add_argument("--mode", default=model.mode, choices=("echo", "generate"))
    serve.add_argument("--weights", default=model.weights, help="native: GPT-2-family checkpoint directory")
    serve.add_argument("--path", default=model.path,
                       help="Hugging Face checkpoint directory: native for gpt2/llama/mistral/qwen2/qwen3, else hf")
    serve.add_argument("--tokenizer", default=model.tokenizer, help="gpt2 (bundled) or a Hugging Face name/directory")
    serve.add_argument("--device", default=model.device, help="auto|cpu|cuda|cuda:N|mps")
    serve.add_argument("--dtype", default=model.dtype, help="auto|float32|bfloat16|float16")
    serve.add_argument("--compile", default=model.compile, choices=("auto", "on", "off"))
    serve.add_argument("--max-context", type=int, default=model.max_context)
    serve.add_argument("--seed", type=int, default=model.seed)
    serve.add_argument("--upstream-url", default=None, help="upstream: base URL, e.g. http://gpu-box:8000/v1")
    serve.add_argument("--upstream-model", default=None, help="upstream: model name (default: its first model)")
    serve.add_argument("--upstream-api-key-env", default=None, help="upstream: env var holding the API key")
    serve.add_argument("--max-batch", type=int, default=engine.max_batch, help="concurrent streams")
    serve.add_argument("--max-queue", type=int, default=engine.max_queue, help="requests waiting beyond those")
    serve.add_argument("--flush-tokens", type=int, default=engine.flush_tokens)
    serve.add_argument("--flush-ms", type=float, default=engine.flush_ms)
    serve.add_argument("--max-new-tokens", type=int, default=engine.max_new_tokens, help="ceiling per request")


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .config import EngineOptions, ModelOptions
    from .server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = ModelOptions(backend=args.backend, preset=args.preset, mode=args.mode, weights=args.weights,
                         path=args.path, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                         compile=args.compile, max_context=args.max_context, seed=args.seed,
                         upstream_url=args.upstream_url, upstream_model=args.upstream_model,
                         upstream_api_key_env=args.upstream_api_key_env)
    engine = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue, flush_tokens=args.flush_tokens,
                           flush_ms=args.flush_ms, max_new_tokens=args.max_new_tokens)
    try:
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
    _add_serve(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)

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
