"""The compiled int4 row kernel: bit-identical to torch's int4 CPU kernel at every row count, through the layer,
the custom op and a compiled graph, and never used where it would not be."""

from __future__ import annotations

import pytest
import torch

from minercore.models import int4_rows
from minercore.models.quant import Int4Linear

needs_kernel = pytest.mark.skipif(not int4_rows.AVAILABLE, reason="the int4 row kernel needs AVX-512 and its build")

SHAPES = [(960, 576, 32), (576, 1536, 32), (128, 256, 64), (64, 512, 128), (192, 256, 256)]
ROWS = [1, 3, 4, 5, 7, 8, 9, 16, 31, 64, 72, 130]


def packed(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    scales_and_zeros = (torch.randn(k // group, n, 2, generator=gen) * 0.05).to(torch.bfloat16)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros


def test_the_kernel_is_available_where_its_build_and_the_cpu_allow() -> None:
    # Where torch runs its AVX-512 kernels the extension must have been built: a silent fallback would hide a
    # broken build behind torch's slower kernel.
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert int4_rows.AVAILABLE


@needs_kernel
@pytest.mark.parametrize(("n", "k", "group"), SHAPES)
def test_rows_equal_torch_kernel_bit_for_bit_at_every_row_count(n: int, k: int, group: int) -> None:
    weights, scales_and_zeros = packed(n, k, group, seed=n + k)
    x = (torch.randn(max(ROWS), k, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    for m in ROWS:
        rows = x[:m].contiguous()
        expected = torch._weight_int4pack_mm_for_cpu(rows, weights, group, scales_and_zeros)
        assert torch.equal(int4_rows.rows_mm(rows, weights, group, scales_and_zeros), expected), m
        assert torch.equal(torch.ops.minercore.int4_rows_mm(rows, weights, group, scales_and_zeros), expected), m


@needs_kernel
def test_a_strided_input_gives_the_same_rows() -> None:
    weights, scales_and_zeros = packed(128, 256, 32, seed=6)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16).t()  # (16, 256), strided
    expected = torch._weight_int4pack_mm_for_cpu(x.contiguous(), weights, 32, scales_and_zeros)
    assert torch.equal(int4_rows.rows_mm(x, weights, 32, scales_and_zeros), expected)


@needs_kernel
def test_inputs_the_kernel_does_not_take_go_to_torchs_kernel_and_its_checks() -> None:
    weights, scales_and_zeros = packed(128, 256, 32, seed=8)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(9))
    expected = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weights, 32, scales_and_zeros)
    with pytest.raises(RuntimeError):  # float32 activations with bfloat16 scales: torch's kernel refuses them
        int4_rows.rows_mm(x, weights, 32, scales_and_zeros)
    with pytest.raises(RuntimeError):  # more inputs than the packing holds: refused, never read past its end
        int4_rows.rows_mm(torch.randn(16, 512).to(torch.bfloat16), weights, 32, scales_and_zeros)
    assert torch.equal(int4_rows.rows_mm(x.to(torch.bfloat16), weights, 32, scales_and_zeros), expected)


@needs_kernel
def test_special_values_round_as_torch_does() -> None:
    weights, scales_and_zeros = packed(64, 64, 32, seed=3)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[0, 0], x[1, :] = 1e30, 0.0  # overflow to inf in one row, an all-zero row
    x[2, 5] = float("nan")
    expected = torch._weight_int4pack_mm_for_cpu(x, weights, 32, scales_and_zeros)
    got = int4_rows.rows_mm(x, weights, 32, scales_and_zeros)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(got[finite], expected[finite])
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


@needs_kernel
def test_the_layer_uses_the_kernel_only_where_it_can() -> None:
    weight = torch.randn(128, 256)
    assert Int4Linear.quantize(weight, dtype=torch.bfloat16).rows_kernel
    assert not Int4Linear.quantize(torch.randn(80, 256), dtype=torch.bfloat16).rows_kernel  # N not a multiple of 64
    assert not Int4Linear.quantize(weight, dtype=torch.float16).rows_kernel  # the kernel is bfloat16 only


@needs_kernel
def test_a_layer_gives_the_same_rows_alone_in_a_batch_and_compiled() -> None:
    layer = Int4Linear.quantize(torch.randn(192, 256), dtype=torch.bfloat16)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    batched = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(40)])
    assert torch.equal(batched, alone)
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    for m in (2, 9, 40):
        assert torch.equal(compiled(x[:m]), batched[:m]), m
