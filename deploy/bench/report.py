"""Results out: `results.json` (settings, one summary per run, every request's record), PNG
plots (matplotlib, Agg backend) and the text table printed at the end.

    results.json           {"meta": ..., "runs": [{"load", "summary", "requests"}, ...]}
    latency_cdf.png        CDFs of TTFT, ITL and end-to-end latency, one line per run
    throughput_vs_rate.png output tokens/s, requests/s and goodput vs offered rate (sweeps)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.bench.metrics import itl_samples
from deploy.bench.runner import RunResult

RESULTS_JSON, CDF_PNG, SWEEP_PNG = "results.json", "latency_cdf.png", "throughput_vs_rate.png"


def run_label(load: dict[str, Any]) -> str:
    if load.get("rate") is not None:
        return f"rate {load['rate']}/s"
    return f"concurrency {load.get('concurrency')}"


def write_json(out: Path, meta: dict[str, Any], runs: list[tuple[RunResult, dict]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "runs": [
            {
                "load": run.load.describe(),
                "summary": summary,
                "requests": [r.to_json() for r in run.results],
            }
            for run, summary in runs
        ],
    }
    path = out / RESULTS_JSON
    path.write_text(json.dumps(doc, indent=1))
    return path


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label)


def write_plots(out: Path, runs: list[tuple[RunResult, dict]], title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run, _ in runs:
        ok = [r for r in run.results if r.ok]
        label = run_label(run.load.describe())
        _cdf(axes[0], [1000 * r.ttft for r in ok if r.ttft is not None], label)
        itls = [1000 * x for r in ok for x in itl_samples(r.chunk_times, r.chunk_tokens)]
        _cdf(axes[1], itls, label)
        _cdf(axes[2], [1000 * r.e2e for r in ok if r.e2e is not None], label)
    for ax, name in zip(axes, ("TTFT", "ITL", "end-to-end latency"), strict=True):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of tokens")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths.append(out / CDF_PNG)
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    rated = [(run, s) for run, s in runs if run.load.rate is not None]
    if len(rated) > 1:
        # Categorical x: sweep points evenly spaced, so an `inf` point has a place too.
        xs = list(range(len(rated)))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines = ax.plot(xs, [s["output_token_throughput"] for _, s in rated], "o-", c="C0")
        ax.set_xticks(xs, [str(run.load.describe()["rate"]) for run, _ in rated])
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel("output tokens/s")
        ax2 = ax.twinx()
        lines += ax2.plot(xs, [s["request_throughput"] for _, s in rated], "s--", c="C1")
        labels = ["output tok/s", "completed req/s"]
        if all("goodput" in s for _, s in rated):
            lines += ax2.plot(xs, [s["goodput"]["goodput_rps"] for _, s in rated], "^:", c="C2")
            labels.append("goodput req/s")
        ax2.set_ylabel("requests/s")
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
        ax.legend(lines, labels, loc="lower right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / SWEEP_PNG)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def table(runs: list[tuple[RunResult, dict]]) -> str:
    """A compact text table: one block per run."""
    lines = []
    for run, s in runs:
        lines.append(f"== {run_label(run.load.describe())} ==")
        lines.append(
            f"requests: {s['completed']} ok, {s['failed']} failed, {s['not_sent']} not sent "
            f"in {s['duration_s']:.2f} s"
        )
        for code, n in s["errors"].items():
            lines.append(f"  error {code}: {n}  (e.g. {s['error_samples'].get(code, '')[:120]})")
        lines.append(
            f"throughput: {s['request_throughput']:.2f} req/s, "
            f"{s['output_token_throughput']:.1f} output tok/s, "
            f"{s['total_token_throughput']:.1f} total tok/s "
            f"({s['input_tokens']} in / {s['output_tokens']} out tokens)"
        )
        lines.append(f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            d = s[key]
            row = "".join(f"{_fmt(d.get(k)):>10}" for k in ("mean", "p50", "p90", "p99"))
            lines.append(f"{key[:-3].upper():<6}{row}")
        if "goodput" in s:
            g = s["goodput"]
            lines.append(
                f"goodput: {g['goodput_rps']:.2f} req/s ({g['good']} good = "
                f"{100 * g['good_fraction']:.0f}%; TTFT <= {_fmt(g['slo_ttft_ms'])} ms, "
                f"{g['itl_stat']} ITL <= {_fmt(g['slo_itl_ms'])} ms)"
            )
        if s["usage_mismatches"]:
            lines.append(f"WARNING: {s['usage_mismatches']} streams disagree with their usage")
    return "\n".join(lines)
