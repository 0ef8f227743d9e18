"""The KV cache manager: each stream's block table over a ``BlockPool``, and the prefix cache over full blocks.

Only full blocks are cached, under a chained hash: a block's hash covers its tokens and its parent's hash, so
equal hashes mean equal whole prefixes, and a prompt's cached prefix is found block by block from the start. The
hash is blake2b over the token ids' bytes, the same in every process (Python's ``hash`` is salted per process).

Where the whole blocks end, the prefix can go on inside a block: the cached children of the last block found
are searched for the one that shares the most leading tokens with the prompt's next ones (the same prompt asked
again, whose last block was filled by its answer; the next turn of a chat). That block is copied into the
stream's own first fresh block (copy-on-write, through ``copy_block``: the cached one stays as it is for whoever
finds it next), and the stream computes only from there. So a repeated prompt computes one token, not up to a
block's worth.

A block is cached only once its keys and values are written (``commit``), never at admission: with chunked
prefill another stream could otherwise find a block whose contents are still to come.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from itertools import islice

from minercore.kv.block_pool import BlockHash, BlockPool

# The parent of a prompt's first block.
_ROOT: BlockHash = bytes(32)


def _hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    data = struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.blake2b(parent + data, digest_size=32).digest()


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """The chained hashes of the full blocks of ``token_ids`` (a trailing partial block has none)."""
    hashes = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


@dataclass
class KVStats:
    """Prefix-cache outcomes of admitted prompts (in blocks: ``hits`` reused, ``misses`` cacheable but
    computed, ``partial_hits`` copied for their leading tokens), blocks whose cached contents were evicted,
    preemptions, and the pool's blocks now."""

    hits: int
    misses: int
    partial_hits: int
    evictions: int
    preemptions: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int


@dataclass
class _Stream:
    blocks: list[int]
    # Hashes of the leading full blocks already committed, in order: where ``commit`` picks up the chain.
    hashes: list[BlockHash]


# Cached children looked at per partial match, most recent first: bounds the search behind a prefix that many
# prompts share (a system text), where the most recent children are the likeliest repeats.
_MAX_CHILDREN_SCANNED = 64


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


class KVCacheManager:
    """Block tables of the live streams, at most ``max_blocks_per_stream`` blocks each, over ``pool``.

    ``prefix_caching`` off: nothing is cached or looked up, every prompt is computed whole. ``copy_block(src,
    dst)`` makes block ``dst`` a copy of block ``src`` in the KV storage (ordered before any later step); without
    it, only whole blocks are reused."""

    def __init__(self, pool: BlockPool, max_blocks_per_stream: int, prefix_caching: bool = True,
                 copy_block: Callable[[int, int], None] | None = None) -> None:
        if max_blocks_per_stream < 1:
            raise ValueError(f"max_blocks_per_stream must be positive, got {max_blocks_per_stream}")
        self.pool = pool
        self.block_size = pool.block_size
        self.max_blocks_per_stream = max_blocks_per_stream
        self.prefix_caching = prefix_caching
        self._copy_block = copy_block if prefix_caching else None
        self._streams: dict[Hashable, _Stream] = {}
        # The cached blocks' tokens by their parent's hash, for matches inside a block; kept only with copy_block.
        self._children: dict[BlockHash, dict[BlockHash, tuple[int, ...]]] = {}
        self._parent: dict[BlockHash, BlockHash] = {}
        if self._copy_block is not None:
            pool.on_evict = self._forget
        self._hits = 0
        self._misses = 0
        self._partial_hits = 0
        self._preemptions = 0

    def __contains__(self, stream: Hashable) -> bool:
        return stream in self._streams

    def block_table(self, stream: Hashable) -> list[int]:
        """A copy of ``stream``'s block table: block i holds positions [i * block_size, (i + 1) * block_size)."""
        return list(self._streams[stream].blocks)

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def max_positions(self) -> int:
        """The most positions one stream can hold, every other stream gone."""
        return min(self.max_blocks_per_stream, self.pool.capacity) * self.block_size

    def can_fit_alone(self, n_tokens: int) -> bool:
        """Whether a stream holding ``n_tokens`` positions fits its table and the whole pool, every other stream
        gone: False is a request no amount of waiting admits (answer it 400, do not queue it)."""
        return self._blocks_for(n_tokens) <= min(self.max_blocks_per_stream, self.pool.capacity)

    def admit(self, stream: Hashable, prompt_ids: Sequence[int], positions: int = 0) -> int | None:
        """Give ``stream`` blocks for its prompt plus one position (the first generated token's), or for
        ``positions`` if more (a whole answer reserved up front), reusing the longest cached prefix: full blocks,
        then the leading tokens of a cached block, copied into the stream's next block. Returns how many leading
        prompt tokens are cached already (always below ``len(prompt_ids)``: the last token is recomputed for its
        logits), or None, allocating nothing and counting nothing, if too few blocks are free now."""
        if stream in self._streams:
            raise ValueError(f"stream {stream!r} is already admitted")
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("an empty prompt has nothing to compute")
        total = self._blocks_for(max(n + 1, positions))
        if total > self.max_blocks_per_stream:
            raise ValueError(f"{n} prompt tokens need {total} blocks, over {self.max_blocks_per_stream} per stream"
                             " (check can_fit_alone first)")
        hits: list[int] = []
        hashes: list[BlockHash] = []
        cacheable = (n - 1) // self.block_size
        if self.prefix_caching:
            for block_hash in block_hashes(prompt_ids[:cacheable * self.block_size], self.block_size):
                block = self.pool.lookup(block_hash)
                if block is None:
                    break
                hits.append(block)
                hashes.append(block_hash)
        fresh = total - len(hits)
        # A hit nobody references sits in the eviction queue, so it costs a free block just as a fresh one does.
        needed = fresh + sum(1 for block in hits if self.pool.refcount(block) == 0)
        if needed > self.pool.num_free:
            return None
        source, shared = None, 0
        if self._copy_block is not None:
            done = len(hits) * self.block_size
            source, shared = self._partial_match(hashes[-1] if hashes else _ROOT,
                                                 prompt_ids[done:min(n - 1, done + self.block_size)])
            # Held while the fresh blocks are taken, so that taking them cannot evict it.
            if source is not None and needed + (self.pool.refcount(source) == 0) > self.pool.num_free:
                source, shared = None, 0
        for block in hits:
            self.pool.share(block)
        if source is not None:
            self.pool.share(source)
        blocks = hits + self.pool.allocate(fresh)
        if source is not None:
            self._copy_block(source, blocks[len(hits)])
            self.pool.free([source])
            self._partial_hits += 1
        self._streams[stream] = _Stream(blocks, hashes)
        if self.prefix_caching:
            self._hits += len(hits)
            self._misses += cacheable - len(hits)
        return len(hits) * self.block_size + shared

    def _partial_match(self, parent: BlockHash, tokens: Sequence[int]) -> tuple[int | None, int]:
        """The cached child of ``parent`` whose leading tokens match most of ``tokens``, and how many match;
        (None, 0) where none matches a token."""
        best, shared = None, 0
        children = self._children.get(parent)
        if not tokens or not children:
            return None, 0
        for block_hash, cached in islice(reversed(children.items()), _MAX_CHILDREN_SCANNED):
            length = _common_length(cached, tokens)
            if length > shared:
                best, shared = block_hash, length
        block = None if best is None else self.pool.lookup(best)
        return (None, 0) if block is None else (block, shared)

    def _forget(self, block_hash: BlockHash) -> None:
        """An evicted block leaves the partial-match index."""
        parent = self._parent.pop(block_hash, None)
        if parent is None:
            return
        children = self._children[parent]
        del children[block_hash]
        if not children:
            del self._children[parent]

    def commit(self, stream: Hashable, token_ids: Sequence[int]) -> None:
        """Record that ``stream``'s keys and values for ``token_ids`` (all its tokens from position 0) are written:
        every block they fill is cached under its hash. Call it after each prefill chunk and decode step."""
        entry = self._streams[stream]
        if len(token_ids) > len(entry.blocks) * self.block_size:
            raise ValueError(f"{len(token_ids)} tokens committed to a table of {len(entry.blocks)} blocks")
        if not self.prefix_caching:
            return
        parent = entry.hashes[-1] if entry.hashes else _ROOT
        for i in range(len(entry.hashes), len(token_ids) // self.block_size):
            tokens = token_ids[i * self.block_size:(i + 1) * self.block_size]
            block_hash = _hash_block(parent, tokens)
            if (self.pool.cache(entry.blocks[i], block_hash) and self._copy_block is not None
                    and block_hash not in self._parent):
                self._children.setdefault(parent, {})[block_hash] = tuple(tokens)
                self._parent[block_hash] = parent
            entry.hashes.append(block_hash)
            parent = block_hash

    def append_slot(self, stream: Hashable, new_len: int) -> bool:
        """Grow ``stream``'s table to hold ``new_len`` positions. False, allocating nothing, if too few blocks
        are free: the caller then preempts a stream."""
        entry = self._streams[stream]
        wanted = self._blocks_for(new_len)
        if wanted > self.max_blocks_per_stream:
            raise ValueError(f"{new_len} positions need {wanted} blocks, over {self.max_blocks_per_stream} per stream")
        extra = wanted - len(entry.blocks)
        if extra <= 0:
            return True
        if extra > self.pool.num_free:
            return False
        entry.blocks.extend(self.pool.allocate(extra))
        return True

    def release(self, stream: Hashable) -> None:
        """Free ``stream``'s blocks (its cached full blocks stay findable until evicted). They are freed last
        block first, so a prompt's tail is evicted before its head: the head is what more prompts share, and
        a tail whose head is gone can no longer be found."""
        entry = self._streams.pop(stream)
        self.pool.free(reversed(entry.blocks))

    def preempt(self, stream: Hashable) -> None:
        """Release ``stream`` to make room for others (it is recomputed when admitted again), counted apart."""
        self.release(stream)
        self._preemptions += 1

    def stats(self) -> KVStats:
        return KVStats(
            hits=self._hits,
            misses=self._misses,
            partial_hits=self._partial_hits,
            evictions=self.pool.stats.evictions,
            preemptions=self._preemptions,
            blocks_used=self.pool.capacity - self.pool.num_free,
            blocks_free=self.pool.num_free,
            blocks_cached=self.pool.num_evictable,
        )
