"""The paged KV cache's storage (minercore.kv.paged) against the static cache it replaces: the same keys and
values attended after random fills, decode steps and verify steps through a scrambled block assignment, the
same logits from both model families, no data of a released slot shown to the slot given its blocks, and
table edits seen by a compiled step."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import Tensor
from torch._dynamo.testing import CompileCounter

from minercore.kv.block_pool import NULL_BLOCK, BlockPool
from minercore.kv.manager import KVCacheManager
from minercore.kv.paged import PagedKVCache, PagedSpec, pool_zeros
from minercore.kv.static import KVCache
from minercore.models.presets import build_preset

CPU = torch.device("cpu")
H, D, BS = 2, 4, 4  # heads, head size, positions per block


def _scrambled_spec(num_blocks: int, max_batch: int, blocks_per_slot: int, seed: int) -> PagedSpec:
    """A spec whose slots own random, interleaved blocks (never the null block, never in order)."""
    spec = PagedSpec.create(num_blocks, BS, max_batch, blocks_per_slot, CPU)
    ids = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    for slot in range(max_batch):
        spec.set_blocks(slot, ids[slot::max_batch][:blocks_per_slot])
    return spec


def _assert_rows_equal(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor], rows: list[int],
                       lengths: list[int]) -> None:
    """Result row i equals the reference's over the first ``lengths[rows[i]]`` positions (the written ones)."""
    for i, row in enumerate(rows):
        for g, w in zip(got, want, strict=True):
            n = min(lengths[row], w.shape[2])
            assert torch.equal(g[i, :, :n], w[i, :, :n]), f"row {row}, positions [0, {n})"


def test_fill_and_append_attend_what_the_static_cache_does() -> None:
    max_batch, max_context = 3, 27  # positions = 28 = the table's capacity: a step past it reaches the null block
    positions = max_context + 1
    static = KVCache(max_batch, H, positions, D, torch.float32, CPU)
    spec = _scrambled_spec(num_blocks=32, max_batch=max_batch, blocks_per_slot=7, seed=1)
    paged = spec.layer_cache(max_batch, H, positions, D, torch.float32, CPU)
    assert sorted(spec.table.flatten().tolist()) != spec.table.flatten().tolist()  # not the identity layout
    lengths = [0] * max_batch
    g = torch.Generator().manual_seed(0)

    def chunk(b: int, t: int) -> tuple[Tensor, Tensor]:
        return torch.randn(b, H, t, D, generator=g), torch.randn(b, H, t, D, generator=g)

    # Prompt chunks: rows 2 and 0 from position 0, then row 0 again from 5 (attending the gathered prefix), then
    # all three from their own lengths at once (what is read reaches the furthest row's end).
    for rows, start, t in (([2, 0], 0, 5), ([1], 0, 9), ([0], 5, 6), ([0, 2, 1], [11, 5, 9], 4)):
        k, v = chunk(len(rows), t)
        slots = torch.tensor(rows)
        want = static.fill(slots, start, k, v)
        got = paged.fill(slots, start, k, v)
        for i, row in enumerate(rows):
            lengths[row] = (start if isinstance(start, int) else start[i]) + t
        assert got[0].shape == want[0].shape
        _assert_rows_equal(got, want, rows, lengths)
    # Decode steps of one position, then verify steps of three, each row at its own length.
    for t in (1, 1, 3, 1, 3):
        pos = torch.tensor(lengths)
        ctx = max(lengths) + t
        k, v = chunk(max_batch, t)
        want = static.append(pos, k, v, ctx)
        got = paged.append(pos, k, v, ctx)
        lengths = [n + t for n in lengths]
        assert got[0].shape == want[0].shape == (max_batch, H, ctx, D)
        _assert_rows_equal(got, want, list(range(max_batch)), lengths)
    # A verify step running past the end: the static cache's spare position, the null block here; neither
    # may touch what is written below max_context, in this row or another.
    pos = torch.tensor([max_context - 1, lengths[1], lengths[2]])
    k, v = chunk(max_batch, 3)
    want = static.append(pos, k, v, positions)
    got = paged.append(pos, k, v, positions)
    lengths = [max_context, lengths[1] + 3, lengths[2] + 3]
    _assert_rows_equal(got, want, list(range(max_batch)), [min(n, max_context) for n in lengths])


def test_bytes_per_token_match_the_static_formula() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        static = KVCache(2, H, 9, D, dtype, CPU)
        paged = PagedSpec.create(5, BS, 2, 3, CPU).layer_cache(2, H, 9, D, dtype, CPU)
        per_token = 2 * H * D * dtype.itemsize
        assert paged.bytes_per_token == per_token
        assert (static.k.nbytes + static.v.nbytes) // (2 * 9) == per_token
        assert paged.k.nbytes + paged.v.nbytes == 5 * BS * per_token


def test_spec_refuses_tables_that_cannot_name_the_positions() -> None:
    spec = PagedSpec.create(8, BS, max_batch=2, max_blocks_per_slot=3, device=CPU)
    with pytest.raises(ValueError, match="rows"):
        spec.layer_cache(3, H, 12, D, torch.float32, CPU)
    with pytest.raises(ValueError, match="positions"):
        spec.layer_cache(2, H, 13, D, torch.float32, CPU)
    with pytest.raises(ValueError, match="table row"):
        spec.set_blocks(0, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="block ids"):
        spec.set_blocks(0, [8])
    spec.set_blocks(1, [5, 3])
    assert spec.table.tolist() == [[NULL_BLOCK] * 3, [5, 3, NULL_BLOCK]]


def test_a_compiled_step_reads_table_edits_without_recompiling() -> None:
    spec = PagedSpec.create(16, BS, max_batch=2, max_blocks_per_slot=4, device=CPU)
    spec.set_blocks(0, [3, 7, 1, 9])
    spec.set_blocks(1, [2, 5])
    paged = spec.layer_cache(2, H, 13, D, torch.float32, CPU)
    counter = CompileCounter()
    step = torch.compile(lambda pos, k, v: paged.append(pos, k, v, 12), backend=counter, fullgraph=True)
    k, v = torch.randn(2, H, 1, D), torch.randn(2, H, 1, D)
    step(torch.tensor([5, 3]), k, v)
    spec.set_blocks(1, [11, 12, 13])  # slot 1 moves: position 3 is now block 11's offset 3
    keys, _ = step(torch.tensor([5, 3]), k, v)
    assert counter.frame_count == 1
    assert torch.equal(paged.k[11, :, 3], k[1, :, 0]) and torch.equal(keys[1, :, 3], k[1, :, 0])


def _scrambled_manager(num_blocks: int, max_blocks: int, seed: int) -> KVCacheManager:
    """A manager whose pool hands blocks out in a random order (all allocated, then freed shuffled)."""
    pool = BlockPool(num_blocks, BS)
    blocks = pool.allocate(pool.capacity)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    pool.free(blocks[i] for i in order)
    return KVCacheManager(pool, max_blocks, prefix_caching=False)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_models_give_the_static_logits_over_interleaved_blocks(preset: str) -> None:
    model = build_preset(preset, 0, CPU, torch.float32).eval()
    max_batch, max_context = 3, 48
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(vocab, (n,), generator=g).tolist() for n in (5, 11, 14)]
    steps = torch.randint(vocab, (20, max_batch), generator=g)
    drafts = torch.randint(vocab, (max_batch, 3), generator=g)

    def run(paged: bool) -> list[Tensor]:
        outputs = []
        manager = _scrambled_manager(num_blocks=40, max_blocks=13, seed=2) if paged else None
        spec = PagedSpec.create(40, BS, max_batch, 13, CPU) if paged else None

        def grow(lengths: list[int]) -> None:
            # The manager's tables, in its allocation order, become the device table before each write.
            if manager is not None:
                for slot, n in enumerate(lengths):
                    if slot not in manager:
                        manager.admit(slot, prompts[slot])
                    assert manager.append_slot(slot, n)
                    spec.set_blocks(slot, manager.block_table(slot))

        with torch.no_grad():
            if spec is None:
                model.setup_caches(max_batch, max_context)
            else:
                model.setup_caches(max_batch, max_context, cache_factory=spec.layer_cache)
            lengths = [len(p) for p in prompts]
            grow(lengths)
            # Rows 0 and 1 in one right-padded batch (row 0's padding runs past its blocks), row 2 in two chunks.
            batch = torch.tensor([prompts[0] + [0] * 6, prompts[1]])
            outputs.append(model.prefill(batch, torch.tensor([0, 1]), last=torch.tensor([4, 10])))
            outputs.append(model.prefill(torch.tensor([prompts[2][:8]]), 2))
            outputs.append(model.prefill(torch.tensor([prompts[2][8:]]), 2, start=8))
            for tokens in steps:
                grow([n + 1 for n in lengths])
                pos = torch.tensor(lengths)
                ctx = -(-(max(lengths) + 1) // 8) * 8  # a bucket, as the runner's
                outputs.append(model.decode(tokens, pos, ctx))
                lengths = [n + 1 for n in lengths]
            grow([n + drafts.shape[1] for n in lengths])
            outputs.append(model.verify(drafts, torch.tensor(lengths), max_context))
        if manager is not None:
            owners = [set(manager.block_table(slot)) for slot in range(max_batch)]
            assert not owners[0] & owners[1] and not owners[1] & owners[2] and not owners[0] & owners[2]
            assert any(sorted(o) != list(range(min(o), max(o) + 1)) for o in owners)  # interleaved, not runs
            assert all(isinstance(m.cache, PagedKVCache) for m in model.modules() if hasattr(m, "cache"))
        return outputs

    for got, want in zip(run(paged=True), run(paged=False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_released_slots_blocks_show_nothing_of_it_to_the_next_owner() -> None:
    max_batch, positions = 2, 17
    manager = KVCacheManager(BlockPool(6, BS), max_blocks_per_stream=5, prefix_caching=False)
    spec = PagedSpec.create(6, BS, max_batch, 5, CPU)
    paged = spec.layer_cache(max_batch, H, positions, D, torch.float32, CPU)
    g = torch.Generator().manual_seed(3)
    manager.admit("old", list(range(16)))
    old_blocks = manager.block_table("old")
    spec.set_blocks(0, old_blocks)
    old = torch.randn(1, H, 16, D, generator=g), torch.randn(1, H, 16, D, generator=g)
    paged.fill(torch.tensor([0]), 0, *old)
    manager.release("old")
    spec.set_blocks(0, [])
    # The new stream in the other slot gets the old one's blocks and writes part of them (10 positions,
    # then one decode step): whatever it attends at those positions is its own.
    manager.admit("new", list(range(10)))
    assert set(manager.block_table("new")) <= set(old_blocks)
    spec.set_blocks(1, manager.block_table("new"))
    new = torch.randn(1, H, 10, D, generator=g), torch.randn(1, H, 10, D, generator=g)
    paged.fill(torch.tensor([1]), 0, *new)
    step = torch.randn(2, H, 1, D, generator=g), torch.randn(2, H, 1, D, generator=g)
    keys, values = paged.append(torch.tensor([0, 10]), *step, ctx=12)
    for got, written, last in ((keys, new[0], step[0]), (values, new[1], step[1])):
        assert torch.equal(got[1, :, :10], written[0])
        assert torch.equal(got[1, :, 10], last[1, :, 0])
    # Slot 0 owns nothing now: its step went to the null block, not into the new stream's blocks (read back
    # through a one-position chunk at the new stream's last owned position).
    tail = torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g)
    keys, values = paged.fill(torch.tensor([1]), 11, *tail)
    for got, written, last in ((keys, new[0], step[0]), (values, new[1], step[1])):
        assert torch.equal(got[0, :, :10], written[0])
        assert torch.equal(got[0, :, 10], last[1, :, 0])


def test_a_cpu_pool_is_zero_and_resident_only_where_blocks_were_written() -> None:
    """256 MiB of pool: reading it gives zeros, and the process's resident memory grows by what the written
    blocks hold, not by the pool's size."""
    process = psutil.Process()
    before = process.memory_info().rss
    pool = pool_zeros((16384, 4, 16, 64), torch.float32, torch.device("cpu"))  # 16 KiB a block
    assert pool.nbytes == 256 << 20 and pool.is_contiguous()
    pool[7] = 1.0
    pool[1000:1064] = 2.0  # 1 MiB
    grown = process.memory_info().rss - before
    assert grown < 32 << 20, grown
    assert float(pool[7].sum()) == 4 * 16 * 64 and float(pool[8:1000].abs().sum()) == 0.0
