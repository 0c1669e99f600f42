"""Scheduler + BlockManager without a model: fake workers that always sample token 7."""

from __future__ import annotations

import pytest

from cluster.block_manager import BlockManager
from cluster.config import SchedulerConfig
from cluster.request import Request, Status
from cluster.scheduler import Scheduler
from workers.messages import StepPlan, StepResult
from workers.sampling_params import SamplingParams

TOKEN = 7


def make(budget=2048, num_blocks=64, block_size=4, **kw) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, **kw)
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def req(rid: str, n: int, max_tokens: int = 4, base: int = 0) -> Request:
    # Distinct prompts per request id so the prefix cache does not interfere unless wanted.
    off = 1000 * (base or (sum(map(ord, rid)) % 40 + 1))
    return Request(rid, [off + i for i in range(n)], SamplingParams(max_tokens=max_tokens))


def fake_result(plan: StepPlan) -> StepResult:
    ids = [s.req_id for s in plan.seqs if s.sample]
    return StepResult(plan.step_id, ids, [TOKEN] * len(ids))


def step(s: Scheduler) -> tuple[StepPlan, list[Request]]:
    plan = s.schedule()
    got = s.update(plan, fake_result(plan))
    for r in got:
        if r.num_output_tokens >= r.params.max_tokens:
            s.finish(r, "length")
    return plan, got


def summary(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    return [(q.req_id, q.start_pos, len(q.token_ids), q.sample) for q in plan.seqs]


def run_all(s: Scheduler, max_steps: int = 500) -> list[StepPlan]:
    plans = []
    while s.has_work():
        plan, _ = step(s)
        plans.append(plan)
        assert len(plans) < max_steps, "scheduler did not finish"
    return plans


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


# ---- latency under load: decode-first, prefill cap, admission policies ----------------------------
class Clock:
    """A clock the test moves by hand (the scheduler's `clock`, and the requests' arrivals)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_latency(budget=2048, num_blocks=256, block_size=4, clock=None, **kw) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, **kw)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), clock=clock or Clock())


def prefill_tokens(plan: StepPlan) -> int:
    return sum(len(q.token_ids) for q in plan.seqs if not q.is_decode)


def num_decodes(plan: StepPlan) -> int:
    return sum(q.is_decode for q in plan.seqs)


def test_decodes_go_before_a_running_chunk():
    s = make(budget=8)
    s.add(req("A", 4, max_tokens=5))
    step(s)
    s.add(req("B", 40))
    step(s)
    # Put B's chunk ahead of A's decode in running order: A must still get its token first.
    s.running.reverse()
    p, _ = step(s)
    assert summary(p) == [("A", 5, 1, True), ("B", 7, 7, False)]


def test_fixed_prefill_cap_while_decoding_exact():
    s = make_latency(budget=32, max_prefill_tokens_when_decoding=6)
    s.add(req("A", 4, max_tokens=4))
    s.add(req("B", 20, max_tokens=2))
    p, _ = step(s)
    assert summary(p) == [("A", 0, 4, True), ("B", 0, 20, True)]  # no decodes yet: whole budget
    s.add(req("C", 15, max_tokens=2))
    s.add(req("D", 3, max_tokens=1))
    p, _ = step(s)
    assert summary(p) == [("A", 4, 1, True), ("B", 20, 1, True), ("C", 0, 6, False)]
    p, _ = step(s)
    assert summary(p) == [("A", 5, 1, True), ("C", 6, 6, False)]  # B finished
    p, _ = step(s)
    assert summary(p) == [("A", 6, 1, True), ("C", 12, 3, True), ("D", 0, 3, True)]
    p, _ = step(s)
    assert summary(p) == [("C", 15, 1, True)]  # A and D finished


def test_prefill_cap_never_exceeded_with_decodes_running():
    clock = Clock()
    s = make_latency(budget=64, clock=clock, max_prefill_tokens_when_decoding=10)
    for i in range(40):
        r = req(f"r{i}", 3 + (i * 37) % 50, max_tokens=1 + i % 6, base=i + 1)
        r.arrival_time = clock.now
        s.add(r)
        plan, _ = step(s)
        clock.now += 0.1
        if num_decodes(plan):
            assert prefill_tokens(plan) <= 10
        else:
            assert prefill_tokens(plan) <= 64
    run_all(s)
    assert s.bm.num_free_blocks == s.bm.num_blocks


def feed(model, a: float, b: float, c: float, n: int = 64) -> None:
    """n synthetic steps t = a + b*d + c*p, half of them pure decode."""
    for i in range(n):
        d, p = 1 + i % 9, (0 if i % 2 else 16 * (1 + i % 7))
        model.observe(d, p, a + b * d + c * p)


def test_step_model_fits_and_sizes_prefill():
    from cluster.step_model import StepTimeModel

    m = StepTimeModel(window=16, min_samples=8)
    assert m.max_prefill(4, 0.1) is None  # knows nothing yet
    for d in range(1, 6):
        m.observe(d, 0, 0.01 + 0.002 * d)
    assert m.coefficients() is None  # no step with prefill yet
    feed(m, 0.01, 0.002, 0.0001)
    a, b, c = m.coefficients()
    assert (round(a, 9), round(b, 9), round(c, 9)) == (0.01, 0.002, 0.0001)
    assert round(m.predict(3, 100), 9) == 0.026
    assert m.max_prefill(5, 0.05) == 300  # (0.05 - 0.01 - 0.010) / 0.0001, floor
    assert m.max_prefill(20, 0.05) == 0  # the decodes alone take 0.05
    # A long run of pure decodes keeps the prefill samples (their own window).
    for _ in range(100):
        m.observe(4, 0, 0.018)
    assert m.max_prefill(5, 0.05) == 300


def test_auto_cap_follows_the_step_time_model():
    s = make_latency(
        budget=512, max_prefill_tokens_when_decoding="auto", target_step_ms=50, min_prefill_tokens=8
    )
    s.add(req("A", 4, max_tokens=400))
    step(s)
    prompts = iter(range(2, 100))

    def chunk_with_decodes() -> int:
        s.add(req("L", 400, max_tokens=1, base=next(prompts)))  # no prefix-cache hits
        p, _ = step(s)
        assert num_decodes(p) == 1
        while "L" in s.requests:
            step(s)  # finish this prompt before the next measurement
        return prefill_tokens(p)

    chunks = [chunk_with_decodes()]  # no model yet: uncapped
    window = 2 * s.step_model.window  # feed() alternates decode-only and prefill steps
    feed(s.step_model, 0.01, 0.002, 0.0001, window)
    chunks.append(chunk_with_decodes())
    feed(s.step_model, 0.01, 0.002, 0.0004, window)  # prefill got 4x slower
    chunks.append(chunk_with_decodes())
    feed(s.step_model, 0.01, 0.045, 0.0004, window)  # decodes alone overrun: the floor
    chunks.append(chunk_with_decodes())
    feed(s.step_model, 0.01, 0.002, 0.0001, window)  # and fast again
    chunks.append(chunk_with_decodes())
    # (0.05 - 0.01 - 0.002) / c with one decode
    assert chunks == [400, 380, 95, 8, 380]


def test_sjf_aging_order_exact():
    clock = Clock()
    s = make_latency(budget=64, clock=clock, policy="sjf_aging", max_wait_s=10, sjf_window=4)
    lengths = {"L": 40, "M": 20, "S": 4, "T": 8, "U": 2}
    for rid, n in lengths.items():  # U is past the window: arrival order after it
        r = req(rid, n, max_tokens=1)
        r.arrival_time = clock.now
        s.add(r)
        clock.now += 1.0
    order = [r.req_id for r in s.admission.order(s.waiting, clock.now)]
    # keys at t=5: L 40*0.5=20, M 20*0.6=12, S 4*0.7=2.8, T 8*0.8=6.4
    assert order == ["S", "T", "M", "L", "U"]
    clock.now = 10.5  # L (arrived at 0) is overdue: first, whatever its length
    # keys at t=10.5: M 20*0.05=1, S 4*0.15=0.6, T 8*0.25=2
    assert [r.req_id for r in s.admission.order(s.waiting, clock.now)] == ["L", "S", "M", "T", "U"]
    s.waiting[2].num_preemptions = 1  # S came back from preemption: ahead of everyone
    assert [r.req_id for r in s.admission.order(s.waiting, clock.now)][0] == "S"


POLICIES = [
    dict(policy="fcfs", max_prefill_tokens_when_decoding=None),
    dict(policy="fcfs", max_prefill_tokens_when_decoding=6),
    dict(policy="sjf_aging", max_prefill_tokens_when_decoding=None, max_wait_s=2.0),
    dict(policy="sjf_aging", max_prefill_tokens_when_decoding=6, max_wait_s=2.0),
    dict(policy="sjf_aging", max_prefill_tokens_when_decoding="auto", max_wait_s=2.0),
]


@pytest.mark.parametrize("knobs", POLICIES, ids=lambda k: "-".join(map(str, k.values())))
def test_long_prompt_not_starved_by_a_stream_of_short_ones(knobs):
    # Two 7-token prompts (2 tokens out) arrive per 0.1 s step: with their decodes they fill the
    # 16-token budget every step, so shortest-first without aging never admits L.
    clock = Clock()
    s = make_latency(budget=16, num_blocks=4096, clock=clock, **knobs)
    if knobs["max_prefill_tokens_when_decoding"] == "auto":
        feed(s.step_model, 0.01, 0.002, 0.0001)
    long = req("L", 60, max_tokens=2, base=1)
    for i in range(400):
        for j in range(2):
            r = req(f"s{i}.{j}", 7, max_tokens=2, base=2 + (2 * i + j) % 5000)
            r.arrival_time = clock.now
            s.add(r)
        if i == 2:
            long.arrival_time = clock.now
            s.add(long)
        plan, _ = step(s)
        if num_decodes(plan) and isinstance(knobs["max_prefill_tokens_when_decoding"], int):
            assert prefill_tokens(plan) <= 6
        clock.now += 0.1
        if long.finished:
            break
    assert long.finished and long.output_token_ids == [TOKEN, TOKEN]
    if knobs["policy"] == "sjf_aging":
        assert i <= 2 + 2.0 / 0.1 + 60 / 6 + 5  # overdue after max_wait_s, then its chunks


def test_latency_knobs_validated():
    from pydantic import ValidationError

    bad = {
        "policy": "lifo",
        "sjf_window": 0,
        "max_wait_s": 0,
        "max_prefill_tokens_when_decoding": 0,
        "target_step_ms": -1,
        "min_prefill_tokens": 0,
    }
    for field, value in bad.items():
        with pytest.raises(ValidationError, match=field):
            SchedulerConfig(**{field: value})
    with pytest.raises(ValidationError, match="max_prefill_tokens_when_decoding"):
        SchedulerConfig(max_prefill_tokens_when_decoding="fast")
    with pytest.raises(ValidationError, match="max_prefill_tokens_when_decoding=4096 exceeds"):
        SchedulerConfig(max_prefill_tokens_when_decoding=4096)
    with pytest.raises(ValidationError, match="needs enable_chunked_prefill"):
        SchedulerConfig(enable_chunked_prefill=False, max_prefill_tokens_when_decoding=64)
    # Chunking off with the default cap is fine: the cap just does not apply.
    assert SchedulerConfig(enable_chunked_prefill=False).max_prefill_tokens_when_decoding == "auto"


def test_latency_knobs_from_yaml(tmp_path):
    from pydantic import ValidationError

    from deploy.config import FlotillaConfig

    path = tmp_path / "c.yaml"
    path.write_text(
        "engine:\n  scheduler:\n    policy: sjf_aging\n    max_wait_s: 2.5\n"
        "    max_prefill_tokens_when_decoding: 256\n"
    )
    sched = FlotillaConfig.from_yaml(path).engine.scheduler
    assert (sched.policy, sched.max_wait_s, sched.max_prefill_tokens_when_decoding) == (
        "sjf_aging",
        2.5,
        256,
    )
    path.write_text("engine:\n  scheduler:\n    target_step_ms: 0\n")
    with pytest.raises(ValidationError, match=r"engine\.scheduler\.target_step_ms"):
        FlotillaConfig.from_yaml(path)


def test_scheduled_time_is_the_first_admission_only():
    """Queue time ends at the first admission: a preempted request keeps it (vLLM's too)."""
    clock = Clock()
    s = make_latency(budget=100, num_blocks=6, clock=clock)
    a, b, c = req("A", 8, max_tokens=8), req("B", 8, max_tokens=8), req("C", 4, max_tokens=2)
    s.add(a)
    s.add(b)
    clock.now = 1.0
    step(s)
    s.add(c)  # no block left for it until A finishes
    while s.has_work():
        clock.now += 1.0
        step(s)
    assert b.num_preemptions == 1  # as in test_preemption_recompute
    assert a.scheduled_time == b.scheduled_time == 1.0
    assert c.scheduled_time is not None and c.scheduled_time > 2.0
