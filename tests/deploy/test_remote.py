"""deploy/remote.py without a cluster: the merge that keeps other applications, the delete
config, the proxy-option warnings and the wait (progress lines, DEPLOY_FAILED, timeout)."""

from __future__ import annotations

import pytest

from deploy import remote, serve_config
from deploy.config import FlotillaConfig

CFG = FlotillaConfig.model_validate({"groups": 2})
OURS = serve_config.build(CFG)
OTHER = {"name": "other", "import_path": "x:app", "route_prefix": "/x"}


def details(apps: dict, running: bool = True) -> dict:
    base = {"controller_info": {"node_id": "n"}} if running else {"controller_info": {}}
    return base | {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "grpc_options": {"port": 9000, "grpc_servicer_functions": []},
        "applications": apps,
    }


def app(status="RUNNING", t=1.0, source="declarative", config=None, deployments=None) -> dict:
    return {
        "status": status,
        "source": source,
        "message": "",
        "last_deployed_time_s": t,
        "deployed_app_config": config,
        "deployments": deployments or {},
    }


def dep(running: int, target: int, status="HEALTHY", other_state: str | None = None) -> dict:
    replicas = [{"replica_id": f"r{i}", "state": "RUNNING"} for i in range(running)]
    if other_state:
        replicas.append({"replica_id": "x", "state": other_state})
    return {"status": status, "target_num_replicas": target, "replicas": replicas}


def test_merge_keeps_other_declarative_apps_and_replaces_ours():
    d = details(
        {
            "other": app(config=OTHER),
            "imperative": app(source="imperative"),
            "flotilla": app(config={"name": "flotilla", "import_path": "old"}),
        }
    )
    config, kept = remote.merged(d, OURS)
    assert kept == ["other"]
    assert config["applications"] == [OTHER, OURS["applications"][0]]
    assert config["http_options"] == OURS["http_options"]

    gone = remote.without(d, "flotilla")
    assert gone["applications"] == [OTHER]
    assert gone["http_options"] == d["http_options"]  # as Serve runs them: no warning


def test_proxy_warnings_only_when_serve_runs_with_other_options():
    cfg = serve_config.build(FlotillaConfig.model_validate({"serve": {"http_port": 8100}}))
    assert remote.proxy_warnings(details({}, running=False), cfg) == []
    (w,) = remote.proxy_warnings(details({}), cfg)
    assert "http_options.port = 8000" in w and "8100 is ignored" in w
    assert remote.proxy_warnings(details({}), OURS) == []


class FakeRest:
    def __init__(self, states: list[dict]):
        self.states = states

    def get_serve_details(self) -> dict:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def healthy(t: float) -> dict:
    return app(
        t=t,
        deployments={"router": dep(1, 1), "registry": dep(1, 1), "groups": dep(2, 2)},
    )


def test_wait_reports_progress_then_ready(monkeypatch):
    monkeypatch.setattr(remote, "group_stats", lambda name, timeout_s=10.0: None)
    rest = FakeRest(
        [
            details({"flotilla": healthy(t=1.0)}),  # not taken yet: the state before the PUT
            details(
                {
                    "flotilla": app(
                        status="DEPLOYING",
                        t=2.0,
                        deployments={"router": dep(0, 1, "UPDATING", "STARTING")},
                    )
                }
            ),
            details({"flotilla": healthy(t=2.0)}),
        ]
    )
    lines: list[str] = []
    remote.wait_ready(rest, OURS, before=1.0, timeout_s=10, report=lines.append, poll_s=0)
    assert lines[0] == "deployment router: 0/1 replicas running (1 starting) [UPDATING]"
    assert "deployment groups: 2/2 replicas running [HEALTHY]" in lines


def test_wait_stops_on_deploy_failed_with_serves_message(monkeypatch):
    monkeypatch.setattr(remote, "group_stats", lambda name, timeout_s=10.0: None)
    failed = app(status="DEPLOY_FAILED", t=2.0) | {"message": "ImportError: no module x"}
    rest = FakeRest([details({"flotilla": failed})])
    with pytest.raises(remote.DeployError, match="DEPLOY_FAILED(.|\n)*no module x"):
        remote.wait_ready(rest, OURS, before=1.0, timeout_s=10, report=print, poll_s=0)


def test_wait_is_bounded(monkeypatch):
    monkeypatch.setattr(remote, "group_stats", lambda name, timeout_s=10.0: None)
    rest = FakeRest([details({"flotilla": app(status="DEPLOYING", t=2.0)})])
    with pytest.raises(remote.DeployError, match="not ready after 0.2 s"):
        remote.wait_ready(rest, OURS, before=None, timeout_s=0.2, report=print, poll_s=0.05)
