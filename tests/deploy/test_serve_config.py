"""`flotilla build`: the Serve config it writes validates through Ray's own schema and carries
the Flotilla config exactly (args + the replica counts in `deployments:`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy import preflight, serve_config
from deploy.config import FlotillaConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"


def _through_ray(cfg: FlotillaConfig) -> dict:
    """build -> Ray's schema -> the application entry as Serve would store it."""
    schema = ServeDeploySchema.model_validate(serve_config.build(cfg))
    (app,) = schema.applications
    return app.model_dump(exclude_unset=True)


@pytest.mark.parametrize("example", ["default.yaml", "pd.yaml"])
def test_args_round_trip_exactly(example):
    cfg = preflight.load(str(EXAMPLES / example))
    app = _through_ray(cfg)
    assert FlotillaConfig.model_validate(app["args"]) == cfg
    assert serve_config.config_of(app) == cfg
    assert app["import_path"] == "deploy.app:declarative_app"
    assert app["route_prefix"] == "/"


def test_counts_live_in_deployments_not_args():
    # Serve hashes args into the code version: a count there would restart every replica.
    cfg = FlotillaConfig.model_validate({"groups": 2, "serve": {"ingress_replicas": 3}})
    app = _through_ray(cfg)
    assert "ingress_replicas" not in app["args"].get("serve", {})
    assert "groups" not in app["args"]
    assert app["deployments"] == serve_config.deployment_overrides(cfg)
    assert {d["name"]: d["num_replicas"] for d in app["deployments"]} == {"router": 3, "groups": 2}
    # With threads unset, two groups share each node's cores (user_config: applied in place).
    assert app["deployments"][1]["user_config"] == {"cpu_share": 0.5}
    assert serve_config.config_of(app) == cfg


AUTOSCALED = {
    "pools": {
        "prefill": {"autoscaling": {"min_groups": 1, "max_groups": 3, "target": 4}},
        "decode": {
            "autoscaling": {"max_groups": 2, "policy": "kv_usage", "upscale_delay_s": 1},
            "group_num_cpus": 0.5,
        },
        "autoscaling_ratio": {"prefill_per_decode": 0.5},
    }
}


def test_autoscaling_lives_in_deployments_and_round_trips():
    cfg = FlotillaConfig.model_validate(AUTOSCALED)
    app = _through_ray(cfg)
    assert "autoscaling" not in app["args"]["pools"]["prefill"]
    assert "autoscaling_ratio" not in app["args"]["pools"]
    deps = {d["name"]: d for d in app["deployments"]}
    assert deps["prefill"]["autoscaling_config"]["max_replicas"] == 3
    assert deps["decode"]["autoscaling_config"]["upscale_delay_s"] == 1
    assert "num_replicas" not in deps["decode"]  # Serve refuses both
    assert deps["decode"]["user_config"] == {"cpu_share": 0.2}  # 1 / (3 + 2) groups at most
    assert app["autoscaling_policy"]["policy_kwargs"]["prefill_per_decode"] == 0.5
    assert serve_config.config_of(app) == cfg


def test_top_level_options():
    cfg = FlotillaConfig.model_validate(
        {
            "serve": {
                "host": "0.0.0.0",
                "http_port": 8100,
                "grpc_port": 9100,
                "request_timeout_s": 30,
                "proxy_location": "HeadOnly",
                "control_loop_interval_s": 0.25,
            }
        }
    )
    schema = ServeDeploySchema.model_validate(serve_config.build(cfg))
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8100
    assert schema.http_options.request_timeout_s == 30
    assert schema.grpc_options.port == 9100
    assert schema.grpc_options.grpc_servicer_functions == ["router.grpc_server.add_servicer"]
    assert schema.grpc_options.enable_reflection
    assert schema.proxy_location.value == "HeadOnly"
    env = schema.applications[0].runtime_env
    assert env["worker_process_setup_hook"] == "deploy.proxy_bind.install"
    assert env["env_vars"]["FLOTILLA_GRPC_HOST"] == "0.0.0.0"
    # Serve's own loops, slowed so they preempt the engine less (defaults: 0.5 s, 1000 ms)
    assert env["env_vars"]["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.25"
    assert env["env_vars"]["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"


def test_bad_proxy_location_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: {proxy_location: Everywhere}\n")
    with pytest.raises(preflight.ConfigError, match="serve.proxy_location"):
        preflight.load(str(bad))


def test_build_cli_writes_the_file(tmp_path):
    out = tmp_path / "serve.yaml"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "build",
            str(EXAMPLES / "default.yaml"),
            "-o",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    cfg = preflight.load(str(EXAMPLES / "default.yaml"))
    assert yaml.safe_load(out.read_text()) == serve_config.build(cfg)

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "build",
            str(EXAMPLES / "default.yaml"),
            "--set",
            "serve.host=0.0.0.0",
            "--set",
            "groups=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    built = yaml.safe_load(r.stdout)
    assert built["http_options"]["host"] == "0.0.0.0"
    (app,) = built["applications"]
    assert "groups" not in app["args"]
    assert {d["name"]: d.get("num_replicas") for d in app["deployments"]}["groups"] == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: 0\n")
    r = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "build", str(bad), "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "groups" in r.stderr
