"""The pool policies against Serve's own AutoscalingContext, clock driven by hand.

A `Pool` plays the controller: it builds the context, calls the policy (alone, or wrapped the
way Serve 2.60 wraps every custom policy, delays included) and takes the decision as the new
target, with its replicas running and reporting at once unless a test says otherwise.
"""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deploy.autoscaling import AutoscalingSpec, serve_autoscaling_config
from deploy.autoscaling_policy import REASON, GroupAutoscalingPolicy, PoolRatioPolicy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # metrics_interval_s


def _context(
    name: str,
    target: int,
    reports: list[dict[str, float] | None],
    *,
    now: float,
    state: dict[str, Any] | None = None,
    lo: int = 1,
    hi: int = 8,
    spec: AutoscalingSpec | None = None,
    last_up: float | None = None,
    last_down: float | None = None,
) -> AutoscalingContext:
    """One replica per entry of `reports`: its metrics, or None (nothing reported yet)."""
    dep = DeploymentID(name=name, app_name="flotilla")
    replicas = [ReplicaID(unique_id=f"{name}-{i}", deployment_id=dep) for i in range(len(reports))]
    metrics: dict[str, dict[ReplicaID, float]] = {}
    for r, report in zip(replicas, reports, strict=True):
        for key, value in (report or {}).items():
            metrics.setdefault(key, {})[r] = value
    spec = spec or AutoscalingSpec(min_groups=lo, max_groups=hi)
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name=name,
        app_name="flotilla",
        current_num_replicas=len(replicas),
        target_num_replicas=target,
        running_replicas=replicas,
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=dict(state or {}),
        last_scale_up_time=last_up,
        last_scale_down_time=last_down,
        current_time=now,
        config=AutoscalingConfig(**serve_autoscaling_config(spec)),
    )


def q(load: float) -> dict[str, float]:
    """A group's report under the queue policy: `load` requests running, none waiting."""
    return {"num_running": load, "num_waiting": 0.0}


def decide(policy, target: int, reports, now: float = 0.0, **kw) -> int:
    return policy(_context("groups", target, reports, now=now, **kw))[0]


# ---- queue ---------------------------------------------------------------------------------
QUEUE = GroupAutoscalingPolicy(policy="queue", target=8, cooldown_s=0, hysteresis=0.1)


def test_queue_above_target_scales_up_to_cover_it():
    assert decide(QUEUE, 1, [q(20)]) == 3  # ceil(20 / 8)
    assert decide(QUEUE, 2, [q(10), {"num_running": 4.0, "num_waiting": 10.0}]) == 3


def test_queue_within_the_band_holds():
    assert decide(QUEUE, 2, [q(8), q(8)]) == 2  # exactly at target
    assert decide(QUEUE, 2, [q(4), q(4)]) == 2  # one group would be at 8: not 10% under
    assert decide(QUEUE, 2, [q(3.5), q(3.5)]) == 1  # 7 <= 8 * 0.9


def test_scale_down_is_one_group_at_a_time():
    assert decide(QUEUE, 4, [q(0)] * 4) == 3
    assert decide(QUEUE, 1, [q(0)]) == 1  # never below one group


def test_no_metrics_never_scales_down():
    assert decide(QUEUE, 2, [None, None]) == 2
    assert decide(QUEUE, 2, [q(0), None]) == 2  # one group has not reported yet
    assert decide(QUEUE, 2, [q(0), {"num_running": 0.0}]) == 2  # half a report
    assert decide(QUEUE, 1, [q(30), None]) == 4  # the load already seen justifies growing


def test_no_scale_down_while_groups_start():
    # target 3, only 2 running: the third is starting; idle groups do not cancel it
    assert decide(QUEUE, 3, [q(0), q(0)]) == 3


def test_decisions_are_clamped_to_min_and_max():
    assert decide(QUEUE, 2, [q(500), q(500)], hi=4) == 4
    assert decide(QUEUE, 2, [q(0), q(0)], lo=2) == 2


# ---- proportional metrics ------------------------------------------------------------------
def test_kv_usage_is_proportional():
    kv = GroupAutoscalingPolicy(policy="kv_usage", target=0.6, cooldown_s=0)
    full = {**q(1), "kv_usage": 0.9}
    assert decide(kv, 2, [full, full]) == 3  # 2 * 0.9 / 0.6
    light = {**q(1), "kv_usage": 0.2}
    assert decide(kv, 2, [light, light]) == 1
    assert decide(kv, 2, [light, q(1)]) == 2  # one group without kv_usage: no scale-down


def test_ttft_and_itl_are_proportional_and_zero_means_no_sample():
    ttft = GroupAutoscalingPolicy(policy="ttft", target=1000, cooldown_s=0)
    assert decide(ttft, 1, [{**q(5), "ttft_ms_p90": 3000.0}]) == 3
    assert decide(ttft, 2, [{**q(5), "ttft_ms_p90": 0.0}] * 2) == 2  # busy, no sample yet
    assert decide(ttft, 2, [{**q(0), "ttft_ms_p90": 0.0}] * 2) == 1  # idle: give one back
    assert decide(ttft, 2, [{**q(1), "ttft_ms_p90": 200.0}] * 2) == 1  # far under the SLO
    assert decide(ttft, 2, [{**q(1), "ttft_ms_p90": 800.0}] * 2) == 2  # near it: hold
    itl = GroupAutoscalingPolicy(policy="itl", target=200, cooldown_s=0)
    # the group without samples is left out of the mean, not counted as fast
    assert decide(itl, 2, [{**q(4), "itl_ms_p90": 300.0}, {**q(0), "itl_ms_p90": 0.0}]) == 3


# ---- cooldown (ours) and delays (Serve's) ------------------------------------------------------
class Pool:
    """The controller's side: target, policy state and clock carried from tick to tick."""

    def __init__(self, policy, spec: AutoscalingSpec, serve_wrapped: bool = False):
        from ray.serve.autoscaling_policy import _apply_autoscaling_config

        # What ray/serve/_private/autoscaling_state.py does to every policy at register().
        self.policy = _apply_autoscaling_config(policy) if serve_wrapped else policy
        self.spec, self.target, self.state = spec, spec.initial_groups or spec.min_groups, {}
        self.last_up: float | None = None
        self.last_down: float | None = None

    def tick(self, now: float, load_per_group: float) -> int:
        ctx = _context(
            "groups",
            self.target,
            [q(load_per_group)] * self.target,
            now=now,
            state=self.state,
            spec=self.spec,
            lo=self.spec.min_groups,
            hi=self.spec.max_groups,
            last_up=self.last_up,
            last_down=self.last_down,
        )
        n, self.state = self.policy(ctx)
        n = max(self.spec.min_groups, min(self.spec.max_groups, n))  # Serve's apply_bounds
        if n > self.target:  # Serve stamps each change (deployment_state.py)
            self.last_up = now
        elif n < self.target:
            self.last_down = now
        self.target = n
        return n


def test_cooldown_spaces_two_changes(monkeypatch):
    spec = AutoscalingSpec(max_groups=4, target=8, cooldown_s=30, upscale_delay_s=0)
    pool = Pool(GroupAutoscalingPolicy(**spec.policy_kwargs()), spec)
    assert pool.tick(0.0, 20) == 3
    assert [pool.tick(t, 0) for t in (1.0, 10.0, 29.0)] == [3, 3, 3]
    assert pool.state[REASON] == "cooldown"
    assert pool.tick(31.0, 0) == 2
    assert pool.tick(40.0, 0) == 2  # the scale-down started a new cooldown
    assert pool.tick(61.5, 0) == 1


def test_serve_applies_the_delays_to_our_policy(monkeypatch):
    import ray.serve.autoscaling_policy as serve_policy

    clock = [0.0]
    monkeypatch.setattr(serve_policy.time, "time", lambda: clock[0])  # Serve's delay clock
    spec = AutoscalingSpec(
        max_groups=4, target=8, cooldown_s=0, upscale_delay_s=5, downscale_delay_s=20
    )
    pool = Pool(GroupAutoscalingPolicy(**spec.policy_kwargs()), spec, serve_wrapped=True)

    def at(t: float, load: float) -> int:
        clock[0] = t
        return pool.tick(t, load)

    assert [at(t, 20) for t in (0, 2, 4)] == [1, 1, 1]  # wanted, not yet for 5 s
    assert at(5, 20) == 3
    assert at(6, 0) == 3  # a scale-down wish starts its own 20 s
    assert at(16, 7) == 3  # 21 requests: inside the band, the wish is forgotten
    assert [at(t, 0) for t in (17, 30, 36)] == [3, 3, 3]
    assert at(37, 0) == 2  # 20 s of wanting fewer, then one group only
    assert [at(t, 0) for t in (38, 57)] == [2, 2]  # the next wish is timed from its first tick
    assert at(58, 0) == 1


# ---- the P:D ratio (application level) -----------------------------------------------------
def _ratio_contexts(prefill: tuple[int, float], decode: tuple[int, float], extra: bool = False):
    ctxs = {}
    pools = [("prefill", *prefill), ("decode", *decode)] + ([("router", 1, 50.0)] if extra else [])
    for name, target, load in pools:
        ctx = _context(name, target, [q(load)] * target, now=100.0)
        ctxs[ctx.deployment_id] = ctx
    return ctxs


RATIO = PoolRatioPolicy(
    pools={
        "prefill": {"policy": "queue", "target": 8, "cooldown_s": 0},
        "decode": {"policy": "queue", "target": 8, "cooldown_s": 0},
    },
    prefill_per_decode=0.5,
)


def _by_name(decisions: dict) -> dict[str, int]:
    return {dep.name: n for dep, n in decisions.items()}


def test_prefill_grows_with_decode_at_once():
    decisions, states = RATIO(_ratio_contexts(prefill=(1, 0.0), decode=(2, 16.0)))
    assert _by_name(decisions) == {"prefill": 2, "decode": 4}  # ceil(0.5 * 4)
    assert {d.name: s[REASON] for d, s in states.items()}["prefill"] == "ratio"


def test_each_pool_still_follows_its_own_metric():
    decisions, _ = RATIO(_ratio_contexts(prefill=(1, 30.0), decode=(1, 1.0), extra=True))
    assert _by_name(decisions) == {"prefill": 4, "decode": 1}  # "router": not ours to scale


def test_prefill_shrinks_only_after_decode():
    # decode wants 4 -> 3; prefill idle but still floored by decode's current 4
    decisions, _ = RATIO(_ratio_contexts(prefill=(2, 0.0), decode=(4, 0.0)))
    assert _by_name(decisions) == {"prefill": 2, "decode": 3}
    decisions, _ = RATIO(_ratio_contexts(prefill=(2, 0.0), decode=(3, 0.0)))
    assert _by_name(decisions) == {"prefill": 2, "decode": 2}  # ceil(0.5 * 3) = 2
    decisions, _ = RATIO(_ratio_contexts(prefill=(2, 0.0), decode=(2, 0.0)))
    assert _by_name(decisions) == {"prefill": 1, "decode": 1}


def test_the_ratio_policy_runs_under_serves_app_level_wrapper():
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config

    spec = AutoscalingSpec(max_groups=8, upscale_delay_s=0, downscale_delay_s=0)
    ctxs = {}
    for name, target, load in [("prefill", 1, 0.0), ("decode", 2, 24.0)]:
        ctx = _context(name, target, [q(load)] * target, now=0.0, spec=spec)
        ctxs[ctx.deployment_id] = ctx
    decisions, states = _apply_app_level_autoscaling_config(RATIO)(ctxs)
    assert _by_name(decisions) == {"prefill": 3, "decode": 6}
    assert all(REASON in s for s in states.values())


def test_policies_refuse_bad_kwargs():
    with pytest.raises(ValueError):
        GroupAutoscalingPolicy(policy="pd_ratio")
    with pytest.raises(ValueError):
        GroupAutoscalingPolicy(target=0)
    with pytest.raises(ValueError):
        PoolRatioPolicy(pools={}, prefill_per_decode=0)


def test_the_policy_module_needs_only_the_standard_library():
    """Serve pickles it by value for the controller; any other import would have to be
    importable there (NOTES-autoscale.md)."""
    import ast
    import sys
    from pathlib import Path

    import deploy.autoscaling_policy as module

    tree = ast.parse(Path(module.__file__).read_text())
    runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name) for n in runtime}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
