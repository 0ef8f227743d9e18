"""Group ``q4_rows``: one SmolLM2-135M decoder block's four products (qkv 960 x 576, o 576 x 576, gate_up
3072 x 576, down 576 x 1536) with a GGUF file's Q4_1 weights, in a float32 model, four ways side by side at 1 to 256
rows with the same weights and inputs: how minercore served them before ``q4_rows`` (``Int4Linear``: torch's int4
kernel, the rows cast to bfloat16 and back), the dense float32 matrices, the kernel over the blocks as they are
(``q4_rows``, float rows: the default), and the same blocks times rows rounded to int8 per block
(``q4_i8_rows``, ``--activations int8``; ``q4_i8_rows_avx2`` is that kernel held to AVX2 where the CPU has AVX-512
VNNI, the same bits). ``q4_rows`` and the dense product multiply the same float32 weights
(tests/test_q4_rows.py); torch's kernel rounds the scales to bfloat16; ``q4_i8_rows`` rounds the rows
(tests/test_q4_i8_rows.py). The kernels serve float32 models, which ``dtype auto`` picks on a CPU without native
bfloat16.

    pytest benchmarks/bench_q4_rows.py --benchmark-only -p no:cacheprovider

A round is the block's four products; ``extra_info``: ``kernel``, ``rows``. Without the compiled kernel (no AVX2
and FMA, or no build) its entries say so and measure nothing.
"""

from __future__ import annotations

import pytest
import torch

from minercore.models import q4_i8_rows, q4_rows
from minercore.models.quant import Int4Linear, Q4I8Linear, Q4Linear

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K): qkv, o, gate_up, down
ROWS = (1, 8, 16, 64, 256)


@pytest.fixture(scope="module")
def layers() -> dict[str, list]:
    gen = torch.Generator().manual_seed(0)
    built: dict[str, list] = {"int4": [], "float32": [], "q4_rows": [], "q4_i8_rows": []}
    for n, k in SHAPES:
        values = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        d = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
        m = (-torch.rand(n, k // 32, generator=gen) * 0.08).half().float()
        blocks = Q4Linear.from_blocks(d, m, values)
        built["q4_rows"].append(blocks)
        built["q4_i8_rows"].append(Q4I8Linear.from_q4(blocks))
        built["float32"].append(blocks.dequantize())
        built["int4"].append(Int4Linear.from_blocks(d, m, values, dtype=torch.bfloat16))
    return built


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kernel", ["int4", "float32", "q4_rows", "q4_i8_rows", "q4_i8_rows_avx2"])
@torch.no_grad()
def test_q4_rows(benchmark, layers, kernel: str, rows: int, monkeypatch) -> None:
    benchmark.group = f"q4_rows {rows} rows"
    benchmark.extra_info.update(kernel=kernel, rows=rows)
    if not {"q4_rows": q4_rows.AVAILABLE}.get(kernel, not kernel.startswith("q4_i8") or q4_i8_rows.AVAILABLE):
        benchmark.extra_info["status"] = f"no {kernel} kernel here (needs AVX2, FMA and its build): nothing measured"
        print(f"\n{kernel}: {benchmark.extra_info['status']}")
        return
    inputs = [torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) for _, k in SHAPES]
    if kernel == "float32":
        products = [lambda x, w=w: torch.nn.functional.linear(x, w) for w in layers["float32"]]
    else:
        products = layers[kernel.removesuffix("_avx2")]
    if kernel == "q4_i8_rows_avx2":
        monkeypatch.setattr(q4_i8_rows, "VNNI", False)
    benchmark(lambda: [product(x) for product, x in zip(products, inputs, strict=True)])
