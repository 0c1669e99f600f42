"""`flotilla --version` and the `flotilla serve` flags: each overrides one YAML field (the
parsed command line -> overrides -> the validated config; no cluster), and a bad value fails
like the same value in the YAML: exit 2 naming the field, before anything starts."""

from __future__ import annotations

from importlib import metadata

import pytest

from deploy import preflight
from deploy.cli import _overrides, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"flotilla {metadata.version('flotilla')}"


def test_serve_flags_map_onto_the_config_fields():
    argv = ["serve", "--host", "0.0.0.0", "--http-port", "8100", "--grpc-port", "9100",
            "--tp", "2", "--pp", "2", "--max-model-len", "512", "--dtype", "bfloat16",
            "--served-model-name", "my-model", "--groups", "2", "--policy", "round_robin"]  # fmt: skip
    overrides = _overrides(build_parser().parse_args(argv))
    assert overrides == {
        "serve.host": "0.0.0.0",
        "serve.http_port": 8100,
        "serve.grpc_port": 9100,
        "engine.parallel.tp": 2,
        "engine.parallel.pp": 2,
        "engine.model.max_model_len": 512,
        "engine.model.dtype": "bfloat16",
        "engine.model.served_name": "my-model",
        "groups": 2,
        "router.policy": "round_robin",
    }
    cfg = preflight.load(None, overrides)
    assert (cfg.serve.host, cfg.serve.http_port, cfg.serve.grpc_port) == ("0.0.0.0", 8100, 9100)
    assert (cfg.engine.parallel.tp, cfg.engine.parallel.pp) == (2, 2)
    assert cfg.engine.model.max_model_len == 512 and cfg.engine.model.dtype == "bfloat16"
    assert cfg.model_name == "my-model"  # what clients send as `model`
    # No flags: no overrides (the YAML, or the defaults, stand).
    assert _overrides(build_parser().parse_args(["serve"])) == {}


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--http-port", "70000"], "serve.http_port"),
        (["--dtype", "float8"], "engine.model.dtype"),
        (["--tp", "0"], "engine.parallel.tp"),
        (["--max-model-len", "4"], "engine.model.max_model_len"),
    ],
)
def test_a_bad_flag_value_exits_2_naming_the_field(capsys, flags, field):
    assert main(["serve", *flags]) == 2
    assert field in capsys.readouterr().err


def test_a_flag_that_is_not_a_number_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--tp", "two"])
    assert e.value.code == 2 and "--tp" in capsys.readouterr().err
