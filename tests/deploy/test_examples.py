"""deploy/examples/: `cluster.yaml` is a valid `ray up` config (Ray's own schema, after Ray's
own defaults for the local provider), and `rayservice.yaml`'s serveConfigV2 is valid for
Serve and is what `flotilla build` writes for default.yaml today, so it cannot go stale."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deploy import preflight, serve_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_cluster_yaml_is_a_valid_ray_up_config():
    config = yaml.safe_load((EXAMPLES / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before anything else
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert sum("RAY_AUTH_MODE=token" in c for c in starts) == 2
    assert any("requirements.lock" in c and "~/flotilla" in c for c in config["setup_commands"])

    typo = copy.deepcopy(config)
    typo["setup_comands"] = typo.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(prepare_config(typo))  # the check above is not vacuous


def test_rayservice_serve_config_is_what_flotilla_build_writes():
    manifest = yaml.safe_load((EXAMPLES / "rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert isinstance(manifest["spec"]["serveConfigV2"], str)  # KubeRay takes it as a string
    serve_cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    cfg = preflight.load(str(EXAMPLES / "default.yaml"), {"serve.host": "0.0.0.0"})
    assert serve_cfg == serve_config.build(cfg), (
        "rayservice.yaml is stale: paste the output of `flotilla build "
        "deploy/examples/default.yaml --set serve.host=0.0.0.0` into spec.serveConfigV2"
    )
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
