"""Weight-only quantization of a model's plain linear layers: int8 per output channel, int4 in groups.

``quantize(model, mode, group_size)`` replaces every ``nn.Linear`` of a model (GPT-2's ``c_attn``, ``c_proj``,
``c_fc``; the Llama family's fused ``qkv_proj`` and ``gate_up_proj``, ``o_proj``, ``down_proj``; the head) by an
``Int8Linear`` or ``Int4Linear``. The families do not change: the replacement takes the same (..., K) input and
returns (..., N) in the input's dtype. What stays in the activation dtype:

- the embedding lookup: a head tied to the embedding gets its own quantized copy, the embedding keeps its table;
- the KV cache (the models size it from the embedding's dtype, not the weights');
- a bias, added after the product;
- a layer whose shape the kernel cannot take (``refusal``), left an ``nn.Linear`` and logged once per call.

Kernels. CPU: ``torch._weight_int8pack_mm(x, w_int8 [N, K], scales [N])`` and
``torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/group, N, 2])``, where the int4 value
q in 0..15 stands for ``(q - 8) * scale + zero``. CUDA (gpt-fast's recipe): int8 is
``F.linear(x, w.to(x.dtype)) * scales``, which inductor fuses into one dequantizing matmul under
``torch.compile``; int4 is tinygemm's ``torch._weight_int4pack_mm`` over ``torch._convert_weight_to_int4pack``.
On a CPU with AVX-512, int4 products of many rows go through ``int4_rows``: torch's results, bit for bit, for less.
``Q8Linear`` and ``Q4Linear`` are not quantizations this module makes: they hold a GGUF file's Q8_0 and Q4_0/Q4_1
matrices as they are, for a float32 model on a CPU (``q8_rows``, ``q4_rows``); ``int8_rows(model)`` turns the
``Q4Linear`` and ``Q8Linear`` layers into ``Q4I8Linear`` and ``Q8I8Linear`` ones, the same values multiplied by
rows quantized to int8 (``q4_i8_rows``, ``q8_i8_rows``).

The kernel dtype (``kernel_dtype``): both CPU kernels want their activations and scales in bfloat16 or float16
and are 5-60x slower with float32 ones (notes/real-model.md), so a float32 model's quantized layers cast their
input to bfloat16 and the product back (about 4 us a layer at batch 1, measured on this CPU); tinygemm takes
bfloat16 only. Scales stay in the kernel dtype whatever dtype the model is later cast to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..contract.config import QUANT_CHOICES, QUANT_GROUPS
from . import int4_rows, q4_i8_rows, q4_rows, q8_i8_rows, q8_rows

logger = logging.getLogger(__name__)

INT4_MID = 8  # the int4 value that stands for ``zero``: w = (q - INT4_MID) * scale + zero
# Output rows the int4 packers take in a whole number of (CPU: "expect N to be dividable by 16"; CUDA: 8-row
# tiles): other row counts (GPT-2's 50257-row head) are padded with zero rows, and the product sliced.
INT4_ROWS = {"cpu": 16, "cuda": 8}
# _weight_int8pack_mm on CPU reads K in 16-wide blocks and crashes the process (no error) on any other K (torch
# 2.13, measured: K = 24, 40, 100, 104 all die); such a layer must never reach it.
CPU_INT8_K_MULTIPLE = 16


def kernel_dtype(mode: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a ``mode`` layer's kernel computes in for a model running in ``dtype`` on ``device``."""
    if device.type == "cuda":
        return torch.bfloat16 if mode == "int4" else dtype  # tinygemm is bfloat16 only; the int8 matmul any
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def refusal(mode: str, out_features: int, in_features: int, group_size: int, device: torch.device) -> str | None:
    """Why a (N = ``out_features``, K = ``in_features``) linear cannot take ``mode``'s kernel, or None."""
    k = in_features
    if mode == "int8":
        if device.type == "cpu" and k % CPU_INT8_K_MULTIPLE:
            return f"K {k} is not a multiple of {CPU_INT8_K_MULTIPLE}"
        return None
    if k % group_size:
        return f"K {k} is not a multiple of the group size {group_size}"
    if device.type == "cuda" and k % 32:
        return f"K {k} is not a multiple of 32 (two 16-wide k-tiles)"
    return None


def _check_device(device: torch.device) -> None:
    if device.type not in INT4_ROWS:
        raise ValueError(f"weight-only quantization runs on cpu or cuda, not {device.type}")


def _flat(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(..., K) -> a contiguous (M, K) in ``dtype``: the kernels take 2-D row-major activations."""
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


def _keep_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    tensor = getattr(module, name)
    if tensor.dtype != dtype:
        setattr(module, name, tensor.to(dtype))


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scales[:, None]).T + bias: symmetric int8 per output channel (w_int8 in -127..127)."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
            raise ValueError(f"Int8Linear needs int8 [N, K] weights and [N] scales, got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", bias)
        self.kernel_dtype = scales.dtype

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None, *, dtype: torch.dtype) -> Int8Linear:
        """From float [N, K] weights (rounded against the scales as stored in ``dtype``, the kernel dtype)."""
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
        q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales, None if bias is None else bias.detach().clone())

    def dequantize(self) -> Tensor:
        """The float32 [N, K] weights the layer computes with."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x2 = _flat(x, self.kernel_dtype)
        if self.qweight.is_cuda:
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int8Linear:
        # The runner casts the whole model to the activation dtype; the kernel wants its scales in its own.
        super()._apply(fn, recurse)
        _keep_dtype(self, "scales", self.kernel_dtype)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel {self.kernel_dtype}"


class Int4Linear(nn.Module):
    """y = x @ w.T + bias with w = (q - 8) * scale + zero, q in 0..15, one (scale, zero) per ``group_size``
    consecutive inputs of an output row; q packed in the device's kernel layout (opaque: ``dequantize`` reads
    it back through the kernel)."""

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, *, in_features: int, out_features: int,
                 group_size: int, bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K / group, N padded, 2]
        self.register_buffer("group_tensor", torch.tensor(group_size, device=packed.device), persistent=False)
        self.register_buffer("bias", bias)
        self.kernel_dtype = scales_and_zeros.dtype
        self.rows_kernel = int4_rows.usable(packed, scales_and_zeros)  # products of many rows: int4_rows

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None, *, group_size: int = 32,
                 dtype: torch.dtype) -> Int4Linear:
        """From float [N, K] weights, asymmetric per group: the group's min and max span 0..15 (rounded against
        the scale and zero as stored in ``dtype``, the kernel dtype). Packed on the weights' device."""
        w = weight.detach().float()
        n, k = w.shape
        groups = w.view(n, k // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12).to(dtype).float()
        zero = (low + INT4_MID * scale).to(dtype).float()
        q = ((groups - zero[..., None]) / scale[..., None]).round() + INT4_MID
        return cls._pack(q.clamp(0, 15).view(n, k), scale, zero, group_size, bias, dtype)

    @classmethod
    def from_blocks(cls, scale: Tensor, minimum: Tensor | None, q: Tensor, *, bias: Tensor | None = None,
                    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> Int4Linear:
        """A layer holding a GGUF Q4_0 or Q4_1 tensor's values as they are (no re-quantization).

        ``scale``: [N, K / 32] (float16 in the file), each block's ``d``. ``minimum``: [N, K / 32], each block's
        ``m`` (Q4_1, w = d * q + m), or None (Q4_0, w = d * (q - 8)). ``q``: [N, K], any integer dtype, values
        0..15, already unpacked from the blocks' nibbles into their positions along K (in a GGUF block the low
        nibbles hold the first 16 values, the high ones the last 16: the loader's business). The group size is
        K / scale.shape[1] (32 for GGUF). ``dtype`` is the kernel dtype (``kernel_dtype``), ``device`` where it
        runs (default: ``q``'s). In this layout Q4_1 is scale = d, zero = m + 8 d, and Q4_0 zero = 0: the
        dequantized weights are exactly d * q + m (resp. d * (q - 8)) when the scales' dtype holds d and
        m + 8 d exactly (float32 does, for float16 d and m); bfloat16 scales round d to 8 significant bits.
        """
        n, k = q.shape
        if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1] or (minimum is not None
                                                                             and minimum.shape != scale.shape):
            raise ValueError(f"from_blocks: q {tuple(q.shape)} needs scale (and minimum) [N, K / group], got "
                             f"{tuple(scale.shape)}" + ("" if minimum is None else f" and {tuple(minimum.shape)}"))
        group_size = k // scale.shape[1]
        if group_size not in QUANT_GROUPS:
            raise ValueError(f"from_blocks: group size {group_size} is not one the kernels take "
                             f"({', '.join(map(str, QUANT_GROUPS))})")
        if int(q.min()) < 0 or int(q.max()) > 15:
            raise ValueError("from_blocks: q must hold values in 0..15")
        device = torch.device(device) if device is not None else q.device
        d = scale.to(device=device, dtype=torch.float32)
        # Summed in float32, where it is exact for float16 inputs; then stored in the kernel dtype.
        zero = (torch.zeros_like(d) if minimum is None
                else minimum.to(device=device, dtype=torch.float32) + INT4_MID * d)
        return cls._pack(q.to(device), d, zero, group_size, bias, dtype)

    @classmethod
    def _pack(cls, q: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None,
              dtype: torch.dtype) -> Int4Linear:
        """q [N, K] 0..15, scale and zero [N, K / group]: into the kernel's layout on q's device."""
        n, k = q.shape
        device = q.device
        _check_device(device)
        rows = -(-n // INT4_ROWS[device.type]) * INT4_ROWS[device.type]
        if rows != n:  # zero rows: scale and zero 0, so every padded weight is 0
            q = F.pad(q, (0, 0, 0, rows - n), value=INT4_MID)
            scale, zero = F.pad(scale, (0, 0, 0, rows - n)), F.pad(zero, (0, 0, 0, rows - n))
        scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)
        if device.type == "cuda":
            q8 = q.to(torch.uint8)
            packed = torch._convert_weight_to_int4pack((q8[:, ::2] << 4 | q8[:, 1::2]).contiguous(),
                                                       _inner_k_tiles(k))
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        return cls(packed, scales_and_zeros, in_features=k, out_features=n, group_size=group_size,
                   bias=None if bias is None else bias.detach().to(device).clone())

    def _product(self, x2: Tensor) -> Tensor:
        """(M, K) in the kernel dtype -> (M, N padded)."""
        if self.packed.is_cuda:
            return torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.rows_kernel and not statically_known_true(x2.shape[0] < int4_rows.MIN_ROWS):
            # Bit-identical to torch's kernel below, cheaper from MIN_ROWS rows; a graph whose row count is a
            # symbol gets the op, which picks the kernel per call (the check adds no guard on that symbol).
            if torch.compiler.is_compiling():
                return torch.ops.minercore.int4_rows_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
            return int4_rows.rows_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        if torch.compiler.is_compiling():
            # The same kernel through the op inductor's lowering of the one below emits, with the group size an
            # input: inductor's lowering makes it a constant, which inside a nested compile region reaches the
            # kernel as no scalar (torch 2.13). A C++ op, so the kernel runs without the GIL.
            return torch.ops.quantized.int4mm_packed_weight_cpu(x2, self.packed, self.group_tensor,
                                                                self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)

    def dequantize(self) -> Tensor:
        """The [N, K] weights the layer computes with, in the kernel dtype: the kernel's product with the
        identity, so the packed layout is read back by the kernel itself."""
        eye = torch.eye(self.in_features, dtype=self.kernel_dtype, device=self.packed.device)
        return self._product(eye)[:, :self.out_features].t().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        y = self._product(_flat(x, self.kernel_dtype))
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int4Linear:
        super()._apply(fn, recurse)  # see Int8Linear._apply
        _keep_dtype(self, "scales_and_zeros", self.kernel_dtype)
        self.rows_kernel = int4_rows.usable(self.packed, self.scales_and_zeros)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel {self.kernel_dtype}")


class Q8Linear(nn.Module):
    """y = x @ w.T + bias with w = d * q: a GGUF Q8_0 matrix's int8 values q [N, K] and block scales d [N, K / 32]
    kept as they are, for a float32 model on a CPU (``q8_rows``). The weights are exactly the file's; inputs in
    another dtype or on another device are multiplied by the dequantized matrix instead."""

    def __init__(self, q: Tensor, d: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % q8_rows.BLOCK or tuple(d.shape) != (
                q.shape[0], q.shape[1] // q8_rows.BLOCK):
            raise ValueError(f"Q8Linear needs int8 [N, K] values (K a multiple of {q8_rows.BLOCK}) and [N, K / "
                             f"{q8_rows.BLOCK}] scales, got {q.dtype} {tuple(q.shape)} and {tuple(d.shape)}")
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.contiguous())
        self.register_buffer("d", d.to(torch.float32).contiguous())
        self.register_buffer("bias", bias)

    def dequantize(self) -> Tensor:
        """The float32 [N, K] weights, exactly d * q."""
        return (self.q.float().view(self.out_features, -1, q8_rows.BLOCK) * self.d[..., None]).view(
            self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and q8_rows.AVAILABLE:
            y = torch.ops.minercore.q8_rows_mm(_flat(x, torch.float32), self.q, self.d)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Q8Linear:
        super()._apply(fn, recurse)  # see Int8Linear._apply: the scales stay float32, the values int8
        _keep_dtype(self, "d", torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 blocks"


class Q4Linear(nn.Module):
    """y = x @ w.T + bias with w = fma(q, d, m): a GGUF Q4_0 or Q4_1 matrix's values q [N, K] (0..15, packed two a
    byte in the file's nibble order, ``q4_rows.pack``) with each block's scale and minimum [N, K / 32, 2] (float16,
    ``q4_rows.pair``) kept as they are, for a float32 model on a CPU (``q4_rows``). The weights are the file's
    values rounded once to float32; inputs in another dtype or on another device are multiplied by the dequantized
    matrix instead."""

    def __init__(self, q: Tensor, dm: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        block = q4_rows.BLOCK
        if (q.dtype != torch.uint8 or q.dim() != 2 or (2 * q.shape[1]) % block or dm.dtype != torch.float16
                or tuple(dm.shape) != (q.shape[0], 2 * q.shape[1] // block, 2)):
            raise ValueError(f"Q4Linear needs packed uint8 [N, K / 2] values (K a multiple of {block}) and float16 "
                             f"[N, K / {block}, 2] scales and minimums, got {q.dtype} {tuple(q.shape)} and "
                             f"{dm.dtype} {tuple(dm.shape)}")
        self.out_features, self.in_features = q.shape[0], 2 * q.shape[1]
        self.register_buffer("q", q.contiguous())
        self.register_buffer("dm", dm.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, scale: Tensor, minimum: Tensor, q: Tensor, *, bias: Tensor | None = None) -> Q4Linear:
        """From a Q4 tensor's blocks as the loader reads them: d and m [N, K / 32] (Q4_0's m is -8 d) and the
        values q [N, K], 0..15."""
        return cls(q4_rows.pack(q), q4_rows.pair(scale, minimum), bias)

    def dequantize(self) -> Tensor:
        """The float32 [N, K] weights: d * q + m, d * q exact in float32, so rounded once as the kernel's fma."""
        values = q4_rows.unpack(self.q).float().view(self.out_features, -1, q4_rows.BLOCK)
        d, m = self.dm.float().unbind(-1)
        return torch.addcmul(m[..., None], values, d[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and q4_rows.AVAILABLE:
            y = torch.ops.minercore.q4_rows_mm(_flat(x, torch.float32), self.q, self.dm)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Q4Linear:
        super()._apply(fn, recurse)  # see Int8Linear._apply: the scales stay float16, the values packed bytes
        _keep_dtype(self, "dm", torch.float16)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q4 blocks"


class Q4I8Linear(nn.Module):
    """A ``Q4Linear``'s values, scales and minimums (the file's) multiplied by rows quantized to int8 per block of
    32, as llama.cpp multiplies them (``q4_i8_rows``): about twice as fast as float rows on an AVX2 CPU, the results
    rounded as the rows are. Inputs in another dtype or on another device are multiplied by the dequantized matrix
    instead."""

    def __init__(self, w: Tensor, dm: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        group, block = q4_i8_rows.GROUP, q4_i8_rows.BLOCK
        if (w.dtype != torch.uint8 or w.dim() != 5 or tuple(w.shape[2:]) != (4, group, 4) or dm.dtype != torch.float16
                or tuple(dm.shape) != (w.shape[0], w.shape[1], 2, group)):
            raise ValueError(f"Q4I8Linear needs q4_i8_rows.layout's uint8 [N/{group}, K/{block}, 4, {group}, 4] values "
                             f"and float16 [N/{group}, K/{block}, 2, {group}] pairs, got {w.dtype} {tuple(w.shape)} "
                             f"and {dm.dtype} {tuple(dm.shape)}")
        self.out_features, self.in_features = w.shape[0] * group, w.shape[1] * block
        self.register_buffer("w", w.contiguous())
        self.register_buffer("dm", dm.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_q4(cls, layer: Q4Linear) -> Q4I8Linear:
        """The same layer, laid out for int8 rows (its output count a multiple of 8)."""
        return cls(*q4_i8_rows.layout(layer.q, layer.dm), layer.bias)

    def dequantize(self) -> Tensor:
        """The float32 [N, K] weights, as ``Q4Linear.dequantize`` gives them."""
        return Q4Linear(*q4_i8_rows.unlayout(self.w, self.dm)).dequantize()

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and q4_i8_rows.AVAILABLE:
            y = torch.ops.minercore.q4_i8_rows_mm(_flat(x, torch.float32), self.w, self.dm)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Q4I8Linear:
        super()._apply(fn, recurse)  # see Int8Linear._apply: the pairs stay float16, the values bytes
        _keep_dtype(self, "dm", torch.float16)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q4 blocks x int8 rows"


class Q8I8Linear(nn.Module):
    """A ``Q8Linear``'s values and block scales (the file's) multiplied by rows quantized to int8 per block of 32,
    as llama.cpp multiplies them (``q8_i8_rows``; see ``Q4I8Linear``). Inputs in another dtype or on another
    device are multiplied by the dequantized matrix instead."""

    def __init__(self, w: Tensor, d: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        group, block = q8_i8_rows.GROUP, q8_i8_rows.BLOCK
        if (w.dtype != torch.int8 or w.dim() != 5 or tuple(w.shape[2:]) != (8, group, 4) or d.dtype != torch.float32
                or tuple(d.shape) != (w.shape[0], w.shape[1], group)):
            raise ValueError(f"Q8I8Linear needs q8_i8_rows.layout's int8 [N/{group}, K/{block}, 8, {group}, 4] values "
                             f"and float32 [N/{group}, K/{block}, {group}] scales, got {w.dtype} {tuple(w.shape)} and "
                             f"{d.dtype} {tuple(d.shape)}")
        self.out_features, self.in_features = w.shape[0] * group, w.shape[1] * block
        self.register_buffer("w", w.contiguous())
        self.register_buffer("d", d.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_q8(cls, layer: Q8Linear) -> Q8I8Linear:
        """The same layer, laid out for int8 rows (its output count a multiple of 8)."""
        return cls(*q8_i8_rows.layout(layer.q, layer.d), layer.bias)

    def dequantize(self) -> Tensor:
        """The float32 [N, K] weights, as ``Q8Linear.dequantize`` gives them."""
        return Q8Linear(*q8_i8_rows.unlayout(self.w, self.d)).dequantize()

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and q8_i8_rows.AVAILABLE:
            y = torch.ops.minercore.q8_i8_rows_mm(_flat(x, torch.float32), self.w, self.d)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Q8I8Linear:
        super()._apply(fn, recurse)  # see Int8Linear._apply: the scales stay float32, the values int8
        _keep_dtype(self, "d", torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 blocks x int8 rows"


def int8_rows(model: nn.Module) -> int:
    """Every ``Q4Linear`` and ``Q8Linear`` of ``model`` whose output count is a multiple of 8 becomes a
    ``Q4I8Linear`` or ``Q8I8Linear``; returns how many did (the others keep float rows, logged)."""
    swapped = kept = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (Q4Linear, Q8Linear):
                continue
            if child.out_features % q4_i8_rows.GROUP:
                kept += 1
                continue
            setattr(parent, name, Q4I8Linear.from_q4(child) if type(child) is Q4Linear else Q8I8Linear.from_q8(child))
            swapped += 1
    if kept:
        logger.warning("int8 rows: %d block layers keep float rows (outputs not a multiple of %d)", kept,
                       q4_i8_rows.GROUP)
    return swapped


def _inner_k_tiles(k: int) -> int:
    """tinygemm's k-tiles per packed word group: the widest of 8, 4, 2 that divides K into 16-wide tiles."""
    return next(tiles for tiles in (8, 4, 2) if k % (tiles * 16) == 0)


def _linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, dotted path, linear) for every plain nn.Linear."""
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                yield parent, name, f"{path}.{name}" if path else name, child


@torch.no_grad()
def quantize(model: nn.Module, mode: str, group_size: int = 32, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> nn.Module:
    """Replace ``model``'s linears in place by ``mode``'s (``none`` and ``auto``: unchanged); returns the model.

    ``device``: where the model will run (default: each weight's own); layers are quantized and packed there,
    since the int4 layouts differ by device. ``dtype``: the activation dtype it will run in (default: each
    weight's own), which picks the kernel dtype. Layers the kernel cannot take stay ``nn.Linear``, logged in
    one line."""
    if mode not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {mode!r}")
    if mode in ("auto", "none"):  # auto: what the checkpoint's loader kept quantized, nothing more
        return model
    if mode == "int4" and group_size not in QUANT_GROUPS:
        raise ValueError(f"quant_group must be one of {', '.join(map(str, QUANT_GROUPS))}, got {group_size}")
    kept: list[str] = []
    for parent, name, path, linear in list(_linears(model)):
        weight = linear.weight.detach()
        target = torch.device(device) if device is not None else weight.device
        _check_device(target)
        activations = dtype or weight.dtype
        reason = refusal(mode, linear.out_features, linear.in_features, group_size, target)
        if reason is not None:
            kept.append(f"{path} ({reason})")
            continue
        kernel = kernel_dtype(mode, target, activations)
        bias = None if linear.bias is None else linear.bias.detach().to(device=target, dtype=activations)
        if mode == "int8":
            layer = Int8Linear.quantize(weight.to(target), bias, dtype=kernel)
        else:
            layer = Int4Linear.quantize(weight.to(target), bias, group_size=group_size, dtype=kernel)
        setattr(parent, name, layer)  # a tied head's new layer owns its copy; the embedding keeps the table
    if kept:
        logger.warning("quant %s: %d linear layer(s) stay unquantized, the kernel cannot take their shape: %s",
                       mode, len(kept), "; ".join(kept))
    return model


def describe(model: nn.Module) -> str:
    """``int4 g32``, ``int8``, ``Q4 blocks (120 linears), Q8_0 blocks (1 linear)`` (a GGUF's matrices kept as they
    are; ``Q4 blocks x int8 rows`` where they multiply int8 rows), with ``(2 of 15 linears unquantized)`` when some
    fell back; ``none``."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    kept = {kind: sum(1 for m in model.modules() if isinstance(m, layer)) for kind, layer in (
        ("Q4 blocks", Q4Linear), ("Q4 blocks x int8 rows", Q4I8Linear), ("Q8_0 blocks", Q8Linear),
        ("Q8_0 blocks x int8 rows", Q8I8Linear))}
    parts = (["int8"] if int8 else [f"int4 g{int4[0].group_size}"] if int4 else []) + [
        f"{kind} ({count} linear{'s' if count > 1 else ''})" for kind, count in kept.items() if count]
    if not parts:
        return "none"
    text = ", ".join(parts)
    plain = sum(1 for m in model.modules() if type(m) is nn.Linear)
    if plain:
        text += f" ({plain} of {plain + len(int8) + len(int4) + sum(kept.values())} linears unquantized)"
    return text
