"""Hugging Face checkpoint directories: config.json, and safetensors weights (single file or sharded) read into
``LlamaLM`` one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..llama import LlamaConfig, LlamaLM


def read_config(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def has_safetensors(directory: Path | str) -> bool:
    directory = Path(directory)
    return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()


def tensor_files(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (single file, or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json "
                            f"(only safetensors and GGUF checkpoints load into the native backend)")


@torch.no_grad()
def load_llama(directory: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               config: LlamaConfig | None = None) -> LlamaLM:
    """A LlamaLM holding a Hugging Face checkpoint's weights, each tensor read once from its safetensors file
    straight onto ``device`` and converted to ``dtype`` in place (the model is allocated first, empty)."""
    from safetensors import safe_open

    directory = Path(directory)
    config = config or LlamaConfig.from_hf(read_config(directory))
    device = torch.device(device)
    model = LlamaLM.empty(config, device, dtype)
    params = model.checkpoint_views()
    loaded = set()
    for name, file in tensor_files(directory).items():
        ours = name.removeprefix("model.")
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue  # some tied checkpoints store the head too; it equals the embedding
        if ours not in params:
            if ours.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints saved the RoPE buffer; it is recomputed
            raise ValueError(f"{directory}: unexpected tensor {name!r} for a {config.family} model")
        # One mapping per tensor: the pages a read touches count as this process's memory until the file is
        # unmapped, so a shard held open through all its tensors would look like a second copy of it.
        # safetensors reads onto CUDA directly; the CPU read lands in the parameter's own memory via copy_.
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            tensor = f.get_tensor(name)
            if tensor.shape != params[ours].shape:
                raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{tuple(params[ours].shape)}")
            params[ours].copy_(tensor)
            del tensor
        loaded.add(ours)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{directory} lacks {missing}")
    return model
