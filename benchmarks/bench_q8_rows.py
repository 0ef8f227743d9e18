"""Group ``q8_rows``: SmolLM2-135M's tied head (49,152 x 576, the file's Q8_0 embedding) in a float32 model, the way
minercore served it before ``q8_rows`` (torch's float32 product over the dequantized matrix, 113 MB) against the
kernel over the Q8_0 blocks (28 MB of int8 values and their scales), and the same blocks times rows rounded to int8
per block (``q8_i8_rows``, ``--activations int8``; ``q8_i8_rows_avx2`` is that kernel held to AVX2 where the CPU has
AVX-512 VNNI, the same bits), side by side at 1 to 64 rows with the same weights and inputs.
The first two multiply the same float32 weights (tests/test_q8_rows.py); the third rounds the rows
(tests/test_int8_rows.py). The kernels serve float32 models, which ``dtype auto`` picks on a CPU without native
bfloat16.

    pytest benchmarks/bench_q8_rows.py --benchmark-only -p no:cacheprovider

A round is one product; ``extra_info``: ``kernel``, ``rows``. Without the compiled kernel (no AVX2 and FMA, or no
build) its entries say so and measure nothing.
"""

from __future__ import annotations

import pytest
import torch

from minercore.models import q8_i8_rows, q8_rows

VOCAB, HIDDEN = 49152, 576
ROWS = (1, 8, 16, 64)


@pytest.fixture(scope="module")
def head() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (VOCAB, HIDDEN), dtype=torch.int8, generator=gen)
    d = (torch.rand(VOCAB, HIDDEN // 32, generator=gen) * 0.002).half().float()
    dense = (q.float().view(VOCAB, -1, 32) * d[..., None]).view(VOCAB, HIDDEN)
    return q, d, dense


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kernel", ["float32", "q8_rows", "q8_i8_rows", "q8_i8_rows_avx2"])
def test_q8_rows(benchmark, head, kernel: str, rows: int, monkeypatch) -> None:
    benchmark.group = f"q8_rows {rows} rows"
    benchmark.extra_info.update(kernel=kernel, rows=rows)
    if not {"q8_rows": q8_rows.AVAILABLE}.get(kernel, kernel == "float32" or q8_i8_rows.AVAILABLE):
        benchmark.extra_info["status"] = f"no {kernel} kernel here (needs AVX2, FMA and its build): nothing measured"
        print(f"\n{kernel}: {benchmark.extra_info['status']}")
        return
    q, d, dense = head
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows))
    if kernel == "float32":
        benchmark(torch.nn.functional.linear, x, dense)
    elif kernel == "q8_rows":
        benchmark(q8_rows.rows_mm, x, q, d)
    else:
        if kernel == "q8_i8_rows_avx2":
            monkeypatch.setattr(q8_i8_rows, "VNNI", False)
        benchmark(q8_i8_rows.rows_mm, x, *q8_i8_rows.layout(q, d))
