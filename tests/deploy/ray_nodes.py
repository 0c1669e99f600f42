"""A real multi-node Ray cluster on loopback, started with `ray start` and stopped without
`ray stop` (which ends every Ray process of the machine, other people's clusters included).

Every process of the cluster carries a marker in its environment (cli_support.marked_env), and
Ray passes its environment down from `ray start` to the GCS, raylets, dashboard, agents and
workers; stopping sends SIGTERM to the marked processes, waits, then SIGKILLs what is left. The
cluster has its own --temp-dir, its own token (RAY_AUTH_TOKEN: ~/.ray/auth_token is left
alone) and its own ports, so it shares nothing with another cluster on the machine.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli_support import kill_marked, marked_env, processes_with, wait_gone

_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this process: the kernel may give a
    closed port again, and one node's flags then name the same port twice (ray start fails)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class LoopbackCluster:
    """Head + workers on 127.0.0.1; `nodes` is [(num_cpus, custom resources)], head first."""

    def __init__(self, nodes: list[tuple[float, dict[str, float]]], pythonpath: list[Path]):
        self.nodes = nodes
        # Short: Ray's unix socket paths under it must stay within 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="fl-", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env, self.mark = marked_env(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
            RAY_USAGE_STATS_ENABLED="0",
            # The checkout under test, ahead of the venv's editable install of another one.
            PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath),
        )
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str) -> None:
        ray_bin = str(Path(sys.executable).parent / "ray")
        r = subprocess.run(
            [ray_bin, "start", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")

    def _node_args(self, cpus: float, resources: dict[str, float]) -> list[str]:
        # Every port of its own: three nodes share one IP, and other clusters may run here.
        base = random.randrange(20000, 30000, 100)  # below the ephemeral range
        return [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus:g}",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=100000000",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={base}",
            f"--max-worker-port={base + 99}",
            "--disable-usage-stats",
        ]

    def start(self) -> None:
        (cpus, res), *workers = self.nodes
        self._ray(
            "--head",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            *self._node_args(cpus, res),
        )
        for cpus, res in workers:
            self._ray(f"--address={self.address}", *self._node_args(cpus, res))

    def stop(self, timeout_s: float = 10.0) -> list[int]:
        """SIGTERM every process of the cluster, SIGKILL what is left after timeout_s (as `ray
        stop` does after its grace period: with the others gone, the GCS and raylets keep
        waiting for each other); returns the survivors (should be none)."""
        for pid in processes_with(self.mark):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        left = wait_gone(self.mark, timeout_s)
        if left:
            kill_marked(self.mark)
            left = wait_gone(self.mark, 10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    def wait_nodes(self, timeout_s: float = 60.0) -> None:
        """Until every node is registered (a worker's `ray start` returns before that)."""
        script = (
            "import ray; ray.init(address='auto', logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.monotonic() + timeout_s
        while True:
            r = subprocess.run(
                [sys.executable, "-c", script],
                env=self.env | {"RAY_ADDRESS": self.address},
                capture_output=True,
                text=True,
                timeout=60,
            )
            if r.stdout.strip() == str(len(self.nodes)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{r.stdout.strip()} node(s) alive:\n{r.stderr[-2000:]}")
            time.sleep(1.0)
