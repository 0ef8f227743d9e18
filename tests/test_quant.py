"""Weight-only quantization (minercore.models.quant): the layers against their dequantized float reference, GGUF
Q4_0/Q4_1 blocks kept exact, whole models through the runner and the engine, the fallback for shapes a kernel
cannot take, the options on both command lines, and the backends that refuse it."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_options import miner_options, serve_options, serve_parser
from torch import nn

from minercore.contract.config import EngineOptions, ModelOptions
from minercore.contract.generation import GenerationRequest
from minercore.engine import Engine
from minercore.models.gpt2 import GPT2LM
from minercore.models.llama import LlamaLM
from minercore.models.presets import GPT2_PRESETS as PRESETS
from minercore.models.presets import LLAMA_PRESETS
from minercore.models.quant import Int4Linear, Int8Linear, describe, quantize
from minercore.runtime.build import build_runner
from minercore.runtime.sampling import SlotParams
from minercore.text.tokenizer import load_tokenizer

CPU = torch.device("cpu")
GPT2_EOS = 50256
SHAPES = [(48, 128), (384, 128), (128, 512), (40, 64)]  # (N, K): 40 rows are padded to the int4 packer's 16


def gaussian(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def repeat_groups(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.float().repeat_interleave(group, dim=1)


def assert_bfloat16_product(got: torch.Tensor, reference: torch.Tensor) -> None:
    """A bfloat16 kernel's product against the float32 one on the same (bfloat16-rounded) inputs: its sums are
    rounded to 8 significant bits, inside the kernel and on the way out, so the largest outputs (about 4 RMS) are
    off by up to about 2^-9 x 4 RMS, and partial sums add as much again (1.5% of the RMS measured, over batch 1
    to 64 and K 64 to 576). 3% of the RMS: a fifth of int8's own rounding error, a fiftieth of int4's."""
    assert got.dtype == reference.dtype and got.shape == reference.shape
    assert (got - reference).abs().max() <= 0.03 * reference.pow(2).mean().sqrt()


# ---- the layers ----

@pytest.mark.parametrize("n, k", SHAPES)
def test_int8_error_is_at_most_half_a_step_and_the_kernel_computes_the_dequantized_product(n, k) -> None:
    w = gaussian(n, k)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    exact = Int8Linear.quantize(w, dtype=torch.float32)
    step = exact.scales.float()[:, None]
    assert exact.qweight.dtype == torch.int8 and int(exact.qweight.abs().max()) == 127
    assert ((exact.dequantize() - w).abs() <= step / 2 + 1e-9).all()
    torch.testing.assert_close(exact(x), F.linear(x, exact.dequantize()), rtol=1e-5, atol=1e-6)
    fast = Int8Linear.quantize(w, dtype=torch.bfloat16)  # the kernel's fast path: bfloat16 activations
    assert ((fast.dequantize() - w).abs() <= fast.scales.float()[:, None] / 2 + 1e-9).all()
    y = fast(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, n)
    assert_bfloat16_product(y, F.linear(x.bfloat16().float(), fast.dequantize()))


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("group", [32, 64])
def test_int4_error_is_at_most_half_a_group_step_and_the_kernel_computes_the_dequantized_product(n, k, group):
    w = gaussian(n, k, seed=2)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(3))
    exact = Int4Linear.quantize(w, group_size=group, dtype=torch.float32)
    low = w.view(n, k // group, group).amin(-1)
    high = w.view(n, k // group, group).amax(-1)
    step = repeat_groups((high - low) / 15, group)
    deq = exact.dequantize()
    assert deq.shape == (n, k) and ((deq - w).abs() <= step / 2 * (1 + 1e-5)).all()
    torch.testing.assert_close(exact(x), F.linear(x, deq), rtol=1e-5, atol=1e-6)
    fast = Int4Linear.quantize(w, group_size=group, dtype=torch.bfloat16)
    # bfloat16 rounds each by at most 2^-9 of itself: the stored scale (over up to 15 steps from the zero), the
    # stored zero, and the weight the kernel hands back. Bounded with twice the last two.
    zero = repeat_groups(fast.scales_and_zeros[..., 1].t()[:n], group)
    bound = step * (0.5 + 15 * 2 ** -9) + (zero.abs() + w.abs()) * 2 ** -8
    assert ((fast.dequantize().float() - w).abs() <= bound).all()
    assert_bfloat16_product(fast(x), F.linear(x.bfloat16().float(), fast.dequantize().float()))


def gguf_blocks(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1-shaped data as a file holds it: float16 d and m per 32 values, 4-bit q."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, generator=g) * 0.004 + 1e-4).half()
    m = (-torch.rand(n, k // 32, generator=g) * 0.03).half()
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    return d, m, q


@pytest.mark.parametrize("n, k", [(64, 128), (40, 96)])
def test_q4_1_and_q4_0_blocks_keep_the_files_values_exactly(n, k) -> None:
    d, m, q = gguf_blocks(n, k)
    bias = torch.randn(n) * 0.1
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(4))
    for minimum, reference in ((m, repeat_groups(d, 32) * q.float() + repeat_groups(m, 32)),
                               (None, repeat_groups(d, 32) * (q.float() - 8))):
        layer = Int4Linear.from_blocks(d, minimum, q, bias=bias, dtype=torch.float32)
        assert layer.group_size == 32 and layer.out_features == n
        assert torch.equal(layer.dequantize(), reference)  # no re-quantization: the file's values, bit for bit
        torch.testing.assert_close(layer(x), F.linear(x, reference, bias), rtol=1e-5, atol=1e-6)
        # bfloat16 scales (the CPU kernel's fast path) round d to 8 significant bits: close, not exact.
        fast = Int4Linear.from_blocks(d, minimum, q, bias=bias)
        assert fast.kernel_dtype == torch.bfloat16
        torch.testing.assert_close(fast.dequantize().float(), reference, rtol=2 ** -7, atol=2e-4)


def test_from_blocks_refuses_what_is_not_a_block_layout() -> None:
    d, m, q = gguf_blocks(16, 64)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        Int4Linear.from_blocks(d, m, q.to(torch.int32) + 1)
    with pytest.raises(ValueError, match="scale"):
        Int4Linear.from_blocks(d[:, :1], m, q)
    with pytest.raises(ValueError, match="group size 16"):
        Int4Linear.from_blocks(torch.ones(16, 4), None, q)


def test_scales_keep_the_kernel_dtype_when_the_model_is_cast() -> None:
    layer = nn.Sequential(Int4Linear.quantize(gaussian(32, 64), dtype=torch.bfloat16),
                          Int8Linear.quantize(gaussian(16, 32), dtype=torch.bfloat16)).to(dtype=torch.float32)
    assert layer[0].scales_and_zeros.dtype == layer[1].scales.dtype == torch.bfloat16
    y = layer(torch.randn(2, 64))
    assert y.dtype == torch.float32 and y.shape == (2, 16)


# ---- whole models ----

def tiny_models() -> list[tuple[str, nn.Module]]:
    return [("tiny", GPT2LM.random(PRESETS["tiny"], seed=0)),
            ("llama-tiny", LlamaLM.random(LLAMA_PRESETS["llama-tiny"], seed=0))]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_linear_is_quantized_and_a_tied_head_gets_its_own_copy(mode) -> None:
    for name, model in tiny_models():
        embedding = model.wte if name == "tiny" else model.embed_tokens
        table = embedding.weight.detach().clone()
        linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
        quantize(model, mode, device=CPU, dtype=torch.bfloat16)
        quantized = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
        assert len(quantized) == linears and not any(isinstance(m, nn.Linear) for m in model.modules())
        assert model.lm_head in quantized and not hasattr(model.lm_head, "weight")
        # The lookup keeps the activation-dtype table, untouched; the head's copy is the only quantized one.
        assert isinstance(embedding.weight, nn.Parameter) and torch.equal(embedding.weight, table)
        assert describe(model) == ("int8" if mode == "int8" else "int4 g32")


@torch.no_grad()
@pytest.mark.parametrize("mode, bound", [("int8", 0.03), ("int4", 0.25)])
def test_quantized_logits_stay_close_to_the_float_model(mode, bound) -> None:
    """For Gaussian weights a rounding error is uniform over one step: its RMS is step / sqrt(12), about 0.6% of
    the weights' spread for int8 (step = 2 max / 254, max about 2.6 sigma over 128 inputs) and 8% for int4 g32
    (step = range / 15, range about 4 sigma over 32). Three layers in series (attention, MLP, head) roughly add
    up: 1.5% and 16% measured, bounded at about twice that. Against its own dequantized weights each model is
    exact up to its activations' bfloat16 rounding."""
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    for _, model in tiny_models():
        reference = model(idx)
        quantized = quantize(copy.deepcopy(model), mode, device=CPU, dtype=torch.bfloat16).to(torch.bfloat16)
        got = quantized(idx).float()
        assert ((got - reference).norm() / reference.norm()).item() < bound
        for parent in list(quantized.modules()):  # the same model with each layer's dequantized weights
            for attr, child in list(parent.named_children()):
                if isinstance(child, (Int8Linear, Int4Linear)):
                    dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    dense.weight.data = child.dequantize().to(torch.bfloat16)
                    if child.bias is not None:
                        dense.bias.data = child.bias
                    setattr(parent, attr, dense.to(torch.bfloat16))
        dense_logits = quantized(idx).float()
        assert ((got - dense_logits).norm() / dense_logits.norm()).item() < 0.02


def echo_runner(preset: str, quant: str, compile: str = "off", dtype: str = "bfloat16"):
    options = ModelOptions(preset=preset, device="cpu", dtype=dtype, compile=compile, quant=quant, max_context=256)
    return build_runner(options, max_batch=3, eos_id=GPT2_EOS)


TEXTS = ["Hello, wörld! 你好，世界 🚀🎉 — ñ", "∑ x² ≤ ∞ · naïve café", "short"]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_greedy_echo_is_byte_exact_through_the_quantized_runner(preset, quant) -> None:
    tok = load_tokenizer("gpt2")
    runner = echo_runner(preset, quant)
    assert f"weights {'int8' if quant == 'int8' else 'int4 g32'}" in runner.description
    prompts = [tok.encode(text) for text in TEXTS]
    outputs = [[runner.prefill(slot, ids, SlotParams())] for slot, ids in enumerate(prompts)]
    while any(out[-1] != GPT2_EOS for out in outputs):
        ids = runner.decode(np.arange(len(prompts), dtype=np.int64))
        for out, token in zip(outputs, ids.tolist(), strict=True):
            if out[-1] != GPT2_EOS:
                out.append(token)
    for text, ids, out in zip(TEXTS, prompts, outputs, strict=True):
        assert out == ids + [GPT2_EOS] and tok.decode(out[:-1]) == text


def test_compiled_int4_runner_keeps_the_cache_in_the_activation_dtype_and_echoes_exactly() -> None:
    tok = load_tokenizer("gpt2")
    runner = echo_runner("llama-tiny", "int4", compile="on")
    assert runner.compiled
    runner.warmup()
    model = runner.model
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[0].self_attn.cache.k.dtype == torch.bfloat16  # the KV cache follows the activations
    ids = tok.encode(TEXTS[0])
    out = [runner.prefill(0, ids, SlotParams())]
    while out[-1] != GPT2_EOS:
        out.append(int(runner.decode(np.array([0]))[0]))
    assert out == ids + [GPT2_EOS]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_compiled_blocks_run_the_quantized_layers_as_eager_does(quant) -> None:
    """compile=blocks puts the quantized products inside the nested block region: greedy ids at batch 1 and 3
    equal the eager runner's on the same weights, with no compile after warmup."""
    from torch._dynamo.utils import counters

    def runner(compile: str):
        options = ModelOptions(preset="llama-tiny", mode="generate", device="cpu", dtype="float32", compile=compile,
                               quant=quant, max_context=128)
        return build_runner(options, max_batch=4, eos_id=GPT2_EOS)

    def greedy(r) -> list[int]:
        out = [r.prefill(slot, [10 + slot, 200, 3000 + slot], SlotParams(echo=False)) for slot in range(3)]
        for step in range(16):
            out.extend(r.decode(np.arange(3 if step < 8 else 1)).tolist())
        return out

    compiled = runner("blocks")
    assert compiled.compiled_blocks
    compiled.warmup()
    graphs = counters["stats"]["unique_graphs"]
    assert greedy(compiled) == greedy(runner("off"))
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_float32_model_runs_its_quantized_layers_on_bfloat16_kernels() -> None:
    runner = echo_runner("tiny", "int8", dtype="float32")
    model = runner.model
    assert model.wte.weight.dtype == torch.float32 and model.blocks[0].attn.cache.k.dtype == torch.float32
    assert model.lm_head.scales.dtype == torch.bfloat16
    assert runner.model.decode(torch.tensor([5]), torch.tensor([0]), 64).dtype == torch.float32


async def test_echo_through_the_engine_with_int4_weights() -> None:
    options = ModelOptions(preset="llama-tiny", device="cpu", dtype="bfloat16", compile="off", quant="int4",
                           max_context=256)
    engine = Engine(options, EngineOptions(max_batch=4), runner=build_runner(options, max_batch=4, eos_id=GPT2_EOS))
    await engine.start()
    try:
        for text in TEXTS:
            pieces = [piece.text async for piece in engine.generate(GenerationRequest(prompt=text))]
            assert "".join(pieces) == text
    finally:
        await engine.shutdown(grace=0)


class Odd(nn.Module):
    """Shapes the kernels refuse: K 48 (int4 g32, and int8's 16-wide K blocks are fine), K 24 (int8 on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.fine = nn.Linear(64, 32)
        self.odd = nn.Linear(48, 32)
        self.odder = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fine(x)


def test_a_shape_the_kernel_cannot_take_stays_in_the_activation_dtype_logged_once(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="minercore.models.quant"):
        model = quantize(Odd(), "int4", device=CPU, dtype=torch.bfloat16)
    assert isinstance(model.fine, Int4Linear)
    assert type(model.odd) is nn.Linear and type(model.odder) is nn.Linear
    records = [r for r in caplog.records if r.name == "minercore.models.quant"]
    assert len(records) == 1
    assert "odd (K 48 is not a multiple of the group size 32)" in records[0].getMessage()
    assert "odder (K 24" in records[0].getMessage()
    assert describe(model) == "int4 g32 (2 of 3 linears unquantized)"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minercore.models.quant"):
        model = quantize(Odd(), "int8", device=CPU, dtype=torch.bfloat16)
    assert isinstance(model.odd, Int8Linear) and type(model.odder) is nn.Linear  # int8 on CPU: K % 16
    assert len([r for r in caplog.records if r.name == "minercore.models.quant"]) == 1


def test_quantize_refuses_unknown_modes_and_groups() -> None:
    with pytest.raises(ValueError, match="quant must be one of auto, none, int8, int4"):
        quantize(Odd(), "int3")
    with pytest.raises(ValueError, match="quant_group must be one of 32, 64, 128, 256"):
        quantize(Odd(), "int4", 48)
    assert quantize(model := Odd(), "none") is model and type(model.fine) is nn.Linear


# ---- options and backends ----

def test_quant_options_on_both_command_lines() -> None:
    model, _ = serve_options("--quant", "int4", "--quant-group", "64")
    assert (model.quant, model.quant_group) == ("int4", 64)
    model, _ = miner_options("--model.quant", "int8")
    assert (model.quant, model.quant_group) == ("int8", 32)
    assert (ModelOptions().quant, ModelOptions().quant_group) == ("auto", 32)


def test_bad_quant_values_are_clear_errors(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        serve_parser().parse_args(["serve", "--quant", "int3"])
    assert exited.value.code == 2 and "int3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["serve", "--quant-group", "0"])
    with pytest.raises(ValueError, match="quant_group must be one of 32, 64, 128, 256"):
        serve_options("--quant", "int4", "--quant-group", "48")


def test_backends_other_than_native_refuse_quantization(tmp_path) -> None:
    with pytest.raises(ValueError, match="quant int8 needs the native backend: backend hf runs transformers"):
        ModelOptions(backend="hf", path=str(tmp_path), quant="int8")
    with pytest.raises(ValueError, match="needs the native backend"):
        ModelOptions(backend="upstream", upstream_url="http://u/v1", quant="int4")
    # A native path whose architecture transformers serves instead: refused, not silently unquantized.
    (tmp_path / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    with pytest.raises(ValueError, match="quant int4 needs the native backend"):
        build_runner(ModelOptions(path=str(tmp_path), quant="int4"), max_batch=1, eos_id=0)
