"""What is at a checkpoint path, decided once (``inspect``), and loading it into a native model (``load_native``).

A path is a Hugging Face directory (config.json; safetensors or other weights), a ``.gguf`` file (or a directory
holding exactly one and no config.json), or the name of an embedded model (``embedded.EMBEDDED``), which is
fetched into the cache on first use. Every part of minercore that needs to know what a checkpoint is — which
backend serves it, its tokenizer, its stop ids, what ``/health`` reports — asks ``inspect``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...contract.config import NATIVE_MODEL_TYPES
from .embedded import resolve

FORMATS = ("safetensors", "gguf", "transformers")  # transformers: weights only transformers reads (.bin, ...)


@dataclass(frozen=True)
class Checkpoint:
    path: str  # local: a directory or a .gguf file
    format: str  # one of FORMATS
    architecture: str | None  # config.json's model_type or GGUF's general.architecture
    quantization: str  # "none", or the GGUF type most of its matrices are stored in (Q4_1, Q8_0, F16, ...)
    eos_ids: tuple[int, ...]  # stop ids the checkpoint's own configs name (the tokenizer's EOS comes first)
    tokenizer: str | None  # where its tokenizer is (the directory, or the .gguf file); None: it has none
    max_positions: int | None
    config: dict[str, Any]  # config.json ({} for GGUF)

    @property
    def native(self) -> bool:
        """Whether the native core serves it (else the hf backend, through transformers)."""
        if self.format == "gguf":
            from .gguf import ARCHITECTURES

            return self.architecture in ARCHITECTURES
        if self.architecture == "gpt2":
            return True
        return self.format == "safetensors" and self.architecture in NATIVE_MODEL_TYPES

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f" {self.quantization}"
        return f"{self.architecture} {self.format}{quant}"

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "architecture": self.architecture,
                "quantization": self.quantization}


class CheckpointError(ValueError):
    """Nothing servable at the path; the message says what is there."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def inspect(path: str) -> Checkpoint:
    """The checkpoint at ``path`` (an embedded model's name is fetched first); CheckpointError if none is."""
    local = Path(resolve(path))
    if local.is_dir() and not (local / "config.json").is_file():
        ggufs = sorted(local.glob("*.gguf"))
        if len(ggufs) == 1:
            local = ggufs[0]
        elif ggufs:
            raise CheckpointError(f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); name one")
    if not local.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    stat = local.stat()
    return _inspect(str(local), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _inspect(path: str, mtime_ns: int, size: int) -> Checkpoint:  # keyed by the file's identity
    local = Path(path)
    if local.is_file():
        if local.suffix != ".gguf":
            raise CheckpointError(f"{path}: a file must be a .gguf checkpoint; a Hugging Face checkpoint is the "
                                  f"directory holding config.json")
        from .gguf import facts

        found = facts(local)
        return Checkpoint(path=path, format="gguf", architecture=found.architecture,
                          quantization=found.quantization, eos_ids=found.eos_ids,
                          tokenizer=path if found.has_tokenizer else None,
                          max_positions=found.max_positions, config={})
    if not (local / "config.json").is_file():
        raise CheckpointError(f"{path} holds neither config.json nor a .gguf file")
    from .safetensors import has_safetensors, read_config

    config = read_config(local)
    eos: list[int] = []
    for source in (config, _json_or_empty(local / "generation_config.json")):
        value = source.get("eos_token_id")
        eos += [value] if isinstance(value, int) else [v for v in value or () if isinstance(v, int)]
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    return Checkpoint(path=path, format="safetensors" if has_safetensors(local) else "transformers",
                      architecture=config.get("model_type"), quantization="none",
                      eos_ids=tuple(dict.fromkeys(eos)),
                      tokenizer=path if any((local / f).is_file() for f in _TOKENIZER_FILES) else None,
                      max_positions=positions if isinstance(positions, int) else None, config=config)


def _json_or_empty(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def load_native(checkpoint: Checkpoint, *, device: Any, dtype: Any, keep_int4: bool = False,
                keep_q8: bool = False) -> Any:
    """The native model (``runtime``'s CachedLM) holding the checkpoint's weights on ``device`` in ``dtype``;
    ``keep_int4`` / ``keep_q8``: a GGUF file's Q4_0/Q4_1 / Q8_0 matrices stay as they are, where a kernel takes
    them (``gguf.load_gguf``)."""
    if not checkpoint.native:
        raise CheckpointError(f"{checkpoint.path}: {checkpoint.describe()} has no native implementation")
    if checkpoint.format == "gguf":
        from .gguf import load_gguf

        return load_gguf(checkpoint.path, device=device, dtype=dtype, keep_int4=keep_int4, keep_q8=keep_q8)
    if checkpoint.architecture == "gpt2":
        from .safetensors import load_gpt2

        return load_gpt2(checkpoint.path)
    from ..llama import LlamaConfig
    from .safetensors import load_llama

    try:
        config = LlamaConfig.from_hf(checkpoint.config)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.path}: {exc}; backend hf serves it through transformers") from exc
    return load_llama(checkpoint.path, device=device, dtype=dtype, config=config)
