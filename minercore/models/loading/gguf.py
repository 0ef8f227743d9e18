"""GGUF checkpoints (the llama.cpp ecosystem's format) of the Llama family, read into ``LlamaLM``.

The model's config comes from the file's metadata, each tensor is dequantized by the ``gguf`` package's own
routines one at a time from the memory-mapped file and written straight into its parameter (peak host memory:
the model plus one float32 tensor). Every check runs before the model is allocated, so a bad file is refused
with the reason and never leaves a half-loaded model.

llama.cpp's converter permutes ``attn_q``/``attn_k`` of ``llama``-architecture models for its interleaved RoPE;
they are permuted back into Hugging Face's "rotate half" layout that ``LlamaLM`` uses. ``qwen2`` and ``qwen3``
are stored unpermuted.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import q4_rows, q8_rows
from ..llama import LlamaConfig, LlamaLM

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2", "qwen3")

# The tensor types dequantized into the serving dtype (every one the loader's tests cover).
_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FACTORS = "rope_freqs.weight"  # Llama 3.1's RoPE scaling, as per-frequency divisors


class GGUFError(ValueError):
    """The file is not a GGUF minercore's native core can serve; the message says what is wrong."""


@dataclass(frozen=True)
class GGUFFacts:
    """What a GGUF file holds, from its header: enough to choose a backend and report it without loading."""

    architecture: str
    quantization: str  # the type most of its matrices are stored in, e.g. Q4_1
    eos_ids: tuple[int, ...]  # end of text, then end of turn / end of message where the file names them
    max_positions: int | None
    has_tokenizer: bool


def open_reader(path: str | Path) -> Any:
    try:
        reader = _plain_reader_class()(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}") from exc
    reader.source = str(path)  # the reader keeps only the mapping; errors name the file
    return reader


@functools.cache
def _plain_reader_class() -> type:
    """``gguf.GGUFReader`` reading its header through a plain array over the file's mapping. The reader slices its
    ``np.memmap`` once per metadata value, and each slice of a memmap runs numpy's Python-level memmap hooks: for
    a tokenizer's hundred thousand strings that was most of the 3 s a reader took to open SmolLM2's file, twice
    per start-up. The values, their types and the tensors' arrays are the same; the arrays are views of the same
    read-only mapping."""
    from gguf import GGUFReader

    class PlainReader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            dtype = np.dtype(dtype)
            values = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            return values.view(values.dtype.newbyteorder(self.byte_order if override_order is None
                                                         else override_order))

    return PlainReader


def _value(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFError(f"{reader.source}: metadata {key!r} is missing")
        return default
    return field.contents()


def facts(path: str | Path) -> GGUFFacts:
    reader = open_reader(path)
    architecture = _value(reader, "general.architecture")
    matrices = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    eos = [_value(reader, f"tokenizer.ggml.{name}_token_id", None) for name in ("eos", "eot", "eom")]
    return GGUFFacts(architecture=architecture, quantization=matrices.most_common(1)[0][0] if matrices else "none",
                     eos_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
                     max_positions=_value(reader, f"{architecture}.context_length", None),
                     has_tokenizer="tokenizer.ggml.tokens" in reader.fields)


def llama_config(reader: Any) -> LlamaConfig:
    """The model's shape from the file's metadata and tensor names; GGUFError for what LlamaLM cannot serve."""
    arch = _value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{reader.source}: GGUF architecture {arch!r} is not served natively (native serves "
                        f"{', '.join(ARCHITECTURES)}); backend hf may serve it through transformers")
    names = {t.name: t for t in reader.tensors}

    def get(key: str, default: Any = ...) -> Any:
        return _value(reader, f"{arch}.{key}", default)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{reader.source}: key and value head sizes differ; not supported")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{reader.source}: partial rotary embeddings are not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFError(f"{reader.source}: RoPE scaling {scaling!r} is not supported (none, and Llama 3.1's "
                        f"rope_freqs, are)")
    if "token_embd.weight" not in names:
        raise GGUFError(f"{reader.source}: tensor 'token_embd.weight' is missing")
    factors = None
    if _ROPE_FACTORS in names:
        factors = tuple(float(f) for f in _dequantized(names[_ROPE_FACTORS]).reshape(-1))
    first = "blk.0."
    return LlamaConfig(
        family=arch, vocab_size=int(names["token_embd.weight"].shape[1]), hidden_size=hidden,
        n_layer=get("block_count"), n_head=heads, n_kv_head=get("attention.head_count_kv", heads),
        head_dim=head_dim, intermediate_size=get("feed_forward_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6), rope_theta=float(get("rope.freq_base", 1e4)),
        rope_freq_factors=factors, max_positions=get("context_length", 4096),
        qkv_bias=first + "attn_q.bias" in names, o_bias=first + "attn_output.bias" in names,
        mlp_bias=first + "ffn_up.bias" in names, qk_norm=first + "attn_q_norm.weight" in names,
        tie_embeddings="output.weight" not in names)


def _ours(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.fullmatch(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    return f"layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"


def _dequantized(tensor: Any) -> np.ndarray:
    from gguf import quants

    return quants.dequantize(tensor.data, tensor.tensor_type)


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter: its rows (head, pair index, 2) back to Hugging Face's (head, 2, pair index)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _plan(reader: Any, model: LlamaLM) -> list[tuple[Any, str]]:
    """(GGUF tensor, parameter view name) for every tensor, after checking names, types and shapes."""
    views = model.checkpoint_views()
    plan, seen = [], set()
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FACTORS:
            continue  # read into the config
        ours = _ours(tensor.name)
        if ours is None or ours not in views:
            raise GGUFError(f"{reader.source}: unexpected tensor {tensor.name!r} for a {model.config.family} model "
                            f"of this shape")
        if tensor.tensor_type.name not in _TYPE_NAMES:
            raise GGUFError(f"{reader.source}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the "
                            f"native core does not read (it reads {', '.join(_TYPE_NAMES)})")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if len(shape) == 2 and shape[0] == 1 and views[ours].dim() == 1:
            shape = shape[1:]
        if shape != tuple(views[ours].shape):
            raise GGUFError(f"{reader.source}: {tensor.name} has shape {shape}, the metadata implies "
                            f"{tuple(views[ours].shape)}")
        plan.append((tensor, ours))
        seen.add(ours)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(views) - seen - tied)
    if missing:
        raise GGUFError(f"{reader.source}: tensors for {missing[:6]}{' ...' if len(missing) > 6 else ''} are missing")
    return plan


@torch.no_grad()
def load_gguf(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              keep_int4: bool = False, keep_q8: bool = False) -> LlamaLM:
    """A LlamaLM holding the GGUF file's weights, dequantized into ``dtype`` on ``device``; with ``keep_int4``,
    every linear layer whose matrices are all Q4_0/Q4_1 keeps the file's 4-bit values and block scales as they are
    (no re-quantization): a ``quant.Q4Linear`` where ``q4_rows`` serves this device and dtype (a float32 model on a
    CPU with AVX2), else a ``quant.Int4Linear`` where the int4 kernel takes its shape; with ``keep_q8``, every
    linear whose matrices are all Q8_0 (a head tied to a Q8_0 embedding included: the embedding keeps its
    dequantized table for the lookup) becomes a ``quant.Q8Linear`` holding them as they are, where ``q8_rows``
    serves this device and dtype."""
    reader = open_reader(path)
    config = llama_config(reader)
    with torch.device("meta"):
        plan = _plan(reader, LlamaLM(config))
    device = torch.device(device)
    model = LlamaLM.empty(config, device, dtype)
    views = model.checkpoint_views()
    four_bit = _block_layers(model, plan, _INT4_TYPES, tied_head=False) if keep_int4 else {}
    q4, int4 = (four_bit, {}) if q4_rows.usable(device, dtype) else ({}, _int4_taken(four_bit, model, device))
    q8 = _block_layers(model, plan, ("Q8_0",), tied_head=True) if keep_q8 and q8_rows.usable(device, dtype) else {}
    # A kept layer's matrices are never dequantized (their dense pages stay untouched); the embedding always is.
    held = {name for parts in (*q4.values(), *int4.values(), *q8.values()) for name, _ in parts}
    held.discard("embed_tokens.weight")
    for tensor, ours in plan:
        if ours not in held:
            _copy_into(views[ours], tensor, _heads(config, ours))
    from ..quant import Int4Linear, Q4Linear, Q8Linear, kernel_dtype

    int4_dtype = kernel_dtype("int4", device, dtype)
    for module_path, parts in int4.items():
        _replace(model, module_path, parts, q4_blocks, lambda d, m, q, bias: Int4Linear.from_blocks(
            d, m, q, bias=bias, dtype=int4_dtype, device=device))
    for module_path, parts in q4.items():
        _replace(model, module_path, parts, q4_blocks, lambda d, m, q, bias: Q4Linear.from_blocks(
            d.to(device), m.to(device), q.to(device), bias=bias))
    for module_path, parts in q8.items():
        _replace(model, module_path, parts, q8_blocks, lambda d, q, bias: Q8Linear(q.to(device), d.to(device), bias))
    return model


def _heads(config: LlamaConfig, ours: str) -> int | None:
    """The head count to un-permute a ``llama`` q or k tensor by (None: not permuted)."""
    if config.family != "llama":
        return None
    if ours.endswith(("q_proj.weight", "q_proj.bias")):
        return config.n_head
    if ours.endswith(("k_proj.weight", "k_proj.bias")):
        return config.n_kv_head
    return None


_INT4_TYPES = ("Q4_0", "Q4_1")
# The model's linears and the checkpoint matrices stacked in their rows (fused projections take several).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _block_layers(model: LlamaLM, plan: list[tuple[Any, str]], types: tuple[str, ...], *,
                  tied_head: bool) -> dict[str, list]:
    """Module path -> [(view name, GGUF tensor)] for every linear whose matrices are all of ``types``; with
    ``tied_head``, a head tied to the embedding counts as holding the embedding's tensor."""
    tensors = {ours: tensor for tensor, ours in plan}
    layers = {}
    for path, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        parent, _, name = path.rpartition(".")
        parts = [f"{parent}.{part}.weight" if parent else f"{part}.weight" for part in _FUSED.get(name, (name,))]
        if path == "lm_head" and model.config.tie_embeddings and tied_head:
            parts = ["embed_tokens.weight"]
        if all(p in tensors and tensors[p].tensor_type.name in types for p in parts):
            layers[path] = [(p, tensors[p]) for p in parts]
    return layers


def _int4_taken(layers: dict[str, list], model: LlamaLM, device: torch.device) -> dict[str, list]:
    """``layers`` less those whose shape the int4 kernel cannot take, logged once."""
    from ..quant import refusal

    taken, kept = {}, []
    for path, parts in layers.items():
        module = model.get_submodule(path)
        reason = refusal("int4", module.out_features, module.in_features, 32, device)
        if reason is None:
            taken[path] = parts
        else:
            kept.append(f"{path} ({reason})")
    if kept:
        logger.warning("GGUF int4: %d layer(s) dequantized instead, the kernel cannot take their shape: %s",
                       len(kept), "; ".join(kept))
    return taken


def q4_blocks(tensor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0 or Q4_1 tensor's blocks as (d [N, K/32], m [N, K/32], q [N, K] in 0..15) with w = d * q + m
    (Q4_0's w = d * (q - 8) is m = -8 d). In a block the low nibbles hold its first 16 values."""
    data = np.asarray(tensor.data)
    q4_1 = tensor.tensor_type.name == "Q4_1"
    blocks = data.reshape(data.shape[0], -1, 20 if q4_1 else 18)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = (np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32) if q4_1
         else -8.0 * d)
    nibbles = blocks[..., 4:] if q4_1 else blocks[..., 2:]
    q = np.concatenate((nibbles & 0x0F, nibbles >> 4), axis=-1).reshape(data.shape[0], -1)
    return d, m, q


def q8_blocks(tensor: Any) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's blocks as (d [N, K/32] float32, q [N, K] int8) with w = d * q."""
    data = np.asarray(tensor.data)
    blocks = data.reshape(data.shape[0], -1, 34)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(data.shape[0], -1)
    return d, q


def _replace(model: LlamaLM, path: str, parts: list[tuple[str, Any]], blocks: Callable[[Any], tuple],
             layer: Callable[..., torch.nn.Module]) -> None:
    """The linear at ``path`` replaced by ``layer(*arrays, bias)``: ``blocks``' arrays of its GGUF tensors
    (rows un-permuted as the dense load does it, the same for a row's values and its blocks' scales), stacked
    along the rows as its fused projections are."""
    arrays = []
    for ours, tensor in parts:
        read = [torch.from_numpy(a) for a in blocks(tensor)]
        heads = _heads(model.config, ours)
        arrays.append(read if heads is None else [_unpermute(a, heads) for a in read])
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    bias = getattr(parent, name).bias
    setattr(parent, name, layer(*(torch.cat(column) for column in zip(*arrays, strict=True)),
                                None if bias is None else bias.detach().clone()))


_CHUNK_ELEMENTS = 1 << 22  # dequantized a block of rows at a time: gguf's routines make several temporaries


def _copy_into(view: torch.Tensor, tensor: Any, heads: int | None) -> None:
    """The GGUF tensor's values into ``view`` (un-permuted for ``heads`` when given), a block of rows at a time
    so that a large tensor (the embedding) never exists in float32 whole, with gguf's temporaries beside it."""
    data = tensor.data
    rows = view.shape[0] if view.dim() == 2 else 1
    step = rows if heads is not None else max(1, _CHUNK_ELEMENTS // max(1, view.numel() // rows))
    for start in range(0, rows, step):
        array = _dequantized_rows(tensor, data[start:start + step] if view.dim() == 2 else data)
        if not array.flags.writeable:  # an F32 tensor comes back as the read-only mapping itself
            array = array.copy()
        values = torch.from_numpy(array)
        if view.dim() == 2:
            values = values.reshape(-1, view.shape[1])
            if heads is not None:
                values = _unpermute(values, heads)
            view[start:start + values.shape[0]].copy_(values)
        else:
            values = values.reshape(view.shape)
            view.copy_(_unpermute(values, heads) if heads is not None else values)


def _dequantized_rows(tensor: Any, rows: np.ndarray) -> np.ndarray:
    from gguf import quants

    return quants.dequantize(rows, tensor.tensor_type)
