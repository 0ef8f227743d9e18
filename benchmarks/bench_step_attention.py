"""Group ``step_attention``: a decode step's attention over the KV cache in SmolLM2-135M's shapes (3 KV heads, each
shared by 3 query heads, 64 values a head; one layer), torch's ``scaled_dot_product_attention`` with the step's mask
(what float32 CPU steps ran before) against ``step_attention`` (``csrc/step_attention.c``, which gives each query
the same bits in any batch: tests/test_step_attention.py), side by side at 1 to 16 rows and 64 or 1,024 cached
positions, every row's last position near the context's end.

    pytest benchmarks/bench_step_attention.py --benchmark-only -p no:cacheprovider

A round is one layer's attention; ``extra_info``: ``kernel``, ``rows``, ``context``. Without the compiled kernel (no
AVX2 and FMA, or no build) its entries say so and measure nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minercore.models import step_attention

KV_HEADS, GROUPS, DIM = 3, 3, 64


@pytest.mark.parametrize("context", [64, 1024])
@pytest.mark.parametrize("rows", [1, 8, 16])
@pytest.mark.parametrize("kernel", ["sdpa", "step_attention"])
def test_step_attention(benchmark, kernel: str, rows: int, context: int) -> None:
    benchmark.group = f"step_attention {rows} rows, {context} positions"
    benchmark.extra_info.update(kernel=kernel, rows=rows, context=context)
    if kernel == "step_attention" and not step_attention.AVAILABLE:
        benchmark.extra_info["status"] = "no step attention kernel here (needs AVX2, FMA and its build): nothing " \
                                         "measured"
        print(f"\n{kernel}: {benchmark.extra_info['status']}")
        return
    gen = torch.Generator().manual_seed(rows)
    keys = torch.randn(rows, KV_HEADS, context, DIM, generator=gen)
    values = torch.randn(rows, KV_HEADS, context, DIM, generator=gen)
    q = torch.randn(rows, KV_HEADS, GROUPS, DIM, generator=gen)
    pos = context - 1 - torch.arange(rows) % 4
    if kernel == "sdpa":
        mask = (torch.arange(context) <= pos[:, None])[:, None, None, :]
        benchmark(F.scaled_dot_product_attention, q, keys, values, attn_mask=mask)
    else:
        benchmark(step_attention.attend, q, keys, values, pos[:, None])
