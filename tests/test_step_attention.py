"""The compiled step attention (csrc/step_attention.c): a decode or verify step's attention over the KV cache equal
to scaled-dot-product attention, each query's result the same bits whatever else the step holds (batch, context
bucket, verify width, threads, compile), its refusals, and the models' use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minercore.models import step_attention
from minercore.models.base import cached_attention, verify_mask, verify_positions

needs_kernel = pytest.mark.skipif(not step_attention.AVAILABLE,
                                  reason="the step attention kernel needs AVX2, FMA and its build")


def cache(batch: int, heads: int, positions: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, positions, dim, generator=gen),
            torch.randn(batch, heads, positions, dim, generator=gen))


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Scaled-dot-product attention with each query row r seeing positions [0, at[:, r % T]]."""
    b, h, rows, _ = q.shape
    width, ctx = at.shape[1], keys.shape[2]
    last = at[:, torch.arange(rows) % width]  # (B, R)
    mask = (torch.arange(ctx) <= last[..., None])[:, None]
    return F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=mask).float()


@needs_kernel
@pytest.mark.parametrize(("heads", "groups", "width", "dim", "ctx"),
                         [(3, 3, 1, 64, 64), (3, 3, 5, 64, 256), (2, 1, 1, 20, 7), (4, 2, 9, 32, 1024)])
def test_the_kernel_is_attention_over_each_querys_visible_positions(heads, groups, width, dim, ctx) -> None:
    keys, values = cache(3, heads, ctx, dim, seed=dim)
    q = torch.randn(3, heads, groups * width, dim, generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([0, ctx // 2, ctx - 1])
    at = verify_positions(pos, width)  # the last row's later positions lie past the context: clamped to its end
    got = step_attention.attend(q, keys, values, at)
    torch.testing.assert_close(got, reference(q, keys, values, at.clamp(max=ctx - 1)), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(("groups", "width", "block_size"), [(3, 1, 16), (3, 4, 16), (1, 1, 5), (2, 9, 1)])
@torch.inference_mode()
def test_a_paged_cache_read_where_its_blocks_lie_gives_the_gathered_copys_bits(compiled, groups, width,
                                                                               block_size) -> None:
    """Each row's positions in scattered blocks of one pool (the null block 0 among them past its end): the paged
    op equals the kernel over the blocks gathered end to end, bit for bit, and a context bucket past the table
    row reads no further than the row names."""
    gen = torch.Generator().manual_seed(block_size + width)
    heads, dim, rows_blocks, num_blocks = 3, 64, 7, 40
    k_pool, v_pool = (torch.randn(num_blocks, heads, block_size, dim, generator=gen) for _ in range(2))
    tables = torch.randperm(num_blocks - 1, generator=gen)[:3 * rows_blocks].view(3, rows_blocks) + 1
    tables[0, 5:] = 0  # a short row: its table ends on the null block
    q = torch.randn(3, heads, groups * width, dim, generator=gen)
    capacity = rows_blocks * block_size
    pos = torch.tensor([3 * block_size, capacity // 2, capacity - width])
    at = verify_positions(pos, width)
    paged = torch.ops.minercore.step_attention_paged
    if compiled:  # dynamo keeps graphs per code object: this lambda's, across the parameters, would pass its limit
        torch._dynamo.reset()
        paged = torch.compile(lambda *a: torch.ops.minercore.step_attention_paged(*a), fullgraph=True)
    for ctx in (capacity, capacity - 3, capacity + 64):
        gathered = [pool[tables].transpose(1, 2).flatten(2, 3)[:, :, :ctx] for pool in (k_pool, v_pool)]
        expected = step_attention.attend(q, *gathered, at)
        assert torch.equal(paged(q, k_pool, v_pool, tables, at, ctx), expected), ctx
    with pytest.raises(ValueError, match="contiguous pools"):
        step_attention.attend_paged(q, k_pool.transpose(2, 3), v_pool, tables, at, capacity)
    tables[2, 1] = num_blocks  # no such block: refused, never read
    with pytest.raises(ValueError, match="outside the pool's 40 blocks"):
        torch.ops.minercore.step_attention_paged(q, k_pool, v_pool, tables, at, capacity)


@needs_kernel
def test_a_query_with_nothing_visible_gets_zeros_and_nans_stay_in_their_row() -> None:
    keys, values = cache(2, 1, 16, 8, seed=2)
    q = torch.randn(2, 1, 1, 8)
    q[1, 0, 0, 3] = float("nan")
    got = step_attention.attend(q, keys, values, torch.tensor([[-1], [5]]))
    assert not got[0].any()
    assert got[1].isnan().all()


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True])
@torch.inference_mode()
def test_a_query_gets_the_same_bits_in_any_batch_context_width_and_thread_count(compiled) -> None:
    """Query head g of batch row 0 at position 40 + j: alone in a decode step over 64 positions, and in a batch of 8
    over 1024, in a verify step of width 9 over 512, with one thread: the same bits. (torch's flash attention and
    matrix products differ in the last bit across these.)"""
    keys, values = cache(8, 3, 1024, 64, seed=3)
    q = torch.randn(8, 3, 3 * 9, 64, generator=torch.Generator().manual_seed(4))  # 3 query heads x 9 positions
    pos = torch.tensor([40, 300, 12, 63, 900, 7, 0, 255])
    attend = torch.compile(cached_attention, fullgraph=True, dynamic=True) if compiled else cached_attention

    def step(b: int, ctx: int, width: int) -> torch.Tensor:
        rows = q[:b].view(b, 3, 3, 9, 64)[:, :, :, :width].reshape(b, 3, 3 * width, 64)
        mask = (torch.arange(ctx) <= verify_positions(pos[:b], width)[..., None])[:, None]  # unused on the kernel path
        mask = mask.expand(b, 3, width, ctx).reshape(b, 1, 3 * width, ctx)
        return attend(rows, keys[:b, :, :ctx], values[:b, :, :ctx], mask, pos[:b], width).view(b, 3, 3, width, 64)

    for j in range(9):
        alone = attend(q[:1].view(1, 3, 3, 9, 64)[:, :, :, j].contiguous(), keys[:1, :, :64], values[:1, :, :64],
                       None, pos[:1] + j, 1)
        if j == 0:
            assert torch.equal(step(8, 1024, 1)[:1, :, :, 0], alone)
        assert torch.equal(step(8, 512, 9)[:1, :, :, j], alone), j
        assert torch.equal(step(2, 64, j + 1)[:1, :, :, j], alone), j
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = step(8, 512, 9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, step(8, 512, 9))


@needs_kernel
def test_a_static_caches_prefix_is_read_in_place_and_a_gathered_one_too() -> None:
    """Keys and values as the static cache gives them (a view of the first ctx of more positions) and as the paged
    one gathers them (contiguous), or with positions apart (copied first): one result."""
    keys, values = cache(4, 2, 100, 16, seed=5)
    q = torch.randn(2, 2, 2, 16)
    at = torch.tensor([[30], [49]])
    view = step_attention.attend(q, keys[:2, :, :50], values[:2, :, :50], at)
    assert torch.equal(view, step_attention.attend(q, keys[:2, :, :50].contiguous(), values[:2, :, :50].contiguous(),
                                                   at))
    apart = keys[:2, :, :50].transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(view, step_attention.attend(q, apart, values[:2, :, :50], at))


@needs_kernel
@pytest.mark.parametrize(("change", "message"), [
    (lambda q, k, v, at: (q.double(), k, v, at), "float32 CPU queries"),
    (lambda q, k, v, at: (q, k[:, :1], v, at), "keys"),
    (lambda q, k, v, at: (q, k, v, at.int()), "int64"),
    (lambda q, k, v, at: (torch.randn(2, 2, 3, 16), k, v, torch.zeros(2, 2, dtype=torch.int64)), "R a multiple of T"),
])
def test_misshapen_inputs_are_refused_with_what_was_given(change, message) -> None:
    keys, values = cache(2, 2, 8, 16, seed=6)
    q, at = torch.randn(2, 2, 2, 16), torch.tensor([[3], [7]])
    with pytest.raises(ValueError, match=message):
        step_attention.attend(*change(q, keys, values, at))


def test_other_dtypes_attend_through_torchs_fused_attention() -> None:
    """bfloat16 (or a CPU without the kernel) takes scaled_dot_product_attention with the step's mask."""
    keys, values = cache(2, 2, 32, 16, seed=7)
    q = torch.randn(2, 2, 1, 16)
    pos = torch.tensor([5, 31])
    mask = (torch.arange(32) <= pos[:, None])[:, None, None, :]
    got = cached_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), mask, pos, 1)
    assert got.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), attn_mask=mask)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("groups", "width"), [(1, 1), (3, 1), (1, 4), (3, 4)])
def test_torchs_attention_gives_each_query_heads_rows_their_own_positions(monkeypatch, groups, width) -> None:
    """Where the kernel does not serve, a step's (B, 1, T, ctx) mask is spread over the query heads sharing a KV
    head (row g * T + j sees what position j sees): the same attention the kernel computes."""
    monkeypatch.setattr(step_attention, "usable", lambda q: False)
    keys, values = cache(2, 2, 40, 16, seed=8)
    q = torch.randn(2, 2, groups * width, 16, generator=torch.Generator().manual_seed(9))
    pos = torch.tensor([4, 30])
    at = verify_positions(pos, width)
    mask = verify_mask(at, 40)
    got = cached_attention(q, keys, values, mask, pos, width, groups)
    torch.testing.assert_close(got, reference(q, keys, values, at), rtol=1e-5, atol=1e-5)
