"""What the scheduler tests share: a Scheduler over a BlockManager without a model, fake
workers that always sample token 7, and a clock the test moves by hand."""

from __future__ import annotations

from cluster.block_manager import BlockManager
from cluster.config import SchedulerConfig
from cluster.request import Request
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
