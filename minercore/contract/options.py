"""The one table of the core's options (``ModelOptions`` and ``EngineOptions`` fields): name, type and bounds,
choices, default and help. Both command lines are built from it: ``python -m minercore serve`` spells an option
``--max-batch``, the miner ``--engine.max_batch``. A new core option is added here once, and both get it.

Torch-free (the miner's ``--help`` must not load torch).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import (
    ACTIVATION_CHOICES,
    ATTENTION_CHOICES,
    BACKENDS,
    COMPILE_CHOICES,
    DTYPE_NAMES,
    GRAPH_CHOICES,
    KV_CACHE_CHOICES,
    MODES,
    PRESET_NAMES,
    QUANT_CHOICES,
    SPECULATIVE_CHOICES,
    EngineOptions,
    ModelOptions,
)


# ---- argument types with their bounds (also used by the miner's own options) ------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


@dataclass(frozen=True)
class Option:
    """One field of ``section``. ``group`` is the miner's dotted prefix ("" for a bare ``--name``); ``help`` may
    name other options as ``{field}``, filled in with each command line's spelling."""

    name: str
    section: type[ModelOptions] | type[EngineOptions]
    group: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def default(self) -> Any:
        return getattr(self.section(), self.name)

    @property
    def serve_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def miner_dest(self) -> str:
        return f"{self.group}.{self.name}" if self.group else self.name

    @property
    def miner_flag(self) -> str:
        return "--" + self.miner_dest


OPTIONS: tuple[Option, ...] = (
    Option("backend", ModelOptions, "model", choices=BACKENDS,
           help="native: the compiled core in this process (GPT-2 and the Llama family: a {path} checkpoint or a "
                "{preset}; simulated is its old name); hf: any Hugging Face causal LM directory ({path}), eager; "
                "upstream: an OpenAI-compatible server ({upstream_url})."),
    Option("preset", ModelOptions, "model", choices=PRESET_NAMES,
           help="Native model with random weights when no {path} or {weights} is given (llama3-8b: Llama-3-8B's "
                "shape, for GPU benchmarks)."),
    Option("mode", ModelOptions, "model", choices=MODES,
           help="echo: answer the prompt (the last message) byte for byte (the seed's behaviour); generate: the "
                "model's own sampling."),
    Option("weights", ModelOptions, "model",
           help="Native backend: a GPT-2-family checkpoint directory (default: random weights from "
                "{seed})."),
    Option("path", ModelOptions, "model",
           help="A Hugging Face checkpoint directory: served natively when its model_type is gpt2, llama, "
                "mistral, qwen2 or qwen3, else by the hf backend (logged)."),
    Option("tokenizer", ModelOptions, "model",
           help="gpt2 (bundled, offline) or a Hugging Face tokenizer name or directory; with {path}, that "
                "directory's own tokenizer unless another is named."),
    Option("compile", ModelOptions, "model", choices=COMPILE_CHOICES,
           help="torch.compile the decode step. on compiles whole steps (the fastest steps; minutes of warm-up "
                "on a CPU); blocks compiles one transformer block, which every layer shares, and the samplers "
                "(warm-up in about a minute cold and seconds with torch's caches warm; a few ms more a step "
                "at batch 1 on a CPU). auto: blocks on a CPU, on with CUDA graphs on CUDA."),
    Option("graphs", ModelOptions, "model", choices=GRAPH_CHOICES,
           help="Native backend on CUDA: how the compiled decode step is replayed. torch: torch.compile's own "
                "CUDA graphs; manual: one CUDA graph per batch bucket, captured by hand around a static compile; "
                "off: none. auto: torch until a device run shows manual faster."),
    Option("attention", ModelOptions, "model", choices=ATTENTION_CHOICES,
           help="Native backend: the keys a decode step reads. bucketed: a power-of-two prefix holding every "
                "row; masked: the whole context, masked per row; flex: FlexAttention over each row's own length. "
                "auto: masked with graphs manual, else bucketed."),
    Option("max_context", ModelOptions, "model", type=positive_int,
           help="Longest prompt plus answer, in tokens (default: the model's own context, at most 4096). Echo "
                "answers prompts of up to (max_context - 1) / 2 tokens in full."),
    Option("seed", ModelOptions, "model", type=int, help="Seed of the native model's random weights."),
    Option("upstream_url", ModelOptions, "model",
           help="upstream backend: base URL of the OpenAI-compatible API, e.g. http://gpu-box:8000/v1."),
    Option("upstream_model", ModelOptions, "model",
           help="upstream backend: the model name to request (default: the upstream's first model)."),
    Option("upstream_api_key_env", ModelOptions, "model",
           help="upstream backend: name of the environment variable holding the API key."),
    Option("quant", ModelOptions, "model", choices=QUANT_CHOICES,
           help="Native backend: weight-only quantization of the linear layers (the head's own copy when tied; "
                "the embedding, the KV cache and biases stay in {dtype}). auto: a GGUF file's own (its Q4_0 and "
                "Q4_1 matrices kept as int4 blocks, not re-quantized; the rest dequantized), none otherwise. "
                "int8: per output channel; int4: in groups of {quant_group} inputs (a GGUF's Q4_0/Q4_1 blocks "
                "kept as they are at group 32). Layers a kernel cannot take stay unquantized (logged)."),
    Option("quant_group", ModelOptions, "model", type=positive_int,
           help="int4: inputs per (scale, zero) group: 32, 64, 128 or 256."),
    Option("activations", ModelOptions, "model", choices=ACTIVATION_CHOICES,
           help="Native backend, a GGUF's Q4_0/Q4_1 and Q8_0 layers kept as blocks (quant auto): float multiplies "
                "them by float rows, exactly; int8 by rows quantized to int8 per block of 32, as llama.cpp does: "
                "1.4-1.7x faster decode steps on an AVX2 CPU (float32 models), results rounded as the rows are; "
                "auto: int8 where its kernels serve, float elsewhere."),
    Option("device", ModelOptions, "", help="auto | cpu | cuda | cuda:N | mps."),
    Option("dtype", ModelOptions, "", choices=("auto", *DTYPE_NAMES),
           help="auto: bfloat16 on recent CUDA GPUs, float16 on older ones, bfloat16 on a CPU that computes it "
                "natively (AVX-512 BF16 or AMX), float32 elsewhere."),
    Option("threads", ModelOptions, "model", type=non_negative_int,
           help="On a CPU: torch's intra-op threads. 0: every usable core (its CPU affinity), as llama.cpp "
                "serves; the startup log and 'minercore info' say how many. Other devices keep torch's own "
                "default unless this is given."),
    Option("max_batch", EngineOptions, "engine", type=non_negative_int,
           help="Streams decoded together in one batch (0: 256 on CUDA with the paged KV cache, else 64)."),
    Option("max_queue", EngineOptions, "engine", type=non_negative_int,
           help="Requests that may wait for a free slot; past it requests are refused at once as overloaded."),
    Option("max_new_tokens", EngineOptions, "engine", type=positive_int,
           help="Longest answer, in tokens (the ceiling on any request's own limit)."),
    Option("max_prompt_chars", EngineOptions, "engine", type=positive_int,
           help="Longer prompts get 400 before they are tokenized."),
    Option("prefill_tokens", EngineOptions, "engine", type=positive_int,
           help="Prompt tokens prefilled per engine step; longer prompts are prefilled in chunks between decode "
                "steps, so running streams keep flowing while long prompts arrive."),
    Option("overlap", EngineOptions, "engine", type=on_off,
           help="on: launch decode step N+1 before step N is detokenized and sent, so the device never waits for "
                "the host (on or off)."),
    Option("speculative", EngineOptions, "engine", choices=SPECULATIVE_CHOICES,
           help="Native backend: ngram drafts up to {speculative_tokens} tokens per stream from the text it has "
                "already seen (its prompt and its own answer; in echo mode, the prompt) and checks them in one "
                "forward, keeping exactly the tokens plain decoding would give; a stream whose drafts keep "
                "failing stops drafting for a while. off: one token per forward."),
    Option("speculative_tokens", EngineOptions, "engine", type=positive_int,
           help="Drafts checked per forward with {speculative} ngram (1-16)."),
    Option("kv_cache", EngineOptions, "engine", choices=KV_CACHE_CHOICES,
           help="Native backend: paged keeps keys and values in a pool of {kv_block_size}-position blocks "
                "({kv_cache_gb}): a request is admitted when its prompt's blocks are free, takes more as its "
                "answer grows and returns them when it ends; when the pool runs out the most recently admitted "
                "stream is preempted and later resumed exactly where it stopped. static gives every slot "
                "max_context positions up front (the reference the paged cache is tested against)."),
    Option("kv_block_size", EngineOptions, "engine", type=positive_int,
           help="Positions per block of the {kv_cache} paged pool."),
    Option("kv_cache_gb", EngineOptions, "engine", type=non_negative_float,
           help="GiB of keys and values in the {kv_cache} paged pool. 0: on CUDA what is free once the weights "
                "are loaded, up to {kv_memory_fraction} of the device's memory in use; 1 GiB elsewhere; either way "
                "at most what every slot at its full context needs."),
    Option("kv_memory_fraction", EngineOptions, "engine", type=fraction,
           help="CUDA, with {kv_cache_gb} 0: the share of the device's memory minercore may fill, weights and "
                "KV pool together (as vLLM's gpu_memory_utilization); the rest is left for activations and "
                "CUDA graphs."),
    Option("prefix_cache", EngineOptions, "engine", type=on_off,
           help="With {kv_cache} paged: full blocks of prompts stay cached after their request ends (evicted "
                "least recently used when the pool needs room), and a prompt starting with them prefills only "
                "the rest (on or off)."),
    Option("flush_tokens", EngineOptions, "stream", type=positive_int,
           help="After a stream's first text, send once this many tokens are pending..."),
    Option("flush_ms", EngineOptions, "stream", type=non_negative_float,
           help="...or this many milliseconds after the stream's last send."),
)


def _add(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, dest: str, option: Option,
         flags: Mapping[str, str]) -> None:
    parser.add_argument(flag, dest=dest, type=option.type, choices=option.choices, default=option.default,
                        help=option.help.format_map(flags))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option as ``--max-batch`` (dest ``max_batch``)."""
    flags = {option.name: option.serve_flag for option in OPTIONS}
    for option in OPTIONS:
        _add(parser, option.serve_flag, option.name, option, flags)


def add_miner_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Every option as ``--engine.max_batch`` (dest ``engine.max_batch``), in argument groups named by section
    ("model", "engine", "stream"); returns the groups so the miner can add its own options to them."""
    flags = {option.name: option.miner_flag for option in OPTIONS}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        title = option.group or "model"
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        _add(groups[title], option.miner_flag, option.miner_dest, option, flags)
    return groups


def core_options(value: Callable[[Option], Any]) -> tuple[ModelOptions, EngineOptions]:
    """The dataclasses from each option's parsed value (``value(option)``)."""
    fields = {section: {option.name: value(option) for option in OPTIONS if option.section is section}
              for section in (ModelOptions, EngineOptions)}
    return ModelOptions(**fields[ModelOptions]), EngineOptions(**fields[EngineOptions])

