"""The paged KV cache's bookkeeping (minercore.kv.block_pool, minercore.kv.manager): reference counts, the LRU
prefix cache, admission that allocates all or nothing, and a state machine over random admissions, commits,
appends, releases and preemptions that checks no block is leaked, freed twice or read by a stream it is not
shared with."""

from __future__ import annotations

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from minercore.kv.block_pool import NULL_BLOCK, BlockPool, NoFreeBlocks
from minercore.kv.manager import KVCacheManager, block_hashes

H1, H2, H3 = b"h1", b"h2", b"h3"


def _cached_pool(n_cached: int, num_blocks: int) -> tuple[BlockPool, list[int]]:
    """A pool whose first ``n_cached`` blocks were allocated, cached under H1, H2, … and freed in that order."""
    pool = BlockPool(num_blocks, 4)
    blocks = pool.allocate(n_cached)
    for i, block in enumerate(blocks):
        assert pool.cache(block, (H1, H2, H3)[i])
    pool.free(blocks)
    return pool, blocks


def test_block_zero_is_reserved_and_never_allocated():
    pool = BlockPool(5, 4)
    assert pool.capacity == pool.num_free == 4
    assert sorted(pool.allocate(4)) == [1, 2, 3, 4]
    assert NULL_BLOCK == 0
    with pytest.raises(ValueError):
        pool.free([NULL_BLOCK])


def test_freed_cached_blocks_stay_findable_until_evicted_least_recently_freed_first():
    pool, (b1, b2, b3) = _cached_pool(3, 6)  # blocks 4 and 5 were never cached
    assert pool.num_free == 5 and pool.num_evictable == 3
    assert [pool.lookup(h) for h in (H1, H2, H3)] == [b1, b2, b3]
    # Never-cached blocks go first: nothing evicted yet.
    plain = pool.allocate(2)
    assert pool.stats.evictions == 0 and pool.num_evictable == 3
    # Sharing b1 takes it off the queue; freed again, it is the most recently freed.
    pool.share(b1)
    pool.free([b1])
    assert pool.allocate(1) == [b2]
    assert pool.lookup(H2) is None and pool.hash_of(b2) is None
    assert pool.allocate(1) == [b3]
    assert pool.lookup(H1) == b1 and pool.stats.evictions == 2
    assert pool.stats.hits == 4 and pool.stats.misses == 1
    pool.free(plain)


def test_a_failed_allocation_allocates_and_evicts_nothing():
    pool, blocks = _cached_pool(2, 4)  # 3 usable: 2 cached and free, 1 plain
    held = pool.allocate(1)
    assert pool.num_evictable == 2 and held not in blocks
    with pytest.raises(NoFreeBlocks) as failure:
        pool.allocate(3)
    assert (failure.value.requested, failure.value.available) == (3, 2)
    assert pool.num_free == 2 and pool.stats.evictions == 0
    assert pool.lookup(H1) == blocks[0] and pool.lookup(H2) == blocks[1]


def test_freeing_twice_raises_and_changes_nothing():
    pool = BlockPool(4, 4)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([b, a])
    assert pool.refcount(b) == 1 and pool.num_free == 2
    pool.share(b)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([b, b, b])
    pool.free([b, b])
    assert pool.num_free == 3
    with pytest.raises(ValueError, match="nothing in it to share"):
        pool.share(a)


def test_a_hash_cached_twice_keeps_the_first_block():
    pool = BlockPool(4, 4)
    a, b = pool.allocate(2)
    assert pool.cache(a, H1) and pool.cache(a, H1)
    assert not pool.cache(b, H1)
    assert pool.lookup(H1) == a and pool.hash_of(b) is None
    with pytest.raises(ValueError, match="another hash"):
        pool.cache(a, H2)
    pool.free([a, b])
    assert pool.num_evictable == 1


def test_block_hashes_are_chained_and_the_same_in_every_process():
    hashes = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(hashes) == 2  # the trailing partial block has no hash
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == hashes
    assert block_hashes([1, 2, 3, 4], 4) == hashes[:1]
    assert block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)[1] != hashes[1]  # the second block's parent differs
    # A fixed value: Python's salted hash() would differ from one process to the next.
    assert hashes[0].hex() == "6e2bd142f369eb09b66e15dfa3785225b4510b9ed68fc9e6bf9d17a46511f9f5"


def test_an_identical_prompt_reuses_its_full_blocks():
    manager = KVCacheManager(BlockPool(16, 4), max_blocks_per_stream=8)
    prompt = list(range(10))
    assert manager.admit("a", prompt) == 0
    manager.commit("a", prompt)
    assert manager.admit("b", prompt) == 8
    assert manager.block_table("b")[:2] == manager.block_table("a")[:2]
    assert manager.block_table("b")[2] != manager.block_table("a")[2]
    manager.release("a")
    manager.release("b")
    # A prompt that is whole blocks still recomputes its last one: the last token's logits are needed.
    assert manager.admit("c", prompt[:8]) == 4
    stats = manager.stats()
    assert (stats.hits, stats.misses) == (3, 2)


def test_only_blocks_committed_full_are_cached():
    pool = BlockPool(8, 4)
    manager = KVCacheManager(pool, max_blocks_per_stream=4)
    prompt = list(range(9))
    manager.admit("a", prompt)
    manager.commit("a", prompt[:3])  # a first prefill chunk: no block is full yet
    assert manager.admit("b", prompt) == 0  # nor findable, though "a" holds it
    manager.commit("a", prompt)
    first, second, third = manager.block_table("a")
    assert pool.hash_of(first) is not None and pool.hash_of(second) is not None and pool.hash_of(third) is None
    manager.commit("b", prompt)  # computed the same blocks again: "a"'s stay the ones found
    assert all(pool.hash_of(block) is None for block in manager.block_table("b"))
    with pytest.raises(ValueError, match="committed to a table"):
        manager.commit("a", prompt + [1, 2, 3, 4])
    with pytest.raises(ValueError, match="already admitted"):
        manager.admit("a", prompt)


def test_a_refused_admission_allocates_nothing():
    pool = BlockPool(5, 4)
    manager = KVCacheManager(pool, max_blocks_per_stream=4)
    prompt = list(range(8))
    head, tail = block_hashes(prompt, 4)
    manager.admit("a", prompt)  # 3 blocks, the last for the first generated token
    manager.commit("a", prompt)
    manager.release("a")
    assert manager.admit("b", [9] * 11) == 0  # 3 blocks: 2 plain, 1 evicted
    # Released last block first, so the prompt's tail went before its head.
    assert pool.stats.evictions == 1 and pool.lookup(tail) is None and pool.lookup(head) is not None
    before = (pool.num_free, pool.num_evictable, pool.stats.evictions)
    # The cached head is the one free block: reusing it leaves none for the second block.
    assert manager.admit("c", prompt[:5]) is None
    assert (pool.num_free, pool.num_evictable, pool.stats.evictions) == before
    assert pool.lookup(head) is not None
    assert "c" not in manager and manager.stats().hits == 0


def test_prefix_caching_off_never_caches_or_hits():
    pool = BlockPool(16, 4)
    manager = KVCacheManager(pool, max_blocks_per_stream=8, prefix_caching=False)
    prompt = list(range(12))
    for stream in ("a", "b"):
        assert manager.admit(stream, prompt) == 0
        manager.commit(stream, prompt)
    assert pool.num_evictable == 0 and all(pool.hash_of(b) is None for b in range(pool.num_blocks))
    assert pool.stats.hits == pool.stats.misses == 0
    assert manager.stats().hits == 0


def test_append_slot_grows_at_block_boundaries_and_says_when_it_cannot():
    manager = KVCacheManager(BlockPool(4, 4), max_blocks_per_stream=3)
    manager.admit("a", [1, 2, 3])  # positions 0..3: one block
    assert len(manager.block_table("a")) == 1
    assert manager.append_slot("a", 4) and len(manager.block_table("a")) == 1
    assert manager.append_slot("a", 5) and len(manager.block_table("a")) == 2
    manager.admit("b", [1])
    assert not manager.append_slot("a", 9)  # the third block is b's
    assert len(manager.block_table("a")) == 2
    with pytest.raises(ValueError, match="per stream"):
        manager.append_slot("a", 13)
    manager.preempt("b")
    assert manager.append_slot("a", 9)
    stats = manager.stats()
    assert (stats.preemptions, stats.blocks_used, stats.blocks_free) == (1, 3, 0)


def _copying_manager(num_blocks: int = 16) -> tuple[KVCacheManager, list[tuple[int, int]]]:
    copies: list[tuple[int, int]] = []
    manager = KVCacheManager(BlockPool(num_blocks, 4), max_blocks_per_stream=8,
                             copy_block=lambda src, dst: copies.append((src, dst)))
    return manager, copies


def test_a_prompt_asked_again_computes_only_its_last_token():
    """Its last block, filled by its answer, is found by its leading tokens and copied into the new stream's own
    block; the cached one stays as it was, findable by the next."""
    manager, copies = _copying_manager()
    prompt, answer = list(range(10)), [50, 51, 52, 53]
    manager.admit("a", prompt, positions=14)
    manager.commit("a", prompt + answer[:3])  # the last answer id was never fed back: positions [0, 13) written
    source = manager.block_table("a")[2]  # prompt 8-9 then answer 50-51: full and cached
    manager.release("a")
    assert manager.admit("b", prompt) == 9
    table = manager.block_table("b")
    assert copies == [(source, table[2])] and source not in table
    assert manager.stats().partial_hits == 1
    assert manager.pool.refcount(source) == 0 and manager.pool.hash_of(source) is not None
    # The copy is the new stream's own: once written full it is cached like any block (the same contents as the
    # source: the first one cached stays the one found).
    manager.commit("b", prompt + [60, 61])
    assert manager.admit("c", prompt + [60, 61, 7]) == 12 and len(copies) == 1
    assert manager.block_table("c")[2] == table[2]


def test_a_partial_match_takes_the_child_sharing_the_most_tokens():
    manager, copies = _copying_manager()
    head = [1, 2, 3, 4]
    for stream, tail in (("a", [5, 6, 7, 8]), ("b", [5, 6, 9, 9]), ("c", [7, 7, 7, 7])):
        manager.admit(stream, head + tail + [0])
        manager.commit(stream, head + tail)
    manager.release("a")
    copies.clear()  # "b" began from a copy of "a"'s second block
    block_a = manager.pool.lookup(block_hashes(head + [5, 6, 7, 8], 4)[1])
    assert manager.admit("d", head + [5, 6, 7, 3, 3]) == 7
    assert copies == [(block_a, manager.block_table("d")[1])]
    assert manager.admit("e", head + [8, 8]) == 4 and len(copies) == 1  # no child begins with 8
    assert manager.admit("f", [1, 2, 3]) == 2  # inside the first block: a child of the root
    assert copies[1:] == [(manager.pool.lookup(block_hashes(head, 4)[0]), manager.block_table("f")[0])]


def test_an_evicted_block_is_never_copied_and_without_copy_block_only_whole_blocks_are_reused():
    manager, copies = _copying_manager(num_blocks=4)  # 3 usable blocks
    prompt = list(range(8))
    manager.admit("a", prompt)
    manager.commit("a", prompt)
    manager.release("a")
    assert manager.admit("b", [9] * 11) == 0  # evicts every cached block
    manager.release("b")
    assert manager.admit("c", prompt) == 0 and copies == []
    plain = KVCacheManager(BlockPool(16, 4), max_blocks_per_stream=8)
    plain.admit("a", prompt)
    plain.commit("a", prompt)
    assert plain.admit("b", prompt) == 4 and plain.stats().partial_hits == 0


def test_the_copied_block_is_held_while_the_fresh_ones_are_taken():
    """The one block left to evict is the copy's source: the copy is skipped rather than read from a block just
    handed out again, and the admission takes whole-block hits only."""
    manager, copies = _copying_manager(num_blocks=4)
    prompt = list(range(6))
    manager.admit("a", prompt, positions=8)
    manager.commit("a", prompt + [6, 7])  # both blocks full and cached
    manager.release("a")
    manager.admit("x", [9] * 3)  # holds the third block: the two cached ones are all that is free
    assert manager.admit("b", prompt) == 4 and copies == []
    assert manager.block_table("b")[0] == manager.pool.lookup(block_hashes(prompt, 4)[0])


def test_can_fit_alone_bounds_by_the_table_and_the_pool():
    manager = KVCacheManager(BlockPool(4, 4), max_blocks_per_stream=8)  # 3 usable blocks
    assert manager.can_fit_alone(12) and not manager.can_fit_alone(13)
    manager = KVCacheManager(BlockPool(64, 4), max_blocks_per_stream=2)
    assert manager.can_fit_alone(8) and not manager.can_fit_alone(9)
    with pytest.raises(ValueError, match="can_fit_alone"):
        manager.admit("a", list(range(8)))  # 8 tokens plus one position need 3 blocks
    with pytest.raises(ValueError, match="empty"):
        manager.admit("a", [])


BLOCK_SIZE = 4
NUM_BLOCKS = 7  # 6 usable: small enough that admissions are refused and appends preempt
MAX_BLOCKS = 4
# Shared prompt heads (a system prompt, a few-shot preamble), so that prefixes repeat often.
HEADS = ([], [0, 0, 1, 1], [0, 0, 1, 1, 1, 0, 1, 0], [1] * 6)


class KVBlocksMachine(RuleBasedStateMachine):
    """Random prompts over a 2-token alphabet (so prefixes repeat) admitted, committed in chunks, extended,
    released and preempted against a model of what each stream holds.

    ``written[block]`` is the chained hash of the full block a stream last wrote into ``block`` in its current
    life (cleared when the block is handed out fresh), and ``contents[block]`` its tokens: the ground truth a
    cached block, or one copied for a match inside it, is checked against."""

    @initialize(prefix_caching=st.booleans(), copying=st.booleans())
    def setup(self, prefix_caching: bool, copying: bool) -> None:
        self.pool = BlockPool(NUM_BLOCKS, BLOCK_SIZE)
        self.copies: list[tuple[int, int]] = []
        self.manager = KVCacheManager(self.pool, MAX_BLOCKS, prefix_caching,
                                      copy_block=self._copy if copying else None)
        self.contents: dict[int, tuple[int, ...]] = {}
        self.tokens: dict[int, list[int]] = {}  # the tokens whose KV each live stream holds or will
        self.committed: dict[int, int] = {}
        self.positions: dict[int, int] = {}  # the positions its table must cover
        self.written: dict[int, bytes] = {}
        self.next_id = 0
        self.preemptions = 0

    def _pick(self, data: st.DataObject) -> int | None:
        """A live stream, or None (a rule with nothing to act on does nothing: preconditions that are rarely
        met make hypothesis give up on the example)."""
        return data.draw(st.sampled_from(sorted(self.tokens))) if self.tokens else None

    def _copy(self, src: int, dst: int) -> None:
        # The source is a cached block someone wrote full, still held (nothing can hand it out meanwhile).
        assert self.pool.refcount(src) > 0 and self.pool.hash_of(src) == self.written[src]
        self.copies.append((src, dst))

    def _fresh(self, blocks: list[int]) -> None:
        for block in blocks:
            self.written.pop(block, None)
            self.contents.pop(block, None)

    @rule(head=st.sampled_from(HEADS), tail=st.lists(st.integers(0, 1), max_size=MAX_BLOCKS * BLOCK_SIZE - 1))
    def admit(self, head: list[int], tail: list[int]) -> None:
        prompt = (head + tail)[:MAX_BLOCKS * BLOCK_SIZE - 1]
        if not prompt:
            return
        stream = self.next_id
        self.next_id += 1
        needed = -(-(len(prompt) + 1) // BLOCK_SIZE)
        assert self.manager.can_fit_alone(len(prompt) + 1) == (needed <= MAX_BLOCKS)
        free, alone = self.pool.num_free, not self.tokens
        self.copies.clear()
        cached = self.manager.admit(stream, prompt)
        event("refused" if cached is None else f"admitted, {cached} tokens cached")
        if cached is None:
            assert not alone, "a prompt that fits alone was refused by an empty pool"
            assert free < needed, "refused although enough blocks were free"
            assert self.pool.num_free == free
            return
        assert 0 <= cached < len(prompt)
        assert cached == 0 or self.manager.prefix_caching
        table = self.manager.block_table(stream)
        assert len(table) == needed
        hits, shared = divmod(cached, BLOCK_SIZE)
        # What a hit reuses really holds this prompt's leading blocks.
        for block, block_hash in zip(table[:hits], block_hashes(prompt, BLOCK_SIZE), strict=False):
            assert self.written[block] == block_hash
        # A match inside a block: a copy of a block written after the same leading blocks, its first tokens
        # this prompt's next ones, into the stream's own next block.
        assert len(self.copies) == (shared > 0)
        if shared:
            (src, dst), = self.copies
            assert dst == table[hits] and src not in table
            assert self.contents[src][:shared] == tuple(prompt[cached - shared:cached])
            chain = block_hashes(prompt[:cached - shared] + list(self.contents[src]), BLOCK_SIZE)
            assert chain[-1] == self.written[src]
            event("a match inside a block, copied")
        self._fresh(table[hits:])
        self.tokens[stream] = list(prompt)
        self.committed[stream] = cached
        self.positions[stream] = len(prompt) + 1

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        stream = self._pick(data)
        if stream is None:
            return
        tokens = self.tokens[stream]
        upto = data.draw(st.integers(self.committed[stream], len(tokens)))
        self.manager.commit(stream, tokens[:upto])
        table = self.manager.block_table(stream)
        for i, (block, block_hash) in enumerate(zip(table, block_hashes(tokens[:upto], BLOCK_SIZE), strict=False)):
            self.written.setdefault(block, block_hash)
            self.contents.setdefault(block, tuple(tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))
            assert self.written[block] == block_hash, "a block was written with two contents"
        self.committed[stream] = upto

    @rule(data=st.data(), token=st.integers(0, 1))
    def append(self, data: st.DataObject, token: int) -> None:
        """A decode step: the stream's next token is written at its last position, and it needs one more."""
        stream = self._pick(data)
        if stream is None:
            return
        if self.positions[stream] + 1 > MAX_BLOCKS * BLOCK_SIZE:
            return  # at its longest: the engine finishes it instead
        self.tokens[stream].append(token)
        before = self.manager.block_table(stream)
        free = self.pool.num_free
        if self.manager.append_slot(stream, self.positions[stream] + 1):
            self.positions[stream] += 1
            after = self.manager.block_table(stream)
            assert after[:len(before)] == before
            self._fresh(after[len(before):])
        else:
            assert free == 0 and self.manager.block_table(stream) == before
            event("append_slot failed: preempted")
            self._drop(stream)
            self.manager.preempt(stream)
            self.preemptions += 1

    def _drop(self, stream: int) -> None:
        for table in (self.tokens, self.committed, self.positions):
            del table[stream]

    @rule(data=st.data(), preempt=st.booleans())
    def release(self, data: st.DataObject, preempt: bool) -> None:
        stream = self._pick(data)
        if stream is None:
            return
        self._drop(stream)
        if preempt:
            self.manager.preempt(stream)
            self.preemptions += 1
        else:
            self.manager.release(stream)

    @invariant()
    def every_block_is_counted_once(self) -> None:
        holders: dict[int, list[int]] = {}
        for stream in self.tokens:
            table = self.manager.block_table(stream)
            assert len(set(table)) == len(table) and NULL_BLOCK not in table
            assert len(table) * BLOCK_SIZE >= self.positions[stream]
            for block in table:
                holders.setdefault(block, []).append(stream)
        for block in range(1, NUM_BLOCKS):
            assert self.pool.refcount(block) == len(holders.get(block, ()))
        referenced = len(holders)
        cached_free = sum(1 for b in range(1, NUM_BLOCKS) if b not in holders and self.pool.hash_of(b) is not None)
        # No leak: every block is free, referenced or cached, and the free counts agree with the refcounts.
        assert self.pool.num_free + referenced == self.pool.capacity
        assert self.pool.num_evictable == cached_free
        stats = self.manager.stats()
        assert (stats.blocks_used, stats.blocks_free) == (referenced, self.pool.num_free)
        assert stats.preemptions == self.preemptions
        # Streams share only cached full blocks holding the same prefix, each of them at that block's place.
        for block, streams in holders.items():
            if len(streams) > 1:
                block_hash = self.pool.hash_of(block)
                assert block_hash is not None, f"streams {streams} share the uncached block {block}"
                for stream in streams:
                    place = self.manager.block_table(stream).index(block)
                    assert block_hashes(self.tokens[stream], BLOCK_SIZE)[place] == block_hash

    @invariant()
    def cached_blocks_hold_what_their_hash_says(self) -> None:
        for block in range(1, NUM_BLOCKS):
            block_hash = self.pool.hash_of(block)
            if block_hash is not None:
                assert self.manager.prefix_caching
                assert self.written.get(block) == block_hash
                assert self.pool.lookup(block_hash) == block


KVBlocksMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_kv_blocks_state_machine = KVBlocksMachine.TestCase
