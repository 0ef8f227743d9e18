"""A GGUF file's Q4_0 and Q4_1 blocks as they are, times float32 rows, on a CPU without native bfloat16.

Where the model runs in float32 (``select_dtype``'s choice on a CPU without AVX-512 BF16 or AMX), torch's int4
kernel still wants bfloat16 activations and scales: every product casts its rows to bfloat16, converted in
software on such a CPU, and rounds each block's scale to 8 significant bits. The compiled kernel here
(``csrc/q4_rows.c``, AVX2, FMA and F16C) reads the packed nibbles with each block's scale and minimum as the file
holds them (float16: 0.625 bytes a weight, as in the file) and multiplies float32 rows by the weights
``fma(q, d, m)``: the file's values rounded once to float32, as a dequantized float32 copy holds them. Every
output is the same sequence of float32 operations at any row count (``csrc/rows_tile.h``), so a stream's logits
do not depend on its batch.

``rows_mm(x, q, dm)`` is the product; inside a compiled graph it is the custom op ``minercore::q4_rows_mm``.
``pack(values)`` lays [N, K] values 0..15 out as the kernel reads them (a GGUF block's own nibble order) and
``pair(d, m)`` the blocks' scales and minimums. Where the kernel cannot run (no compiled extension, no AVX2, FMA and
F16C, not a CPU tensor, not float32), ``usable`` is False and the loader keeps torch's int4 kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _q4_rows as _kernel  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: torch's int4 kernel serves Q4 tensors
    _kernel = None

BLOCK = 32  # weights per Q4 block

AVAILABLE = _kernel is not None and _kernel.supported()


def usable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a Q4 layer for a model running in ``dtype`` on ``device`` can keep its blocks."""
    return AVAILABLE and torch.device(device).type == "cpu" and dtype == torch.float32


def pack(values: Tensor) -> Tensor:
    """[N, K] integers 0..15 -> [N, K / 2] uint8 as in a GGUF block: byte j of block b holds value 32 b + j in its
    low nibble and 32 b + j + 16 in its high one."""
    n, k = values.shape
    if k % BLOCK:
        raise ValueError(f"q4_rows.pack: K must be a multiple of {BLOCK}, got {k}")
    blocks = values.to(torch.uint8).view(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(n, k // 2).contiguous()


def unpack(q: Tensor) -> Tensor:
    """``pack``'s inverse: [N, K / 2] uint8 -> [N, K] uint8 values 0..15."""
    n, half = q.shape
    blocks = q.view(n, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack((blocks & 0x0F, blocks >> 4), dim=2).reshape(n, half * 2)


def pair(d: Tensor, m: Tensor) -> Tensor:
    """Blocks' scales and minimums [N, K / 32] -> [N, K / 32, 2] float16 (d, m), as a GGUF file holds them; refused
    where float16 does not hold a value exactly (a Q4_0 block's m = -8 d past float16's range)."""
    dm = torch.stack((d, m), dim=-1).to(torch.float16)
    if d.shape != m.shape or not torch.equal(dm.float(), torch.stack((d, m), dim=-1).float()):
        raise ValueError("q4_rows.pair: the blocks' scales and minimums must be [N, K/32] values float16 holds "
                         "exactly (a GGUF file's own)")
    return dm.contiguous()


def rows_mm(x: Tensor, q: Tensor, dm: Tensor) -> Tensor:
    """(M, K) float32 -> (M, N) float32: x times the weights fma(q[n, k], d, m), (d, m) = dm[n, k // 32] (q packed
    [N, K / 2] uint8, dm [N, K / 32, 2] float16)."""
    rows, k = x.shape
    n = q.shape[0]
    if (not AVAILABLE or x.dtype != torch.float32 or x.device.type != "cpu" or q.dtype != torch.uint8
            or dm.dtype != torch.float16 or k % BLOCK or tuple(q.shape) != (n, k // 2)
            or tuple(dm.shape) != (n, k // BLOCK, 2) or not q.is_contiguous() or not dm.is_contiguous()):
        raise ValueError(f"q4_rows_mm: float32 CPU rows [M, K], packed uint8 [N, K/2] values with float16 scales and "
                         f"minimums [N, K/{BLOCK}, 2] on a CPU with AVX2, FMA and F16C, K a multiple of {BLOCK}; got x "
                         f"{tuple(x.shape)} {x.dtype}, q {tuple(q.shape)} {q.dtype}, dm {tuple(dm.shape)} {dm.dtype} "
                         f"(kernel available: {AVAILABLE})")
    x = x.contiguous()
    y = torch.empty((rows, n), dtype=torch.float32)
    if rows and n:
        _kernel.mm(x.data_ptr(), q.data_ptr(), dm.data_ptr(), y.data_ptr(), rows, n, k, torch.get_num_threads())
    return y


def _rows_mm_op(x: Tensor, q: Tensor, dm: Tensor) -> Tensor:
    """The op's body: ``rows_mm`` with its checks cut to the rows' own, since a ``Q4Linear`` checked its blocks
    when it was built and a decode step makes a hundred of these calls. Anything else goes through the checks."""
    if (x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != 2 * q.shape[1] or not x.is_contiguous()
            or q.dtype != torch.uint8 or dm.dtype != torch.float16 or x.device.type != "cpu" or not AVAILABLE):
        return rows_mm(x, q, dm)
    y = torch.empty((x.shape[0], q.shape[0]), dtype=torch.float32)
    if x.shape[0]:
        _kernel.mm(x.data_ptr(), q.data_ptr(), dm.data_ptr(), y.data_ptr(), x.shape[0], q.shape[0], x.shape[1],
                   torch.get_num_threads())
    return y


_library = torch.library.Library("minercore", "FRAGMENT")
_library.define("q4_rows_mm(Tensor x, Tensor q, Tensor dm) -> Tensor")
_library.impl("q4_rows_mm", _rows_mm_op, "CPU")


@torch.library.register_fake("minercore::q4_rows_mm")
def _rows_mm_shape(x: Tensor, q: Tensor, dm: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], q.shape[0]), dtype=torch.float32)
