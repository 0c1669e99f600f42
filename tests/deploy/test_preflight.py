"""`flotilla serve` refuses a config that cannot be served before starting anything: one
message naming the field and the numbers, exit code 2, no traceback, no process left."""

from __future__ import annotations

import socket

import pytest
from cli_support import flotilla, marked_env, processes_with

from deploy import preflight
from deploy.config import FlotillaConfig


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# ---- the checks, in process ---------------------------------------------------------------
def test_yaml_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "groups: 1\nserve:\n  http_port: [8000\n")
    with pytest.raises(preflight.ConfigError) as e:
        preflight.load(path)
    assert str(e.value).startswith(f"{path}: line ")
    assert "not valid YAML" in str(e.value)


def test_field_errors_name_the_field_and_the_limit(tmp_path):
    path = _write(tmp_path, "groups: 100\nserve:\n  http_port: 0\n  colour: blue\n")
    with pytest.raises(preflight.ConfigError) as e:
        preflight.load(path)
    lines = e.value.problems
    assert f"{path}: groups: Input should be less than or equal to 64 (got 100)" in lines
    assert f"{path}: serve.http_port: Input should be greater than or equal to 1 (got 0)" in lines
    assert any(
        line.startswith(f"{path}: serve.colour: Extra inputs are not permitted") for line in lines
    )


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(preflight.ConfigError, match="expected a mapping at the top level"):
        preflight.load(_write(tmp_path, "- 1\n- 2\n"))


def test_missing_file(tmp_path):
    with pytest.raises(preflight.ConfigError, match="No such file"):
        preflight.load(str(tmp_path / "nope.yaml"))


def test_overrides_apply_over_the_file(tmp_path):
    cfg = preflight.load(
        _write(tmp_path, "groups: 1\n"), {"groups": 3, "router.policy": "round_robin"}
    )
    assert cfg.groups == 3 and cfg.router.policy == "round_robin"


def test_cpu_demand_counts_groups_ranks_and_routers():
    cfg = FlotillaConfig.model_validate(
        {
            "groups": 2,
            "engine": {"parallel": {"tp": 2, "cpus_per_rank": 0.5}},
            "serve": {"group_num_cpus": 0.25, "ingress_replicas": 2, "ingress_num_cpus": 0.1},
        }
    )
    need, how = preflight.cpu_demand(cfg)
    assert need == pytest.approx(2 * (0.25 + 2 * 0.5) + 2 * 0.1)
    assert "2 ranks x engine.parallel.cpus_per_rank 0.5" in how
    assert preflight.check_cpus(cfg, 2.7, "here") == []
    (problem,) = preflight.check_cpus(cfg, 2.0, "this machine (2 cores)")
    assert (
        problem.startswith("the config reserves 2.7 CPUs (")
        and "this machine (2 cores) has 2" in problem
    )


def test_an_autoscaled_pool_must_fit_at_its_largest_on_one_machine():
    scaled = {"autoscaling": {"max_groups": 4}, "serve": {"group_num_cpus": 0.9}}
    cfg = FlotillaConfig.model_validate(scaled)
    assert preflight.check_cpus(cfg, 2, "here") == []  # it starts with 1 group: fits
    (msg,) = preflight.check_cpus(cfg, 2, "this machine", largest=True)
    assert "3.7 CPUs at autoscaling's max_groups" in msg and "max_groups" in msg
    example = preflight.load(str(preflight_root() / "deploy" / "examples" / "autoscale.yaml"))
    assert preflight.check_cpus(example, 2, "a 2-core machine", largest=True) == []


def preflight_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


def test_busy_port_is_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert preflight.port_problem("127.0.0.1", port) == f"127.0.0.1:{port} is already in use"
    assert preflight.port_problem("127.0.0.1", port) is None


def test_a_foreign_address_is_reported():
    assert "not an address of this machine" in preflight.port_problem("192.0.2.1", 0)


def test_bad_model_path(tmp_path):
    cfg = FlotillaConfig.model_validate({"engine": {"model": {"model": str(tmp_path / "m")}}})
    (problem,) = preflight.check_model(cfg)
    assert problem.startswith("engine.model.model: model ") and "not found" in problem


# ---- the real command ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_fails(tmp_path, yaml_text: str, *extra: str) -> str:
    """Run `flotilla serve` on the config; it must exit 2 with a plain message and start
    nothing. Returns its stderr."""
    ports = f"serve:\n  http_port: {_free_port()}\n  grpc_port: {_free_port()}\n  metrics_export_port: {_free_port()}\n"
    env, mark = marked_env()
    res = flotilla(
        "serve",
        "--config",
        _write(tmp_path, yaml_text.replace("serve:\n", ports, 1)),
        *extra,
        env=env,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stderr.startswith("flotilla: the config cannot be served:\n  - ")
    assert "starting Ray" not in res.stdout
    assert processes_with(mark) == []
    return res.stderr


def test_cli_too_many_groups_for_the_cpus(tmp_path):
    err = _serve_fails(tmp_path, "serve:\n  group_num_cpus: 1.0\n", "--groups", "64")
    assert "the config reserves 64.1 CPUs (64 group(s) x serve.group_num_cpus 1" in err


def test_cli_bad_model_path(tmp_path):
    err = _serve_fails(tmp_path, "serve:\n", "--model", str(tmp_path / "no-such-model"))
    assert "engine.model.model: model " in err and "not found" in err


def test_cli_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _serve_fails(tmp_path, f"serve:\n  http_port: {port}\n")
    assert f"serve.http_port: 127.0.0.1:{port} is already in use" in err


def test_cli_bad_yaml(tmp_path):
    err = _serve_fails(tmp_path, "serve:\ngroups: [1\n")
    assert "not valid YAML" in err


def test_cli_bad_field(tmp_path):
    err = _serve_fails(tmp_path, "serve:\nrouter:\n  policy: fastest\n")
    assert "router.policy: Input should be 'round_robin', 'power_of_two' or 'prefix_aware'" in err
