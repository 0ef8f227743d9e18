"""A GGUF file's Q4_0 and Q4_1 blocks times rows quantized to int8, as llama.cpp runs them on a CPU.

``q4_rows`` multiplies float32 rows by the file's values widened to float32: exact, but on a CPU without native
bfloat16 each weight costs a widening and a fused multiply-add. Here each row is first quantized per block of 32
(llama.cpp's Q8_1: ``dx = amax / 127``, ``qx = rint(x / dx)``, ``sx = dx * sum(qx)``) and the weights stay 4-bit
integers: AVX2's ``maddubs`` multiplies 32 of them at a time, and each block's scales then apply in float32
(``csrc/q4_i8_rows.c``). The weights are the file's (values, scales and minimums as it holds them); the rows are
rounded to 8 bits per block, so results differ from the float product by that rounding (about 0.5% relative on a
random product). A row's quantization and every output's operations depend only on that row: the kernel gives a row
the same result whatever rows share the call. The model around it is not bitwise independent of the batch (torch's
flash attention rounds a padded prompt's last bits differently), and rounding to 8 bits can turn such a difference
into another token later in a long answer: with int8 rows a stream's text can depend on its batch, as llama.cpp's
does. Float rows (the default) keep it at the token level.

``layout(q, dm)`` lays a ``Q4Linear``'s packed values and float16 pairs out for the kernel (outputs in groups of 8:
N a multiple of 8); ``rows_mm(x, w, dm)`` is the product, inside a compiled graph the custom op
``minercore::q4_i8_rows_mm``; ``unlayout`` gives the ``Q4Linear`` tensors back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import q4_rows

try:
    from . import _q4_i8_rows as _kernel  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: Q4 layers multiply float rows (q4_rows, torch's int4 kernel)
    _kernel = None

BLOCK = q4_rows.BLOCK
GROUP = 8  # outputs the kernel computes side by side

AVAILABLE = _kernel is not None and _kernel.supported()
# AVX-512 VNNI's dot products where the CPU has them (a third fewer instructions a block); the results are the same
# bits as AVX2's. A module setting so that tests can compare the two.
VNNI = AVAILABLE and _kernel.vnni_supported()


def usable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a model running in ``dtype`` on ``device`` can multiply its Q4 layers by int8 rows."""
    return AVAILABLE and torch.device(device).type == "cpu" and dtype == torch.float32


def layout(q: Tensor, dm: Tensor) -> tuple[Tensor, Tensor]:
    """A ``Q4Linear``'s values (packed [N, K / 2], the file's nibble order) and float16 (d, m) pairs [N, K / 32, 2]
    -> the kernel's: values [N / 8, K / 32, 4, 8, 4] uint8, where [g, b, i, j] holds output 8 g + j's values
    4 i .. 4 i + 3 of block b in its low nibbles and 4 i + 16 .. 4 i + 19 in its high ones, and pairs
    [N / 8, K / 32, 2, 8] float16 (the group's 8 scales, then its 8 minimums)."""
    n, k = q.shape[0], 2 * q.shape[1]
    if n % GROUP or k % BLOCK or tuple(dm.shape) != (n, k // BLOCK, 2):
        raise ValueError(f"q4_i8_rows.layout: need N a multiple of {GROUP}, K of {BLOCK} and [N, K/{BLOCK}, 2] pairs; "
                         f"got values {tuple(q.shape)} and pairs {tuple(dm.shape)}")
    chunks = q4_rows.unpack(q).view(n // GROUP, GROUP, k // BLOCK, 8, 4)
    packed = chunks[:, :, :, :4] | chunks[:, :, :, 4:] << 4  # [g, j, b, i, 4]
    w = packed.permute(0, 2, 3, 1, 4).contiguous()
    pairs = dm.view(n // GROUP, GROUP, k // BLOCK, 2).permute(0, 2, 3, 1).contiguous()
    return w, pairs


def unlayout(w: Tensor, dm: Tensor) -> tuple[Tensor, Tensor]:
    """``layout``'s inverse: the packed values [N, K / 2] and pairs [N, K / 32, 2] of a ``Q4Linear``."""
    groups, blocks = w.shape[0], w.shape[1]
    packed = w.permute(0, 3, 1, 2, 4)  # [g, j, b, i, 4]
    chunks = torch.cat((packed & 0x0F, packed >> 4), dim=3)  # [g, j, b, 8, 4]
    values = chunks.reshape(groups * GROUP, blocks * BLOCK)
    pairs = dm.permute(0, 3, 1, 2).reshape(groups * GROUP, blocks, 2)
    return q4_rows.pack(values), pairs.contiguous()


def rows_mm(x: Tensor, w: Tensor, dm: Tensor) -> Tensor:
    """(M, K) float32 -> (M, N) float32: x's rows quantized to int8 per block of 32, times the Q4 weights in
    ``layout``'s form (see ``csrc/q4_i8_rows.h`` for the exact sequence of operations)."""
    rows, k = x.shape
    n = w.shape[0] * GROUP
    if (not AVAILABLE or x.dtype != torch.float32 or x.device.type != "cpu" or w.dtype != torch.uint8
            or dm.dtype != torch.float16 or w.dim() != 5 or tuple(w.shape[1:]) != (k // BLOCK, 4, GROUP, 4)
            or k % BLOCK or tuple(dm.shape) != (w.shape[0], k // BLOCK, 2, GROUP) or not w.is_contiguous()
            or not dm.is_contiguous()):
        raise ValueError(f"q4_i8_rows_mm: float32 CPU rows [M, K], values [N/{GROUP}, K/{BLOCK}, 4, {GROUP}, 4] uint8 "
                         f"and pairs [N/{GROUP}, K/{BLOCK}, 2, {GROUP}] float16 (q4_i8_rows.layout) on a CPU with "
                         f"AVX2, FMA and F16C; got x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}, dm "
                         f"{tuple(dm.shape)} {dm.dtype} (kernel available: {AVAILABLE})")
    x = x.contiguous()
    y = torch.empty((rows, n), dtype=torch.float32)
    if rows:
        _kernel.mm(x.data_ptr(), w.data_ptr(), dm.data_ptr(), y.data_ptr(), rows, n, k, torch.get_num_threads(), VNNI)
    return y


def _rows_mm_op(x: Tensor, w: Tensor, dm: Tensor) -> Tensor:
    """The op's body: ``rows_mm`` with its checks cut to the rows' own (a ``Q4I8Linear`` checked its weights when
    it was built; a decode step makes a hundred of these calls). Anything else goes through the checks."""
    if (x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != BLOCK * w.shape[1] or not x.is_contiguous()
            or w.dtype != torch.uint8 or dm.dtype != torch.float16 or x.device.type != "cpu" or not AVAILABLE):
        return rows_mm(x, w, dm)
    y = torch.empty((x.shape[0], GROUP * w.shape[0]), dtype=torch.float32)
    if x.shape[0]:
        _kernel.mm(x.data_ptr(), w.data_ptr(), dm.data_ptr(), y.data_ptr(), x.shape[0], y.shape[1], x.shape[1],
                   torch.get_num_threads(), VNNI)
    return y


_library = torch.library.Library("minercore", "FRAGMENT")
_library.define("q4_i8_rows_mm(Tensor x, Tensor w, Tensor dm) -> Tensor")
_library.impl("q4_i8_rows_mm", _rows_mm_op, "CPU")


@torch.library.register_fake("minercore::q4_i8_rows_mm")
def _rows_mm_shape(x: Tensor, w: Tensor, dm: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], GROUP * w.shape[0]), dtype=torch.float32)
