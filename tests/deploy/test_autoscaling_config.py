"""Autoscaling in the YAML: valid policies become Serve configs, invalid ones fail naming the
field (pydantic prints the dotted path of the failing field first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deploy.autoscaling import (
    GROUP_POLICY,
    RATIO_POLICY,
    app_autoscaling_policy,
    pool_autoscaling,
    serve_autoscaling_config,
)
from deploy.config import FlotillaConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "autoscale.yaml"
POOLS = {
    "prefill": {"autoscaling": {"max_groups": 2, "policy": "ttft", "target": 800}},
    "decode": {"autoscaling": {"min_groups": 1, "max_groups": 4, "policy": "itl"}},
}


def _refused(data: dict, field: str, words: str = "") -> None:
    with pytest.raises(ValidationError) as e:
        FlotillaConfig.model_validate(data)
    assert field in str(e.value) and words in str(e.value)


def test_example_validates():
    cfg = FlotillaConfig.from_yaml(EXAMPLE)
    a = cfg.autoscaling
    assert a is not None and (a.min_groups, a.max_groups, a.policy) == (1, 2, "queue")
    assert pool_autoscaling(cfg, "colocated") is a and app_autoscaling_policy(cfg) is None


def test_serve_config_of_a_pool():
    from ray.serve.config import AutoscalingConfig

    cfg = FlotillaConfig.model_validate(
        {"autoscaling": {"min_groups": 1, "max_groups": 3, "initial_groups": 2, "target": 5}}
    )
    d = serve_autoscaling_config(cfg.autoscaling)
    assert (d["min_replicas"], d["max_replicas"], d["initial_replicas"]) == (1, 3, 2)
    assert d["policy"] == {
        "policy_function": GROUP_POLICY,
        "policy_kwargs": {"policy": "queue", "target": 5.0, "cooldown_s": 30.0, "hysteresis": 0.1},
    }
    with pytest.warns(DeprecationWarning):  # metrics_interval_s: deprecated, still honoured
        serve = AutoscalingConfig(**d)  # Serve accepts it and imports the policy
    assert serve.upscale_delay_s == 10.0 and serve.look_back_period_s == 10.0


def test_each_policy_has_a_default_target():
    for policy, target in [("queue", 8.0), ("kv_usage", 0.8), ("ttft", 2000.0), ("itl", 200.0)]:
        cfg = FlotillaConfig.model_validate({"autoscaling": {"max_groups": 2, "policy": policy}})
        assert cfg.autoscaling.policy_kwargs()["target"] == target


def test_pools_and_the_ratio_policy():
    cfg = FlotillaConfig.model_validate(
        {"pools": {**POOLS, "autoscaling_ratio": {"prefill_per_decode": 0.5}}}
    )
    assert pool_autoscaling(cfg, "colocated") is None
    assert pool_autoscaling(cfg, "decode").max_groups == 4
    policy = app_autoscaling_policy(cfg)
    assert policy["policy_function"] == RATIO_POLICY
    kw = policy["policy_kwargs"]
    assert kw["prefill_per_decode"] == 0.5
    assert kw["pools"]["prefill"]["policy"] == "ttft" and kw["pools"]["decode"]["target"] == 200.0
    # What `serve deploy` takes: the application entry carries it as is.
    from ray.serve.schema import ServeApplicationSchema

    app = ServeApplicationSchema(import_path="x:y", autoscaling_policy=policy)
    assert app.autoscaling_policy["policy_kwargs"] == kw
    assert app_autoscaling_policy(FlotillaConfig.model_validate({"pools": POOLS})) is None


def test_yaml_round_trip(tmp_path):
    # exclude_unset: a full dump would also write the default `groups`, which (as with pools)
    # may not be set next to autoscaling.
    path = tmp_path / "cfg.yaml"
    for cfg in [
        FlotillaConfig.model_validate(
            {"pools": {**POOLS, "autoscaling_ratio": {"prefill_per_decode": 2}}}
        ),
        FlotillaConfig.from_yaml(EXAMPLE),
    ]:
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
        assert FlotillaConfig.from_yaml(path) == cfg


DEC = "pools.decode.autoscaling"


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"autoscaling": {"min_groups": 3, "max_groups": 2}}, "autoscaling.max_groups", "< min"),
        ({"pools": {"decode": {"autoscaling": {"min_groups": 3, "max_groups": 2}}}},
         f"{DEC}.max_groups", "min_groups 3"),
        ({"autoscaling": {"max_groups": 2, "policy": "latency"}}, "autoscaling.policy", ""),
        ({"autoscaling": {"max_groups": 2, "policy": "pd_ratio"}}, "autoscaling.policy", ""),
        ({"autoscaling": {"max_groups": 2, "upscale_delay_s": -1}},
         "autoscaling.upscale_delay_s", ""),
        ({"pools": {"prefill": {"autoscaling": {"max_groups": 2, "downscale_delay_s": -5}}}},
         "pools.prefill.autoscaling.downscale_delay_s", ""),
        ({"autoscaling": {"max_groups": 2, "cooldown_s": -1}}, "autoscaling.cooldown_s", ""),
        ({"autoscaling": {"max_groups": 2, "target": 0}}, "autoscaling.target", ""),
        ({"pools": {"decode": {"autoscaling": {"max_groups": 2, "target": -3}}}},
         f"{DEC}.target", ""),
        ({"autoscaling": {"max_groups": 2, "policy": "kv_usage", "target": 80}},
         "autoscaling.target", "fraction"),
        ({"autoscaling": {"min_groups": 2, "max_groups": 3, "initial_groups": 1}},
         "autoscaling.initial_groups", "outside"),
        ({"pools": {"decode": {"autoscaling": {"max_groups": 3, "initial_groups": 4}}}},
         f"{DEC}.initial_groups", "outside"),
        ({"autoscaling": {"max_groups": 2, "metrics_interval_s": 5, "look_back_period_s": 5}},
         "autoscaling.look_back_period_s", "exceed"),
        ({"autoscaling": {"max_groups": 2, "metrics_interval_s": 0}},
         "autoscaling.metrics_interval_s", ""),
        ({"autoscaling": {"min_groups": 0, "max_groups": 2}}, "autoscaling.min_groups", ""),
        ({"autoscaling": {"min_groups": 1}}, "autoscaling.max_groups", "required"),
        ({"autoscaling": {"max_groups": 2, "max_group": 3}}, "autoscaling.max_group", "extra"),
        # a ratio without pools: there is no such top-level field ...
        ({"autoscaling_ratio": {"prefill_per_decode": 1}}, "autoscaling_ratio", "extra"),
        # ... and under pools it needs both pools autoscaled
        ({"pools": {"autoscaling_ratio": {"prefill_per_decode": 1}}},
         "pools.autoscaling_ratio", "pools.prefill.autoscaling"),
        ({"pools": {**POOLS, "autoscaling_ratio": {"prefill_per_decode": 0}}},
         "pools.autoscaling_ratio.prefill_per_decode", ""),
        ({"groups": 2, "autoscaling": {"max_groups": 2}}, "autoscaling", "initial_groups"),
        ({"pools": {"decode": {"groups": 2, "autoscaling": {"max_groups": 2}}}},
         "pools.decode", "initial_groups"),
        ({"pools": POOLS, "autoscaling": {"max_groups": 2}}, "autoscaling", "pools.prefill"),
    ],
)  # fmt: skip
def test_bad_autoscaling_is_refused_naming_the_field(data, field, words):
    _refused(data, field, words)
