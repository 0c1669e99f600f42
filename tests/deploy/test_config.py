"""The root config: YAML in, one validated object out; typos and out-of-range values refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.served_group import threads_for
from deploy.app import GRPC_SERVICER, grpc_options
from deploy.cli import main, usage_text
from deploy.config import FlotillaConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "default.yaml"


def test_example_yaml_is_the_default_deployment():
    cfg = FlotillaConfig.from_yaml(EXAMPLE)
    assert cfg.groups == 1 and cfg.router.policy == "prefix_aware"
    assert (cfg.serve.http_port, cfg.serve.grpc_port) == (8000, 9000)
    assert cfg.model_name == "smollm2-135m-instruct"


def test_defaults_need_no_file():
    cfg = FlotillaConfig()
    assert [(p.deployment, p.role, p.groups) for p in cfg.pool_specs()] == [
        ("groups", "colocated", 1)
    ]
    opts = grpc_options(cfg)
    assert opts.port == 9000 and opts.grpc_servicer_functions == [GRPC_SERVICER]
    assert callable(opts.grpc_servicer_func_callable[0])  # importable where Serve runs


def test_engine_threads_default_to_the_nodes_cores_per_group(monkeypatch):
    """Read in the group's own process (its node's cores), times its share of the app."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    share = 1 / FlotillaConfig(groups=2).max_groups()
    assert threads_for(FlotillaConfig().engine, share).model.num_threads == 4
    assert threads_for(FlotillaConfig().engine, 1 / 16).model.num_threads == 1
    pinned = FlotillaConfig.model_validate({"engine": {"model": {"num_threads": 3}}})
    assert threads_for(pinned.engine, share).model.num_threads == 3


@pytest.mark.parametrize(
    "data",
    [
        {"groups": 0},
        {"gropus": 2},
        {"router": {"policy": "random"}},
        {"router": {"stats_interval_s": 0}},
        {"serve": {"http_port": 9000}},  # clashes with grpc_port
        {"serve": {"grpc_port": 70000}},
        {"engine": {"cache": {"block_size": 0}}},
        {"engine": {"model": {"quantization": "int8", "quantization_group_size": 24}}},
        {"engine": {"model": {"quantization_group_size": 32}}},  # without int8
    ],
)
def test_bad_config_is_refused(data):
    with pytest.raises(ValidationError):
        FlotillaConfig.model_validate(data)


def test_int8_group_size_round_trips_through_yaml_and_serve_args(tmp_path):
    from deploy import serve_config

    path = tmp_path / "int8.yaml"
    path.write_text("engine:\n  model:\n    quantization: int8\n    quantization_group_size: 64\n")
    cfg = FlotillaConfig.from_yaml(path)
    assert (cfg.engine.model.quantization, cfg.engine.model.quantization_group_size) == ("int8", 64)
    args = serve_config.app_args(cfg)
    assert args["engine"]["model"] == {"quantization": "int8", "quantization_group_size": 64}
    assert FlotillaConfig.model_validate(args) == cfg


def test_yaml_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError):
        FlotillaConfig.from_yaml(bad)


def test_usage_text_names_every_way_to_call():
    text = usage_text(FlotillaConfig())
    assert "flotilla generate" in text and "curl" in text and "openai.OpenAI" in text
    assert "127.0.0.1:9000" in text and "http://127.0.0.1:8000" in text


def test_generate_reports_unreachable_server(capsys):
    # Nothing listens on this port: a clean error and exit code 1, not a traceback.
    assert main(["generate", "hi", "--address", "127.0.0.1:1", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "tp", "gpus"), [("cpu", 1, 0), ("cuda", 1, 1), ("cuda", 2, 0), ("cpu", 2, 0)]
)
def test_a_one_rank_cuda_group_asks_serve_for_its_gpu(device, tp, gpus):
    """A one-rank group's model runs in its Serve replica, which needs the GPU (Ray hides GPUs
    from actors that ask for none); a multi-rank group's rank actors ask for theirs."""
    from deploy.app import build_app

    cfg = FlotillaConfig.model_validate(
        {"engine": {"model": {"device": device}, "parallel": {"tp": tp}}}
    )
    groups = build_app(cfg)._bound_deployment.init_args[3]  # the ingress's bound pools
    assert [g._bound_deployment.ray_actor_options["num_gpus"] for g in groups.values()] == [gpus]


def _pools(prefill: dict, decode: dict) -> dict:
    return {"pools": {"prefill": prefill, "decode": decode}}


def test_pools_may_differ_in_parallel_layout():
    cfg = FlotillaConfig.model_validate(
        _pools({"parallel": {"tp": 1}}, {"parallel": {"tp": 2, "pp": 2}})
    )
    prefill, decode = (s.engine.parallel for s in cfg.pool_specs())
    assert (prefill.tp, decode.tp, decode.pp) == (1, 2, 2)


def test_the_decode_pool_never_jumps_to_max_step_ms_unless_told():
    """The decode pool's default scheduler has no TTFT deadline (no max_step_ms steps that
    stall every stream); the prefill pool keeps engine.scheduler's; a pool's own scheduler
    is taken as given, and a bad value in it names the field."""
    cfg = FlotillaConfig.model_validate(_pools({}, {}))
    prefill, decode = (s.engine.scheduler for s in cfg.pool_specs())
    assert prefill.ttft_target_ms == 2000.0 and decode.ttft_target_ms is None
    assert decode.model_copy(update={"ttft_target_ms": 2000.0}) == prefill  # nothing else
    own = FlotillaConfig.model_validate(
        _pools({"scheduler": {"target_step_ms": 400}}, {"scheduler": {"ttft_target_ms": 3000}})
    )
    prefill, decode = (s.engine.scheduler for s in own.pool_specs())
    assert (prefill.target_step_ms, decode.ttft_target_ms) == (400, 3000)
    (colocated,) = FlotillaConfig.model_validate({}).pool_specs()
    assert colocated.engine.scheduler.ttft_target_ms == 2000.0
    with pytest.raises(ValidationError, match="pools.decode.scheduler.target_step_ms"):
        FlotillaConfig.model_validate(_pools({}, {"scheduler": {"target_step_ms": -1}}))


def test_pools_must_share_the_block_size():
    with pytest.raises(ValueError, match="prefill block_size 8 != pools.decode block_size 16"):
        FlotillaConfig.model_validate(
            _pools({"cache": {"block_size": 8}}, {"cache": {"block_size": 16}})
        )


def test_pools_must_share_the_kv_dtype():
    """An int8 cache's exported rows (values + scale) fit no float cache: refused at start-up,
    naming the field and both values; the same int8 cache on both sides is fine, and a typo
    in the field is refused with the allowed values."""
    with pytest.raises(ValueError, match="'int8' != pools.decode cache.kv_dtype 'auto'"):
        FlotillaConfig.model_validate(_pools({"cache": {"kv_dtype": "int8"}}, {}))
    both = _pools({"cache": {"kv_dtype": "int8"}}, {"cache": {"kv_dtype": "int8"}})
    assert {s.engine.cache.kv_dtype for s in FlotillaConfig.model_validate(both).pool_specs()} == {
        "int8"
    }
    with pytest.raises(ValidationError, match="kv_dtype\n  Input should be 'auto' or 'int8'"):
        FlotillaConfig.model_validate({"engine": {"cache": {"kv_dtype": "fp8"}}})


def test_kv_transport_is_checked_and_its_pair_backend_follows_the_devices():
    """pools.kv_transport: a typo is refused naming the field and the choices; shm without an
    arena is refused naming both fields; the pair groups' backend is nccl only when both
    pools' groups hold their GPU (one rank on CUDA), and reaches the groups' constructors."""
    from deploy.app import build_app

    assert FlotillaConfig.model_validate(_pools({}, {})).pools.kv_transport == "auto"
    with pytest.raises(ValidationError, match="kv_transport\n  Input should be 'auto', 'shm'"):
        FlotillaConfig.model_validate({"pools": {"kv_transport": "nccl"}})
    with pytest.raises(ValueError, match="kv_transport shm needs pools.kv_arena_mib > 0"):
        FlotillaConfig.model_validate({"pools": {"kv_transport": "shm", "kv_arena_mib": 0}})
    FlotillaConfig.model_validate({"pools": {"kv_transport": "inline", "kv_arena_mib": 0}})

    def backend(engine: dict, decode: dict) -> str:
        return FlotillaConfig.model_validate(
            {"engine": engine} | _pools({}, decode)
        ).kv_link_backend()

    cuda = {"model": {"device": "cuda"}}
    assert backend({}, {}) == "gloo"
    assert backend(cuda, {}) == "nccl"
    assert backend(cuda, {"parallel": {"tp": 2}}) == "gloo"  # its replica holds no GPU
    cfg = FlotillaConfig.model_validate({"engine": cuda, "pools": {"kv_transport": "dist"}})
    pools = build_app(cfg)._bound_deployment.init_args[3]
    assert [p._bound_deployment.init_args[-2:] for p in pools.values()] == [("dist", "nccl")] * 2
