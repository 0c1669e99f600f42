"""Interference (issue 18): streaming decodes while long prompts arrive at a steady rate, served
colocated (1 group, 2 threads) and disaggregated (1 prefill + 1 decode group, 1 thread each),
one server after the other in one run, same seeded requests.

    .venv/bin/python benchmarks/interference.py                      # both, ~11 min
    .venv/bin/python benchmarks/interference.py --systems pd --duration-s 30   # a quick look

Load, over gRPC (`flotilla serve`, SmolLM2-135M from .peers/smollm2-hf, made by
offline_throughput.py):
  * decode streams: a closed loop of --streams requests, each a fresh random prompt of 64-128
    token ids and --stream-output greedy tokens (EOS ignored); when one ends the next starts.
    The streams start --warmup-s / --streams apart and their lengths vary, so that they do not
    end (and send their next prompts) all at once: a steady decode batch, not generations;
  * long prompts: one every --long-every-s seconds (steady, not Poisson) of --long-input-len
    token ids and --long-output tokens. On `pd` they go through the prefill group (they are
    past --pd-min-prompt-tokens); the streams' short prompts are prefilled on the decode group.
Measured in the window [--warmup-s, --duration-s] of the send phase (the streams' first prompts
arrive together, which is not the steady state): the streams' inter-token gaps whose later
token arrived in the window; output tokens/s = every token (streams and long prompts) that
arrived in the window / its length; the long prompts' TTFT. Requests still in flight at the
end finish before the server stops; tokens after the window are not counted.
Writes benchmarks/out/interference/{<system>.json,<system>.log,summary.md}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving_sweep as sweep  # noqa: E402  (server start/stop shared with the sweep)

from deploy.bench.clients import SendOptions, make_client  # noqa: E402
from deploy.bench.metrics import distribution  # noqa: E402
from deploy.bench.records import RequestResult, RequestSpec  # noqa: E402
from deploy.bench.workloads import LengthDist, Vocab  # noqa: E402

SYSTEMS = {"colocated": False, "pd": True}


async def drive(endpoint: str, args, vocab: Vocab) -> tuple[list[RequestResult], list]:
    """Runs the load; returns (stream results, long-prompt results), times from the start."""
    client = make_client(endpoint, "flotilla")
    await client.open()
    try:
        await client.probe(30)
        opts = SendOptions(temperature=0.0, ignore_eos=True, request_timeout_s=600)
        rng = random.Random(args.seed)
        ids = itertools.count()

        def spec(n: int, out: int) -> RequestSpec:
            prompt = tuple(rng.choice(vocab.pool) for _ in range(n))
            return RequestSpec(next(ids), out, n, prompt_ids=prompt)

        await client.send(spec(32, 4), opts)  # warm the path (first-call costs), not measured
        streams: list[RequestResult] = []
        longs: list[RequestResult] = []
        t0 = time.perf_counter()
        end = t0 + args.duration_s

        async def one(s: RequestSpec, into: list[RequestResult]) -> None:
            sent = time.perf_counter()
            r = await client.send(s, opts)
            r.start = sent - t0
            into.append(r)

        async def stream_worker(k: int) -> None:
            await asyncio.sleep(k * args.warmup_s / args.streams)
            while time.perf_counter() < end:
                await one(spec(rng.randint(64, 128), args.stream_output.sample(rng)), streams)

        async def long_sender() -> None:
            tasks, at = [], t0 + args.long_start_s
            while at < end:
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                s = spec(args.long_input_len.sample(rng), args.long_output)
                tasks.append(asyncio.ensure_future(one(s, longs)))
                at += args.long_every_s
            await asyncio.gather(*tasks)

        await asyncio.gather(*(stream_worker(k) for k in range(args.streams)), long_sender())
        return streams, longs
    finally:
        await client.close()


def arrivals(r: RequestResult) -> list[tuple[float, int]]:
    """(arrival time from the run's start, tokens) of each streamed chunk."""
    counts = r.chunk_tokens if r.chunk_tokens is not None else [1] * len(r.chunk_times)
    return [(r.start + t, k) for t, k in zip(r.chunk_times, counts, strict=True)]


def summarize(streams, longs, args) -> dict:
    lo, hi = args.warmup_s, args.duration_s
    gaps: list[float] = []
    for r in streams:
        a = arrivals(r)
        for (prev, _), (at, k) in zip(a, a[1:], strict=False):
            if lo <= at <= hi:
                gaps.extend([(at - prev) / k] * k)
    tokens = sum(k for r in streams + longs for at, k in arrivals(r) if lo <= at <= hi)
    stream_tokens = sum(k for r in streams for at, k in arrivals(r) if lo <= at <= hi)
    long_ttft = [r.ttft for r in longs if r.ok and r.ttft is not None and lo <= r.start <= hi]
    return {
        "window_s": hi - lo,
        "stream_itl_ms": distribution(gaps),
        "output_tok_s": tokens / (hi - lo),
        "stream_tok_s": stream_tokens / (hi - lo),
        "long_ttft_ms": distribution(long_ttft),
        "requests": {
            "streams": len(streams),
            "longs": len(longs),
            "failed": sum(not r.ok for r in streams + longs),
        },
    }


def run_system(name: str, args, vocab: Vocab) -> dict:
    log_path = args.out / f"{name}.log"
    with open(log_path, "w") as log:
        proc = sweep.start_flotilla(args, log, pd=SYSTEMS[name])
        try:
            url = f"http://127.0.0.1:{args.http_port}/health"
            sweep.wait_ready(url, proc, args.startup_timeout_s)
            print(f"### {name}: serving; load for {args.duration_s:g} s", flush=True)
            streams, longs = asyncio.run(drive(f"grpc://127.0.0.1:{args.grpc_port}", args, vocab))
        finally:
            sweep.stop(proc)
    doc = {"system": name, "summary": summarize(streams, longs, args)}
    doc["streams"] = [r.to_json() for r in streams]
    doc["longs"] = [r.to_json() for r in longs]
    (args.out / f"{name}.json").write_text(json.dumps(doc))
    return doc["summary"]


def table(sums: dict[str, dict]) -> str:
    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    rows = [
        "| system | out tok/s (streams) | stream ITL p50/p90/p99/max ms | long TTFT p50/max ms "
        "| streams / long prompts / failed |",
        "|---|---|---|---|---|",
    ]
    for name, s in sums.items():
        i, t, n = s["stream_itl_ms"], s["long_ttft_ms"], s["requests"]
        rows.append(
            f"| {name} | {s['output_tok_s']:.1f} ({s['stream_tok_s']:.1f}) | "
            f"{f(i['p50'])}/{f(i['p90'])}/{f(i['p99'])}/{f(i['max'])} | "
            f"{f(t['p50'])}/{f(t['max'])} | {n['streams']} / {n['longs']} / {n['failed']} |"
        )
    if {"colocated", "pd"} <= sums.keys():
        c, p = sums["colocated"], sums["pd"]
        rows.append(
            f"\npd / colocated: stream ITL p99 {p['stream_itl_ms']['p99'] / c['stream_itl_ms']['p99']:.2f}x "
            f"(issue 18's target <= 0.33x), output tok/s {p['output_tok_s'] / c['output_tok_s']:.2f}x "
            "(target >= 0.8x)"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--systems", default="colocated,pd", help="subset of colocated,pd")
    p.add_argument("--duration-s", type=float, default=200.0, help="send phase per system")
    p.add_argument("--warmup-s", type=float, default=20.0)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stream-output", type=LengthDist.parse, default="uniform:64,192")
    p.add_argument("--long-every-s", type=float, default=20.0)
    p.add_argument("--long-start-s", type=float, default=5.0)
    p.add_argument("--long-input-len", type=LengthDist.parse, default="uniform:1024,2048")
    p.add_argument("--long-output", type=int, default=32)
    p.add_argument("--pd-min-prompt-tokens", type=int, default=512)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=2304)
    p.add_argument("--flotilla-scheduler", default="{}", help="engine.scheduler overrides, JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpc-port", type=int, default=19210)
    p.add_argument("--http-port", type=int, default=18210)
    p.add_argument("--metrics-port", type=int, default=18290)
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=sweep.ROOT / "benchmarks" / "out" / "interference")
    args = p.parse_args()
    names = [s for s in args.systems.split(",") if s]
    if set(names) - SYSTEMS.keys() or not sweep.HF_DIR.is_dir():
        p.error(f"systems must be among {list(SYSTEMS)}, and {sweep.HF_DIR} must exist")
    if not 0 <= args.warmup_s < args.duration_s:
        p.error("--warmup-s must be in [0, --duration-s)")
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = Vocab.from_tokenizer(str(sweep.HF_DIR))
    sums = {name: run_system(name, args, vocab) for name in names}
    text = f"# Interference\n\nCommand: `{' '.join(sys.argv)}`\n\n{table(sums)}\n"
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
