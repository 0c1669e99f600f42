"""Scheduler + BlockManager without a model: fake workers that always sample token 7."""

from __future__ import annotations

from sched_support import (
    TOKEN,
    fake_result,
    make,
    req,
    run_all,
    step,
    summary,
)

from cluster.block_manager import BlockManager
from cluster.config import SchedulerConfig
from cluster.request import Status
from cluster.scheduler import Scheduler


def test_budget_chunking_and_order_exact():
    s = make(budget=16)
    reqs = {r.req_id: r for r in (req("A", 10), req("B", 30), req("C", 5), req("D", 17))}
    for r in reqs.values():
        s.add(r)
    plans = []
    p, _ = step(s)
    plans.append(p)
    assert summary(p) == [("A", 0, 10, True), ("B", 0, 6, False)]
    assert [n.req_id for n in p.new_requests] == ["A", "B"]
    p, _ = step(s)
    # Running first: A's decode, then B's next chunk; nothing left for C.
    assert summary(p) == [("A", 10, 1, True), ("B", 6, 15, False)]
    assert p.new_requests == []
    p, _ = step(s)
    assert summary(p) == [
        ("A", 11, 1, True),
        ("B", 21, 9, True),
        ("C", 0, 5, True),
        ("D", 0, 1, False),
    ]
    assert [n.req_id for n in p.new_requests] == ["C", "D"]
    # The chunks carry the exact prompt tokens at those positions.
    assert p.seqs[1].token_ids == reqs["B"].prompt_token_ids[21:30]
    assert p.seqs[0].token_ids == [TOKEN]
    assert p.seqs[0].is_decode and not p.seqs[2].is_decode
    plans += run_all(s)
    for plan in plans:
        assert sum(len(q.token_ids) for q in plan.seqs) <= 16
    for r in reqs.values():
        assert r.status is Status.FINISHED and r.finish_reason == "length"
        assert r.output_token_ids == [TOKEN] * 4
    assert s.bm.num_free_blocks == s.bm.num_blocks
    assert s.num_preemptions == 0


def test_budget_respected_many_requests():
    s = make(budget=24, num_blocks=256)
    lengths = [3, 50, 17, 1, 33, 8, 64, 2, 25]
    for i, n in enumerate(lengths):
        s.add(req(f"r{i}", n, max_tokens=5, base=i + 1))
    plans = run_all(s)
    for plan in plans:
        assert 0 < sum(len(q.token_ids) for q in plan.seqs) <= 24
        ids = [q.req_id for q in plan.seqs]
        assert len(ids) == len(set(ids))
    assert s.bm.num_free_blocks == s.bm.num_blocks
    # Every prompt token and every fed output token was computed exactly once.
    total = sum(len(q.token_ids) for plan in plans for q in plan.seqs)
    assert total == sum(lengths) + 4 * len(lengths)


def test_decodes_scheduled_before_new_prefills():
    s = make(budget=8)
    s.add(req("A", 4, max_tokens=3))
    p, _ = step(s)
    assert summary(p) == [("A", 0, 4, True)]
    s.add(req("B", 40))
    p, _ = step(s)
    assert summary(p) == [("A", 4, 1, True), ("B", 0, 7, False)]
    p, _ = step(s)
    assert summary(p) == [("A", 5, 1, True), ("B", 7, 7, False)]
    assert s.requests.get("A") is None  # finished after its 3rd token
    p, _ = step(s)
    assert summary(p) == [("B", 14, 8, False)]


def test_long_prompt_chunked_exact_positions():
    s = make(budget=16)
    r = req("L", 40, max_tokens=2)
    s.add(r)
    p1, got = step(s)
    assert summary(p1) == [("L", 0, 16, False)] and got == []
    assert r.num_computed_tokens == 16
    p2, got = step(s)
    assert summary(p2) == [("L", 16, 16, False)] and got == []
    p3, got = step(s)
    assert summary(p3) == [("L", 32, 8, True)] and got == [r]
    assert r.num_computed_tokens == 40 and r.token_ids[-1] == TOKEN
    p4, got = step(s)
    assert summary(p4) == [("L", 40, 1, True)]
    assert p4.seqs[0].block_table == list(range(11))
    assert r.finished and r.output_token_ids == [TOKEN, TOKEN]
    # Only the first chunk announces the request to the workers.
    assert [len(p.new_requests) for p in (p1, p2, p3, p4)] == [1, 0, 0, 0]
    assert p1.new_requests[0].prompt_token_ids == r.prompt_token_ids
    # Finished in p4's update; workers learn it with the next plan.
    p5 = s.schedule()
    assert p5.seqs == [] and p5.finished_req_ids == ["L"]


def test_chunked_prefill_disabled_waits_for_room():
    s = make(budget=16, enable_chunked_prefill=False)
    s.add(req("A", 10))
    s.add(req("B", 10))
    p, _ = step(s)
    assert summary(p) == [("A", 0, 10, True)]  # B does not fit in the remaining 6
    p, _ = step(s)
    assert summary(p) == [("A", 10, 1, True), ("B", 0, 10, True)]


def test_max_num_seqs():
    s = make(budget=100, max_num_seqs=2)
    for rid in "ABC":
        s.add(req(rid, 3, max_tokens=2))
    p, _ = step(s)
    assert [q.req_id for q in p.seqs] == ["A", "B"]
    p, _ = step(s)
    assert [q.req_id for q in p.seqs] == ["A", "B"]  # both finish here
    p, _ = step(s)
    assert summary(p) == [("C", 0, 3, True)]
    assert p.finished_req_ids == ["A", "B"]


def test_preemption_recompute():
    # 6 blocks of 4: A and B (8-token prompts) take 2 blocks each, then 1 more each at their
    # first decode; at 13 tokens A needs a 4th block and B (admitted last) is preempted.
    s = make(budget=100, num_blocks=6, block_size=4)
    a, b = req("A", 8, max_tokens=8), req("B", 8, max_tokens=8)
    s.add(a)
    s.add(b)
    p, _ = step(s)
    assert summary(p) == [("A", 0, 8, True), ("B", 0, 8, True)]
    assert s.bm.block_table("A") == [0, 1] and s.bm.block_table("B") == [2, 3]
    c = req("C", 4, max_tokens=2)
    s.add(c)
    p, _ = step(s)
    assert summary(p) == [("A", 8, 1, True), ("B", 8, 1, True)]  # no block left for C
    assert s.bm.block_table("A") == [0, 1, 4] and s.bm.block_table("B") == [2, 3, 5]
    assert s.bm.num_free_blocks == 0
    for _ in range(3):
        p, _ = step(s)
        assert [q.req_id for q in p.seqs] == ["A", "B"]
    assert a.num_tokens == b.num_tokens == 13 and b.num_computed_tokens == 12
    b_tokens = list(b.token_ids)

    p, _ = step(s)  # A needs a 4th block: B is preempted
    assert summary(p) == [("A", 12, 1, True)]
    assert s.num_preemptions == 1 and b.num_preemptions == 1
    assert b.status is Status.WAITING and b.num_computed_tokens == 0
    assert list(s.waiting) == [b, c]  # back at the FRONT of the queue
    assert s.running == [a]
    assert s.bm.block_table("B") == []
    assert b.token_ids == b_tokens  # its outputs so far are kept
    # B's blocks were hashed: freed last-first to the tail; A took B's last block (5).
    assert s.bm.block_table("A") == [0, 1, 4, 5]
    assert s.bm.num_free_blocks == 2
    assert p.finished_req_ids == []  # preempted, not finished

    # A finishes (8 outputs) before there is room for B again.
    plans = []
    while not a.finished:
        p, _ = step(s)
        plans.append(p)
        assert [q.req_id for q in p.seqs] == ["A"]
    # B comes back from its cached prefix (2 blocks) and recomputes the rest in one chunk,
    # without being announced to the workers again.
    p, _ = step(s)
    assert p.finished_req_ids == ["A"]
    assert summary(p)[0] == ("B", 8, 5, True)
    assert p.seqs[0].token_ids == b_tokens[8:]
    assert p.seqs[0].block_table[:2] == [2, 3]
    assert [n.req_id for n in p.new_requests] == ["C"]
    assert b.num_cached_tokens == 0  # only counted at first admission
    run_all(s)
    for r in (a, b, c):
        assert r.finish_reason == "length"
        assert r.output_token_ids == [TOKEN] * r.params.max_tokens
    assert s.bm.num_free_blocks == s.bm.num_blocks
    assert s.num_preemptions == 1


def test_preemption_without_prefix_cache_completes():
    bm = BlockManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    reqs = [req(f"r{i}", 5 + i, max_tokens=6, base=i + 1) for i in range(3)]
    for r in reqs:
        s.add(r)
    plans = run_all(s)
    assert s.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == [TOKEN] * 6
    # A preempted request restarts from position 0 with all its tokens so far.
    prompt_len = {r.req_id: r.prompt_len for r in reqs}
    restarts = [q for p in plans[1:] for q in p.seqs if q.start_pos == 0]
    assert restarts and all(len(q.token_ids) > prompt_len[q.req_id] for q in restarts)
    assert bm.num_free_blocks == bm.num_blocks


def test_finish_waiting_never_sent():
    s = make(budget=4)
    s.add(req("A", 4))
    s.add(req("W", 4))
    p, _ = step(s)
    assert summary(p) == [("A", 0, 4, True)]
    free = s.bm.num_free_blocks
    w = s.requests["W"]
    s.finish(w, "abort")
    assert w.finished and w.finish_reason == "abort"
    assert s.num_waiting == 0 and "W" not in s.requests
    assert s.bm.num_free_blocks == free
    p = s.schedule()
    assert p.finished_req_ids == []  # workers never heard of W
    s.finish(w, "abort")  # finishing twice is a no-op
    assert s.schedule().finished_req_ids == []


def test_finish_running_frees_blocks_and_reports_once():
    s = make(budget=64)
    a = req("A", 10, max_tokens=50)
    s.add(a)
    step(s)
    step(s)
    assert s.bm.block_table("A") == [0, 1, 2]
    assert s.bm.num_free_blocks == s.bm.num_blocks - 3
    s.finish(a, "abort")
    assert a.finish_reason == "abort" and s.num_running == 0
    assert s.bm.block_table("A") == []
    assert s.bm.num_free_blocks == s.bm.num_blocks
    p = s.schedule()
    assert p.seqs == [] and p.finished_req_ids == ["A"]
    assert s.schedule().finished_req_ids == []


def test_finish_while_step_in_flight():
    s = make(budget=64)
    a, b = req("A", 6, max_tokens=50), req("B", 6, max_tokens=3)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    s.finish(a, "abort")  # aborted while the workers run the step
    got = s.update(plan, fake_result(plan))
    assert got == [b]
    assert a.output_token_ids == [] and a.num_computed_tokens == 0
    assert s.bm.block_table("A") == []
    p = s.schedule()
    assert p.finished_req_ids == ["A"]
    assert [q.req_id for q in p.seqs] == ["B"]


def test_abort_preempted_waiting_request_is_reported():
    s = make(budget=100, num_blocks=6, block_size=4)
    a, b = req("A", 8, max_tokens=8), req("B", 8, max_tokens=8)
    s.add(a)
    s.add(b)
    for _ in range(6):
        step(s)
    assert b.status is Status.WAITING and b.num_preemptions == 1 and b.sent_to_workers
    free = s.bm.num_free_blocks
    s.finish(b, "abort")
    assert s.bm.num_free_blocks == free and s.num_waiting == 0
    p = s.schedule()
    assert p.finished_req_ids == ["B"]  # the workers still hold its sampling state
