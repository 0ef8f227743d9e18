"""GGUF checkpoints in the native core: tiny files written by the tests (every architecture and tensor type,
broken ones), against transformers reading the same file and against the model they were written from."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import tiny_llama_family
from gguf_files import permute, write_gguf
from helpers import MIXED

from minercore.contract.config import CACHE_ENV, EngineOptions, ModelOptions, cache_dir
from minercore.contract.generation import GenerationRequest, SamplingParams
from minercore.engine import Engine
from minercore.models import q4_i8_rows, q4_rows, q8_rows, step_attention
from minercore.models.loading import CheckpointError, inspect
from minercore.models.loading.gguf import GGUFError, load_gguf
from minercore.runtime.build import build_runner
from minercore.runtime.native import ModelRunner
from minercore.text import tokenizer as tokenizer_module

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
ARCHITECTURES = {"llama": {}, "qwen2": {"tie_word_embeddings": True}, "qwen3": {"head_dim": 32}}


def hf_model(arch: str, **extra):
    return tiny_llama_family(arch, **{**COMMON, **extra})


def transformers_reads(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


IDS = torch.tensor([np.random.default_rng(0).integers(0, 256, 24).tolist()])


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_architecture_gives_the_logits_of_the_model_it_was_written_from(tmp_path, arch) -> None:
    source = hf_model(arch, **ARCHITECTURES[arch])
    path = write_gguf(tmp_path / f"{arch}.gguf", source)
    ours = load_gguf(path).eval()
    assert ours.config.family == arch
    assert ours.config.tie_embeddings == (arch == "qwen2") and ours.config.qkv_bias == (arch == "qwen2")
    assert ours.config.qk_norm == (arch == "qwen3") and ours.config.head_dim == (32 if arch == "qwen3" else 16)
    torch.testing.assert_close(logits(ours, IDS), logits(source, IDS), atol=1e-5, rtol=0)
    if arch != "qwen3":  # transformers' GGUF config mapping takes qwen3's head_dim as hidden / heads
        torch.testing.assert_close(logits(ours, IDS), logits(transformers_reads(path), IDS), atol=1e-5, rtol=0)


TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", TYPES)
def test_every_tensor_type_is_dequantized_as_gguf_does_it(tmp_path, type_name) -> None:
    from gguf import GGUFReader, quants

    # K-quants pack 256 weights a block: every matrix's rows are 256 long.
    source = hf_model("llama", **{**COMMON, "vocab_size": 64, "hidden_size": 256, "intermediate_size": 256,
                                  "num_hidden_layers": 1})
    path = write_gguf(tmp_path / "m.gguf", source, types=type_name)
    ours = load_gguf(path).eval()
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == type_name
    stored = torch.from_numpy(quants.dequantize(q.data, q.tensor_type).copy())
    # The file's values exactly, back in Hugging Face's row order.
    q_rows = ours.checkpoint_views()["layers.0.self_attn.q_proj.weight"].detach()
    assert torch.equal(torch.from_numpy(permute(q_rows.numpy(), 4)), stored)
    torch.testing.assert_close(logits(ours, IDS % 64), logits(transformers_reads(path), IDS % 64), atol=1e-4,
                               rtol=1e-4)
    assert inspect(str(path)).quantization == type_name


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs for Llama 3.1 scaling: a divisor per frequency."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, original = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama31_rope_scaling_from_rope_freqs(tmp_path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    source = hf_model("llama", rope_parameters=rope)
    path = write_gguf(tmp_path / "l31.gguf", source, rope_freqs=llama3_rope_factors(rope, 16))
    ours = load_gguf(path).eval()
    assert ours.config.rope_freq_factors is not None
    long = torch.tensor([np.random.default_rng(1).integers(0, 256, 200).tolist()])  # past the original 64
    torch.testing.assert_close(logits(ours, long), logits(source, long), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf", hf_model("llama"), types="Q8_0")


def test_a_truncated_file_is_refused(tmp_path, llama_file) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(llama_file.read_bytes()[: llama_file.stat().st_size // 2])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf(cut)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        build_runner(ModelOptions(path=str(cut), device="cpu", compile="off"), max_batch=1, eos_id=1)


def test_an_unknown_architecture_is_refused_with_a_pointer_to_hf(tmp_path) -> None:
    path = write_gguf(tmp_path / "x.gguf", hf_model("llama"), arch="grok")
    with pytest.raises(GGUFError, match="architecture 'grok' is not served natively.*backend hf"):
        load_gguf(path)
    assert not inspect(str(path)).native


def test_an_unsupported_tensor_type_is_refused_naming_the_tensor(tmp_path) -> None:
    path = write_gguf(tmp_path / "iq.gguf", hf_model("llama", hidden_size=256, intermediate_size=256),
                      types={"blk.1.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(GGUFError, match="'blk.1.ffn_up.weight' has type IQ4_NL"):
        load_gguf(path)


def test_a_missing_tensor_is_refused_naming_it(tmp_path) -> None:
    path = write_gguf(tmp_path / "gap.gguf", hf_model("llama"), drop=("blk.1.ffn_down.weight",))
    with pytest.raises(GGUFError, match=r"layers\.1\.mlp\.down_proj\.weight.*missing"):
        load_gguf(path)


def test_a_directory_with_one_gguf_is_that_file_and_with_two_is_ambiguous(tmp_path, llama_file) -> None:
    (tmp_path / "a.gguf").write_bytes(llama_file.read_bytes())
    found = inspect(str(tmp_path))
    assert (found.format, found.architecture, found.quantization) == ("gguf", "llama", "Q8_0")
    assert found.path == str(tmp_path / "a.gguf") and found.native
    (tmp_path / "b.gguf").write_bytes(llama_file.read_bytes())
    with pytest.raises(CheckpointError, match="several GGUF files"):
        inspect(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such file"):
        inspect(str(tmp_path / "absent.gguf"))


def test_gguf_goes_to_the_native_runner_and_hf_reads_it_too(llama_file) -> None:
    options = ModelOptions(path=str(llama_file), device="cpu", dtype="float32", compile="off", max_context=64,
                           mode="generate")
    native = build_runner(options, max_batch=1, eos_id=1)
    assert isinstance(native, ModelRunner) and "gguf Q8_0" in native.description
    hf = build_runner(ModelOptions(**{**options.__dict__, "backend": "hf"}), max_batch=1, eos_id=1)
    assert hf.kind == "hf"
    from minercore.runtime.sampling import SlotParams

    ids = IDS[0, :12].tolist()
    assert native.prefill(0, ids, SlotParams(echo=False)) == hf.prefill(0, ids, SlotParams(echo=False))


# ---- Q4_0 and Q4_1 kept 4-bit: the file's values in the int4 kernel, not re-quantized ----

@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_q4_blocks_are_exactly_what_gguf_dequantizes(tmp_path, type_name) -> None:
    from gguf import GGUFReader, quants

    from minercore.models.loading.gguf import q4_blocks

    path = write_gguf(tmp_path / "q.gguf", hf_model("qwen2"), types=type_name)
    for tensor in GGUFReader(path).tensors:
        if tensor.tensor_type.name == type_name:
            d, m, q = q4_blocks(tensor)
            assert q.min() >= 0 and q.max() <= 15
            values = np.repeat(d, 32, axis=1) * q + np.repeat(m, 32, axis=1)
            assert np.array_equal(values, quants.dequantize(tensor.data, tensor.tensor_type))


@pytest.mark.parametrize(("arch", "type_name"), [("llama", "Q4_1"), ("qwen2", "Q4_0"), ("qwen3", "Q4_1")])
def test_q4_layers_run_the_files_values_in_the_int4_kernel(tmp_path, monkeypatch, arch, type_name) -> None:
    from minercore.models.quant import Int4Linear

    monkeypatch.setattr(q4_rows, "AVAILABLE", False)  # as on a CPU without AVX2: torch's int4 kernel serves
    path = write_gguf(tmp_path / "q.gguf", hf_model(arch, **ARCHITECTURES[arch]), types=type_name)
    dense = load_gguf(path).eval()
    int4 = load_gguf(path, keep_int4=True).eval()
    layers = [m for m in int4.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * 2 + (arch != "qwen2")  # qkv, o, gate_up, down per block; an untied head
    reference = dense.checkpoint_views()
    fused = torch.cat([reference[f"layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    got = int4.layers[1].self_attn.qkv_proj.dequantize().float()
    # The same weights, un-permuted the same way; the kernel computes in bfloat16 (its scales rounded to it).
    torch.testing.assert_close(got, fused, atol=2e-2 * float(fused.abs().max()), rtol=2e-2)
    torch.testing.assert_close(logits(int4, IDS), logits(dense, IDS), atol=0.05, rtol=0.05)


@pytest.mark.skipif(not q4_rows.AVAILABLE, reason="the Q4 row kernel needs AVX2, FMA and its build")
@pytest.mark.parametrize(("arch", "type_name"), [("llama", "Q4_1"), ("qwen2", "Q4_0"), ("qwen3", "Q4_1")])
def test_q4_layers_in_a_float32_model_hold_the_files_values_and_give_the_dense_logits(tmp_path, arch,
                                                                                        type_name) -> None:
    from minercore.models.quant import Int4Linear, Q4Linear

    path = write_gguf(tmp_path / "q.gguf", hf_model(arch, **ARCHITECTURES[arch]), types=type_name)
    dense = load_gguf(path).eval()
    kept = load_gguf(path, keep_int4=True).eval()
    layers = {name for name, m in kept.named_modules() if isinstance(m, Q4Linear)}
    assert layers == {f"layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} | (
        set() if arch == "qwen2" else {"lm_head"})  # qwen2's head is tied to the embedding
    reference = dense.checkpoint_views()
    fused = torch.cat([reference[f"layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(kept.layers[1].self_attn.qkv_proj.dequantize(), fused)  # un-permuted, value for value
    assert torch.equal(kept.layers[0].mlp.down_proj.dequantize(), reference["layers.0.mlp.down_proj.weight"])
    torch.testing.assert_close(logits(kept, IDS), logits(dense, IDS), atol=1e-4, rtol=1e-4)
    # a bfloat16 model keeps torch's int4 kernel
    bf16 = load_gguf(path, keep_int4=True, dtype=torch.bfloat16)
    assert not any(isinstance(m, Q4Linear) for m in bf16.modules())
    assert any(isinstance(m, Int4Linear) for m in bf16.modules())


# ---- Q8_0 kept as its blocks where the model runs in float32 on a CPU: the file's values exactly ----

def test_q8_blocks_are_exactly_what_gguf_dequantizes(tmp_path) -> None:
    from gguf import GGUFReader, quants

    from minercore.models.loading.gguf import q8_blocks

    path = write_gguf(tmp_path / "q.gguf", hf_model("qwen2"), types="Q8_0")
    for tensor in GGUFReader(path).tensors:
        if tensor.tensor_type.name == "Q8_0":
            d, q = q8_blocks(tensor)
            assert q.dtype == np.int8 and d.dtype == np.float32
            values = np.repeat(d, 32, axis=1) * q.astype(np.float32)
            assert np.array_equal(values, quants.dequantize(tensor.data, tensor.tensor_type))


@pytest.mark.skipif(not q8_rows.AVAILABLE, reason="the Q8_0 row kernel needs AVX2, FMA and its build")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_layers_hold_the_files_values_and_give_the_dense_logits(tmp_path, arch) -> None:
    from minercore.models.quant import Q8Linear

    # Q8_0 everywhere (an untied head), or only the tied embedding, as in the SmolLM2 file.
    types = "Q8_0" if arch == "llama" else {"token_embd.weight": "Q8_0"}
    path = write_gguf(tmp_path / "q.gguf", hf_model(arch, **ARCHITECTURES[arch]), types=types)
    dense = load_gguf(path).eval()
    kept = load_gguf(path, keep_int4=True, keep_q8=True).eval()
    layers = {name for name, m in kept.named_modules() if isinstance(m, Q8Linear)}
    assert layers == ({"lm_head"} | {f"layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} if arch == "llama"
        else {"lm_head"})
    reference = dense.checkpoint_views()
    if arch == "llama":  # fused and un-permuted as the dense load does it, value for value
        fused = torch.cat([reference[f"layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(kept.layers[1].self_attn.qkv_proj.dequantize(), fused)
    assert torch.equal(kept.lm_head.dequantize(), dense.lm_head.weight)
    assert torch.equal(kept.embed_tokens.weight, dense.embed_tokens.weight)  # the lookup keeps its table
    torch.testing.assert_close(logits(kept, IDS), logits(dense, IDS), atol=1e-4, rtol=1e-4)
    # not for a bfloat16 model: its head stays in the activation dtype
    assert not any(isinstance(m, Q8Linear) for m in load_gguf(path, keep_q8=True, dtype=torch.bfloat16).modules())


# ---- a whole checkpoint: GPT-2's tokenizer and a chat template in the file ----

@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    where = tmp_path_factory.mktemp("servable")
    with pytest.MonkeyPatch.context() as patch:  # its converted tokenizer is kept beside it, not in the user's cache
        patch.setenv(CACHE_ENV, str(where / "cache"))
        yield write_gguf(where / "chat.gguf", hf_model("llama", vocab_size=50257, hidden_size=64), types="Q4_0",
                         tokenizer=True)


def test_the_converted_tokenizer_is_kept_and_read_back(servable, monkeypatch) -> None:
    """A GGUF's tokenizer is converted once per file (seconds for a real vocabulary), then read from the cache;
    a damaged cache entry is converted again."""
    shutil.rmtree(cache_dir() / "tokenizers", ignore_errors=True)
    reads = []
    real = tokenizer_module.AutoTokenizer.from_pretrained
    monkeypatch.setattr(tokenizer_module.AutoTokenizer, "from_pretrained",
                        lambda where, **kw: reads.append((Path(where), kw.get("gguf_file"))) or real(where, **kw))
    converted = tokenizer_module._load_gguf(servable)
    (saved,) = (cache_dir() / "tokenizers").iterdir()
    again = tokenizer_module._load_gguf(servable)
    (saved / "tokenizer.json").write_text("{not json")
    repaired = tokenizer_module._load_gguf(servable)
    assert reads[0] == (servable.parent, servable.name) and reads[1] == (saved, None)
    assert reads[2] == (saved, None) and reads[3] == (servable.parent, servable.name)
    text = "Hello, 世界 🎉 <|im_start|>"
    assert converted.encode(text) == again.encode(text) == repaired.encode(text)
    assert converted.chat_template == again.chat_template and again.eos_token_id == converted.eos_token_id
    assert json.loads((saved / "tokenizer.json").read_text())  # replaced whole


async def run_engine(path, mode: str, request: GenerationRequest) -> tuple[Engine, str, str | None]:
    engine = Engine(ModelOptions(path=str(path), mode=mode, device="cpu", dtype="float32", compile="off",
                                 max_context=256), EngineOptions(max_batch=2))
    await engine.start()
    try:
        pieces = [piece async for piece in engine.generate(request)]
    finally:
        await engine.shutdown()
    return engine, "".join(p.text for p in pieces), pieces[-1].finish_reason


def test_the_reader_reads_every_field_and_tensor_as_gguf_does(servable) -> None:
    """open_reader's plain-array header reads (a tokenizer's strings among them) give what gguf's own reader
    gives: every field's parts and types, every tensor's name, type, shape and bytes, read-only."""
    from gguf import GGUFReader

    from minercore.models.loading.gguf import open_reader

    ours, theirs = open_reader(servable), GGUFReader(servable)
    assert list(ours.fields) == list(theirs.fields) and "tokenizer.ggml.tokens" in ours.fields
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert mine.types == field.types and mine.data == field.data, name
        assert all(np.array_equal(a, b) and a.dtype == b.dtype
                   for a, b in zip(mine.parts, field.parts, strict=True)), name
    assert ours.fields["tokenizer.ggml.tokens"].contents() == theirs.fields["tokenizer.ggml.tokens"].contents()
    for mine, tensor in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type, list(mine.shape)) == (tensor.name, tensor.tensor_type, list(tensor.shape))
        assert np.array_equal(mine.data, tensor.data) and not mine.data.flags.writeable


def test_echo_through_the_files_own_tokenizer_is_byte_exact(servable) -> None:
    engine, text, reason = asyncio.run(run_engine(servable, "echo", GenerationRequest(prompt=MIXED)))
    assert text == MIXED and reason == "eos"
    serving = engine.serving
    weights = serving.pop("weights_bytes")
    if q4_i8_rows.AVAILABLE and step_attention.AVAILABLE:  # activations auto: int8 rows where N is a multiple of 8
        quantization = "Q4 blocks (1 linear), Q4 blocks x int8 rows (8 linears)"
    else:
        quantization = "Q4 blocks (9 linears)" if q4_rows.AVAILABLE else "int4 g32"
    assert serving == {"backend": "native", "format": "gguf", "architecture": "llama",
                       "checkpoint_quantization": "Q4_0", "quantization": quantization, "dtype": "float32",
                       "device": "cpu", "kv_cache": "paged", "kv_cache_bytes": serving["kv_cache_bytes"]}
    assert weights > 0 and serving["kv_cache_bytes"] > 0


def test_chat_uses_the_files_template_and_stop_id(servable) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "hello"}],
                                sampling=SamplingParams(max_new_tokens=8))
    engine, text, reason = asyncio.run(run_engine(servable, "generate", request))
    assert "<|im_start|>" in engine.tokenizer.chat_template
    assert engine.tokenizer.eos_token_id == 50256 and reason in ("eos", "length")


def test_info_reports_the_checkpoint_and_its_tokenizer(servable, llama_file, capsys) -> None:
    from minercore.__main__ import main

    assert main(["info", "--device", "cpu", "--path", str(servable)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == {"path": str(servable), "format": "gguf", "architecture": "llama",
                                    "quantization": "Q4_0", "native": True}
    assert report["tokenizer"].startswith("gguf:") and report["vocab_size"] == 50257
    assert main(["info", "--device", "cpu", "--path", str(llama_file)]) == 0  # no vocabulary in the file
    assert json.loads(capsys.readouterr().out)["tokenizer"].startswith("gpt2")
