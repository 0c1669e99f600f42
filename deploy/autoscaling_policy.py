"""Autoscaling policies for pools of replica groups; the Serve controller runs them.

GroupAutoscalingPolicy (one deployment = one pool) turns the groups' custom metrics
(cluster.replica_group.ReplicaGroup.record_autoscaling_stats, per replica in
`ctx.aggregated_metrics`, each averaged by Serve over look_back_period_s) into a replica count:

    queue     demand = sum(num_running + num_waiting) / target          (target: requests/group)
    kv_usage  demand = groups * mean(kv_usage) / target                 (target: fraction used)
    ttft/itl  demand = groups * mean(p90 of groups with samples) / target  (target: ms)

It scales up to ceil(demand) at once, and down by ONE group only when every running group has
reported and demand <= (groups - 1) * (1 - hysteresis); otherwise it holds. A group missing from
the metrics (just started) is no data: it can justify a scale-up from the others' load, never a
scale-down. A latency p90 of 0.0 means "no sample", not "fast": the policy holds, unless every
group reported no load at all (idle), which counts as demand 0. After the target changed it
holds for `cooldown_s` (Serve has no such setting).

What Serve 2.60 adds on top (read in ray/serve/_private/autoscaling_state.py: register() wraps
every policy, custom ones included, in autoscaling_policy._apply_autoscaling_config): the
upscaling/downscaling factors, then `upscale_delay_s` / `downscale_delay_s` (a change must be
wanted on every tick for that long, measured with time.time(), before it is applied), then the
min/max bounds. So this module does NOT implement the delays; a change waits for the cooldown
first, then for Serve's delay.

PoolRatioPolicy is an application-level policy (Serve YAML `applications[].autoscaling_policy`;
serve.run() and serve.deployment() cannot carry one in 2.60): it runs one
GroupAutoscalingPolicy per pool and keeps prefill >= ceil(prefill_per_decode * decode). Serve
then applies each deployment's own delays and bounds; an app-level policy replaces the
deployment-level ones, and deployments it has no kwargs for are not scaled.

Serve cloudpickles this module BY VALUE where the policy is configured (driver or build task),
so the controller needs no import path to it as long as it imports only the standard library:
keep it that way (no project, ray, torch imports at run time).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

POLICIES = ("queue", "kv_usage", "ttft", "itl")
LOAD_KEYS = ("num_running", "num_waiting")
METRIC_KEY = {"kv_usage": "kv_usage", "ttft": "ttft_ms_p90", "itl": "itl_ms_p90"}
# Our keys in the policy state, for logs and tests (Serve keeps its delay counters there too).
DEMAND, REASON = "flotilla_demand", "flotilla_reason"


class GroupAutoscalingPolicy:
    def __init__(
        self,
        policy: str = "queue",
        target: float = 8.0,
        cooldown_s: float = 0.0,
        hysteresis: float = 0.1,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if target <= 0 or cooldown_s < 0 or not 0 <= hysteresis < 1:
            raise ValueError("need target > 0, cooldown_s >= 0 and 0 <= hysteresis < 1")
        self.policy = policy
        self.target = target
        self.cooldown_s = cooldown_s
        self.hysteresis = hysteresis

    def demand(self, ctx: AutoscalingContext) -> tuple[float | None, bool]:
        """(groups the load needs, or None for no signal; whether every group reported)."""
        metrics = ctx.aggregated_metrics or {}
        running = list(ctx.running_replicas)
        loads = {
            r: sum(metrics[k][r] for k in LOAD_KEYS)
            for r in running
            if all(r in metrics.get(k, {}) for k in LOAD_KEYS)
        }
        complete = bool(running) and len(loads) == len(running)
        if self.policy == "queue":
            return (sum(loads.values()) / self.target if loads else None), complete
        values = metrics.get(METRIC_KEY[self.policy], {})
        seen = [values[r] for r in running if r in values]
        complete = complete and len(seen) == len(running)
        if self.policy == "kv_usage":
            signal = seen
        else:  # a latency p90 of 0.0: that group had no sample in its window
            signal = [v for v in seen if v > 0]
            if not signal:
                idle = complete and not any(loads.values())
                return (0.0 if idle else None), complete
        if not signal:
            return None, complete
        return len(running) * (sum(signal) / len(signal)) / self.target, complete

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        held = ctx.target_num_replicas
        demand, complete = self.demand(ctx)
        state: dict[str, Any] = {DEMAND: demand}
        desired, reason = held, "hold"
        if demand is None:
            reason = "no data"
        elif math.ceil(demand - 1e-9) > held:
            desired, reason = math.ceil(demand - 1e-9), "up"
        elif complete and ctx.current_num_replicas == held > 1:  # none starting or stopping
            if demand <= (held - 1) * (1 - self.hysteresis):
                desired, reason = held - 1, "down"  # one group at a time
        desired = max(
            ctx.capacity_adjusted_min_replicas, min(desired, ctx.capacity_adjusted_max_replicas)
        )
        if desired != held:
            # Serve stamps these (time.time(), like current_time) when it changes the target.
            changes = (ctx.last_scale_up_time, ctx.last_scale_down_time)
            last = max((t for t in changes if t is not None), default=None)
            if last is not None and now - last < self.cooldown_s:
                desired, reason = held, "cooldown"
        state[REASON] = reason
        return desired, state


class PoolRatioPolicy:
    """Application-level: each pool by its own GroupAutoscalingPolicy (`pools` maps a
    deployment name to that policy's kwargs), then prefill raised to at least
    ceil(prefill_per_decode * decode). Decode counts as the larger of its current target and
    its new decision, so prefill grows with decode at once but shrinks only after it."""

    def __init__(
        self,
        pools: dict[str, dict[str, Any]],
        prefill_per_decode: float,
        prefill: str = "prefill",
        decode: str = "decode",
    ):
        if prefill_per_decode <= 0:
            raise ValueError("prefill_per_decode must be > 0")
        self.policies = {name: GroupAutoscalingPolicy(**kw) for name, kw in pools.items()}
        self.ratio = prefill_per_decode
        self.prefill, self.decode = prefill, decode

    def __call__(
        self, contexts: dict[Any, AutoscalingContext]
    ) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        decisions: dict[Any, int] = {}
        states: dict[Any, dict[str, Any]] = {}
        ids = {}
        for dep_id, ctx in contexts.items():
            policy = self.policies.get(ctx.deployment_name)
            if policy is not None:
                decisions[dep_id], states[dep_id] = policy(ctx)
                ids[ctx.deployment_name] = dep_id
        p, d = ids.get(self.prefill), ids.get(self.decode)
        if p is not None and d is not None:
            decode_n = max(decisions[d], contexts[d].target_num_replicas)
            floor = min(
                math.ceil(self.ratio * decode_n - 1e-9),
                contexts[p].capacity_adjusted_max_replicas,
            )
            if decisions[p] < floor:
                decisions[p] = floor
                states[p][REASON] = "ratio"
        return decisions, states
