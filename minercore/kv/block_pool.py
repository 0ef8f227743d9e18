"""The block pool of the paged KV cache: fixed-size blocks with reference counts, and the prefix cache's memory.

A block whose last reference goes away keeps its contents. If it was full and hashed (``cache``), it stays
findable by that hash in an LRU queue and is only evicted (its hash forgotten) when a fresh block is needed and
no never-cached block is left: a freed prefix is worth keeping until its memory is wanted. Every operation is
O(1) per block (a list for the plain free blocks, an ``OrderedDict`` for the LRU queue, a dict for the hashes).

Block 0 is reserved as the null block: it is never allocated, so a block table padded with 0 on the device
points at memory no stream owns. ``capacity`` is therefore ``num_blocks - 1``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

BlockHash = bytes
NULL_BLOCK = 0


class NoFreeBlocks(Exception):
    """Fewer blocks are free or evictable than were asked for; nothing was allocated."""

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"asked for {requested} KV blocks, only {available} free or evictable")
        self.requested = requested
        self.available = available


@dataclass
class PoolStats:
    """Counters since the pool was made: ``lookup`` outcomes and blocks whose cached contents were evicted."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` positions each (block 0 reserved), reference counted.

    ``on_evict``, if set, is called with the hash of each cached block ``allocate`` evicts (the prefix cache's
    indexes forget it)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.stats = PoolStats()
        self._refs = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}
        # Never-cached free blocks, popped from the end: the lowest ids come out first on a fresh pool.
        self._plain: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        # Cached blocks nobody references, least recently freed first: the eviction order.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.on_evict: Callable[[BlockHash], None] | None = None

    @property
    def capacity(self) -> int:
        """How many blocks can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now: never-cached free ones plus evictable cached ones."""
        return len(self._plain) + len(self._lru)

    @property
    def num_evictable(self) -> int:
        """Cached blocks that nobody references (findable by hash, but evicted first when memory is needed)."""
        return len(self._lru)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def hash_of(self, block: int) -> BlockHash | None:
        """The hash ``block`` is cached under, or None."""
        return self._hash[block]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks, each with one reference; never-cached ones first, then the least recently freed
        cached ones (evicted). Raises ``NoFreeBlocks`` without allocating anything if fewer than ``n`` are free."""
        if n > self.num_free:
            raise NoFreeBlocks(n, self.num_free)
        blocks = []
        for _ in range(n):
            if self._plain:
                block = self._plain.pop()
            else:
                block, _ = self._lru.popitem(last=False)
                evicted = self._hash[block]
                del self._by_hash[evicted]
                self._hash[block] = None
                self.stats.evictions += 1
                if self.on_evict is not None:
                    self.on_evict(evicted)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference on each of ``blocks`` (in order: a cached block freed later is evicted later).
        Raises ``ValueError``, changing nothing, if that would take any block below zero references."""
        blocks = list(blocks)
        for block, n in Counter(blocks).items():
            if block == NULL_BLOCK or n > self._refs[block]:
                raise ValueError(f"block {block} freed more often than it is referenced ({self._refs[block]})")
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash[block] is None:
                    self._plain.append(block)
                else:
                    self._lru[block] = None

    def share(self, block: int) -> None:
        """Take one more reference on a block that is referenced or cached (a prefix-cache hit); a cached block
        nobody referenced leaves the eviction queue."""
        if self._refs[block] == 0:
            if block not in self._lru:
                raise ValueError(f"block {block} is free and not cached: there is nothing in it to share")
            del self._lru[block]
        self._refs[block] += 1

    def cache(self, block: int, block_hash: BlockHash) -> bool:
        """Make a referenced, full ``block`` findable under ``block_hash``. Returns False if another block is
        already cached under that hash (two streams computed the same block): the first stays the one found,
        this one is freed like a never-cached block."""
        if self._refs[block] == 0:
            raise ValueError(f"block {block} is not referenced: only a block someone just wrote can be cached")
        current = self._hash[block]
        if current is not None:
            if current != block_hash:
                raise ValueError(f"block {block} is already cached under another hash")
            return True
        if block_hash in self._by_hash:
            return False
        self._hash[block] = block_hash
        self._by_hash[block_hash] = block
        return True

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block cached under ``block_hash``, or None; counted as a hit or a miss. Takes no reference."""
        block = self._by_hash.get(block_hash)
        if block is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return block
