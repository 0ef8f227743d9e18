"""The int4 CPU product for many rows: torch's kernel, row for row, at a cost that grows more slowly with the rows.

torch's AVX-512 int4 kernel (``_weight_int4pack_mm_for_cpu``) dequantizes the weights again for every four rows,
so a product costs in proportion to its rows: a verify step or a prompt's prefill pays for each row what one
decode row pays. The compiled kernel here (``csrc/int4_rows.c``) reads torch's packing and computes every output
with the same float32 fused multiply-add chain in the same order, so its results are bit-identical to torch's
at any row count (tested), while it dequantizes each weight once per call. From ``MIN_ROWS`` rows it is the
faster of the two (about 1.1x at 8 rows, 1.5x from 32 on SmolLM2's shapes: RESULTS.md); below, torch's is.
Because the two agree bit for bit, a stream computes the same text whichever of them its batch size picks.

``rows_mm(x, layer)`` is the product; inside a compiled graph the call is the custom op
``minercore::int4_rows_mm``, which picks by the rows it is given at run time. Where the kernel cannot run (no
compiled extension, a CPU without AVX-512, torch not on its AVX-512 kernels, float16 activations, N not a
multiple of 64), ``usable`` is False and the caller keeps torch's kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _int4_rows as _kernel  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: torch's kernel serves every product
    _kernel = None

MIN_ROWS = 8  # from here the compiled kernel is faster than torch's (SmolLM2's four shapes, two threads)
BLOCK_N = 64  # outputs per block of torch's AVX-512 packing; other N end in a block packed differently

# torch's own results are the reference: the kernel mirrors its AVX-512 path only.
AVAILABLE = (_kernel is not None and _kernel.supported()
             and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def usable(packed: Tensor, scales_and_zeros: Tensor) -> bool:
    """Whether products with these CPU-packed weights ([N, K / 2] uint8) can go through the kernel."""
    return (AVAILABLE and packed.device.type == "cpu" and scales_and_zeros.dtype == torch.bfloat16
            and packed.shape[0] % BLOCK_N == 0 and scales_and_zeros.shape[1] == packed.shape[0])


def rows_mm(x: Tensor, packed: Tensor, group: int, scales_and_zeros: Tensor) -> Tensor:
    """(M, K) -> (M, N): ``_weight_int4pack_mm_for_cpu``'s result, by whichever kernel is faster for M rows.
    Anything the compiled kernel does not take (fewer rows, another dtype, shapes that disagree, weights not
    ``usable``) goes to torch's kernel, which also checks its inputs."""
    m, k = x.shape
    n = packed.shape[0]
    if (m < MIN_ROWS or x.dtype != torch.bfloat16 or not usable(packed, scales_and_zeros)
            or packed.shape[1] * 2 != k or not packed.is_contiguous() or not scales_and_zeros.is_contiguous()
            or tuple(scales_and_zeros.shape) != (k // group, n, 2) or k % group):
        return torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    x = x.contiguous()  # the kernel reads rows K apart (a no-op for the layers' own flattened inputs)
    y = torch.empty((m, n), dtype=torch.bfloat16)
    try:
        _kernel.mm(x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(), m, n, k, group,
                   torch.get_num_threads())
    except MemoryError:  # no scratch memory for the kernel: torch's gives the same product
        return torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    return y


_library = torch.library.Library("minercore", "FRAGMENT")
_library.define("int4_rows_mm(Tensor x, Tensor packed, int group, Tensor scales_and_zeros) -> Tensor")
_library.impl("int4_rows_mm", rows_mm, "CPU")


@torch.library.register_fake("minercore::int4_rows_mm")
def _rows_mm_shape(x: Tensor, packed: Tensor, group: int, scales_and_zeros: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]), dtype=torch.bfloat16)
