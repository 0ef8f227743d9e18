"""Options shared by the model runner, the engine, the miner and the server (plain dataclasses, no parsing), and
the names they may take. Torch-free, so command lines can be built (and ``--help`` answered) without loading it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_CONTEXT = 4096
CACHE_ENV = "MINERCORE_CACHE_DIR"


def cache_dir() -> Path:
    """Where minercore keeps what it fetches or derives once (the embedded model, converted tokenizers)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minercore")


# The choices, written once: checked here, offered by both command lines (minercore.options). presets.py and
# runtime/device.py's DTYPES hold what these names stand for (tests check that they agree).
# native: the compiled core (GPT-2 and the Llama family); simulated: its name before the Llama family joined.
BACKENDS = ("native", "simulated", "hf", "upstream")
NATIVE_BACKENDS = ("native", "simulated")
MODES = ("echo", "generate")
COMPILE_CHOICES = ("auto", "on", "blocks", "off")
GRAPH_CHOICES = ("auto", "torch", "manual", "off")  # runtime/native.py says what each means
ATTENTION_CHOICES = ("auto", "bucketed", "masked", "flex")
# models/presets.py's: GPT-2's, then the Llama family's (random weights; llama3-8b is Llama-3-8B's shape,
# for GPU benchmarks).
GPT2_PRESET_NAMES = ("tiny", "gpt2", "gpt2-medium")
LLAMA_PRESET_NAMES = ("llama-tiny", "llama3-8b")
PRESET_NAMES = (*GPT2_PRESET_NAMES, *LLAMA_PRESET_NAMES)
# config.json model_type values the native backend implements; a checkpoint of another type goes to hf.
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
NATIVE_MODEL_TYPES = ("gpt2", *LLAMA_MODEL_TYPES)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Weight-only quantization (models/quant.py): auto (a GGUF file's own: its Q4_0/Q4_1 blocks kept as int4, the
# rest dequantized; none for anything else) | none | int8 (per output channel) | int4 (in groups of one of
# QUANT_GROUPS inputs: the sizes both int4 kernels take).
QUANT_CHOICES = ("auto", "none", "int8", "int4")
QUANT_GROUPS = (32, 64, 128, 256)
# The rows a GGUF's Q4_0/Q4_1 and Q8_0 layers kept as blocks multiply (models/q4_i8_rows.py, q8_i8_rows.py): float
# (exact products) | int8 (quantized per block of 32, as llama.cpp does: faster, rounded; a float32 model on a CPU
# with AVX2) | auto (int8 where those kernels and the step attention kernel serve, which keeps a stream's text
# independent of its batch and of speculation; float elsewhere).
ACTIVATION_CHOICES = ("auto", "float", "int8")
# Speculative decoding (engine/speculation.py): off | ngram (drafts looked up in each stream's own prompt and
# output, checked in one forward; echo's draft is its prompt).
SPECULATIVE_CHOICES = ("off", "ngram")
KV_CACHE_CHOICES = ("static", "paged")
MAX_SPECULATIVE_TOKENS = 16


def served_model_name(model: ModelOptions) -> str:
    """The API's model id: the checkpoint's name (an embedded model's, a directory's, a GGUF file's without its
    suffix), else ``minercore-<preset>``."""
    if model.path:
        name = model.path.rstrip("/").rsplit("/", 1)[-1]
        return name.removesuffix(".gguf") or model.path
    return f"minercore-{model.preset}"


def context_for(options_max_context: int | None, model_positions: int | None) -> int:
    """The KV cache length: as asked, or the model's own positions capped at DEFAULT_MAX_CONTEXT."""
    if options_max_context is not None:
        return options_max_context
    return min(DEFAULT_MAX_CONTEXT, model_positions or DEFAULT_MAX_CONTEXT)


@dataclass
class ModelOptions:
    # native (the compiled core: GPT-2 and the Llama family; alias simulated) | hf (any AutoModelForCausalLM
    # directory, eager) | upstream (an OpenAI-compatible server)
    backend: str = "native"
    preset: str = "tiny"  # native, without path: tiny | gpt2 | gpt2-medium | llama-tiny | llama3-8b (random weights)
    mode: str = "echo"  # echo: greedy output reproduces the prompt | generate: the model's own sampling
    weights: str | None = None  # simulated: GPT-2-family Hugging Face checkpoint directory
    path: str | None = None  # a Hugging Face checkpoint directory: native if its model_type has an implementation
    tokenizer: str = "gpt2"  # gpt2 (bundled) or a Hugging Face tokenizer name/directory
    device: str = "auto"
    dtype: str = "auto"
    # torch's intra-op threads on a CPU; 0: every usable core (runtime.device.cpu_threads). Other devices keep
    # torch's default.
    threads: int = 0
    quant: str = "auto"  # native: weight-only quantization of the linear layers, auto | none | int8 | int4
    quant_group: int = 32  # int4: inputs per (scale, zero) group, one of QUANT_GROUPS
    activations: str = "auto"  # native: what a GGUF's layers kept as blocks multiply, auto | float | int8
    compile: str = "auto"  # auto | on | off
    graphs: str = "auto"  # native, CUDA: torch (torch.compile's CUDA graphs) | manual (captured by hand) | off
    attention: str = "auto"  # native: bucketed (power-of-two context buckets) | masked | flex (row lengths)
    max_context: int | None = None  # None: the model's own context, at most DEFAULT_MAX_CONTEXT
    seed: int = 0
    upstream_url: str | None = None  # upstream: base URL of the OpenAI-compatible API, e.g. http://gpu-box:8000/v1
    upstream_model: str | None = None  # upstream: model name to request; None asks the upstream's /models
    upstream_api_key_env: str | None = None  # upstream: name of the environment variable holding the API key

    def __post_init__(self) -> None:
        # The one place the choices are checked: every runner and backend may rely on them.
        for name, choices in (("backend", BACKENDS), ("mode", MODES), ("compile", COMPILE_CHOICES),
                              ("graphs", GRAPH_CHOICES), ("attention", ATTENTION_CHOICES),
                              ("activations", ACTIVATION_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {', '.join(PRESET_NAMES)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: every usable core), got {self.threads!r}")
        if self.quant not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")
        if self.quant_group not in QUANT_GROUPS:
            raise ValueError(f"quant_group must be one of {', '.join(map(str, QUANT_GROUPS))} (the sizes the int4 "
                             f"kernels take), got {self.quant_group!r}")
        if self.quant not in ("auto", "none") and self.backend not in NATIVE_BACKENDS:
            raise ValueError(f"quant {self.quant} needs the native backend: backend {self.backend} runs "
                             f"{'transformers' if self.backend == 'hf' else 'another server'}'s own weights "
                             f"(use quant none)")
        if self.activations == "int8" and self.backend not in NATIVE_BACKENDS:
            raise ValueError(f"activations {self.activations} needs the native backend (backend {self.backend})")


@dataclass
class EngineOptions:
    max_batch: int = 0  # 0: 256 on CUDA with the paged cache, else 64 (runtime.device.auto_max_batch)
    max_queue: int = 256
    flush_tokens: int = 16  # after a stream's first text, flush once this many tokens are pending...
    flush_ms: float = 50.0  # ...or this long after its last flush
    max_new_tokens: int = 4096  # ceiling on any request's max_new_tokens
    max_prompt_chars: int = 1_000_000  # larger prompts are rejected before tokenization
    # Prompt tokens prefilled per engine step: longer prompts are prefilled in chunks between decode steps, so
    # a burst of long prompts delays running streams by at most about this many tokens of prefill per token.
    prefill_tokens: int = 2048
    overlap: bool = True  # launch decode step N+1 before detokenizing and posting step N
    speculative: str = "ngram"  # off | ngram: several tokens per forward where a stream repeats what it has seen
    speculative_tokens: int = 8  # drafts checked per forward (each forward then yields 1 to this + 1 tokens)
    # paged: a pool of blocks handed out as requests need them; static: every slot holds max_context positions
    kv_cache: str = "paged"
    kv_block_size: int = 16  # positions per block of the paged cache
    # The paged pool's size; 0: on CUDA the memory free after the weights down to leaving (1 - kv_memory_fraction)
    # of the device's unused, on a CPU 1 GiB; either way at most every slot's full context.
    kv_cache_gb: float = 0.0
    kv_memory_fraction: float = 0.9
    prefix_cache: bool = True  # paged: a prompt's leading full blocks seen before are reused, not recomputed

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHE_CHOICES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {self.kv_cache!r}")
        if not 1 <= self.kv_block_size <= 1024:
            raise ValueError(f"kv_block_size must be in [1, 1024], got {self.kv_block_size!r}")
        if self.max_batch < 0:
            raise ValueError(f"max_batch must be >= 0 (0: by device), got {self.max_batch!r}")
        if not self.kv_cache_gb >= 0:  # also refuses NaN
            raise ValueError(f"kv_cache_gb must be >= 0 (0: sized by device), got {self.kv_cache_gb!r}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction!r}")
        if self.speculative not in SPECULATIVE_CHOICES:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_CHOICES)}, "
                             f"got {self.speculative!r}")
        if not 1 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.speculative_tokens!r}")
