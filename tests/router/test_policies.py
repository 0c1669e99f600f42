"""Routing policies over hand-built group views: exact choices, no Ray."""

from __future__ import annotations

import time

from cluster.block_manager import block_hashes
from router.policies import (
    GroupView,
    PowerOfTwoChoices,
    PrefixAware,
    RoundRobin,
    SessionTable,
    make_policy,
)

BS = 4


def _groups(*loads: int) -> list[GroupView]:
    return [GroupView(name=f"g{i}", num_running=n) for i, n in enumerate(loads)]


def test_round_robin_cycles_in_order():
    groups = _groups(0, 0, 0)
    rr = RoundRobin()
    picks = [rr.choose(groups, []).name for _ in range(7)]
    assert picks == ["g0", "g1", "g2", "g0", "g1", "g2", "g0"]


def test_power_of_two_never_picks_the_busiest_of_two():
    groups = _groups(5, 0)
    p2c = PowerOfTwoChoices(seed=0)
    assert {p2c.choose(groups, []).name for _ in range(20)} == {"g1"}
    # With three groups the busiest can never win a pairwise comparison.
    groups = _groups(9, 1, 2)
    assert "g0" not in {p2c.choose(groups, []).name for _ in range(50)}


def test_load_counts_router_inflight_and_kv_usage():
    g = GroupView(name="g", num_running=1, num_waiting=2, inflight=5, kv_usage=0.5)
    assert g.load == 5.5  # max(1 + 2, 5) + 0.5
    g.inflight = 0
    assert g.load == 3.5


def test_prefix_match_counts_leading_blocks_only():
    tokens = list(range(100, 120))  # 5 full blocks of 4
    hashes = block_hashes(tokens, BS)
    g = GroupView(name="g", cached=frozenset(hashes[:3] + hashes[4:]))
    assert g.prefix_match(hashes) == 3
    # A different first block shares nothing, even with equal later token ids: hashes chain.
    other = block_hashes([1, 2, 3, 4] + tokens[4:], BS)
    assert g.prefix_match(other) == 0


def test_prefix_aware_prefers_longest_hit_then_load():
    tokens = list(range(200, 232))
    hashes = block_hashes(tokens, BS)
    a = GroupView(name="a", cached=frozenset(hashes[:2]), num_running=2)
    b = GroupView(name="b", cached=frozenset(hashes[:6]), num_running=3)
    c = GroupView(name="c", num_running=0)
    policy = PrefixAware(max_load_imbalance=8)
    assert policy.choose([a, b, c], hashes).name == "b"
    # No hit anywhere: least loaded.
    assert policy.choose([a, b, c], block_hashes([7] * 32, BS)).name == "c"
    # The best hit sits on a group far busier than the least loaded: load wins.
    b.num_running = 20
    assert policy.choose([a, b, c], hashes).name == "a"


def test_prefix_aware_ties_rotate():
    groups = _groups(0, 0)
    policy = PrefixAware()
    names = [policy.choose(groups, []).name for _ in range(4)]
    assert sorted(names) == ["g0", "g0", "g1", "g1"]


def test_pending_hashes_count_until_published_or_expired():
    hashes = block_hashes(list(range(40)), BS)
    g = GroupView(name="g")
    g.add_pending(hashes[:5], ttl_s=60)
    assert g.prefix_match(hashes) == 5
    assert g.prefix_match(hashes, now=time.monotonic() + 120) == 0  # expired
    g.publish(hashes[:3])  # the group confirms three; the other two stay pending
    assert set(g.pending) == set(hashes[3:5])
    assert g.prefix_match(hashes) == 5
    g.add_pending(hashes[5:7], ttl_s=0)
    g.publish(hashes[:3])  # expired pending entries are dropped on publication
    assert set(g.pending) <= set(hashes[3:5])


def test_session_table_is_lru_bounded():
    t = SessionTable(max_sessions=2)
    t.pin("a", "g0")
    t.pin("b", "g1")
    assert t.get("a") == "g0"  # touch a: b is now the oldest
    t.pin("c", "g0")
    assert t.get("b") is None and t.get("a") == "g0" and t.get("c") == "g0"
    assert len(t) == 2


def test_make_policy_names():
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("power_of_two"), PowerOfTwoChoices)
    assert isinstance(make_policy("prefix_aware"), PrefixAware)
