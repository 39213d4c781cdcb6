"""KV-cache blocks: a pool of fixed-size blocks, reference counts, LRU reuse of cached prefixes. No torch here.

The KV cache is `num_blocks` blocks of `block_size` token positions. A sequence owns a block table
(block ids in position order); position p of the sequence lives at offset p % block_size of block
block_table[p // block_size].

Prefix caching: a block whose `block_size` tokens are all known gets a key, the hash of (the key of
the block before it, its tokens), so a key names the whole prefix up to the end of that block. A new
sequence whose leading full blocks have keys already in the cache takes those blocks (reference
count + 1) instead of computing them again. A block is keyed in the step that writes it (the model
writes a step's keys and values before any attention of that step reads them), and a keyed block is
full, so it is never written again: shared blocks are read-only. Blocks whose reference count falls
to 0 stay keyed in the free list, oldest first, and are reused (evicted) only when a new block is
needed; unkeyed free blocks are reused first.
"""

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class Block:
    id: int
    ref: int = 0
    key: int | None = None  # prefix key, when the block is full and in the cache
    tokens: tuple[int, ...] = ()  # the tokens behind `key` (a hash collision must not give wrong blocks)


@dataclass(eq=False)
class BlockTable:
    """One sequence's blocks, and how many of its leading blocks are keyed."""

    blocks: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # keys of blocks[:len(keys)]
    salt: int | None = None  # where its key chain starts: what else than the tokens the blocks depend on


def prefix_keys(tokens: list[int], block_size: int, n_blocks: int, parent: int | None = None) -> list[int]:
    """Keys of the first `n_blocks` full blocks of `tokens`, chained from `parent`."""
    keys = []
    for i in range(n_blocks):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        keys.append(parent)
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, not {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # ref 0; reused from the front
        self.cached: dict[int, int] = {}  # key -> block id

    # -- queries ---------------------------------------------------------------------------------

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be given out now (free ones and cached ones nobody uses)."""
        return len(self.free)

    def usage(self) -> float:
        """Fraction of the pool held by sequences (vLLM's kv_cache_usage_perc)."""
        return 1 - len(self.free) / self.num_blocks

    def match(self, tokens: list[int], salt: int | None = None) -> list[int]:
        """Cached blocks holding the longest keyed prefix of `tokens`, leaving at least its last token to compute;
        `salt` starts the key chain (a LoRA adapter's: the same tokens under another adapter are other keys)."""
        if not self.prefix_caching:
            return []
        hits = []
        for i, key in enumerate(prefix_keys(tokens, self.block_size, (len(tokens) - 1) // self.block_size, salt)):
            block_id = self.cached.get(key)
            block = self.blocks[block_id] if block_id is not None else None
            if block is None or block.tokens != tuple(tokens[i * self.block_size : (i + 1) * self.block_size]):
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, hits: list[int], n_tokens: int) -> bool:
        """Whether a new table of `hits` plus fresh blocks up to `n_tokens` positions fits now."""
        idle_hits = sum(1 for b in hits if self.blocks[b].ref == 0)  # taking them shrinks the free list
        return self.blocks_for(n_tokens) - len(hits) <= self.num_free - idle_hits

    # -- changes ---------------------------------------------------------------------------------

    def allocate(self, hits: list[int], n_tokens: int, salt: int | None = None) -> BlockTable:
        """A table of the cached `hits` and fresh blocks up to `n_tokens` positions (check can_allocate first)."""
        if not self.can_allocate(hits, n_tokens):
            raise MemoryError(f"{self.blocks_for(n_tokens)} blocks needed, {self.num_free} free")
        table = BlockTable(salt=salt)
        for b in hits:
            self._take(b, hit=True)
            table.blocks.append(b)
            table.keys.append(self.blocks[b].key)
        while len(table.blocks) < self.blocks_for(n_tokens):
            table.blocks.append(self._take(next(iter(self.free))))
        return table

    def can_grow(self, table: BlockTable, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(table.blocks) <= self.num_free

    def grow(self, table: BlockTable, n_tokens: int) -> None:
        """Add fresh blocks to `table` until it holds `n_tokens` positions (check can_grow first)."""
        if not self.can_grow(table, n_tokens):
            raise MemoryError(
                f"{self.blocks_for(n_tokens) - len(table.blocks)} more blocks needed, {self.num_free} free"
            )
        while len(table.blocks) < self.blocks_for(n_tokens):
            table.blocks.append(self._take(next(iter(self.free))))

    def commit(self, table: BlockTable, tokens: list[int], n_written: int) -> None:
        """Key the blocks that positions [0, n_written) of `tokens` fill completely (they are written this step)."""
        if not self.prefix_caching:
            return
        full = min(n_written // self.block_size, len(table.blocks))
        parent = table.keys[-1] if table.keys else table.salt
        bs = self.block_size
        for i in range(len(table.keys), full):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            parent = hash((parent, chunk))
            table.keys.append(parent)
            block = self.blocks[table.blocks[i]]
            if block.key is None and parent not in self.cached:  # a twin computed elsewhere keeps its entry
                block.key, block.tokens = parent, chunk
                self.cached[parent] = block.id

    def release(self, table: BlockTable) -> None:
        """Drop a sequence's hold on its blocks; the table is emptied."""
        for b in reversed(table.blocks):  # the prefix's head is evicted last
            block = self.blocks[b]
            block.ref -= 1
            assert block.ref >= 0, f"block {b} released twice"
            if block.ref == 0:
                self.free[b] = None
                if block.key is None:
                    self.free.move_to_end(b, last=False)  # nothing to keep: reuse it first
        table.blocks.clear()
        table.keys.clear()

    def reset_cache(self) -> None:
        """Forget every cached prefix (after a failed step their contents cannot be trusted)."""
        for b in self.cached.values():
            self.blocks[b].key, self.blocks[b].tokens = None, ()
        self.cached.clear()

    def _take(self, b: int, hit: bool = False) -> int:
        """Hold block b: a prefix hit keeps its key; a fresh block loses it (evicted: it gets new contents)."""
        block = self.blocks[b]
        if block.ref == 0:
            del self.free[b]
        if not hit and block.key is not None:
            del self.cached[block.key]
            block.key, block.tokens = None, ()
        block.ref += 1
        return b
