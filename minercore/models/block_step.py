"""A Llama block's decode or verify step over int8-row layers in three or four host calls instead of ten.

Inside a compiled step each product, norm and activation is its own call from the host, and a call costs
microseconds of the host's time whatever its size: at batch 1 on SmolLM2 the block products' own work is about 4 ms
of a 10 ms step. Where all four of a block's linears are int8-row layers (``quant.Q4I8Linear``,
``quant.Q8I8Linear``, no bias), ``csrc/block_step.c`` does the input norm and the q/k/v product in one call
(``norm_linear``), and everything after the attention (output product, residual, norm, gated MLP, residual) in
another (``block_tail``); the rotary embedding with the cache write is one compiled loop between them. Over a
paged cache the attention joins the tail's call (``attend_block_tail``), reading the blocks where they lie; over
the static cache it is a call of its own. Each row's result depends on that row alone, as in the kernels, so a
stream's numbers do not depend on its batch. Inside a compiled graph the custom ops ``minercore::norm_linear``,
``minercore::block_tail`` and ``minercore::attend_block_tail``."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from . import q4_i8_rows, q8_i8_rows
from .quant import Q4I8Linear, Q8I8Linear

try:
    from . import _block_step as _kernel  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: blocks step through one call per product
    _kernel = None

AVAILABLE = _kernel is not None and _kernel.supported() and q4_i8_rows.AVAILABLE and q8_i8_rows.AVAILABLE
GROUP, BLOCK = q4_i8_rows.GROUP, q4_i8_rows.BLOCK


def fusable(x: Tensor, *layers: nn.Module) -> bool:
    """Whether a step whose rows are ``x`` can take ``layers`` through the fused calls: float32 on a CPU, each
    layer an int8-row layer without bias."""
    return (AVAILABLE and x.dtype == torch.float32 and x.device.type == "cpu"
            and all(isinstance(layer, (Q4I8Linear, Q8I8Linear)) and layer.bias is None for layer in layers))


def norm_linear(x: Tensor, norm: Tensor, eps: float, layer: Q4I8Linear | Q8I8Linear) -> Tensor:
    """``layer(RMSNorm(x))`` for (..., K) float32 rows, the norm's weight ``norm`` (K,) float32."""
    y = torch.ops.minercore.norm_linear(x.reshape(-1, x.shape[-1]), norm, eps, *_tensors(layer))
    return y.view(*x.shape[:-1], y.shape[-1])


def block_tail(x: Tensor, attn: Tensor, o: Q4I8Linear | Q8I8Linear, norm: Tensor, eps: float,
               gate_up: Q4I8Linear | Q8I8Linear, down: Q4I8Linear | Q8I8Linear) -> Tensor:
    """``h + down(silu(gate) * up)`` where ``h = x + o(attn)`` and ``gate, up = gate_up(RMSNorm(h)).chunk(2)``:
    x (..., D) the block's input rows, attn (..., Q) the attention's heads side by side."""
    y = torch.ops.minercore.block_tail(x.reshape(-1, x.shape[-1]), attn.reshape(-1, attn.shape[-1]), *_tensors(o),
                                       norm, eps, *_tensors(gate_up), *_tensors(down))
    return y.view(x.shape)


def attend_block_tail(x: Tensor, q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, at: Tensor, ctx: int,
                      o: Q4I8Linear | Q8I8Linear, norm: Tensor, eps: float, gate_up: Q4I8Linear | Q8I8Linear,
                      down: Q4I8Linear | Q8I8Linear) -> Tensor:
    """``block_tail`` of the step's attention over a paged cache, in the same call: q (B, H, G T, D) the rotated
    queries grouped by KV head (``step_attention.attend_paged``'s layout), the pools, table rows and positions
    as ``attend_paged`` takes them; x (B, T, D') the block's input rows."""
    y = torch.ops.minercore.attend_block_tail(x.reshape(-1, x.shape[-1]), q, k_pool, v_pool, tables, at, ctx,
                                              *_tensors(o), norm, eps, *_tensors(gate_up), *_tensors(down))
    return y.view(x.shape)


def _tensors(layer: Q4I8Linear | Q8I8Linear) -> tuple[Tensor, Tensor]:
    return (layer.w, layer.dm) if isinstance(layer, Q4I8Linear) else (layer.w, layer.d)


def _spec(w: Tensor, scales: Tensor) -> tuple[int, int, int, int, int] | None:
    """The kernel's (format, values, scales, outputs, inputs) of a layer's tensors, None unless they are one of
    the int8-row layouts, contiguous on a CPU."""
    if w.dim() != 5 or not w.is_cpu or not w.is_contiguous() or not scales.is_contiguous() or not scales.is_cpu:
        return None
    groups, blocks = w.shape[0], w.shape[1]
    if (w.dtype == torch.uint8 and tuple(w.shape[2:]) == (4, GROUP, 4) and scales.dtype == torch.float16
            and tuple(scales.shape) == (groups, blocks, 2, GROUP)):
        form = _kernel.Q4
    elif (w.dtype == torch.int8 and tuple(w.shape[2:]) == (8, GROUP, 4) and scales.dtype == torch.float32
          and tuple(scales.shape) == (groups, blocks, GROUP)):
        form = _kernel.Q8
    else:
        return None
    return form, w.data_ptr(), scales.data_ptr(), groups * GROUP, blocks * BLOCK


def _floats(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if t.dtype != torch.float32 or not t.is_cpu or t.shape != shape or not t.is_contiguous():
        raise ValueError(f"block step: {name} must be contiguous float32 CPU values {list(shape)} (-1: any rows), got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def _rows(x: Tensor, width: int, name: str) -> None:
    _floats(x, (x.shape[0] if x.dim() == 2 else -1, width), name)


def _layer(w: Tensor, scales: Tensor, name: str) -> tuple[int, int, int, int, int]:
    spec = _spec(w, scales)
    if spec is None:
        raise ValueError(f"block step: {name} must be an int8-row layer's contiguous CPU tensors (Q4: uint8 "
                         f"[N/{GROUP}, K/{BLOCK}, 4, {GROUP}, 4] with float16 [N/{GROUP}, K/{BLOCK}, 2, {GROUP}] "
                         f"pairs; Q8: int8 [N/{GROUP}, K/{BLOCK}, 8, {GROUP}, 4] with float32 [N/{GROUP}, K/{BLOCK}, "
                         f"{GROUP}] scales); got {w.dtype} {tuple(w.shape)} and {scales.dtype} {tuple(scales.shape)}")
    return spec


def _check_available() -> None:
    if not AVAILABLE:
        raise ValueError("block step: the kernel needs a CPU with AVX2, FMA and F16C and the compiled extensions")


# A layer's spec by the id of its values tensor, with a reference to that tensor, its scales tensor and the scales'
# address it was made for: a step makes sixty of these calls, and inside the model thread each Python-level look at
# a tensor costs about a microsecond. An entry leaves with its tensor.
_SPECS: dict[int, tuple[weakref.ref, Tensor, int, tuple[int, int, int, int, int]]] = {}


def _cached_layer(w: Tensor, scales: Tensor, name: str) -> tuple[int, int, int, int, int]:
    known = _SPECS.get(id(w))
    if (known is not None and known[0]() is w and known[1] is scales and known[2] == scales.data_ptr()
            and known[3][1] == w.data_ptr()):
        return known[3]
    spec = _layer(w, scales, name)
    key = id(w)
    _SPECS[key] = (weakref.ref(w, lambda _, key=key: _SPECS.pop(key, None)), scales, scales.data_ptr(), spec)
    return spec


def _norm_linear_op(x: Tensor, norm: Tensor, eps: float, w: Tensor, scales: Tensor) -> Tensor:
    _check_available()
    layer = _cached_layer(w, scales, "the layer")
    _rows(x, layer[4], "x")
    _floats(norm, (layer[4],), "the norm's weight")
    y = torch.empty((x.shape[0], layer[3]), dtype=torch.float32)
    if x.shape[0]:
        _kernel.norm_linear(x.data_ptr(), norm.data_ptr(), eps, layer, y.data_ptr(), x.shape[0],
                            torch.get_num_threads(), q4_i8_rows.VNNI)
    return y


def _tail_layers(o_w: Tensor, o_scales: Tensor, gate_up_w: Tensor, gate_up_scales: Tensor, down_w: Tensor,
                 down_scales: Tensor) -> tuple[tuple[int, int, int, int, int], ...]:
    o = _cached_layer(o_w, o_scales, "o")
    gate_up = _cached_layer(gate_up_w, gate_up_scales, "gate_up")
    down = _cached_layer(down_w, down_scales, "down")
    if gate_up[4] != o[3] or gate_up[3] != 2 * down[4] or down[3] != o[3]:
        raise ValueError(f"block step: need o [D, Q], gate_up [2 M, D] and down [D, M]; got o {o[3:]}, gate_up "
                         f"{gate_up[3:]} and down {down[3:]} (outputs, inputs)")
    return o, gate_up, down


def _block_tail_op(x: Tensor, attn: Tensor, o_w: Tensor, o_scales: Tensor, norm: Tensor, eps: float,
                   gate_up_w: Tensor, gate_up_scales: Tensor, down_w: Tensor, down_scales: Tensor) -> Tensor:
    _check_available()
    o, gate_up, down = _tail_layers(o_w, o_scales, gate_up_w, gate_up_scales, down_w, down_scales)
    width = o[3]
    _rows(x, width, "x")
    _rows(attn, o[4], "attn")
    _floats(norm, (width,), "the norm's weight")
    if attn.shape[0] != x.shape[0]:
        raise ValueError(f"block step: attn has {attn.shape[0]} rows, x {x.shape[0]}")
    y = torch.empty_like(x)
    if x.shape[0]:
        _kernel.block_tail(x.data_ptr(), attn.data_ptr(), o, norm.data_ptr(), eps, gate_up, down, y.data_ptr(),
                           x.shape[0], torch.get_num_threads(), q4_i8_rows.VNNI)
    return y


def _attend_block_tail_op(x: Tensor, q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, at: Tensor, ctx: int,
                          o_w: Tensor, o_scales: Tensor, norm: Tensor, eps: float, gate_up_w: Tensor,
                          gate_up_scales: Tensor, down_w: Tensor, down_scales: Tensor) -> Tensor:
    _check_available()
    o, gate_up, down = _tail_layers(o_w, o_scales, gate_up_w, gate_up_scales, down_w, down_scales)
    if (q.dtype != torch.float32 or not q.is_cpu or q.dim() != 4 or not q.is_contiguous()
            or k_pool.dtype != torch.float32 or v_pool.dtype != torch.float32 or k_pool.dim() != 4
            or v_pool.shape != k_pool.shape or not k_pool.is_contiguous() or not v_pool.is_contiguous()
            or not k_pool.is_cpu or not v_pool.is_cpu):
        raise ValueError(f"block step: need contiguous float32 CPU queries (B, H, R, D) and pools (blocks, H, "
                         f"block_size, D); got q {tuple(q.shape)} {q.dtype}, pools {tuple(k_pool.shape)} "
                         f"{k_pool.dtype} / {tuple(v_pool.shape)} {v_pool.dtype}")
    batch, heads, q_rows, dim = q.shape
    num_blocks, _, block_size, _ = k_pool.shape
    if (tables.dtype != torch.int64 or at.dtype != torch.int64 or tables.dim() != 2 or at.dim() != 2
            or tables.shape[0] != batch or at.shape[0] != batch or at.shape[1] < 1 or q_rows % at.shape[1]
            or k_pool.shape[1] != heads or k_pool.shape[3] != dim or not tables.is_contiguous()
            or not at.is_contiguous() or not tables.is_cpu or not at.is_cpu):
        raise ValueError(f"block step: need pools (blocks, {heads}, block_size, {dim}) for q {tuple(q.shape)}, "
                         f"contiguous int64 CPU tables ({batch}, blocks per row) and positions ({batch}, T) with T "
                         f"dividing {q_rows}; got pools {tuple(k_pool.shape)}, tables {tuple(tables.shape)} "
                         f"{tables.dtype}, at {tuple(at.shape)} {at.dtype}")
    steps = at.shape[1]
    _rows(x, o[3], "x")
    if x.shape[0] != batch * steps or o[4] != heads * q_rows // steps * dim:
        raise ValueError(f"block step: x has {x.shape[0]} rows for {batch} x {steps} queries, o takes {o[4]} "
                         f"inputs for {heads * q_rows // steps} heads of {dim}")
    _floats(norm, (o[3],), "the norm's weight")
    y = torch.empty_like(x)
    if x.shape[0]:
        width = tables.shape[1]
        _kernel.attend_block_tail(x.data_ptr(), q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                                  tables.data_ptr(), width, block_size, num_blocks, at.data_ptr(), batch, heads,
                                  q_rows, steps, dim, min(ctx, width * block_size), o, norm.data_ptr(), eps, gate_up,
                                  down, y.data_ptr(), torch.get_num_threads(), q4_i8_rows.VNNI)
    return y


_library = torch.library.Library("minercore", "FRAGMENT")
_library.define("norm_linear(Tensor x, Tensor norm, float eps, Tensor w, Tensor scales) -> Tensor")
_library.impl("norm_linear", _norm_linear_op, "CPU")
_library.define("block_tail(Tensor x, Tensor attn, Tensor o_w, Tensor o_scales, Tensor norm, float eps, "
                "Tensor gate_up_w, Tensor gate_up_scales, Tensor down_w, Tensor down_scales) -> Tensor")
_library.impl("block_tail", _block_tail_op, "CPU")


@torch.library.register_fake("minercore::norm_linear")
def _norm_linear_shape(x: Tensor, norm: Tensor, eps: float, w: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], GROUP * w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("minercore::block_tail")
def _block_tail_shape(x: Tensor, attn: Tensor, o_w: Tensor, o_scales: Tensor, norm: Tensor, eps: float,
                      gate_up_w: Tensor, gate_up_scales: Tensor, down_w: Tensor, down_scales: Tensor) -> Tensor:
    return torch.empty_like(x)


_library.define("attend_block_tail(Tensor x, Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor at, "
                "SymInt ctx, Tensor o_w, Tensor o_scales, Tensor norm, float eps, Tensor gate_up_w, "
                "Tensor gate_up_scales, Tensor down_w, Tensor down_scales) -> Tensor")
_library.impl("attend_block_tail", _attend_block_tail_op, "CPU")


@torch.library.register_fake("minercore::attend_block_tail")
def _attend_block_tail_shape(x: Tensor, q: Tensor, k_pool: Tensor, v_pool: Tensor, tables: Tensor, at: Tensor,
                             ctx: int, o_w: Tensor, o_scales: Tensor, norm: Tensor, eps: float, gate_up_w: Tensor,
                             gate_up_scales: Tensor, down_w: Tensor, down_scales: Tensor) -> Tensor:
    return torch.empty_like(x)
