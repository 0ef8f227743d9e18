"""A decode or verify step's attention over the KV cache on a CPU, each query's numbers its own.

A query's result here is the same bits whatever the step holds besides it: the batch, the context bucket, the
other positions of a verify step, the thread count (``csrc/step_attention.c`` computes every query by one fixed
sequence of float32 operations). torch's CPU flash attention rounds a row differently in a batch of 8 than alone,
and MKL's matrix products a row among 4 or more rows differently than among fewer. Float rows rarely turn a
last-bit difference into another token; int8 rows (``quant.int8_rows``) round each layer's input to 8 bits and
often do, so that without this a stream's text would depend on the streams beside it and on speculation.

``attend(q, keys, values, at)``; inside a compiled graph the custom op ``minercore::step_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _step_attention as _kernel  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: steps attend through torch's scaled_dot_product_attention
    _kernel = None

AVAILABLE = _kernel is not None and _kernel.supported()


def usable(q: Tensor) -> bool:
    """Whether the kernel takes a step whose queries are ``q``: float32 on a CPU with AVX2, FMA and F16C."""
    return AVAILABLE and q.device.type == "cpu" and q.dtype == torch.float32


def attend(q: Tensor, keys: Tensor, values: Tensor, at: Tensor) -> Tensor:
    """(B, H, R, D) queries over (B, H, ctx, D) keys and values -> (B, H, R, D), float32 on a CPU. ``at`` (B, T)
    is each batch row's last visible position at each of the step's T positions; query row r of a head is the
    step's position r % T (a KV head's group of query heads, each at every position: rows g T + j). A query
    attends positions [0, min(at, ctx - 1)] (see ``csrc/step_attention.h`` for the exact operations)."""
    b, h, rows, dim = q.shape
    if (not usable(q) or keys.dtype != torch.float32 or values.dtype != torch.float32 or keys.dim() != 4
            or keys.shape[:2] != (b, h) or keys.shape[3] != dim or values.shape != keys.shape
            or at.dtype != torch.int64 or at.dim() != 2 or at.shape[0] != b or rows % max(at.shape[1], 1)
            or keys.device.type != "cpu" or values.device.type != "cpu" or at.device.type != "cpu"):
        raise ValueError(f"step_attention: float32 CPU queries (B, H, R, D), keys and values (B, H, ctx, D) and int64 "
                         f"positions (B, T) with R a multiple of T, on a CPU with AVX2, FMA and F16C; got q "
                         f"{tuple(q.shape)} {q.dtype}, keys {tuple(keys.shape)} {keys.dtype}, values "
                         f"{tuple(values.shape)} {values.dtype}, at {tuple(at.shape)} {at.dtype} (kernel available: "
                         f"{AVAILABLE})")
    q, at = q.contiguous(), at.contiguous()
    keys, values = _positions_contiguous(keys), _positions_contiguous(values)
    out = q.new_empty(q.shape)
    _kernel.attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), at.data_ptr(), out.data_ptr(), b, h, rows,
                   at.shape[1], dim, keys.shape[2], keys.stride(0), keys.stride(1), values.stride(0),
                   values.stride(1), dim ** -0.5, torch.get_num_threads())
    return out


def _positions_contiguous(x: Tensor) -> Tensor:
    """``x`` itself where each position's values lie together and positions follow one another (a prefix of the
    static cache's positions), else a contiguous copy."""
    return x if x.stride(3) == 1 and x.stride(2) == x.shape[3] else x.contiguous()


_library = torch.library.Library("minercore", "FRAGMENT")
_library.define("step_attention(Tensor q, Tensor keys, Tensor values, Tensor at) -> Tensor")
_library.impl("step_attention", attend, "CPU")


@torch.library.register_fake("minercore::step_attention")
def _attend_shape(q: Tensor, keys: Tensor, values: Tensor, at: Tensor) -> Tensor:
    return q.new_empty(q.shape)  # contiguous, as ``attend`` returns it
