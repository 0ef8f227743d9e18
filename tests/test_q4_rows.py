"""The compiled Q4 row kernel: a GGUF file's Q4_0/Q4_1 weights (rounded once to float32) times float32 rows, every
output the same operations whatever the batch, the thread count or the compile; the layer around it, its packing
and its fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minercore.models import q4_rows
from minercore.models.quant import Q4Linear, Q8Linear, describe

needs_kernel = pytest.mark.skipif(not q4_rows.AVAILABLE, reason="the Q4 row kernel needs AVX2, FMA and its build")

SHAPES = [(960, 576), (3072, 576), (576, 1536), (7, 64), (33, 96)]


def blocks(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values 0..15 [N, K] and a file's float16 scales and minimums [N, K / 32], widened (Q4_1's w = d q + m)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half().float()
    m = (-torch.rand(n, k // 32, generator=gen) * 0.16).half().float()
    return values, d, m


def weights(values: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float32 weights as a dequantized copy holds them: d q exact, plus m rounded once."""
    n, k = values.shape
    return (values.float().view(n, -1, 32) * d[..., None] + m[..., None]).view(n, k)


def test_the_kernel_is_available_where_its_build_and_the_cpu_allow() -> None:
    # Every x86-64 CPU torch runs its AVX2 kernels on has what the kernel needs: a silent fallback would hide a
    # broken build behind torch's int4 kernel.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert q4_rows.AVAILABLE


def test_packing_is_a_gguf_blocks_nibble_order_and_round_trips() -> None:
    values = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64).flip(1).contiguous()
    packed = q4_rows.pack(values)
    assert packed.shape == (1, 32) and packed.dtype == torch.uint8
    # byte j of a block: value j low, value j + 16 high
    assert int(packed[0, 3]) == int(values[0, 3]) | int(values[0, 19]) << 4
    assert int(packed[0, 16 + 5]) == int(values[0, 32 + 5]) | int(values[0, 32 + 21]) << 4
    assert torch.equal(q4_rows.unpack(packed), values)
    with pytest.raises(ValueError, match="multiple of 32"):
        q4_rows.pack(values[:, :48])


@needs_kernel
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_rows_are_the_product_with_the_files_weights_and_independent_of_the_batch(n: int, k: int) -> None:
    values, d, m = blocks(n, k, seed=n + k)
    q, dm = q4_rows.pack(values), q4_rows.pair(d, m)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(1)) * 3
    everything = q4_rows.rows_mm(x, q, dm)
    reference = x.double() @ weights(values, d, m).double().t()
    torch.testing.assert_close(everything.double(), reference, atol=1e-5 * float(reference.abs().max()), rtol=0)
    for rows in range(1, 13):  # one and two rows widen in registers, more through the tile: the same sequence
        assert torch.equal(q4_rows.rows_mm(x[:rows], q, dm), everything[:rows]), rows
        assert torch.equal(q4_rows.rows_mm(x[rows - 1:rows], q, dm), everything[rows - 1:rows]), rows


@needs_kernel
def test_the_thread_count_and_a_strided_input_change_nothing() -> None:
    values, d, m = blocks(200, 128, seed=2)
    q, dm = q4_rows.pack(values), q4_rows.pair(d, m)
    x = torch.randn(128, 9, generator=torch.Generator().manual_seed(3)).t()  # (9, 128), strided
    expected = q4_rows.rows_mm(x.contiguous(), q, dm)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            assert torch.equal(q4_rows.rows_mm(x, q, dm), expected), count
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_inputs_the_kernel_does_not_take_are_refused_with_what_it_takes() -> None:
    values, d, m = blocks(64, 64, seed=4)
    q, dm = q4_rows.pack(values), q4_rows.pair(d, m)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="float32 CPU rows"):
        q4_rows.rows_mm(x.bfloat16(), q, dm)
    with pytest.raises(ValueError, match="K a multiple of 32"):
        q4_rows.rows_mm(torch.randn(2, 128), q, dm)  # more inputs than the blocks hold: never read past them
    with pytest.raises(ValueError):
        q4_rows.rows_mm(x, q, dm[:, :1])
    with pytest.raises(ValueError):
        q4_rows.rows_mm(x, values, dm)  # unpacked values
    assert q4_rows.rows_mm(torch.empty(0, 64), q, dm).shape == (0, 64)
    y = torch.full((1, 64), 7.0)
    q4_rows._kernel.mm(x.data_ptr(), q.data_ptr(), dm.data_ptr(), y.data_ptr(), 0, 64, 64, 2)  # no rows: no work
    assert torch.equal(y, torch.full((1, 64), 7.0))


@needs_kernel
def test_the_layer_compiled_equals_eager_and_falls_back_off_the_kernel() -> None:
    values, d, m = blocks(96, 64, seed=5)
    bias = torch.randn(96)
    layer = Q4Linear.from_blocks(d, m, values, bias=bias)
    x = torch.randn(2, 3, 64)
    eager = layer(x)
    assert eager.shape == (2, 3, 96)
    assert torch.equal(layer.dequantize(), weights(values, d, m))
    torch.testing.assert_close(eager, F.linear(x, layer.dequantize(), bias), atol=1e-5, rtol=1e-5)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), eager)
    assert torch.equal(compiled(x[:1, :1]), eager[:1, :1])
    # bfloat16 inputs are not the kernel's: the dequantized weights serve them, the layer keeps its blocks
    layer.to(torch.bfloat16)
    assert layer.q.dtype == torch.uint8 and layer.dm.dtype == torch.float16
    torch.testing.assert_close(layer(x.bfloat16()).float(), eager, atol=0.5, rtol=0.05)


def test_the_layer_refuses_blocks_of_the_wrong_shape_and_is_described() -> None:
    values, d, m = blocks(8, 64, seed=6)
    q, dm = q4_rows.pack(values), q4_rows.pair(d, m)
    with pytest.raises(ValueError, match="Q4Linear needs packed uint8"):
        Q4Linear(q, dm[:, :1])
    with pytest.raises(ValueError, match="Q4Linear needs packed uint8"):
        Q4Linear(q.to(torch.int16), dm)
    with pytest.raises(ValueError, match="Q4Linear needs packed uint8"):
        Q4Linear(q, dm.float())
    with pytest.raises(ValueError, match="float16 holds"):
        q4_rows.pair(d, m + 1e-6)  # not a file's float16 values
    q8 = Q8Linear(torch.zeros(8, 64, dtype=torch.int8), d)
    model = torch.nn.Sequential(Q4Linear(q, dm), Q4Linear(q, dm), q8, torch.nn.Linear(8, 8))
    assert describe(model) == "Q4 blocks (2 linears), Q8_0 blocks (1 linear) (1 of 4 linears unquantized)"
