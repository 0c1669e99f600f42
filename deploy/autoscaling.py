"""Autoscaling of replica-group pools, as written in the YAML, and its Ray Serve form.

    autoscaling:                 colocated pool (replaces `groups`)
    pools.prefill.autoscaling:   one disaggregated pool (replaces that pool's `groups`)
    pools.decode.autoscaling:
    pools.autoscaling_ratio:     keep prefill >= ceil(prefill_per_decode * decode) groups

Each pool is one Serve deployment whose replicas are its groups; its AutoscalingSpec becomes
that deployment's `autoscaling_config` (serve_autoscaling_config) with
deploy.autoscaling_policy.GroupAutoscalingPolicy as the policy. A ratio becomes an
application-level policy (app_autoscaling_policy), which Serve 2.60 takes only from the Serve
YAML's `applications[].autoscaling_policy` (serve deploy / serve run cfg.yaml / KubeRay
serveConfigV2): serve.run() and serve.deployment() have no parameter for it.

No Ray import here: `flotilla serve`'s preflight validates configs without Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

if TYPE_CHECKING:
    from deploy.config import FlotillaConfig

# Import paths the Serve controller loads (deploy/autoscaling_policy.py: stdlib only).
GROUP_POLICY = "deploy.autoscaling_policy:GroupAutoscalingPolicy"
RATIO_POLICY = "deploy.autoscaling_policy:PoolRatioPolicy"

Policy = Literal["queue", "kv_usage", "ttft", "itl"]
DEFAULT_TARGET: dict[str, float] = {"queue": 8.0, "kv_usage": 0.8, "ttft": 2000.0, "itl": 200.0}


class AutoscalingSpec(BaseModel):
    """How one pool's group count follows its load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_groups: int = Field(1, ge=1, le=64, description="Fewest groups (never 0: cold starts).")
    max_groups: int = Field(..., ge=1, le=64, description="Most groups; >= min_groups.")
    initial_groups: int | None = Field(
        None, ge=1, le=64, description="Groups at deploy time, in [min, max]; default min_groups."
    )
    policy: Policy = Field(
        "queue",
        description="The metric followed: queue = running + waiting requests per group; "
        "kv_usage = fraction of KV blocks used; ttft / itl = p90 time to first token / "
        "inter-token latency in ms over the groups' last 30 s.",
    )
    target: float | None = Field(
        None,
        gt=0,
        description="Per-group target of the metric (kv_usage: in (0, 1]); default "
        f"{DEFAULT_TARGET}. Above it the pool grows; it shrinks by one group when one fewer "
        "would still run `hysteresis` below it.",
    )
    hysteresis: float = Field(
        0.1, ge=0, lt=1, description="Margin under target needed to remove a group (anti-flap)."
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="A scale-up must be wanted this long (Serve applies it)."
    )
    downscale_delay_s: float = Field(
        120.0, ge=0, description="A scale-down must be wanted this long (Serve applies it)."
    )
    cooldown_s: float = Field(
        30.0,
        ge=0,
        description="Least time between two changes of the group count (then the delay runs). "
        "For ttft / itl keep it >= 30 s, the groups' latency window, or old samples re-trigger.",
    )
    metrics_interval_s: float = Field(
        2.0, gt=0, description="How often groups push metrics to Serve (Serve's default: 10 s)."
    )
    look_back_period_s: float = Field(
        10.0, gt=0, description="Window Serve averages the metrics over; > metrics_interval_s."
    )

    @field_validator("max_groups")
    @classmethod
    def _max_ge_min(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("min_groups")
        if lo is not None and v < lo:
            raise ValueError(f"max_groups {v} < min_groups {lo}")
        return v

    @field_validator("initial_groups")
    @classmethod
    def _initial_in_range(cls, v: int | None, info: ValidationInfo) -> int | None:
        lo, hi = info.data.get("min_groups"), info.data.get("max_groups")
        if v is not None and lo is not None and hi is not None and not lo <= v <= hi:
            raise ValueError(f"initial_groups {v} is outside [min_groups {lo}, max_groups {hi}]")
        return v

    @field_validator("target")
    @classmethod
    def _kv_target_is_a_fraction(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("policy") == "kv_usage" and v > 1:
            raise ValueError(f"a kv_usage target is a fraction in (0, 1], not {v}")
        return v

    @field_validator("look_back_period_s")
    @classmethod
    def _window_holds_a_push(cls, v: float, info: ValidationInfo) -> float:
        push = info.data.get("metrics_interval_s")
        if push is not None and v <= push:
            raise ValueError(f"look_back_period_s {v} must exceed metrics_interval_s {push}")
        return v

    @property
    def target_value(self) -> float:
        return DEFAULT_TARGET[self.policy] if self.target is None else self.target

    def policy_kwargs(self) -> dict[str, Any]:
        """GroupAutoscalingPolicy's keyword arguments (JSON, as Serve requires)."""
        return {
            "policy": self.policy,
            "target": self.target_value,
            "cooldown_s": self.cooldown_s,
            "hysteresis": self.hysteresis,
        }


class AutoscalingRatio(BaseModel):
    """Coordinates the two pools of a disaggregated deployment (both need `autoscaling`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_per_decode: float = Field(
        ...,
        gt=0,
        le=64,
        description="Prefill groups per decode group, as a floor: each pool still follows its "
        "own metric, and prefill is raised to ceil(prefill_per_decode * decode) whenever it "
        "would fall below (it grows with decode at once and shrinks only after it).",
    )


def serve_autoscaling_config(a: AutoscalingSpec) -> dict[str, Any]:
    """`autoscaling_config=` for the pool's serve.deployment(...).options(...)."""
    return {
        "min_replicas": a.min_groups,
        "max_replicas": a.max_groups,
        "initial_replicas": a.initial_groups,
        # Deprecated in Serve 2.60 (it warns) but still the interval replicas push metrics at;
        # the RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S variables it names are unused yet.
        "metrics_interval_s": a.metrics_interval_s,
        "look_back_period_s": a.look_back_period_s,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "policy": {"policy_function": GROUP_POLICY, "policy_kwargs": a.policy_kwargs()},
    }


def pool_autoscaling(config: FlotillaConfig, role: str) -> AutoscalingSpec | None:
    """The spec of pool `role` (colocated | prefill | decode), or None: a fixed group count."""
    if role == "colocated":
        return config.autoscaling
    if config.pools is None:
        return None
    return getattr(config.pools, role).autoscaling


def app_autoscaling_policy(config: FlotillaConfig) -> dict[str, Any] | None:
    """`autoscaling_policy` of the Serve YAML's application entry, or None (each pool then
    scales by its own deployment-level policy). Pool deployments are named after their role."""
    pools = config.pools
    if pools is None or pools.autoscaling_ratio is None:
        return None
    assert pools.prefill.autoscaling and pools.decode.autoscaling  # PoolsConfig checked it
    return {
        "policy_function": RATIO_POLICY,
        "policy_kwargs": {
            "pools": {
                "prefill": pools.prefill.autoscaling.policy_kwargs(),
                "decode": pools.decode.autoscaling.policy_kwargs(),
            },
            "prefill_per_decode": pools.autoscaling_ratio.prefill_per_decode,
        },
    }
