"""KV block bookkeeping: reference counts, hash-chained prefix caching, LRU eviction.

Pure Python; owned by the scheduler. Workers only ever see block ids (block tables).

Lifecycle of a block:
    free (never used, or evicted)  --allocate-->  in use (ref_count >= 1)
    in use  --cache_blocks (full, KV written)-->  in use + hashed (shareable by later requests)
    in use + hashed  --free (ref_count -> 0)-->  cached: still findable by hash, at the tail of the
        free queue, so it is evicted only when every older free block has been reused (LRU)
    cached  --a later request's prefix matches-->  in use again (a "hit")

A block's hash is chained: hash(parent block's hash, this block's token ids), so equal hashes
mean equal whole prefixes. The hash is stable across processes (blake2b), which lets the router
compute a prompt's block hashes itself and route on the hashes groups publish.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Collection, Sequence
from itertools import compress


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    """Stable 63-bit hash of a full block given its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent if parent is not None else -1).to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of `token_ids`, in order."""
    out: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


class BlockManager:
    """Per-block state lives in flat lists and dicts, not one object per block: a tiny model
    on a large host gets ~10^5-10^6 blocks, and objects for them cost seconds to build and
    free and weigh on every full garbage collection for the engine's life. The free queue is
    three parts in order: `_head` (freed, worth nothing: reused first, most recently freed
    first), the blocks never used yet (`_fresh` and above, in id order), `_tail` (freed with a
    cached prefix: least recently freed first, so LRU eviction)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks  # references per block (one list, no object per block)
        self._hash: dict[int, int] = {}  # block id -> its hash, for hashed (findable) blocks
        # Dicts as ordered sets: O(1) removal when a cached block is hit again.
        self._head: OrderedDict[int, None] = OrderedDict()
        self._fresh = 0
        self._tail: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}  # hash -> block id
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}  # req -> full blocks already hashed
        self._hashes: dict[str, list[int]] = {}  # req -> chain of its hashed blocks
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ---- queries -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._head) + (self.num_blocks - self._fresh) + len(self._tail)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._hash.get(block_id)

    def free_queue(self) -> list[int]:
        """Free block ids in the order they will be reused. O(num_blocks): for tests."""
        return [*self._head, *range(self._fresh, self.num_blocks), *self._tail]

    def block_table(self, req_id: str) -> list[int]:
        return self._tables.get(req_id, [])

    def cached_block_hashes(self) -> list[int]:
        return list(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached chain of full blocks of `token_ids`.

        At least one token is always left to compute (the step that computes it samples the
        next token), so a fully cached prompt matches one block less. Takes no references.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        limit = (len(token_ids) - 1) // self.block_size
        for i in range(limit):
            parent = hash_block(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # ---- allocation ---------------------------------------------------------------------
    def can_allocate(self, req_id: str, num_tokens: int, hit_blocks: Sequence[int] = ()) -> bool:
        have = len(self._tables.get(req_id, ())) or len(hit_blocks)
        need = self.blocks_needed(num_tokens) - have
        # Hit blocks that sit in the free queue are taken out of it, so they don't count as free.
        reclaimed = sum(1 for b in hit_blocks if self._ref[b] == 0)
        return need <= self.num_free_blocks - reclaimed

    def allocate(self, req_id: str, num_tokens: int, hit_blocks: Sequence[int] = ()) -> bool:
        """Grow `req_id`'s table to hold `num_tokens` tokens. A new request first shares
        `hit_blocks` (its cached prefix). Returns False, changing nothing, if blocks run out."""
        if not self.can_allocate(req_id, num_tokens, hit_blocks):
            return False
        table = self._tables.get(req_id)
        if table is None:
            table = self._tables[req_id] = []
            for b in hit_blocks:
                table.append(self._take(b, keep_hash=True))
            self._num_hashed[req_id] = len(hit_blocks)
            self._hashes[req_id] = [self._hash[b] for b in hit_blocks]
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._take(self._next_free()))
        return True

    def _next_free(self) -> int:
        if self._head:
            return next(iter(self._head))
        if self._fresh < self.num_blocks:
            return self._fresh
        return next(iter(self._tail))

    def _take(self, block_id: int, keep_hash: bool = False) -> int:
        if self._ref[block_id] == 0:
            if block_id >= self._fresh:  # never used: only ever taken in order
                assert block_id == self._fresh, f"block {block_id} is not next in line"
                self._fresh += 1
            elif self._head.pop(block_id, False) is False:
                del self._tail[block_id]
            if not keep_hash and self._hash:
                h = self._hash.pop(block_id, None)
                if h is not None:  # reused for new content: its cached prefix is evicted
                    del self._cached[h]
        self._ref[block_id] += 1
        return block_id

    def cache_blocks(self, req_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Register hashes of `req_id`'s blocks that are now full and computed."""
        if not self.enable_prefix_caching or req_id not in self._tables:
            return
        table = self._tables[req_id]
        done = self._num_hashed[req_id]
        chain = self._hashes[req_id]
        full = min(num_computed // self.block_size, len(table))
        for i in range(done, full):
            parent = chain[-1] if chain else None
            h = hash_block(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            chain.append(h)
            if h in self._cached:
                continue  # an identical block exists already (computed concurrently); keep it
            self._hash[table[i]] = h
            self._cached[h] = table[i]
        self._num_hashed[req_id] = max(done, full)

    def trim(self, req_id: str, num_tokens: int) -> int:
        """Give back `req_id`'s blocks past the first blocks_needed(num_tokens): those taken
        for draft tokens that were rejected. Returns how many went back. Such a block holds no
        computed full block (never hashed) and was taken fresh (never shared)."""
        table = self._tables.get(req_id)
        keep = self.blocks_needed(num_tokens)
        if table is None or len(table) <= keep:
            return 0
        assert keep >= self._num_hashed[req_id], "trimming a hashed block"
        extra = table[keep:]
        del table[keep:]
        for b in reversed(extra):
            assert self._ref[b] == 1 and b not in self._hash, f"trimming shared block {b}"
            self._ref[b] = 0
            self._head[b] = None
            self._head.move_to_end(b, last=False)  # worth nothing: reuse first
        return len(extra)

    def free(self, req_id: str) -> None:
        """Drop `req_id`'s references. Blocks are queued tail-first so a sequence's last blocks
        (least likely to be shared) are evicted before its first ones."""
        table = self._tables.pop(req_id, None)
        self._num_hashed.pop(req_id, None)
        self._hashes.pop(req_id, None)
        if table is None:
            return
        ref = self._ref
        for b in reversed(table):
            ref[b] -= 1
            if ref[b] == 0:
                if b not in self._hash:
                    # Uncached blocks are worth nothing: reuse them first.
                    self._head[b] = None
                    self._head.move_to_end(b, last=False)
                else:
                    self._tail[b] = None

    def audit(self, live: Collection[str]) -> dict[str, int]:
        """Account for every block: free (unused), cached (unused, findable by hash), in use
        (referenced). `leaked` counts blocks whose state disagrees with the requests in
        `live`: referenced by no live request's table (a finished request kept them), a
        reference count other than the live tables' count, or a free block missing from the
        free queue (never reusable). O(num_blocks) at C speed, O(blocks in use) in Python: call it
        between steps."""
        refs: dict[int, int] = {}
        for req_id, table in self._tables.items():
            if req_id in live:
                for b in table:
                    refs[b] = refs.get(b, 0) + 1
        ref, n, fresh = self._ref, self.num_blocks, self._fresh
        head, tail = self._head, self._tail
        held = list(compress(range(n), ref))  # referenced blocks, found at C speed
        in_use = len(held)
        cached = sum(1 for b in self._hash if ref[b] == 0)
        free = n - in_use - cached
        wrong = {b for b in held if ref[b] != refs.get(b, 0)}
        wrong |= {b for b in refs if ref[b] == 0}
        # queued (in _head, _tail or never used) although referenced
        queued_held = {b for b in held if b >= fresh or b in head or b in tail}
        # unreferenced but in no queue: never reusable
        queued = len(head) + len(tail) + (n - fresh)
        lost = (n - in_use) - (queued - len(queued_held))
        lost_wrong = sum(
            1 for b in refs if ref[b] == 0 and b < fresh and b not in head and b not in tail
        )
        leaked = len(wrong | queued_held) + lost - lost_wrong
        return {
            "total": self.num_blocks,
            "free": free,
            "cached": cached,
            "in_use": in_use,
            "leaked": leaked,
        }

    def reset_prefix_cache(self) -> None:
        for h, b in list(self._cached.items()):
            if self._ref[b] == 0:
                del self._hash[b]
                del self._cached[h]
