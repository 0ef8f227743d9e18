"""The compiled int8-row kernels: a GGUF file's Q4_0/Q4_1 and Q8_0 weights times rows quantized to int8 per block of
32 (llama.cpp's scheme), against that scheme computed exactly here; every row independent of its batch, the thread
count and the compile; the layers, their layouts and their fallback; the option that turns them on."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minercore.contract.config import ModelOptions
from minercore.contract.options import OPTIONS
from minercore.models import q4_i8_rows, q4_rows, q8_i8_rows
from minercore.models.quant import Q4I8Linear, Q4Linear, Q8I8Linear, Q8Linear, describe, int8_rows

needs_kernel = pytest.mark.skipif(not (q4_i8_rows.AVAILABLE and q8_i8_rows.AVAILABLE),
                                  reason="the int8-row kernels need AVX2, FMA and their build")

SHAPES = [(960, 576), (576, 1536), (8, 32), (24, 96)]


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux names them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def q4_layer(n: int, k: int, seed: int, *, q4_0: bool = False) -> Q4Linear:
    """Random values 0..15 with a file's float16 scales and minimums (Q4_0's minimum is -8 d)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02).half().float()
    m = -8 * d if q4_0 else (-torch.rand(n, k // 32, generator=gen) * 0.16).half().float()
    return Q4Linear.from_blocks(d, m, values)


def quantized(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row quantized per block as the kernels do it, in float32: dx = amax / 127, qx = rint(x * (127 / amax))
    ties to even, sx = dx * sum(qx)."""
    rows, k = x.shape
    blocks = x.numpy().astype(np.float32).reshape(rows, k // 32, 32)
    amax = np.abs(blocks).max(axis=-1)
    dx = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    qx = np.rint((blocks * inverse[..., None]).astype(np.float32))
    return qx, dx, (dx * qx.sum(axis=-1).astype(np.float32)).astype(np.float32)


def scheme(x: torch.Tensor, layer: Q4Linear | Q8Linear) -> torch.Tensor:
    """What a kernel computes, in float64 from the float32 quantities it forms: per block the integer dot product
    of the row's and the weights' values times d * dx, plus (Q4) m * sx."""
    qx, dx, sx = quantized(x)
    n, k = layer.out_features, layer.in_features
    if isinstance(layer, Q4Linear):
        values = q4_rows.unpack(layer.q).numpy().astype(np.float64).reshape(n, k // 32, 32)
        d, m = (t.numpy().astype(np.float32) for t in layer.dm.float().unbind(-1))
    else:
        values = layer.q.numpy().astype(np.float64).reshape(n, k // 32, 32)
        d, m = layer.d.numpy().astype(np.float32), np.zeros((n, k // 32), dtype=np.float32)
    dots = np.einsum("rbk,nbk->rnb", qx.astype(np.float64), values)
    scales = (d[None, :, :] * dx[:, None, :]).astype(np.float32).astype(np.float64)
    return torch.from_numpy((dots * scales + m[None].astype(np.float64) * sx[:, None, :].astype(np.float64)).sum(-1))


def q8_layer(n: int, k: int, seed: int) -> Q8Linear:
    """Random int8 values (-128 among them) with a file's float16 block scales."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    q[0, :3] = -128
    return Q8Linear(q, (torch.rand(n, k // 32, generator=gen) * 0.002).half().float())


def test_the_kernels_are_available_where_their_build_and_the_cpu_allow() -> None:
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert q4_i8_rows.AVAILABLE and q8_i8_rows.AVAILABLE


def test_vnni_is_taken_exactly_where_the_cpu_has_it() -> None:
    flags = cpu_flags()
    if q4_i8_rows.AVAILABLE and flags:
        has_vnni = {"avx512_vnni", "avx512vl"} <= flags
        assert q4_i8_rows.VNNI is has_vnni and q8_i8_rows.VNNI is has_vnni, sorted(flags)


@pytest.mark.skipif(not (q4_i8_rows.VNNI and q8_i8_rows.VNNI), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
def test_vnni_gives_the_same_bits_as_avx2(kind: str, monkeypatch) -> None:
    """The two instruction sets sum the same integer products, so every output is the same float32 sequence."""
    for n, k in [(960, 576), (576, 1536), (8, 32), (24, 96)]:
        x = torch.randn(13, k, generator=torch.Generator().manual_seed(n)) * 3
        x[5, :32] = 0
        x[7, 1] = 1e30  # one huge value: that block's other values round to 0
        if kind == "q8_0":
            layer = q8_layer(n, k, seed=n + k)
            module, weights = q8_i8_rows, q8_i8_rows.layout(layer.q, layer.d)
        else:
            layer = q4_layer(n, k, seed=n + k, q4_0=kind == "q4_0")
            module, weights = q4_i8_rows, q4_i8_rows.layout(layer.q, layer.dm)
        op = getattr(torch.ops.minercore, module.__name__.rsplit(".", 1)[-1] + "_mm")  # the layers' path
        results = {}
        for vnni in (True, False):
            monkeypatch.setattr(module, "VNNI", vnni)
            results[vnni] = [module.rows_mm(x[:rows], *weights) for rows in range(1, 14)] + [op(x, *weights)]
        for rows, (fast, plain) in enumerate(zip(results[True], results[False], strict=True), 1):
            assert torch.equal(fast, plain), (n, k, rows)


def test_the_layout_groups_eight_outputs_and_round_trips() -> None:
    layer = q4_layer(16, 64, seed=1)
    w, dm = q4_i8_rows.layout(layer.q, layer.dm)
    assert w.shape == (2, 2, 4, 8, 4) and dm.shape == (2, 2, 2, 8)
    values = q4_rows.unpack(layer.q)
    # group 1, block 1, vector 2, output 8 + 3, byte 1: values 32 + 4 * 2 + 1 (low) and + 16 (high)
    assert int(w[1, 1, 2, 3, 1]) == int(values[11, 41]) | int(values[11, 57]) << 4
    assert torch.equal(dm[1, 1, 0, 3], layer.dm[11, 1, 0]) and torch.equal(dm[1, 1, 1, 3], layer.dm[11, 1, 1])
    q, pairs = q4_i8_rows.unlayout(w, dm)
    assert torch.equal(q, layer.q) and torch.equal(pairs, layer.dm)
    with pytest.raises(ValueError, match="multiple of 8"):
        q4_i8_rows.layout(layer.q[:12], layer.dm[:12])


@needs_kernel
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("q4_0", [False, True])
def test_rows_are_the_int8_scheme_exactly_and_independent_of_the_batch(n: int, k: int, q4_0: bool) -> None:
    layer = q4_layer(n, k, seed=n + k, q4_0=q4_0)
    w, dm = q4_i8_rows.layout(layer.q, layer.dm)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(2)) * 3
    x[3] = 0  # a row of zeros: every block's scale 0
    everything = q4_i8_rows.rows_mm(x, w, dm)
    expected = scheme(x, layer)
    torch.testing.assert_close(everything.double(), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    assert torch.equal(everything[3], torch.zeros(n))
    exact = x.double() @ layer.dequantize().double().t()  # the rows' 8-bit rounding is all that separates them
    assert float((everything.double() - exact).norm() / exact.norm()) < 2e-2
    for rows in range(1, 13):  # rows go four at a time: every count, and each row alone, is the same sequence
        assert torch.equal(q4_i8_rows.rows_mm(x[:rows], w, dm), everything[:rows]), rows
        assert torch.equal(q4_i8_rows.rows_mm(x[rows - 1:rows], w, dm), everything[rows - 1:rows]), rows


def test_the_q8_layout_groups_eight_outputs_and_round_trips() -> None:
    layer = q8_layer(16, 64, seed=11)
    w, d = q8_i8_rows.layout(layer.q, layer.d)
    assert w.shape == (2, 2, 8, 8, 4) and d.shape == (2, 2, 8)
    # group 1, block 1, chunk 5, output 8 + 3, byte 2: value 32 + 4 * 5 + 2
    assert int(w[1, 1, 5, 3, 2]) == int(layer.q[11, 54]) and float(d[1, 1, 3]) == float(layer.d[11, 1])
    q, scales = q8_i8_rows.unlayout(w, d)
    assert torch.equal(q, layer.q) and torch.equal(scales, layer.d)
    with pytest.raises(ValueError, match="multiple of 8"):
        q8_i8_rows.layout(layer.q[:12], layer.d[:12])


@needs_kernel
@pytest.mark.parametrize(("n", "k"), [(4096, 576), (8, 32), (24, 96)])
def test_q8_rows_are_the_int8_scheme_exactly_and_independent_of_the_batch(n: int, k: int) -> None:
    layer = q8_layer(n, k, seed=n + k)
    w, d = q8_i8_rows.layout(layer.q, layer.d)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(12)) * 3
    x[3] = 0
    everything = q8_i8_rows.rows_mm(x, w, d)
    expected = scheme(x, layer)
    torch.testing.assert_close(everything.double(), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    assert torch.equal(everything[3], torch.zeros(n))
    exact = x.double() @ layer.dequantize().double().t()
    assert float((everything.double() - exact).norm() / exact.norm()) < 2e-2
    for rows in range(1, 13):
        assert torch.equal(q8_i8_rows.rows_mm(x[:rows], w, d), everything[:rows]), rows
        assert torch.equal(q8_i8_rows.rows_mm(x[rows - 1:rows], w, d), everything[rows - 1:rows]), rows
    with pytest.raises(ValueError, match="float32 CPU rows"):
        q8_i8_rows.rows_mm(x.bfloat16(), w, d)
    with pytest.raises(ValueError):
        q8_i8_rows.rows_mm(x, layer.q, layer.d)  # a Q8Linear's tensors, not laid out
    assert q8_i8_rows.rows_mm(torch.empty(0, k), w, d).shape == (0, n)


@needs_kernel
def test_the_thread_count_and_a_strided_input_change_nothing() -> None:
    layer = q4_layer(200, 128, seed=3)
    w, dm = q4_i8_rows.layout(layer.q, layer.dm)
    x = torch.randn(128, 9, generator=torch.Generator().manual_seed(4)).t()  # (9, 128), strided
    expected = q4_i8_rows.rows_mm(x.contiguous(), w, dm)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            assert torch.equal(q4_i8_rows.rows_mm(x, w, dm), expected), count
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_a_nan_reaches_its_rows_outputs_and_no_other_row() -> None:
    layer = q4_layer(16, 64, seed=5)
    w, dm = q4_i8_rows.layout(layer.q, layer.dm)
    x = torch.randn(3, 64)
    x[1, 40] = float("nan")
    y = q4_i8_rows.rows_mm(x, w, dm)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


@needs_kernel
def test_inputs_the_kernel_does_not_take_are_refused_with_what_it_takes() -> None:
    layer = q4_layer(64, 64, seed=6)
    w, dm = q4_i8_rows.layout(layer.q, layer.dm)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="float32 CPU rows"):
        q4_i8_rows.rows_mm(x.bfloat16(), w, dm)
    with pytest.raises(ValueError, match="float32 CPU rows"):
        q4_i8_rows.rows_mm(torch.randn(2, 128), w, dm)  # more inputs than the blocks hold: never read past them
    with pytest.raises(ValueError):
        q4_i8_rows.rows_mm(x, layer.q, layer.dm)  # a Q4Linear's tensors, not laid out
    with pytest.raises(ValueError):
        q4_i8_rows.rows_mm(x, w, dm[:, :1])
    assert q4_i8_rows.rows_mm(torch.empty(0, 64), w, dm).shape == (0, 64)


@needs_kernel
def test_the_layer_compiled_equals_eager_and_falls_back_off_the_kernel() -> None:
    bias = torch.randn(96)
    source = q4_layer(96, 64, seed=7)
    source.bias = bias
    layer = Q4I8Linear.from_q4(source)
    assert torch.equal(layer.dequantize(), source.dequantize())
    x = torch.randn(2, 3, 64)
    eager = layer(x)
    assert eager.shape == (2, 3, 96)
    torch.testing.assert_close(eager, scheme(x.view(6, 64), source).float().view(2, 3, 96) + bias, atol=1e-4,
                               rtol=1e-5)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), eager)
    assert torch.equal(compiled(x[:1, :1]), eager[:1, :1])
    layer.to(torch.bfloat16)  # not the kernel's inputs: the dequantized weights serve them, the layer keeps its own
    assert layer.w.dtype == torch.uint8 and layer.dm.dtype == torch.float16
    torch.testing.assert_close(layer(x.bfloat16()).float(), F.linear(x, source.dequantize(), bias), atol=0.5,
                               rtol=0.05)


@needs_kernel
def test_the_q8_layer_compiled_equals_eager_and_falls_back_off_the_kernel() -> None:
    source = q8_layer(64, 96, seed=13)
    layer = Q8I8Linear.from_q8(source)
    assert torch.equal(layer.dequantize(), source.dequantize())
    x = torch.randn(2, 3, 96)
    eager = layer(x)
    torch.testing.assert_close(eager, scheme(x.view(6, 96), source).float().view(2, 3, 64), atol=1e-4, rtol=1e-5)
    assert torch.equal(torch.compile(layer, fullgraph=True, dynamic=True)(x), eager)
    layer.to(torch.bfloat16)
    assert layer.w.dtype == torch.int8 and layer.d.dtype == torch.float32
    torch.testing.assert_close(layer(x.bfloat16()).float(), F.linear(x, source.dequantize()), atol=0.5, rtol=0.05)


def test_int8_rows_turns_the_block_layers_that_fit_and_describes_them(caplog) -> None:
    model = torch.nn.Sequential(q4_layer(16, 64, seed=8), q4_layer(16, 64, seed=9), q4_layer(12, 64, seed=10),
                                q8_layer(8, 64, seed=14), q8_layer(12, 64, seed=15), torch.nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING):
        assert int8_rows(model) == 3
    assert [type(m).__name__ for m in model] == ["Q4I8Linear", "Q4I8Linear", "Q4Linear", "Q8I8Linear", "Q8Linear",
                                                 "Linear"]
    assert "2 block layers keep float rows" in caplog.text
    assert describe(model) == ("Q4 blocks (1 linear), Q4 blocks x int8 rows (2 linears), Q8_0 blocks (1 linear), "
                               "Q8_0 blocks x int8 rows (1 linear) (1 of 6 linears unquantized)")
    with pytest.raises(ValueError, match="Q8I8Linear needs"):
        Q8I8Linear(model[3].w[:, :, :2], model[3].d)
    with pytest.raises(ValueError, match="Q4I8Linear needs"):
        Q4I8Linear(model[0].w[:, :, :2], model[0].dm)


def test_the_option_is_checked_and_reaches_the_command_lines() -> None:
    assert ModelOptions(activations="int8").activations == "int8"
    assert ModelOptions().activations == "auto"
    with pytest.raises(ValueError, match="activations must be one of auto, float, int8"):
        ModelOptions(activations="int4")
    with pytest.raises(ValueError, match="needs the native backend"):
        ModelOptions(backend="hf", activations="int8")
    (option,) = (option for option in OPTIONS if option.name == "activations")
    assert (option.serve_flag, option.miner_flag) == ("--activations", "--model.activations")
