"""Building a runner from ``ModelOptions``: which runner a backend and a checkpoint get (``build_runner``), and
the native runner's construction (the model, its quantization, and the compile, graph and attention choices
``auto`` resolves to on this device)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..contract.config import NATIVE_BACKENDS, NATIVE_MODEL_TYPES, ModelOptions, context_for
from ..models import q4_i8_rows, step_attention
from ..models.base import CachedLM
from ..models.loading import inspect as inspect_checkpoint
from ..models.loading import load_native
from ..models.loading.safetensors import load_gpt2
from ..models.presets import build_preset
from ..models.quant import int8_rows, quantize
from .device import configure_threads, select, select_device
from .frame_chunks import keep_frame_chunks
from .native import ModelRunner
from .protocol import Runner
from .sampling import GREEDY, KINDS

log = logging.getLogger(__name__)


def build_runner(options: ModelOptions, *, max_batch: int, eos_id: int, stop_ids: Sequence[int] = (),
                 speculative_tokens: int = 0, kv_block_size: int = 0, kv_cache_bytes: int = 0,
                 kv_memory_fraction: float = 0.9) -> Runner:
    """The runner for ``options.backend``: ``native`` (alias ``simulated``: GPT-2 and the Llama family, compiled,
    one batched decode loop) or ``hf`` (any causal LM directory, eager). ``stop_ids`` (default: ``eos_id``) are
    the ids a row's ``SlotParams.min_new`` keeps from being sampled; ``speculative_tokens`` gives a native runner
    verify steps of that many drafts (hf has none: its engine decodes one token a step), ``kv_block_size`` > 0
    a paged KV pool of ``kv_cache_bytes`` (0: sized by ``device.auto_kv_pool_bytes`` with ``kv_memory_fraction``;
    hf keeps transformers' own cache). A native ``path`` of an
    architecture without a native implementation goes to hf, with a log line."""
    # Before any model work: torch's thread pool takes its size when a thread first runs a parallel op.
    configure_threads(select_device(options.device), options.threads)
    keep_frame_chunks()
    backend = options.backend
    if backend in NATIVE_BACKENDS and options.path:
        checkpoint = inspect_checkpoint(options.path)
        if not checkpoint.native:
            log.warning("%s: %r has no native implementation (a %s checkpoint; native serves %s); using the hf "
                        "backend (eager, one forward per stream per step)", options.path, checkpoint.architecture,
                        checkpoint.format, ", ".join(NATIVE_MODEL_TYPES))
            backend = "hf"
    if backend in NATIVE_BACKENDS:
        return build_model_runner(options, max_batch=max_batch, eos_id=eos_id, stop_ids=stop_ids,
                                  speculative_tokens=speculative_tokens, kv_block_size=kv_block_size,
                                  kv_cache_bytes=kv_cache_bytes, kv_memory_fraction=kv_memory_fraction)
    if backend == "hf":
        from .hf import HFRunner

        return HFRunner.from_options(options, max_batch=max_batch, eos_id=eos_id, stop_ids=stop_ids)
    raise ValueError(f"backend must be native (or simulated) or hf, got {options.backend!r}")


# compile=auto on CPU: compiled. It decodes faster than eager at every batch size measured, and sampling gains
# most (the noise hash fuses into one loop; benchmarks/bench_decode.py, RESULTS.md). The price is warm-up: two
# graphs per sampling kind.
CPU_AUTO_COMPILE = True


def _resolve_compile(option: str, device: torch.device) -> bool:
    """``option`` is one of config.COMPILE_CHOICES (ModelOptions checks it)."""
    if option != "auto":
        return option in ("on", "blocks")
    return device.type == "cuda" or (device.type == "cpu" and CPU_AUTO_COMPILE)


# graphs=auto: torch.compile's own CUDA graphs on CUDA until a device run shows the hand-captured ones faster
# (benchmarks/gpu_check.py measures both side by side); on CPU no graphs exist, and the dynamic compile
# (two graphs per kind) beats the static one's per-shape compiles at warmup for the same steady speed.
CUDA_AUTO_GRAPHS = "torch"


# compile=auto on CPU compiles blocks, not whole steps: the forwards with one nested block region and the samplers
# apart start in about a minute cold and 13 s warm on SmolLM2 with the serving defaults here, where whole steps
# took 14 and 2.3 minutes (benchmarks/bench_startup.py, RESULTS.md). On CUDA whole steps, which CUDA graphs replay.
CPU_AUTO_BLOCKS = True


def _resolve_blocks(option: str, device: torch.device) -> bool:
    """Whether a compiled runner compiles blocks (``option`` is one of config.COMPILE_CHOICES)."""
    return option == "blocks" or (option == "auto" and device.type == "cpu" and CPU_AUTO_BLOCKS)


def _resolve_graphs(option: str, device: torch.device, compile: str) -> str:
    """``option`` is one of config.GRAPH_CHOICES, ``compile`` of config.COMPILE_CHOICES (ModelOptions checks
    them). Compiled blocks have no graphs: CUDA graphs replay whole steps."""
    if option == "auto":
        whole = _resolve_compile(compile, device) and not _resolve_blocks(compile, device)
        return CUDA_AUTO_GRAPHS if device.type == "cuda" and whole else "off"
    return option


def _resolve_attention(option: str, graphs: str) -> str:
    """``option`` is one of config.ATTENTION_CHOICES (ModelOptions checks it)."""
    if option == "auto":
        # Hand-captured steps compile once per shape: one context shape keeps that to one per batch bucket.
        return "masked" if graphs == "manual" else "bucketed"
    return option


def _sampling_kinds(mode: str) -> tuple[int, ...]:
    """The sampling kinds warmup prepares: echo rows are always greedy."""
    return (GREEDY,) if mode == "echo" else KINDS


def _native_model(options: ModelOptions, device: torch.device, dtype: torch.dtype) -> tuple[CachedLM, str]:
    """The model ``options`` name: a checkpoint (``path``: a GPT-2 or Llama-family directory, a GGUF file or an
    embedded model's name; ``weights``: GPT-2), else a random-weight preset."""
    if options.path:
        checkpoint = inspect_checkpoint(options.path)
        # A GGUF file's 4-bit blocks go into the int4 kernel as they are (auto, or int4 at the files' group 32);
        # its Q8_0 blocks into q8_rows under auto, where that serves (a float32 model on a CPU).
        keep_int4 = options.quant == "auto" or (options.quant == "int4" and options.quant_group == 32)
        model = load_native(checkpoint, device=device, dtype=dtype, keep_int4=keep_int4,
                            keep_q8=options.quant == "auto")
        return model, f"{options.path} [{checkpoint.describe()}]"
    if options.weights:
        return load_gpt2(options.weights), options.weights
    name = f"{options.preset} (seed {options.seed})"
    return build_preset(options.preset, options.seed, device, dtype), name


def _activation_rows(model: torch.nn.Module, activations: str, device: torch.device, dtype: torch.dtype) -> None:
    """What the model's Q4 and Q8_0 layers multiply (``activations``, one of config.ACTIVATION_CHOICES): int8 rows
    where asked and the kernels serve (logged if not), and under auto where they and the step attention kernel,
    which keeps a stream's text the same in any batch, serve."""
    if activations == "auto":
        if q4_i8_rows.usable(device, dtype) and step_attention.AVAILABLE:
            int8_rows(model)  # a model with no layers kept as blocks is left as it is
    elif activations == "int8":
        if not q4_i8_rows.usable(device, dtype):
            log.warning("activations int8: no int8-row kernels for a %s model on %s (they need float32 on a CPU with "
                        "AVX2, FMA and F16C); the layers multiply %s rows", dtype, device, dtype)
        elif not int8_rows(model):
            log.warning("activations int8: the model has no layers kept as blocks (a GGUF's Q4_0/Q4_1 and Q8_0 "
                        "under quant auto); nothing changed")


def build_model_runner(options: ModelOptions, *, max_batch: int, eos_id: int,
                       stop_ids: Sequence[int] = (), speculative_tokens: int = 0, kv_block_size: int = 0,
                       kv_cache_bytes: int = 0, kv_memory_fraction: float = 0.9) -> ModelRunner:
    keep_frame_chunks()  # the Python around each custom op of a step must not map memory per call
    device, dtype = select(options.device, options.dtype)
    model, name = _native_model(options, device, dtype)
    model = quantize(model, options.quant, options.quant_group, device=device, dtype=dtype)
    _activation_rows(model, options.activations, device, dtype)
    max_context = context_for(options.max_context, model.max_positions)
    compile = _resolve_compile(options.compile, device)
    graphs = _resolve_graphs(options.graphs, device, options.compile)
    return ModelRunner(model, max_batch=max_batch, max_context=max_context, eos_id=eos_id, stop_ids=stop_ids,
                       device=device, dtype=dtype, compile=compile, kinds=_sampling_kinds(options.mode), name=name,
                       graphs=graphs, attention=_resolve_attention(options.attention, graphs),
                       compile_blocks=compile and _resolve_blocks(options.compile, device),
                       speculative_tokens=speculative_tokens, kv_block_size=kv_block_size,
                       kv_cache_bytes=kv_cache_bytes, kv_memory_fraction=kv_memory_fraction)
