"""A stand-in for a replica group in the autoscaling test: it reports, as its queue, the number
written in a file, so the test can raise and drop the load without running requests. The
replica gets the class by value (the decorator rebinds its name to the Deployment, so
cloudpickle cannot pickle it by reference); tests/deploy is not on the workers' sys.path."""

from __future__ import annotations

from pathlib import Path

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_timeout_s=0.5)
class LoadReporter:
    def __init__(self, load_file: str):
        self.load_file = Path(load_file)

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = float(self.load_file.read_text() or 0)
        return {"num_running": load, "num_waiting": 0.0}

    def __call__(self) -> str:
        return "ok"
