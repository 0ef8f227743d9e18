"""A GGUF file's Q8_0 blocks times rows quantized to int8, as llama.cpp runs them on a CPU.

The Q8_0 counterpart of ``q4_i8_rows`` (which says what the rows' rounding costs and why a stream's text can then
depend on its batch): each row is quantized per block of 32 the same way, and AVX2's ``maddubs`` multiplies 32 of
the file's int8 values at a time (their magnitudes by the row's values carrying their signs); each block's scale
then applies in float32 (``csrc/q8_i8_rows.c``). On SmolLM2 this is the tied head, 49,152 x 576.

``layout(q, d)`` lays a ``Q8Linear``'s values and scales out for the kernel (outputs in groups of 8); ``rows_mm(x,
w, d)`` is the product, inside a compiled graph the custom op ``minercore::q8_i8_rows_mm``; ``unlayout`` gives the
``Q8Linear`` tensors back.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _q8_i8_rows as _kernel  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: Q8_0 layers multiply float rows (q8_rows, or dequantized)
    _kernel = None

BLOCK = 32  # weights per Q8_0 block
GROUP = 8  # outputs the kernel computes side by side

AVAILABLE = _kernel is not None and _kernel.supported()
# AVX-512 VNNI's dot products where the CPU has them (a third fewer instructions a block); the results are the same
# bits as AVX2's. A module setting so that tests can compare the two.
VNNI = AVAILABLE and _kernel.vnni_supported()


def layout(q: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """A ``Q8Linear``'s int8 values [N, K] and float32 block scales [N, K / 32] -> the kernel's: values
    [N / 8, K / 32, 8, 8, 4] int8, where [g, b, c, j] holds output 8 g + j's values 4 c .. 4 c + 3 of block b, and
    scales [N / 8, K / 32, 8]."""
    n, k = q.shape
    if n % GROUP or k % BLOCK or tuple(d.shape) != (n, k // BLOCK):
        raise ValueError(f"q8_i8_rows.layout: need N a multiple of {GROUP}, K of {BLOCK} and [N, K/{BLOCK}] scales; "
                         f"got values {tuple(q.shape)} and scales {tuple(d.shape)}")
    w = q.view(n // GROUP, GROUP, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    scales = d.float().view(n // GROUP, GROUP, k // BLOCK).permute(0, 2, 1).contiguous()
    return w, scales


def unlayout(w: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """``layout``'s inverse: the values [N, K] and scales [N, K / 32] of a ``Q8Linear``."""
    groups, blocks = w.shape[0], w.shape[1]
    q = w.permute(0, 3, 1, 2, 4).reshape(groups * GROUP, blocks * BLOCK)
    return q.contiguous(), d.permute(0, 2, 1).reshape(groups * GROUP, blocks).contiguous()


def rows_mm(x: Tensor, w: Tensor, d: Tensor) -> Tensor:
    """(M, K) float32 -> (M, N) float32: x's rows quantized to int8 per block of 32, times the Q8_0 weights in
    ``layout``'s form (see ``csrc/q8_i8_rows.h`` for the exact sequence of operations)."""
    rows, k = x.shape
    n = w.shape[0] * GROUP
    if (not AVAILABLE or x.dtype != torch.float32 or x.device.type != "cpu" or w.dtype != torch.int8
            or d.dtype != torch.float32 or w.dim() != 5 or tuple(w.shape[1:]) != (k // BLOCK, 8, GROUP, 4)
            or k % BLOCK or tuple(d.shape) != (w.shape[0], k // BLOCK, GROUP) or not w.is_contiguous()
            or not d.is_contiguous()):
        raise ValueError(f"q8_i8_rows_mm: float32 CPU rows [M, K], values [N/{GROUP}, K/{BLOCK}, 8, {GROUP}, 4] int8 "
                         f"and scales [N/{GROUP}, K/{BLOCK}, {GROUP}] float32 (q8_i8_rows.layout) on a CPU with AVX2, "
                         f"FMA and F16C; got x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}, d "
                         f"{tuple(d.shape)} {d.dtype} (kernel available: {AVAILABLE})")
    x = x.contiguous()
    y = torch.empty((rows, n), dtype=torch.float32)
    if rows:
        _kernel.mm(x.data_ptr(), w.data_ptr(), d.data_ptr(), y.data_ptr(), rows, n, k, torch.get_num_threads(), VNNI)
    return y


def _rows_mm_op(x: Tensor, w: Tensor, d: Tensor) -> Tensor:
    """The op's body: ``rows_mm`` with its checks cut to the rows' own (a ``Q8I8Linear`` checked its weights when
    it was built). Anything else goes through the checks."""
    if (x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != BLOCK * w.shape[1] or not x.is_contiguous()
            or w.dtype != torch.int8 or d.dtype != torch.float32 or x.device.type != "cpu" or not AVAILABLE):
        return rows_mm(x, w, d)
    y = torch.empty((x.shape[0], GROUP * w.shape[0]), dtype=torch.float32)
    if x.shape[0]:
        _kernel.mm(x.data_ptr(), w.data_ptr(), d.data_ptr(), y.data_ptr(), x.shape[0], y.shape[1], x.shape[1],
                   torch.get_num_threads(), VNNI)
    return y


_library = torch.library.Library("minercore", "FRAGMENT")
_library.define("q8_i8_rows_mm(Tensor x, Tensor w, Tensor d) -> Tensor")
_library.impl("q8_i8_rows_mm", _rows_mm_op, "CPU")


@torch.library.register_fake("minercore::q8_i8_rows_mm")
def _rows_mm_shape(x: Tensor, w: Tensor, d: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], GROUP * w.shape[0]), dtype=torch.float32)
