"""BlockManager unit tests: exact block ids, prefix-cache hits, refcounts and LRU eviction order."""

from __future__ import annotations

import pytest

from cluster.block_manager import BlockManager, block_hashes, hash_block

BS = 4
A = list(range(100, 112))  # three full blocks of 4
B_ONLY = [900, 901, 902, 903]


def cached_req(bm: BlockManager, req_id: str, tokens: list[int]) -> list[int]:
    """Allocate `tokens` for a new request, mark them all computed, return its table."""
    assert bm.allocate(req_id, len(tokens))
    bm.cache_blocks(req_id, tokens, len(tokens))
    return bm.block_table(req_id)


# ---- hashing ---------------------------------------------------------------------------------
def test_hash_block_is_stable_known_value():
    # Computed once with blake2b; must not change across processes or versions (the router
    # computes the same hashes independently).
    assert hash_block(None, [1, 2, 3, 4]) == 6299580164403041414
    assert hash_block(6299580164403041414, [5, 6, 7, 8]) == 8558562078184593415
    assert block_hashes(list(range(1, 11)), 4) == [6299580164403041414, 8558562078184593415]
    assert 0 <= hash_block(None, [1, 2, 3, 4]) < 2**63


def test_hashes_are_chained():
    tail = [5, 6, 7, 8]
    p1 = hash_block(None, [1, 2, 3, 4])
    p2 = hash_block(None, [1, 2, 3, 9])
    assert p1 != p2
    assert hash_block(p1, tail) != hash_block(p2, tail)
    assert hash_block(p1, tail) != hash_block(None, tail)
    # Same tokens in different positions of a chain differ too.
    hs = block_hashes(tail * 3, 4)
    assert len(set(hs)) == 3
    # block_hashes ignores the trailing partial block and chains from the previous one.
    toks = list(range(20, 31))
    h0 = hash_block(None, toks[0:4])
    assert block_hashes(toks, 4) == [h0, hash_block(h0, toks[4:8])]
    assert block_hashes(toks[:3], 4) == []


# ---- allocation ------------------------------------------------------------------------------
def test_fresh_pool_allocates_in_order():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert bm.allocate("a", 10)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate("b", 4)
    assert bm.block_table("b") == [3]
    # Growing a table appends the next free block; growing within the last block takes nothing.
    assert bm.allocate("a", 12)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate("a", 13)
    assert bm.block_table("a") == [0, 1, 2, 4]
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    assert [bm.ref_count(i) for i in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.block_table("nope") == []
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(1) == 1 and bm.blocks_needed(8) == 2


def test_constructor_rejects_empty_pool():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


def test_allocate_fails_without_changing_anything():
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.allocate("a", 12)
    assert bm.block_table("a") == [0, 1, 2]
    assert not bm.can_allocate("b", 8)
    assert bm.allocate("b", 8) is False
    assert bm.block_table("b") == []
    assert "b" not in bm._tables
    assert bm.num_free_blocks == 1
    # Growing an existing request past the pool fails and leaves its table as it was.
    assert bm.allocate("a", 20) is False
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_free_blocks == 1
    assert bm.allocate("a", 16)  # exactly the last block
    assert bm.block_table("a") == [0, 1, 2, 3]
    assert bm.num_free_blocks == 0
    bm.free("a")
    assert bm.num_free_blocks == 4


def test_allocate_with_hits_fails_without_touching_the_cache():
    bm = BlockManager(num_blocks=4, block_size=BS)
    cached_req(bm, "a", A)
    bm.free("a")
    hashes_before = bm.cached_block_hashes()
    assert len(hashes_before) == 3 and bm.num_free_blocks == 4
    # A + 5 tokens needs 5 blocks: 3 hits + 2 new, but only 1 non-hit block is free.
    prompt = A + [1, 2, 3, 4, 5]
    hits = bm.find_cached_prefix(prompt)
    assert hits == [0, 1, 2]
    assert not bm.can_allocate("c", len(prompt), hits)
    assert bm.allocate("c", len(prompt), hits) is False
    assert bm.num_free_blocks == 4
    assert bm.cached_block_hashes() == hashes_before
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == [0, 0, 0, 0]
    # A + 1 token needs exactly the 3 hits + the one remaining free block.
    prompt = A + [1]
    assert bm.allocate("c", len(prompt), bm.find_cached_prefix(prompt))
    assert bm.block_table("c") == [0, 1, 2, 3]
    assert bm.num_free_blocks == 0


# ---- prefix cache ----------------------------------------------------------------------------
def test_find_cached_prefix_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.allocate("pad", 4)  # so cached ids don't start at 0
    assert cached_req(bm, "a", A) == [1, 2, 3]
    # A fully cached prompt matches one block less: one token must be left to compute.
    assert bm.find_cached_prefix(A) == [1, 2]
    assert bm.find_cached_prefix(A + [7]) == [1, 2, 3]
    assert bm.find_cached_prefix(A[:8] + [7, 7, 7, 7, 7]) == [1, 2]
    assert bm.find_cached_prefix(A[:5]) == [1]
    assert bm.find_cached_prefix(A[:4]) == []  # a lone full block leaves nothing to compute
    assert bm.find_cached_prefix([0] + A[1:] + [7]) == []  # first block differs: chain broken
    # Same second block after a different first block: no hit (hashes are chained).
    assert bm.find_cached_prefix(B_ONLY + A[4:] + [7]) == []
    # Lookups take no references.
    assert [bm.ref_count(i) for i in (1, 2, 3)] == [1, 1, 1]


def test_cache_blocks_hashes_only_full_computed_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    toks = A[:10]
    assert bm.allocate("a", len(toks))
    assert bm.block_table("a") == [0, 1, 2]
    bm.cache_blocks("a", toks, 3)  # nothing full yet
    assert bm.cached_block_hashes() == []
    bm.cache_blocks("a", toks, 7)  # one full block computed
    assert bm.cached_block_hashes() == block_hashes(toks, BS)[:1]
    bm.cache_blocks("a", toks, 10)  # two full, third partial
    assert bm.cached_block_hashes() == block_hashes(toks, BS)
    assert [bm.block_hash(i) for i in range(3)] == block_hashes(toks, BS) + [None]
    # Extending to a full third block hashes it, chained to the previous ones.
    toks = A
    bm.cache_blocks("a", toks, 12)
    assert bm.cached_block_hashes() == block_hashes(A, BS)
    assert bm.block_hash(2) == block_hashes(A, BS)[2]
    # Unknown request: no-op.
    bm.cache_blocks("ghost", toks, 12)
    assert bm.cached_block_hashes() == block_hashes(A, BS)


def test_duplicate_block_is_not_cached_twice():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert cached_req(bm, "a", A) == [0, 1, 2]
    # Same prompt computed concurrently (no hits taken): its blocks are not registered.
    assert cached_req(bm, "b", A) == [3, 4, 5]
    assert bm.cached_block_hashes() == block_hashes(A, BS)
    assert [bm.block_hash(i) for i in (3, 4, 5)] == [None, None, None]
    bm.free("b")  # uncached: back at the head of the free queue
    assert bm.free_queue() == [3, 4, 5, 6, 7]


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    cached_req(bm, "a", A)
    assert bm.cached_block_hashes() == []
    assert bm.find_cached_prefix(A + [1]) == []
    bm.free("a")
    assert bm.free_queue() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_hit_on_freed_cached_blocks_reclaims_them():
    bm = BlockManager(num_blocks=8, block_size=BS)
    cached_req(bm, "a", A)
    bm.free("a")
    assert bm.num_free_blocks == 8
    prompt = A + [5]
    hits = bm.find_cached_prefix(prompt)
    assert hits == [0, 1, 2]
    assert bm.allocate("c", len(prompt), hits)
    assert bm.block_table("c") == [0, 1, 2, 3]
    assert bm.num_free_blocks == 4
    # The hit blocks keep their hashes and stay findable.
    assert bm.cached_block_hashes() == block_hashes(A, BS)
    assert [bm.ref_count(i) for i in range(4)] == [1, 1, 1, 1]
    # Hashing continues after the hits, chained to them.
    prompt2 = prompt + [6, 7, 8]
    bm.cache_blocks("c", prompt2, 16)
    assert bm.cached_block_hashes() == block_hashes(prompt2, BS)
    assert bm.block_hash(3) == block_hashes(prompt2, BS)[3]


# ---- refcounts and freeing -------------------------------------------------------------------
def test_shared_prefix_refcounts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert cached_req(bm, "a", A) == [0, 1, 2]
    b_prompt = A[:8] + [50, 51, 52, 53, 54]
    hits = bm.find_cached_prefix(b_prompt)
    assert hits == [0, 1]
    assert bm.allocate("b", len(b_prompt), hits)
    assert bm.block_table("b") == [0, 1, 3, 4]
    assert [bm.ref_count(i) for i in range(5)] == [2, 2, 1, 1, 1]
    assert bm.num_free_blocks == 3
    bm.free("a")
    # Shared blocks stay in use for b; only a's private block 2 is free (cached, at the tail).
    assert [bm.ref_count(i) for i in range(5)] == [1, 1, 0, 1, 1]
    assert bm.num_free_blocks == 4
    assert bm.free_queue() == [5, 6, 7, 2]
    assert bm.block_table("b") == [0, 1, 3, 4]
    assert bm.find_cached_prefix(A + [1]) == [0, 1, 2]
    bm.free("b")
    assert bm.num_free_blocks == 8
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    bm.free("b")  # double free is a no-op
    assert bm.num_free_blocks == 8


def test_free_order_and_eviction_order():
    bm = BlockManager(num_blocks=8, block_size=BS)
    h = block_hashes(A, BS)
    assert cached_req(bm, "a", A) == [0, 1, 2]  # hashed
    assert bm.allocate("b", 6) and bm.block_table("b") == [3, 4]  # never hashed
    assert bm.free_queue() == [5, 6, 7]
    bm.free("a")
    # Hashed blocks go to the tail, last block first (it is evicted first).
    assert bm.free_queue() == [5, 6, 7, 2, 1, 0]
    bm.free("b")
    # Uncached blocks go to the head, in table order.
    assert bm.free_queue() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.num_free_blocks == bm.num_blocks

    # New allocations use the uncached blocks first: no cached hash disappears.
    assert bm.allocate("c", 20)
    assert bm.block_table("c") == [3, 4, 5, 6, 7]
    assert bm.cached_block_hashes() == h
    # Then the LRU cached blocks, a's last block first.
    assert bm.allocate("d", 1) and bm.block_table("d") == [2]
    assert bm.cached_block_hashes() == h[:2]
    assert bm.block_hash(2) is None
    assert bm.find_cached_prefix(A + [1]) == [0, 1]
    assert bm.allocate("e", 1) and bm.block_table("e") == [1]
    assert bm.cached_block_hashes() == h[:1]
    assert bm.find_cached_prefix(A + [1]) == [0]
    assert bm.allocate("f", 1) and bm.block_table("f") == [0]
    assert bm.cached_block_hashes() == []
    assert bm.find_cached_prefix(A + [1]) == []
    assert bm.num_free_blocks == 0
    assert bm.allocate("g", 1) is False
    for r in "cdef":
        bm.free(r)
    assert bm.num_free_blocks == bm.num_blocks


def test_lru_across_requests():
    """A cached prefix freed earlier is evicted before one freed later."""
    bm = BlockManager(num_blocks=4, block_size=BS)
    x = [1, 2, 3, 4]
    y = [5, 6, 7, 8]
    assert cached_req(bm, "x", x) == [0]
    assert cached_req(bm, "y", y) == [1]
    bm.free("x")
    bm.free("y")
    assert bm.free_queue() == [2, 3, 0, 1]
    assert bm.allocate("z", 12) and bm.block_table("z") == [2, 3, 0]
    assert bm.cached_block_hashes() == block_hashes(y, BS)
    # A hit moves a cached block out of the queue; freed again it goes to the tail (MRU).
    bm.free("z")
    assert bm.free_queue() == [2, 3, 0, 1]  # z's blocks were uncached: head, in table order
    assert bm.allocate("w", 5, [1])
    assert bm.block_table("w") == [1, 2]
    assert bm.free_queue() == [3, 0]
    bm.free("w")
    assert bm.free_queue() == [2, 3, 0, 1]


def test_reset_prefix_cache_drops_only_unreferenced():
    bm = BlockManager(num_blocks=8, block_size=BS)
    cached_req(bm, "a", A)
    cached_req(bm, "b", B_ONLY + [1])
    bm.free("a")
    bm.reset_prefix_cache()
    assert bm.cached_block_hashes() == block_hashes(B_ONLY, BS)
    assert bm.find_cached_prefix(A + [1]) == []


def test_prefix_hit_rate_bookkeeping():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.prefix_hit_rate == 0.0
    bm.record_lookup(12, 8)
    assert (bm.prefix_queries, bm.prefix_hits) == (12, 8)
    assert bm.prefix_hit_rate == pytest.approx(8 / 12)
    bm.record_lookup(4, 0)
    assert (bm.prefix_queries, bm.prefix_hits) == (16, 8)
    assert bm.prefix_hit_rate == 0.5


def test_everything_freed_returns_all_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompts = {f"r{i}": A[: 3 + 2 * i] + [i] * i for i in range(6)}
    for rid, toks in prompts.items():
        hits = bm.find_cached_prefix(toks)
        assert bm.allocate(rid, len(toks), hits)
        bm.cache_blocks(rid, toks, len(toks))
    assert bm.num_free_blocks < bm.num_blocks
    for rid in prompts:
        bm.free(rid)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert sorted(bm.free_queue()) == list(range(16))


def test_audit_counts_every_block_and_finds_leaks():
    bm = BlockManager(num_blocks=8, block_size=4)
    cached_req(bm, "a", list(range(8)))  # 2 full blocks, hashed
    bm.allocate("b", 5)  # 2 blocks, unhashed
    assert bm.audit({"a", "b"}) == {"total": 8, "free": 4, "cached": 0, "in_use": 4, "leaked": 0}
    bm.free("a")  # its blocks stay findable: cached
    assert bm.audit({"b"}) == {"total": 8, "free": 4, "cached": 2, "in_use": 2, "leaked": 0}
    # "b" finished but nobody freed its blocks: both are leaked
    assert bm.audit(set())["leaked"] == 2
    bm.free("b")
    audit = bm.audit(set())
    assert audit["leaked"] == 0 and audit["free"] + audit["cached"] == 8


def test_audit_finds_a_wrong_reference_count():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 4)
    bm._ref[0] += 1  # a reference nobody holds
    assert bm.audit({"a"})["leaked"] == 1


def test_audit_finds_a_reference_to_a_block_never_handed_out():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 4)  # block 0; blocks 1-3 were never used
    bm._ref[2] += 1  # a reference nobody holds
    audit = bm.audit({"a"})
    assert audit["leaked"] == 1 and audit["in_use"] == 2
    assert audit["free"] + audit["cached"] + audit["in_use"] == audit["total"]


def test_audit_finds_a_free_block_missing_from_the_queue():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 8)  # blocks 0 and 1
    bm.free("a")
    del bm._head[1]  # free but never reusable
    audit = bm.audit(set())
    assert audit["leaked"] == 1 and audit["free"] == 4 and audit["in_use"] == 0
