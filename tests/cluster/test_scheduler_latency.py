"""Scheduling for latency under load (issue 17): decode-first steps, the prefill token cap
while decodes run (fixed or `auto` from the step-time model), admission policies (FCFS,
shortest-prompt-first with aging) and their knobs. Scheduler + BlockManager, no model."""

from __future__ import annotations

import pytest
from sched_support import (
    TOKEN,
    Clock,
    make,
    make_latency,
    num_decodes,
    prefill_tokens,
    req,
    run_all,
    step,
    summary,
)

from cluster.config import SchedulerConfig


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
        budget=512,
        max_prefill_tokens_when_decoding="auto",
        target_step_ms=50,
        min_prefill_tokens=8,
        ttft_target_ms=None,  # the plain cap (loosened: test_auto_cap_loosens_*)
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
    dict(policy="fcfs", max_prefill_tokens_when_decoding="auto", ttft_target_ms=300),
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


def test_auto_cap_loosens_for_prompts_that_would_miss_their_first_token_deadline():
    from cluster.policies import AutoCap, Pending
    from cluster.step_model import StepTimeModel

    m = StepTimeModel()
    feed(m, 0.01, 0.002, 0.0001)  # 5 decodes: overhead 0.02 s a step, 0.1 ms a prefill token
    now = 100.0

    def cap(ttft_s, *pending, max_step_s=0.2, hurry_late=True):
        return AutoCap(m, 0.05, 8, ttft_s, max_step_s, hurry_late).limit(5, list(pending), now)

    assert cap(None, Pending(1000, now)) == 300  # no deadline: the target's chunk
    assert cap(0.15) == 300  # nothing waiting
    assert cap(1.0, Pending(1000, now)) == 300  # 1000 tokens fit in 45 steps of 23: plenty
    # Chunks of 300 would miss a deadline: the step goes straight to the ceiling,
    # (0.2 - 0.02) / 0.0001 tokens, not to the smallest chunk that would just meet it.
    # 0.15 s allows 2 steps of overhead: 1000 tokens need chunks of 500 > 300.
    assert cap(0.15, Pending(1000, now)) == 1800
    # The later prompt's deadline binds: 800 tokens in floor((0.13 - 0.08) / 0.02) = 2 steps,
    # 400 > 300.
    assert cap(0.13, Pending(200, now), Pending(600, now)) == 1800
    # 700 tokens in floor((0.14 - 0.07) / 0.02) = 3 steps need chunks of 234: 300 is enough.
    assert cap(0.14, Pending(200, now), Pending(500, now)) == 300
    # Too late for any step to save (past its deadline, or its work alone overruns it): the
    # ceiling by default (its first token sooner, in fewer and larger steps) ...
    assert cap(0.05, Pending(1000, now)) == 1800
    assert cap(0.15, Pending(1000, now - 1.0)) == 1800
    assert cap(0.15, Pending(1000, now), max_step_s=0.06) == 400  # the ceiling bounds it
    assert cap(0.15, Pending(1000, now), max_step_s=0.01) == 300  # never below the target's
    # ... and the target's chunk with hurry_late_prompts off: a long step would stall every
    # stream and save no deadline.
    late = dict(hurry_late=False)
    assert cap(0.15, Pending(1000, now), **late) == 1800  # 2 steps of 500 are in time
    assert cap(0.05, Pending(1000, now), **late) == 300
    assert cap(0.15, Pending(1000, now - 1.0), **late) == 300
    # Chunks of 400 take 3 steps, 0.16 s > 0.15: 400 saves nothing; with 0.165 s it does.
    assert cap(0.15, Pending(1000, now), max_step_s=0.06, **late) == 300
    assert cap(0.165, Pending(1000, now), max_step_s=0.06, **late) == 400
    # A late prompt ahead of one that can still be saved: the ceiling, for the one behind
    # (1100 tokens in floor((0.15 - 0.11) / 0.02) = 2 steps need chunks of 550).
    assert cap(0.15, Pending(1000, now - 1.0), Pending(100, now), **late) == 1800
    assert cap(1.0, Pending(1000, now - 1.0), Pending(100, now), **late) == 300  # in time


def test_scheduler_gives_an_overdue_prompt_bigger_chunks():
    clock = Clock()
    s = make_latency(
        budget=4096,
        num_blocks=4096,
        clock=clock,
        max_prefill_tokens_when_decoding="auto",
        target_step_ms=50,
        min_prefill_tokens=8,
        ttft_target_ms=1000,
        max_step_ms=200,
    )
    feed(s.step_model, 0.01, 0.002, 0.0001, 2 * s.step_model.window)
    s.add(req("A", 4, max_tokens=400))
    step(s)  # A decodes from now on: 1 decode, overhead 0.012 s
    late = req("L", 3000, max_tokens=1, base=2)
    late.arrival_time = clock.now
    s.add(late)
    p, _ = step(s)
    assert prefill_tokens(p) == 380  # in time: (0.05 - 0.012) / 0.0001
    # L's deadline is 300 ms away and 2620 tokens are left: chunks of 380 miss it, chunks of
    # 1880 meet it (2620 tokens in floor((0.3 - 0.262) / 0.012) = 3 steps need 874).
    clock.now += 0.7
    p, _ = step(s)
    assert num_decodes(p) == 1 and prefill_tokens(p) == 1880  # (0.2 - 0.012) / 0.0001
    clock.now += 1.0  # past L's deadline: no step can save it, but it is hurried (default)
    p, _ = step(s)
    assert num_decodes(p) == 1 and prefill_tokens(p) == 740  # the rest of it
    # With hurry_late_prompts off, a late prompt gets the target's chunks.
    s.prefill_cap.hurry_late = False
    late2 = req("M", 3000, max_tokens=1, base=3)
    late2.arrival_time = clock.now - 5.0
    s.add(late2)
    p, _ = step(s)
    assert num_decodes(p) == 1 and prefill_tokens(p) == 380  # L is done: A decodes alone


def test_latency_knobs_validated():
    from pydantic import ValidationError

    bad = {
        "policy": "lifo",
        "sjf_window": 0,
        "max_wait_s": 0,
        "max_prefill_tokens_when_decoding": 0,
        "target_step_ms": -1,
        "min_prefill_tokens": 0,
        "ttft_target_ms": 0,
        "max_step_ms": 0,
    }
    for field, value in bad.items():
        with pytest.raises(ValidationError, match=field):
            SchedulerConfig(**{field: value})
    with pytest.raises(ValidationError, match="max_prefill_tokens_when_decoding"):
        SchedulerConfig(max_prefill_tokens_when_decoding="fast")
    with pytest.raises(ValidationError, match="max_prefill_tokens_when_decoding=4096 exceeds"):
        SchedulerConfig(max_prefill_tokens_when_decoding=4096)
    with pytest.raises(ValidationError, match="max_step_ms=100.0 is below target_step_ms=170"):
        SchedulerConfig(ttft_target_ms=2000, max_step_ms=100)
    assert SchedulerConfig(target_step_ms=3000).max_step_ms == 1500  # unset: follows the target
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
