"""The block step kernel (models/block_step.py, csrc/block_step.c): a Llama block's norm and q/k/v product in one
call, everything after its attention in another, over the int8-row layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_int8_rows import q4_layer, q8_layer

from minercore.kv.paged import PagedSpec
from minercore.models import block_step
from minercore.models.llama import LlamaConfig, LlamaLM
from minercore.models.quant import Q4I8Linear, Q8I8Linear

pytestmark = pytest.mark.skipif(not block_step.AVAILABLE,
                                reason="the block step kernel needs AVX2, FMA and F16C and its build")

D, Q, M = 64, 64, 96  # hidden size, attention heads side by side, MLP width


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layers(q8_down: bool = False) -> tuple[Q4I8Linear, Q4I8Linear, Q4I8Linear | Q8I8Linear]:
    down = Q8I8Linear.from_q8(q8_layer(D, M, 3)) if q8_down else Q4I8Linear.from_q4(q4_layer(D, M, 3))
    return Q4I8Linear.from_q4(q4_layer(D, Q, 1)), Q4I8Linear.from_q4(q4_layer(2 * M, D, 2)), down


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("q8_down", [False, True])
def test_the_tail_is_the_blocks_own_operations(rows: int, q8_down: bool) -> None:
    o, gate_up, down = layers(q8_down)
    gen = torch.Generator().manual_seed(rows)
    x, attn = torch.randn(rows, 1, D, generator=gen), torch.randn(rows, 1, Q, generator=gen)
    norm = torch.rand(D, generator=gen) + 0.5
    h = x + o(attn)
    gate, up = gate_up(rms_norm(h, norm, 1e-5)).chunk(2, dim=-1)
    expected = h + down(F.silu(gate) * up)
    got = block_step.block_tail(x, attn, o, norm, 1e-5, gate_up, down)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_norm_linear_is_the_norm_then_the_product() -> None:
    layer = Q4I8Linear.from_q4(q4_layer(96, D, 4))
    x, norm = torch.randn(5, 2, D), torch.rand(D) + 0.5
    torch.testing.assert_close(block_step.norm_linear(x, norm, 1e-6, layer), layer(rms_norm(x, norm, 1e-6)),
                               rtol=1e-4, atol=1e-5)


def test_a_rows_result_is_the_same_bits_alone_as_in_a_batch() -> None:
    o, gate_up, down = layers()
    x, attn, norm = torch.randn(6, 1, D), torch.randn(6, 1, Q), torch.rand(D) + 0.5
    batched = block_step.block_tail(x, attn, o, norm, 1e-5, gate_up, down)
    for i in range(6):
        alone = block_step.block_tail(x[i:i + 1], attn[i:i + 1], o, norm, 1e-5, gate_up, down)
        assert torch.equal(alone, batched[i:i + 1])


def test_silu_keeps_large_and_nan_gates() -> None:
    """The gate's exp is a polynomial with its argument clamped: far-off gates still give silu's limits, and a NaN
    in a row reaches that row's outputs and no other."""
    o, gate_up, down = layers()
    x, attn, norm = torch.randn(3, 1, D) * 1e3, torch.randn(3, 1, Q), torch.rand(D) + 0.5
    h = x + o(attn)
    gate, up = gate_up(rms_norm(h, norm, 1e-5)).chunk(2, dim=-1)
    torch.testing.assert_close(block_step.block_tail(x, attn, o, norm, 1e-5, gate_up, down),
                               h + down(F.silu(gate) * up), rtol=1e-4, atol=1e-2)
    x[1, 0, 5] = float("nan")
    y = block_step.block_tail(x, attn, o, norm, 1e-5, gate_up, down)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_inputs_it_does_not_take_are_refused_with_what_it_takes() -> None:
    o, gate_up, down = layers()
    x, attn, norm = torch.randn(2, D), torch.randn(2, Q), torch.rand(D)
    ops = torch.ops.minercore
    with pytest.raises(ValueError, match="attn must be contiguous float32"):
        ops.block_tail(x, attn[:, :32], o.w, o.dm, norm, 1e-5, gate_up.w, gate_up.dm, down.w, down.dm)
    with pytest.raises(ValueError, match="x must be contiguous float32"):
        ops.block_tail(x.double(), attn, o.w, o.dm, norm, 1e-5, gate_up.w, gate_up.dm, down.w, down.dm)
    with pytest.raises(ValueError, match="need o"):  # the MLP's layers swapped
        ops.block_tail(x, attn, o.w, o.dm, norm, 1e-5, down.w, down.dm, gate_up.w, gate_up.dm)
    with pytest.raises(ValueError, match="int8-row layer"):
        ops.block_tail(x, attn, o.w, o.dm.float(), norm, 1e-5, gate_up.w, gate_up.dm, down.w, down.dm)
    with pytest.raises(ValueError, match="norm's weight"):
        ops.norm_linear(x, norm[:32], 1e-5, o.w, o.dm)


def int8_row_llama() -> LlamaLM:
    """A two-layer Llama whose block linears are random int8-row layers (the head stays dense)."""
    config = LlamaConfig(family="llama", vocab_size=128, hidden_size=D, n_layer=2, n_head=2, n_kv_head=1,
                         head_dim=32, intermediate_size=M, max_positions=64, rms_norm_eps=1e-5)
    model = LlamaLM.random(config, seed=0)
    for i, block in enumerate(model.layers):
        attn, mlp = block.self_attn, block.mlp
        for parent, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
            linear = getattr(parent, name)
            layer = q4_layer(linear.out_features, linear.in_features, seed=10 * i + len(name))
            setattr(parent, name, Q4I8Linear.from_q4(layer))
    return model.eval()


@torch.inference_mode()
def test_a_models_decode_and_verify_take_the_fused_calls_and_keep_their_logits(monkeypatch) -> None:
    """Over the static cache a block takes norm_linear and block_tail; over a paged one, the attention joins the
    tail's call (attend_block_tail). Either way the logits are the unfused model's."""
    model = int8_row_llama()
    kernel = block_step._kernel

    class Counting:
        Q4, Q8 = kernel.Q4, kernel.Q8

        def norm_linear(self, *args):
            calls["norm_linear"] += 1
            return kernel.norm_linear(*args)

        def block_tail(self, *args):
            calls["block_tail"] += 1
            return kernel.block_tail(*args)

        def attend_block_tail(self, *args):
            calls["attend_block_tail"] += 1
            return kernel.attend_block_tail(*args)

    tokens, pos = torch.tensor([5, 9, 17]), torch.tensor([0, 3, 7])
    for paged in (False, True):
        calls = {"norm_linear": 0, "block_tail": 0, "attend_block_tail": 0}
        results = {}
        for fused in (True, False):
            monkeypatch.setattr(block_step, "AVAILABLE", fused)
            monkeypatch.setattr(block_step, "_kernel", Counting() if fused else kernel)
            if paged:  # each row's blocks scattered through a pool of 16 blocks of 4 positions (block 0: null)
                spec = PagedSpec.create(16, 4, 3, 5, torch.device("cpu"))
                model.setup_caches(3, 16, cache_factory=spec.layer_cache)
                for row, blocks in enumerate(([3, 7, 1, 12, 13], [2, 9, 4, 11, 14], [10, 5, 8, 6, 15])):
                    spec.set_blocks(row, blocks)
            else:
                model.setup_caches(3, 16)
            results[fused] = (model.decode(tokens, pos, 16),
                              model.verify(tokens[:, None].repeat(1, 3), pos + 1, 16))
        tail = "attend_block_tail" if paged else "block_tail"
        # two layers, a decode and a verify step
        assert calls == {"norm_linear": 4, "block_tail": 0, "attend_block_tail": 0, tail: 4}
        for fused, unfused in zip(results[True], results[False], strict=True):
            torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
