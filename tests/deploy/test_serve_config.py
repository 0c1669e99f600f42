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
    assert app["import_path"] == "deploy.app:build_app"
    assert app["route_prefix"] == "/"


def test_replica_counts_live_in_deployments_not_args():
    # Serve hashes args into the code version: a count there would restart every replica.
    cfg = FlotillaConfig.model_validate({"groups": 2, "serve": {"ingress_replicas": 3}})
    app = _through_ray(cfg)
    assert "ingress_replicas" not in app["args"].get("serve", {})
    assert app["deployments"] == serve_config.deployment_overrides(cfg)
    assert {d["name"]: d["num_replicas"] for d in app["deployments"]} == {
        "router": 3,
        "group-0": 1,
        "group-1": 1,
    }
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
            }
        }
    )
    schema = ServeDeploySchema.model_validate(serve_config.build(cfg))
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8100
    assert schema.http_options.request_timeout_s == 30
    assert schema.grpc_options.port == 9100
    assert schema.grpc_options.grpc_servicer_functions == ["router.grpc_server.add_servicer"]
    assert schema.proxy_location.value == "HeadOnly"
    env = schema.applications[0].runtime_env
    assert env["worker_process_setup_hook"] == "deploy.proxy_bind.install"
    assert env["env_vars"]["FLOTILLA_GRPC_HOST"] == "0.0.0.0"


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
    assert built["applications"][0]["args"]["groups"] == 3

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
