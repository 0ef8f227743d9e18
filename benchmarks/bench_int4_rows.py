"""Group ``int4_rows``: the int4 CPU product over SmolLM2-135M's four linear shapes (fused qkv 960 x 576, o 576 x 576,
fused gate-up 3072 x 576, down 576 x 1536; group 32, bfloat16 activations), torch's kernel
(``_weight_int4pack_mm_for_cpu``) against minercore's row kernel (``minercore.models.int4_rows``), side by side at
1 to 256 rows, with the same weights and inputs. The two give bit-identical products (tests/test_int4_rows.py);
this measures what each costs.

    pytest benchmarks/bench_int4_rows.py --benchmark-only -p no:cacheprovider

A round is one product of each of the four shapes (one layer's products); ``extra_info``: ``kernel``, ``rows``.
Without the compiled kernel (no AVX-512, or no build) its entries say so and measure nothing.
"""

from __future__ import annotations

import pytest
import torch

from minercore.models import int4_rows

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
GROUP = 32
ROWS = (1, 8, 16, 32, 64, 256)


@pytest.fixture(scope="module")
def layer() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(0)
    weights = []
    for n, k in SHAPES.values():
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        scales_and_zeros = (torch.randn(k // GROUP, n, 2, generator=gen) * 0.02).to(torch.bfloat16)
        weights.append((torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros, k))
    return weights


def torch_kernel(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)


def row_kernel(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    # Through the kernel at every row count (rows_mm hands fewer than MIN_ROWS to torch's).
    y = torch.empty((x.shape[0], packed.shape[0]), dtype=torch.bfloat16)
    int4_rows._kernel.mm(x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(), x.shape[0],
                         packed.shape[0], x.shape[1], GROUP, torch.get_num_threads())
    return y


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kernel", ["torch", "minercore"])
def test_int4_rows(benchmark, layer, kernel: str, rows: int) -> None:
    benchmark.group = f"int4_rows {rows} rows"
    benchmark.extra_info.update(kernel=kernel, rows=rows)
    if kernel == "minercore" and not int4_rows.AVAILABLE:
        benchmark.extra_info["status"] = "no int4 row kernel here (needs AVX-512 and its build): nothing measured"
        print(f"\nint4_rows: {benchmark.extra_info['status']}")
        return
    fn = torch_kernel if kernel == "torch" else row_kernel
    gen = torch.Generator().manual_seed(rows)
    inputs = [torch.randn(rows, k, generator=gen).to(torch.bfloat16) for _, _, k in layer]

    def one_layer() -> None:
        for x, (packed, scales_and_zeros, _) in zip(inputs, layer, strict=True):
            fn(x, packed, scales_and_zeros)

    benchmark(one_layer)
