"""Hugging Face checkpoint directories: config.json, and safetensors weights (single file or sharded) read one
tensor at a time into ``LlamaLM`` or ``GPT2LM``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..gpt2 import GPT2LM, GPTConfig
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


def read_tensors(directory: Path, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Each (checkpoint name, tensor) of the directory's safetensors files, read onto ``device``.

    One mapping per tensor: the pages a read touches count as this process's memory until the file is unmapped,
    so a shard held open through all its tensors would look like a second copy of it. safetensors reads onto
    CUDA directly."""
    from safetensors import safe_open

    for name, file in tensor_files(directory).items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            tensor = f.get_tensor(name)
        yield name, tensor
        del tensor


@torch.no_grad()
def load_llama(directory: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               config: LlamaConfig | None = None) -> LlamaLM:
    """A LlamaLM holding a Hugging Face checkpoint's weights, each tensor read once from its safetensors file
    straight onto ``device`` and converted to ``dtype`` in place (the model is allocated first, empty)."""
    directory = Path(directory)
    config = config or LlamaConfig.from_hf(read_config(directory))
    device = torch.device(device)
    model = LlamaLM.empty(config, device, dtype)
    params = model.checkpoint_views()
    loaded = set()
    for name, tensor in read_tensors(directory, device):
        ours = name.removeprefix("model.")
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue  # some tied checkpoints store the head too; it equals the embedding
        if ours not in params:
            if ours.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints saved the RoPE buffer; it is recomputed
            raise ValueError(f"{directory}: unexpected tensor {name!r} for a {config.family} model")
        if tensor.shape != params[ours].shape:
            raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(params[ours].shape)}")
        params[ours].copy_(tensor)  # on the CPU, into the parameter's own memory
        loaded.add(ours)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{directory} lacks {missing}")
    return model


def load_gpt2(directory: Path | str) -> GPT2LM:
    """A GPT2LM (float32, CPU) holding a GPT-2-family checkpoint's weights: safetensors, or the older
    ``pytorch_model.bin`` (read with ``weights_only``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (minercore downloads nothing: fetch "
                                f"the checkpoint first, e.g. huggingface-cli download gpt2 --local-dir DIR)")
    try:
        config = GPTConfig.from_hf(read_config(directory))
    except ValueError as exc:
        raise ValueError(f"{directory}: {exc}") from exc
    model = GPT2LM(config)
    target = model.state_dict()
    loaded = {}
    for key, tensor in _gpt2_tensors(directory):
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # old checkpoints' causal-mask buffers; the head is tied to wte
        ours = "blocks." + key.removeprefix("h.") if key.startswith("h.") else key
        if ours not in target:
            raise ValueError(f"unexpected tensor {key!r} in {directory}")
        # HF GPT-2 stores its linear layers as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
        if ours.endswith(".weight") and tensor.dim() == 2 and ("attn.c_" in ours or "mlp.c_" in ours):
            tensor = tensor.t()
        if tensor.shape != target[ours].shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target[ours].shape)}")
        loaded[ours] = tensor.float()
    missing = set(target) - set(loaded) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"{directory} lacks {sorted(missing)}")
    model.load_state_dict(loaded, strict=False)
    return model


def _gpt2_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if has_safetensors(directory):
        yield from read_tensors(directory)
        return
    legacy = directory / "pytorch_model.bin"
    if not legacy.is_file():
        raise FileNotFoundError(f"{directory} has no model.safetensors or pytorch_model.bin")
    yield from torch.load(legacy, map_location="cpu", weights_only=True).items()
