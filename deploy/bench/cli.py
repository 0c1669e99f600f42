"""`flotilla bench`: benchmark a Flotilla gRPC endpoint or any OpenAI-compatible HTTP server.

    flotilla bench --endpoint grpc://127.0.0.1:9000 | http://127.0.0.1:8000
                   [--model NAME] [--tokenizer DIR] --workload random|long-mix|chat
                   --num-requests N (--concurrency C | --rate R | --rates 1,2,4) [--duration-s D]
                   --input-len SPEC --output-len SPEC --seed S
                   [--slo-ttft-ms MS --slo-itl-ms MS --slo-itl-stat mean|p99] --out DIR

Lifecycle: check flags (argparse errors exit 2) -> bounded health probe of the endpoint (exit 2
when unreachable) -> pick the model (the first one served unless --model) -> build the seeded
workload -> warm-up requests (not measured) -> one run, or one run per --rates entry -> print
the table, write DIR/results.json and PNG plots. Exit 0 when at least one request of every
run succeeded, 1 otherwise; failed requests are always counted under their code.
Imports here are light on purpose: `flotilla serve` loads this module to register the command.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from deploy.bench.clients import EndpointError, SendOptions, make_client, parse_endpoint
from deploy.bench.tokenizer import NoTokenizer, find_tokenizer
from deploy.bench.workloads import WORKLOADS, LengthDist, Vocab, WorkloadConfig


def _positive(kind: type, what: str, allow_inf: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not value > 0 or (math.isinf(value) and not allow_inf) or math.isnan(value):
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {text!r}")
        return value

    return parse


def _length(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rates(text: str) -> list[float]:
    rate = _positive(float, "every --rates entry", allow_inf=True)
    return [rate(x.strip()) for x in text.split(",") if x.strip()] or [rate("")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    pint, pfloat = _positive(int, "the value"), _positive(float, "the value")
    p.add_argument("--endpoint", required=True, help="grpc://HOST:PORT or http(s)://HOST:PORT")
    p.add_argument("--model", help="model name sent with each request (default: the served one)")
    p.add_argument(
        "--tokenizer",
        help="HF model dir, tokenizer.json or .gguf (default: the served model's own, when it "
        "is a local path or the default model)",
    )
    p.add_argument("--label", default="", help="name of the system under test, for the report")
    p.add_argument("--workload", choices=WORKLOADS, default="random")
    p.add_argument("--num-requests", type=pint, default=100, help="requests per run")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=pint, help="closed loop: requests in flight")
    load.add_argument("--rate", type=_positive(float, "--rate", True), help="Poisson req/s (inf)")
    load.add_argument("--rates", type=_rates, help="sweep: comma-separated rates, one run each")
    p.add_argument("--max-concurrency", type=pint, help="cap on in-flight requests under --rate")
    p.add_argument("--duration-s", type=pfloat, help="stop sending after this long (per run)")
    p.add_argument(
        "--input-len",
        type=_length,
        default=LengthDist("fixed", 128),
        help="N | uniform:LO,HI | normal:MEAN,STD (prompt tokens; chat: per user turn)",
    )
    p.add_argument("--output-len", type=_length, default=LengthDist("fixed", 64))
    p.add_argument("--long-input-len", type=_length, default=LengthDist("fixed", 1024))
    p.add_argument("--long-fraction", type=float, default=0.25, help="long-mix: share of long")
    p.add_argument("--prefix-len", type=pint, default=256, help="chat: shared system prompt")
    p.add_argument("--turns", type=pint, default=4, help="chat: turns per conversation")
    p.add_argument("--prompt-format", choices=["ids", "text"], default="ids")
    p.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="HTTP endpoint for random / long-mix prompts (chat needs text)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at EOS (default: exactly --output-len tokens)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests before each run")
    p.add_argument("--slo-ttft-ms", type=pfloat, help="goodput: TTFT objective")
    p.add_argument("--slo-itl-ms", type=pfloat, help="goodput: ITL objective")
    p.add_argument(
        "--slo-itl-stat",
        choices=["mean", "p99"],
        default="mean",
        help="which per-request ITL the ITL objective bounds",
    )
    p.add_argument("--request-timeout-s", type=pfloat, default=300.0)
    p.add_argument("--probe-timeout-s", type=pfloat, default=10.0, help="health probe bound")
    p.add_argument("--app-name", default="flotilla", help="gRPC: Serve application ('' = none)")
    p.add_argument("--out", default="bench-results", help="directory for JSON and PNG files")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def check(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Cross-flag checks; p.error exits 2."""
    try:
        parse_endpoint(args.endpoint)
    except ValueError as e:
        p.error(str(e))
    if not 0 <= args.long_fraction <= 1:
        p.error(f"--long-fraction must be in [0, 1], got {args.long_fraction}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_concurrency and args.rate is None and args.rates is None:
        p.error("--max-concurrency only applies with --rate or --rates")
    if args.api == "chat" and args.prompt_format == "ids" and args.workload != "chat":
        p.error("--api chat sends text: add --prompt-format text")


def _workload(args: argparse.Namespace, seed: int, n: int) -> WorkloadConfig:
    return WorkloadConfig(
        kind=args.workload,
        num_requests=n,
        input_len=args.input_len,
        output_len=args.output_len,
        prompt_format="text" if args.workload == "chat" else args.prompt_format,
        long_input_len=args.long_input_len,
        long_fraction=args.long_fraction,
        prefix_len=args.prefix_len,
        turns=args.turns,
        seed=seed,
    )


async def _bench(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from deploy.bench import report
    from deploy.bench.metrics import Slo, summarize
    from deploy.bench.runner import Load, run_load
    from deploy.bench.workloads import build

    client = make_client(args.endpoint, args.app_name)
    await client.open()
    try:
        try:
            served = await client.probe(args.probe_timeout_s)
        except EndpointError as e:
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            return 2
        model = args.model or (served[0] if served else "")
        if args.model and served and args.model not in served:
            print(
                f"{p.prog}: error: --model {args.model!r} not served; the endpoint serves {served}",
                file=sys.stderr,
            )
            return 2
        try:
            tok = find_tokenizer(args.tokenizer, model)
        except NoTokenizer as e:
            p.error(str(e))
        try:
            vocab = Vocab.from_tokenizer(tok)
        except Exception as e:  # a directory without tokenizer.json, a corrupt file
            p.error(f"tokenizer {tok!r}: {e}")
        opts = SendOptions(
            model=model,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            request_timeout_s=args.request_timeout_s,
            api=args.api,
        )
        if args.rates:
            loads = [
                Load(rate=r, max_concurrency=args.max_concurrency, duration_s=args.duration_s)
                for r in args.rates
            ]
        else:
            loads = [
                Load(
                    concurrency=None if args.rate else (args.concurrency or 1),
                    rate=args.rate,
                    max_concurrency=args.max_concurrency,
                    duration_s=args.duration_s,
                )
            ]
        slo = Slo(
            ttft=args.slo_ttft_ms / 1000 if args.slo_ttft_ms else None,
            itl=args.slo_itl_ms / 1000 if args.slo_itl_ms else None,
            itl_stat=args.slo_itl_stat,
        )
        runs = []
        for i, load in enumerate(loads):
            seed = args.seed + i  # fresh prompts per sweep point: no cross-point cache hits
            if args.warmup:
                warm = build(_workload(args, seed + 1_000_003, args.warmup), vocab)
                await run_load(client, warm, opts, Load(concurrency=1), progress=False)
            specs = build(_workload(args, seed, args.num_requests), vocab)
            desc = report.run_label(load.describe())
            run = await run_load(client, specs, opts, load, seed, not args.no_progress, desc)
            runs.append((run, summarize(run.results, run.duration_s, slo, run.not_sent)))
    finally:
        await client.close()

    out = Path(args.out)
    meta = _meta(args, model, client.backend, _workload(args, args.seed, args.num_requests), opts)
    print(report.table(runs))
    written = [report.write_json(out, meta, runs)]
    if not args.no_plots:
        title = f"{args.label or Path(model).name or model} via {args.endpoint}"
        written += report.write_plots(out, runs, title)
    print("wrote " + ", ".join(str(w) for w in written), file=sys.stderr)
    return 0 if all(s["completed"] > 0 for _, s in runs) else 1


def _meta(args, model: str, backend: str, workload: WorkloadConfig, opts: SendOptions) -> dict:
    meta: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "endpoint": args.endpoint,
        "backend": backend,
        "label": args.label,
        "model": model,
        "workload": workload.describe(),
        "temperature": opts.temperature,
        "ignore_eos": opts.ignore_eos,
        "api": "grpc GenerateStream" if backend == "grpc" else opts.api,
        "slo": {
            "ttft_ms": args.slo_ttft_ms,
            "itl_ms": args.slo_itl_ms,
            "itl_stat": args.slo_itl_stat,
        },
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return meta


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    check(args, p)
    return asyncio.run(_bench(args, p))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench` to the `flotilla` command's subparsers."""
    b = sub.add_parser(
        "bench",
        help="benchmark a gRPC or OpenAI-compatible HTTP endpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(b)
    b.set_defaults(func=lambda args: run(args, b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="flotilla bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run(p.parse_args(argv), p)
