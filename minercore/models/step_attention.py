"""A decode or verify step's attention over the KV cache on a CPU, each query's numbers its own.

A query's result here is the same bits whatever the step holds besides it: the batch, the context bucket, the
other positions of a verify step, the thread count (``csrc/step_attention.c`` computes every query by one fixed
sequence of float32 operations). torch's CPU flash attention rounds a row differently in a batch of 8 than alone,
and MKL's matrix products a row among 4 or more rows differently than among fewer. Float rows rarely turn a
last-bit difference into another token; int8 rows (``quant.int8_rows``) round each layer's input to 8 bits and
often do, so that without this a stream's text would depend on the streams beside it and on speculation.

``attend(q, keys, values, at)``; inside a compiled graph the custom op ``minercore::step_attention``.
``attend_paged(q, k_pool, v_pool, tables, at, ctx)`` reads a paged cache's blocks where they lie (the op
``minercore::step_attention_paged``) instead of a gathered copy of them.
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
                   values.stride(1), 0, 0, 0, 0, dim ** -0.5, torch.get_num_threads())
    return out


def attend_paged(q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, at: Tensor, ctx: int) -> Tensor:
    """``attend`` over a paged cache read in place: (num_blocks, H, block_size, D) pools, batch row b's positions
    in the blocks ``tables[b]`` names (position p at offset p % block_size of block ``tables[b, p //
    block_size]``), its first ``ctx`` positions visible (at most what the table row names). The same values in the
    same order as ``attend`` over the blocks gathered end to end, so the same bits, without the copy."""
    b, h, rows, dim = q.shape
    if (not usable(q) or k_pool.dtype != torch.float32 or v_pool.dtype != torch.float32 or k_pool.dim() != 4
            or k_pool.shape[1] != h or k_pool.shape[3] != dim or v_pool.shape != k_pool.shape
            or not k_pool.is_contiguous() or not v_pool.is_contiguous() or tables.dtype != torch.int64
            or tables.dim() != 2 or tables.shape[0] != b or at.dtype != torch.int64 or at.dim() != 2
            or at.shape[0] != b or rows % max(at.shape[1], 1) or k_pool.device.type != "cpu"
            or tables.device.type != "cpu" or at.device.type != "cpu"):
        raise ValueError(f"step_attention_paged: float32 CPU queries (B, H, R, D), contiguous pools (blocks, H, "
                         f"block_size, D), int64 tables (B, blocks per row) and positions (B, T) with R a multiple "
                         f"of T; got q {tuple(q.shape)} {q.dtype}, pools {tuple(k_pool.shape)} {k_pool.dtype} / "
                         f"{tuple(v_pool.shape)}, tables {tuple(tables.shape)} {tables.dtype}, at {tuple(at.shape)} "
                         f"{at.dtype} (kernel available: {AVAILABLE})")
    return _paged(q.contiguous(), k_pool, v_pool, tables.contiguous(), at.contiguous(), ctx)


def _paged(q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, at: Tensor, ctx: int) -> Tensor:
    """The kernel call itself, over checked, contiguous tensors (it refuses a table entry outside the pool)."""
    b, h, rows, dim = q.shape
    num_blocks, _, block_size, _ = k_pool.shape
    width = tables.shape[1]
    out = torch.empty_like(q)
    _kernel.attend(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), at.data_ptr(), out.data_ptr(), b, h, rows,
                   at.shape[1], dim, min(ctx, width * block_size), k_pool.stride(0), k_pool.stride(1),
                   v_pool.stride(0), v_pool.stride(1), tables.data_ptr(), width, block_size, num_blocks,
                   dim ** -0.5, torch.get_num_threads())
    return out


def _attend_paged_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, at: Tensor, ctx: int) -> Tensor:
    """The op's body: a model's step passes its own pools, its table's rows and its positions, which pass one
    comparison of their layouts against the queries'; anything else goes through ``attend_paged``'s checks. A
    decode step makes thirty of these calls, and inside the model thread each Python-level look at a tensor costs
    about a microsecond: the full checks took twice the kernel's time at one stream."""
    if (q.dtype == k_pool.dtype == v_pool.dtype == torch.float32 and tables.dtype == at.dtype == torch.int64
            and q.is_cpu and q.is_contiguous() and k_pool.is_contiguous() and v_pool.is_contiguous()
            and tables.is_contiguous() and at.is_contiguous() and AVAILABLE):
        b, h, _, dim = q.shape
        pool = k_pool.shape
        if (pool == v_pool.shape and len(pool) == 4 and pool[1] == h and pool[3] == dim and tables.dim() == 2
                and tables.shape[0] == b and at.dim() == 2 and at.shape[0] == b and at.shape[1] > 0
                and q.shape[2] % at.shape[1] == 0
                and k_pool.is_cpu and tables.is_cpu and at.is_cpu):
            return _paged(q, k_pool, v_pool, tables, at, ctx)
    return attend_paged(q, k_pool, v_pool, tables, at, ctx)


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


_library.define("step_attention_paged(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor at, SymInt ctx) "
                "-> Tensor")
_library.impl("step_attention_paged", _attend_paged_op, "CPU")


@torch.library.register_fake("minercore::step_attention_paged")
def _attend_paged_shape(q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, at: Tensor, ctx: int) -> Tensor:
    return q.new_empty(q.shape)
