"""A GGUF file's Q8_0 blocks as they are, times float32 rows, on a CPU without native bfloat16.

Where the model runs in float32 (``select_dtype``'s choice on a CPU without AVX-512 BF16 or AMX), a Q8_0 matrix
dequantized to float32 is four bytes a weight, and its product reads them all every decode step: SmolLM2's tied
head alone is 113 MB. torch's int8 kernel wants bfloat16 activations (and per-channel scales, not Q8_0's per
block), which such a CPU converts in software. The compiled kernel here (``csrc/q8_rows.c``, AVX2 and FMA) reads
the int8 values and their block scales (one byte a weight and one float per 32) and multiplies by the exact
float32 weights ``d * q``, the file's own values: the same values a dequantized float32 copy holds, summed in an
order of its own. Every output is the same sequence of float32 operations at any row count, so a stream's logits
do not depend on its batch.

``rows_mm(x, q, d)`` is the product; inside a compiled graph it is the custom op ``minercore::q8_rows_mm``.
Where the kernel cannot run (no compiled extension, no AVX2 and FMA, not a CPU tensor, not float32), ``usable``
is False and the caller keeps the dequantized layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _q8_rows as _kernel  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: Q8_0 tensors are dequantized
    _kernel = None

BLOCK = 32  # weights per Q8_0 block

AVAILABLE = _kernel is not None and _kernel.supported()


def usable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a Q8_0 layer for a model running in ``dtype`` on ``device`` can keep its blocks."""
    return AVAILABLE and torch.device(device).type == "cpu" and dtype == torch.float32


def rows_mm(x: Tensor, q: Tensor, d: Tensor) -> Tensor:
    """(M, K) float32 -> (M, N) float32: x times the weights d[n, k // 32] * q[n, k] (q [N, K] int8, d [N, K / 32]
    float32)."""
    m, k = x.shape
    n = q.shape[0]
    if (not AVAILABLE or x.dtype != torch.float32 or x.device.type != "cpu" or q.dtype != torch.int8
            or d.dtype != torch.float32 or tuple(q.shape) != (n, k) or tuple(d.shape) != (n, k // BLOCK)
            or k % BLOCK or not q.is_contiguous() or not d.is_contiguous()):
        raise ValueError(f"q8_rows_mm: float32 CPU rows [M, K] and int8 [N, K] blocks with float32 scales [N, K/32] "
                         f"on a CPU with AVX2 and FMA, K a multiple of {BLOCK}; got x {tuple(x.shape)} {x.dtype}, "
                         f"q {tuple(q.shape)} {q.dtype}, d {tuple(d.shape)} {d.dtype} (kernel available: "
                         f"{AVAILABLE})")
    x = x.contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    if m and n:
        _kernel.mm(x.data_ptr(), q.data_ptr(), d.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
    return y


_library = torch.library.Library("minercore", "FRAGMENT")
_library.define("q8_rows_mm(Tensor x, Tensor q, Tensor d) -> Tensor")
_library.impl("q8_rows_mm", rows_mm, "CPU")


@torch.library.register_fake("minercore::q8_rows_mm")
def _rows_mm_shape(x: Tensor, q: Tensor, d: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], q.shape[0]), dtype=torch.float32)
