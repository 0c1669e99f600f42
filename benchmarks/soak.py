"""Soak: steady greedy load on a served pool while its groups are killed, bounded in time and
in requests. Does anything fail, drift, leak or grow?

    .venv/bin/python benchmarks/soak.py [--duration-s 600] [--kill-every-s 60] [--clients 4]
        [--groups 2] [--max-tokens 32] [--max-requests 100000] [--model PATH] [--out DIR]

Model: the tiny seeded Llama of the test suite (built into a temporary directory, float32)
unless `--model` names one (a Hugging Face directory or GGUF, `--dtype` auto). Ray and the
Serve app start in this process (ray.init + deploy.app.start, as `flotilla serve` does):
`--groups` colocated groups, 0.5 CPU and one torch thread each, round-robin routing.

  * load: `--clients` threads, each sending greedy gRPC streams back to back (prompts drawn
    from a seeded set of `--num-prompts`, `--max-tokens` out, EOS ignored) until the time or
    the request budget is spent; every output is compared with the offline engine's
    (cluster.engine.LLMEngine on the same config, computed before Ray starts);
  * faults: every `--kill-every-s` a random group's replica actor is killed (ray.kill: the
    process dies at once), once the pool is back to full strength after the previous kill;
  * at the end, once every group is idle and the pool is whole: each group's KV block audit
    (cluster.block_manager.BlockManager.audit, in the groups' stats);
  * all along: the RSS of every Ray process (psutil, every `--sample-s`).

Reported (stdout, and OUT/report.json): requests sent / completed / failed, outputs that
differ from the reference (mismatched), groups killed, leaked blocks, each process's RSS at
the start, end and peak, and the largest growth of a process that lived through the run.
OUT/rss.csv holds the samples, OUT/rss.png plots them (if matplotlib is installed). Target:
0 failed, 0 mismatched, 0 leaked, flat memory. Exit status 1 if any count is not 0.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

META = (("application", "flotilla"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(model: str, dtype: str, args: argparse.Namespace):
    from deploy.config import FlotillaConfig

    return FlotillaConfig.model_validate(
        {
            "engine": {
                "model": {"model": model, "dtype": dtype, "num_threads": 1, "max_model_len": 1024},
                "cache": {"block_size": 16, "num_blocks": 1024},
                "scheduler": {"max_num_seqs": 16, "max_waiting": 64, "hang_timeout_s": 30},
            },
            "groups": args.groups,
            "router": {"policy": "round_robin", "stats_interval_s": 0.2},
            "serve": {
                "http_port": free_port(),
                "grpc_port": free_port(),
                "metrics_export_port": None,
                "group_num_cpus": 0.5,
                "health_check_period_s": 1.0,
                "health_check_timeout_s": 10.0,
                "group_graceful_shutdown_s": 2.0,
            },
        }
    )


def make_prompts(seed: int, n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(8, 64))] for _ in range(n)]


class Counts:
    """Outcome counts, shared by the client threads."""

    def __init__(self, max_requests: int):
        self.lock = threading.Lock()
        self.left = max_requests
        self.n = {"sent": 0, "completed": 0, "failed": 0, "mismatched": 0}
        self.errors: list[str] = []

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            self.n["sent"] += 1
            return True

    def add(self, key: str, error: str | None = None) -> None:
        with self.lock:
            self.n[key] += 1
            if error is not None and len(self.errors) < 20:
                self.errors.append(error)


def client(i: int, stub, prompts, refs, args, counts: Counts, stop: threading.Event) -> None:
    import grpc

    from router.proto import flotilla_pb2 as pb

    rng = random.Random(args.seed * 1000 + i)
    params = pb.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    while not stop.is_set() and counts.take():
        k = rng.randrange(len(prompts))
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompts[k]), params=params)
        ids: list[int] = []
        finish = ""
        try:
            for msg in stub.GenerateStream(req, metadata=META, timeout=args.request_timeout_s):
                ids += msg.token_ids
                finish = msg.finish_reason or finish
        except Exception as e:  # an RPC error: the request failed
            detail = e.details() if isinstance(e, grpc.RpcError) else str(e)  # type: ignore[attr-defined]
            counts.add("failed", f"{type(e).__name__}: {detail}")
            continue
        counts.add("completed" if (ids, finish) == (refs[k], "length") else "mismatched")


class RssSampler(threading.Thread):
    """RSS of this process's descendants (raylet, GCS, every Ray worker and Serve replica)."""

    def __init__(self, every_s: float):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.rows: list[tuple[float, int, str, float]] = []  # (t, pid, label, rss MiB)
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    @staticmethod
    def label(p) -> str:
        cmd = p.cmdline()
        head = cmd[0].split()[0] if cmd and cmd[0] else p.name()
        return head if head.startswith("ray::") else Path(head).name

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        self.t0 = time.monotonic()  # t = 0: the app is up, the load starts
        while not self.stop.is_set():
            t = time.monotonic() - self.t0
            for p in me.children(recursive=True):
                try:
                    self.rows.append((t, p.pid, self.label(p), p.memory_info().rss / 2**20))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.stop.wait(self.every_s)

    def summary(self, warmup_s: float) -> dict[str, Any]:
        """Per process: RSS after the warm-up, at the end, at the peak; and the largest growth
        of a process alive from the warm-up to the end (the ones a leak would show in)."""
        by_pid: dict[int, list[tuple[float, str, float]]] = {}
        for t, pid, label, rss in self.rows:
            by_pid.setdefault(pid, []).append((t, label, rss))
        end = max((r[0] for r in self.rows), default=0.0)
        procs, growth = {}, 0.0
        for pid, rows in by_pid.items():
            settled = [r for r in rows if r[0] >= warmup_s] or rows
            start, last = settled[0], rows[-1]
            procs[f"{last[1]}[{pid}]"] = {
                "start_mib": round(start[2], 1),
                "end_mib": round(last[2], 1),
                "max_mib": round(max(r[2] for r in rows), 1),
                "lived_s": round(last[0] - rows[0][0], 1),
            }
            if rows[0][0] <= warmup_s and last[0] >= end - 2 * self.every_s:
                growth = max(growth, last[2] - start[2])
        return {"processes": procs, "max_growth_mib": round(growth, 1)}

    def write(self, out: Path) -> None:
        with open(out / "rss.csv", "w") as f:
            f.write("t_s,pid,process,rss_mib\n")
            for t, pid, label, rss in self.rows:
                f.write(f"{t:.1f},{pid},{label},{rss:.1f}\n")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(10, 5))
        series: dict[str, tuple[list[float], list[float]]] = {}
        for t, pid, label, rss in self.rows:
            xs, ys = series.setdefault(f"{label}[{pid}]", ([], []))
            xs.append(t)
            ys.append(rss)
        for name, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, label=name, linewidth=1)
        ax.set_xlabel("s")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title("Ray processes during the soak")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "rss.png", dpi=100)
        plt.close(fig)


def group_replicas() -> dict[str, str]:
    """Live replica actors of the colocated pool: name -> Ray namespace."""
    import ray

    return {
        a["name"]: a["namespace"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "#groups#" in a["name"]
    }


def wait_whole(router, n: int, timeout_s: float, idle: bool = False) -> list[dict] | None:
    """The groups' stats once `n` are healthy (and, with `idle`, none runs anything for three
    polls in a row), or None after `timeout_s`."""
    deadline, quiet = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        gs = router.group_stats.remote().result(timeout_s=30)
        # A group the router has just registered has no stats until its first poll: not whole.
        whole = len(gs) == n and all(
            g["healthy"] and not g["draining"] and "num_running" in g for g in gs
        )
        busy = any(g.get("num_running") or g.get("num_waiting") for g in gs)
        quiet = quiet + 1 if whole and not busy else 0
        if whole and (not idle or quiet >= 3):
            return gs
        time.sleep(0.2)
    return None


def killer(router, args, stop: threading.Event, kills: list[str]) -> None:
    import ray

    rng = random.Random(args.seed)
    while not stop.wait(args.kill_every_s):
        if wait_whole(router, args.groups, args.kill_every_s) is None:
            continue  # the last kill's replacement is not up yet: no kill this round
        if stop.is_set():
            return
        name, namespace = rng.choice(sorted(group_replicas().items()))
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            kills.append(name)
        except ValueError:  # gone meanwhile
            pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    import ray
    from ray.serve.context import _set_global_client

    from cluster.engine import LLMEngine
    from deploy.app import runtime_env, start
    from router.proto import flotilla_pb2_grpc as pb_grpc
    from workers.sampling_params import SamplingParams

    tmp = tempfile.TemporaryDirectory(prefix="flotilla-soak-")
    if args.model is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from gpu_smoke import make_model

        model, dtype = make_model("llama", tmp.name), "float32"
    else:
        model, dtype = args.model, args.dtype
    cfg = make_config(model, dtype, args)
    engine = LLMEngine(cfg.engine)
    prompts = make_prompts(args.seed, args.num_prompts, min(engine.vocab_size, 32000))
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    refs = [o.token_ids for o in engine.generate(prompts, greedy)]
    engine.shutdown()
    del engine

    args.out.mkdir(parents=True, exist_ok=True)
    rss = RssSampler(args.sample_s)
    counts = Counts(args.max_requests)
    kills: list[str] = []
    stop = threading.Event()
    t_start = time.monotonic()
    # address="local": a cluster of this run's own (never one found by RAY_ADDRESS or a `ray
    # start` on this machine), so that ray.shutdown() below ends all of it.
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=runtime_env(cfg),
    )
    try:
        router = start(cfg)
        startup_s = time.monotonic() - t_start
        rss.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{cfg.serve.grpc_port}")
        stub = pb_grpc.FlotillaStub(channel)
        threads = [
            threading.Thread(target=client, args=(i, stub, prompts, refs, args, counts, stop))
            for i in range(args.clients)
        ]
        threads.append(threading.Thread(target=killer, args=(router, args, stop, kills)))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        stop.wait(args.duration_s)
        stop.set()
        for t in threads:
            t.join(timeout=args.request_timeout_s + 60)
        load_s = time.monotonic() - t0
        groups = wait_whole(router, args.groups, 180, idle=True)
        settle_s = time.monotonic() - t0 - load_s
        rss.stop.set()
        rss.join(timeout=10)
        channel.close()
    finally:
        # ray.shutdown() ends the cluster this run started, the app with it: a serve.shutdown()
        # first would only add its graceful drain (~6 s). The driver's cached Serve client
        # goes too, for a caller (tests) that starts Serve again in this process.
        ray.shutdown()
        _set_global_client(None)
        tmp.cleanup()
    blocks = {g["name"]: g["blocks"] for g in groups or []}
    unbalanced = [
        n for n, b in blocks.items() if b["free"] + b["cached"] + b["in_use"] != b["total"]
    ]
    report = {
        "model": args.model or "tiny seeded llama (tests' shapes)",
        "startup_s": round(startup_s, 1),
        "load_s": round(load_s, 1),
        "settle_s": round(settle_s, 1),  # until the pool was whole and idle again
        **counts.n,
        "kills": len(kills),
        # a pool that never became whole and idle again cannot be audited: count it as a leak
        "leaked_blocks": sum(b["leaked"] for b in blocks.values()) if groups else -1,
        "unbalanced_groups": unbalanced,
        "blocks": blocks,
        "errors": counts.errors,
        "rss": rss.summary(warmup_s=min(10.0, args.duration_s / 4)),
    }
    rss.write(args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration-s", type=float, default=600.0, help="load time")
    p.add_argument("--max-requests", type=int, default=100_000, help="request budget")
    p.add_argument("--kill-every-s", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--model", default=None, help="default: the tiny seeded Llama")
    p.add_argument("--dtype", default="auto", help="with --model")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "soak")
    return p


def main(argv: list[str] | None = None) -> int:
    report = run(parser().parse_args(argv))
    short = {k: v for k, v in report.items() if k not in ("blocks", "rss")}
    print(json.dumps(short, indent=1))
    print(f"RSS: largest growth of a process alive all run: {report['rss']['max_growth_mib']} MiB")
    for name, r in sorted(report["rss"]["processes"].items()):
        print(f"  {name:48s} start {r['start_mib']:7.1f}  end {r['end_mib']:7.1f}  "
              f"max {r['max_mib']:7.1f} MiB  ({r['lived_s']:.0f} s)")  # fmt: skip
    bad = (
        report["failed"]
        or report["mismatched"]
        or report["leaked_blocks"]
        or report["unbalanced_groups"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
