"""Pools pinned to nodes and ranks spread over nodes, as config: the fields validate, reach the
group actors' Ray options, and preflight refuses resources the cluster does not have (naming
the field and the resource). No cluster here: tests/deploy/test_multinode.py runs them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.served_group import threads_for
from deploy import preflight
from deploy.config import FlotillaConfig

# What ray.cluster_resources() returns for a head + node_b + node_c loopback cluster.
CLUSTER = {
    "CPU": 4.0,
    "memory": 1e9,
    "object_store_memory": 3e8,
    "node:127.0.0.1": 3.0,
    "node:__internal_head__": 1.0,
    "node_b": 1.0,
    "node_c": 1.0,
}

PD = {
    "serve": {"group_resources": {"node_b": 0.1}},
    "pools": {"prefill": {"resources": {"node_c": 0.1}}},
}


def test_pool_resources_default_to_serve_group_resources():
    specs = {s.role: s for s in FlotillaConfig.model_validate(PD).pool_specs()}
    assert specs["prefill"].resources == {"node_c": 0.1}
    assert specs["prefill"].resources_field == "pools.prefill.resources"
    assert specs["decode"].resources == {"node_b": 0.1}
    assert specs["decode"].resources_field == "serve.group_resources"
    (colocated,) = FlotillaConfig.model_validate({"serve": PD["serve"]}).pool_specs()
    assert colocated.resources == {"node_b": 0.1}


def test_resources_reach_the_group_actors():
    from deploy.app import build_app

    groups = build_app(FlotillaConfig.model_validate(PD))._bound_deployment.init_args[3]
    opts = {r: g._bound_deployment.ray_actor_options for r, g in groups.items()}
    assert opts["prefill"]["resources"] == {"node_c": 0.1}
    assert opts["decode"]["resources"] == {"node_b": 0.1}
    (plain,) = build_app(FlotillaConfig())._bound_deployment.init_args[3].values()
    assert "resources" not in plain._bound_deployment.ray_actor_options


@pytest.mark.parametrize(
    "data",
    [
        {"serve": {"group_resources": {"node_b": -1}}},
        {"serve": {"group_resources": {"": 1}}},
        {"serve": {"group_resources": {"CPU": 1}}},
        {"serve": {"group_resources": {"node_b": float("inf")}}},
        {"pools": {"decode": {"resources": {" ": 0.5}}}},
        {"engine": {"parallel": {"rank_resources": {"node_b": -0.1}}}},
        {"engine": {"parallel": {"placement": "scatter"}}},
    ],
)
def test_bad_placement_fields_are_refused(data):
    with pytest.raises(ValidationError):
        FlotillaConfig.model_validate(data)


def test_preflight_refuses_a_resource_the_cluster_lacks():
    cfg = FlotillaConfig.model_validate(
        {
            "serve": {"group_resources": {"node_x": 0.1}},
            "engine": {
                "parallel": {"tp": 2, "cpus_per_rank": 0.5, "rank_resources": {"gpu_box": 1}}
            },
        }
    )
    with pytest.raises(preflight.ConfigError) as e:
        preflight.check_cluster(cfg, CLUSTER)
    assert e.value.problems == [
        "serve.group_resources: the Ray cluster has no custom resource 'node_x' (it has: "
        "node_b, node_c; nodes get them from `ray start --resources`)",
        "engine.parallel.rank_resources: the Ray cluster has no custom resource 'gpu_box' (it "
        "has: node_b, node_c; nodes get them from `ray start --resources`)",
    ]


def test_preflight_names_the_pool_and_the_amount():
    cfg = FlotillaConfig.model_validate(
        {"pools": {"prefill": {"resources": {"node_b": 2}}, "decode": {"resources": {"node_c": 1}}}}
    )
    (problem,) = preflight.check_resources(cfg, CLUSTER, "the Ray cluster")
    assert problem == "pools.prefill.resources: asks for 2 node_b but the Ray cluster has 1"
    preflight.check_cluster(FlotillaConfig.model_validate(PD), CLUSTER)  # all there: passes
    # `flotilla serve` starting its own cluster: that one has no custom resources at all.
    assert preflight.check_resources(FlotillaConfig.model_validate(PD), {}, "here") != []


def test_multi_rank_groups_hand_their_share_to_the_ranks():
    """A multi-rank group's ranks may be on other nodes: they get the share, not a count made
    from the group's own node's cores (workers.worker counts each rank's node)."""
    cfg = FlotillaConfig.model_validate({"engine": {"parallel": {"tp": 2}}})
    engine = threads_for(cfg.engine, 0.25)
    assert engine.model.num_threads is None and engine.parallel.cpu_share == 0.25
