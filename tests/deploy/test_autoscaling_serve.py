"""A real Serve controller runs GroupAutoscalingPolicy from serve_autoscaling_config: a deployment
grows from 1 to 2 replicas while its replicas report a long queue and shrinks back to 1 when it
drops. Polls serve.status() until a bounded deadline."""

from __future__ import annotations

import time

import pytest
from app_fixtures import stop_local_cluster

from deploy.autoscaling import AutoscalingSpec, serve_autoscaling_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

APP, DEPLOYMENT = "autoscale-test", "LoadReporter"
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def serve_cluster():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start()
        yield serve
    finally:
        stop_local_cluster()


def _running(serve) -> tuple[int, int]:
    """(RUNNING replicas, all replicas) of the deployment."""
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0, 0
    states = app.deployments[DEPLOYMENT].replica_states
    return states.get("RUNNING", 0), sum(states.values())


def _wait_for(serve, want: int) -> tuple[int, int]:
    deadline = time.monotonic() + DEADLINE_S
    seen = _running(serve)
    while seen != (want, want) and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = _running(serve)
    return seen


def test_serve_scales_a_pool_up_and_down_with_its_queue(serve_cluster, tmp_path):
    from autoscale_support import LoadReporter

    serve = serve_cluster
    load = tmp_path / "load"
    load.write_text("0")
    spec = AutoscalingSpec(
        min_groups=1,
        max_groups=2,
        target=4,
        upscale_delay_s=0,
        downscale_delay_s=1,
        cooldown_s=1,
        metrics_interval_s=0.5,
        look_back_period_s=2,
    )
    app = LoadReporter.options(autoscaling_config=serve_autoscaling_config(spec)).bind(str(load))
    serve.run(app, name=APP, route_prefix=None)
    assert _wait_for(serve, 1) == (1, 1)

    load.write_text("10")  # 10 per group, target 4: wants 3, capped at max_groups 2
    assert _wait_for(serve, 2) == (2, 2)

    load.write_text("0")
    assert _wait_for(serve, 1) == (1, 1)
    serve.delete(APP)
