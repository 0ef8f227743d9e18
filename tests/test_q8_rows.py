"""The compiled Q8_0 row kernel: the file's exact weights times float32 rows, every output the same operations
whatever the batch, the thread count or the compile; the layer around it, and its fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minercore.models import q8_rows
from minercore.models.quant import Q8Linear, describe

needs_kernel = pytest.mark.skipif(not q8_rows.AVAILABLE, reason="the Q8_0 row kernel needs AVX2, FMA and its build")

SHAPES = [(960, 576), (49152 // 64, 576), (576, 1536), (7, 64), (33, 96)]


def blocks(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half().float()  # a file's float16 scales
    return q, d


def exact(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.double().view(n, -1, 32) * d.double()[..., None]).view(n, k)


def test_the_kernel_is_available_where_its_build_and_the_cpu_allow() -> None:
    # Every x86-64 CPU torch runs its AVX2 kernels on has what the kernel needs: a silent fallback would hide a
    # broken build behind the dequantized head.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert q8_rows.AVAILABLE


@needs_kernel
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_rows_are_the_exact_product_and_independent_of_the_batch(n: int, k: int) -> None:
    q, d = blocks(n, k, seed=n + k)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(1)) * 3
    everything = q8_rows.rows_mm(x, q, d)
    reference = x.double() @ exact(q, d).t()
    torch.testing.assert_close(everything.double(), reference, atol=1e-5 * float(reference.abs().max()), rtol=0)
    for m in range(1, 13):  # one and two rows widen in registers, more through the tile: the same sequence
        assert torch.equal(q8_rows.rows_mm(x[:m], q, d), everything[:m]), m
        assert torch.equal(q8_rows.rows_mm(x[m - 1:m], q, d), everything[m - 1:m]), m


@needs_kernel
def test_the_thread_count_and_a_strided_input_change_nothing() -> None:
    q, d = blocks(200, 128, seed=2)
    x = torch.randn(128, 9, generator=torch.Generator().manual_seed(3)).t()  # (9, 128), strided
    expected = q8_rows.rows_mm(x.contiguous(), q, d)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            assert torch.equal(q8_rows.rows_mm(x, q, d), expected), count
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_inputs_the_kernel_does_not_take_are_refused_with_what_it_takes() -> None:
    q, d = blocks(64, 64, seed=4)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="float32 CPU rows"):
        q8_rows.rows_mm(x.bfloat16(), q, d)
    with pytest.raises(ValueError, match="K a multiple of 32"):
        q8_rows.rows_mm(torch.randn(2, 128), q, d)  # more inputs than the blocks hold: never read past them
    with pytest.raises(ValueError):
        q8_rows.rows_mm(x, q, d[:, :1])
    assert q8_rows.rows_mm(torch.empty(0, 64), q, d).shape == (0, 64)


@needs_kernel
def test_the_layer_compiled_equals_eager_and_falls_back_off_the_kernel() -> None:
    q, d = blocks(96, 64, seed=5)
    bias = torch.randn(96)
    layer = Q8Linear(q, d, bias)
    x = torch.randn(2, 3, 64)
    eager = layer(x)
    assert eager.shape == (2, 3, 96)
    torch.testing.assert_close(eager, F.linear(x, layer.dequantize(), bias), atol=1e-5, rtol=1e-5)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), eager)
    assert torch.equal(compiled(x[:1, :1]), eager[:1, :1])
    # bfloat16 inputs are not the kernel's: the dequantized weights serve them, the layer keeps its blocks
    layer.to(torch.bfloat16)
    assert layer.q.dtype == torch.int8 and layer.d.dtype == torch.float32
    torch.testing.assert_close(layer(x.bfloat16()).float(), eager, atol=0.5, rtol=0.05)


def test_the_layer_refuses_blocks_of_the_wrong_shape_and_is_described() -> None:
    q, d = blocks(8, 64, seed=6)
    with pytest.raises(ValueError, match="Q8Linear needs int8"):
        Q8Linear(q, d[:, :1])
    with pytest.raises(ValueError, match="Q8Linear needs int8"):
        Q8Linear(q.to(torch.int16), d)
    model = torch.nn.Sequential(Q8Linear(q, d), torch.nn.Linear(8, 8))
    assert describe(model) == "Q8_0 blocks (1 linear) (1 of 2 linears unquantized)"
    assert torch.equal(Q8Linear(q, d).dequantize().double(), exact(q, d))
