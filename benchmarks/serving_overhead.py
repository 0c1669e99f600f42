"""Serving overhead: the full path (gRPC -> Serve gRPC proxy -> router -> replica group) against
the same engine in-process (AsyncEngine), on the same workload, side by side in one run.

Command (from the repo root):

    .venv/bin/python benchmarks/serving_overhead.py --record     # default model, one group

Both systems are loaded up front (the in-process engine in this process, the Serve app in a
local Ray cluster) and measured side by side so that load from anything else on the machine
hits both alike: latency requests alternate request by request (in-process, served, served,
in-process, ...), throughput bursts alternate round by round. While one system runs the other
is idle.

Workloads, greedy with EOS ignored so every request produces exactly its tokens:
  * latency: --latency-requests (40) requests one at a time, --latency-len (16) prompt tokens,
    --latency-output (8) new tokens; TTFT = request sent -> first token received by the client.
    Added TTFT = median over all pairs (same prompt on both systems, back to back) of
    served TTFT - in-process TTFT. Short prompts keep the engine's own prefill time (and its
    noise) small next to what the path adds.
  * throughput: --num-prompts (32) requests at once, prompt lengths uniform in
    [--min-len, --max-len] ([32, 256]), --output-len (64) new tokens each;
    throughput = output tokens / wall time from the first send to the last token; the
    ratio reported is the median over --rounds (5) of served / in-process.
Token ids are drawn (seeded) from the vocabulary minus special tokens and sent as ids, so both
paths compute identical prompts; each round uses fresh prompts (no cross-round prefix hits).
Served requests stream over gRPC (GenerateStream) from one asyncio client in this process.
Writes benchmarks/out/serving_overhead.json; --record rewrites this benchmark's section of
benchmarks/RESULTS.md (between its markers, leaving other sections alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- serving-overhead:begin -->", "<!-- serving-overhead:end -->"
INPROC, SERVED = "in-process AsyncEngine", "gRPC -> Serve proxy -> router -> group"
FLOOR = "gRPC -> Serve proxy -> no-op deployment"
FLOOR_APP = "serve-proxy-floor"


def make_workload(args, rng: random.Random, pool: list[int]):
    latency = [
        [rng.choice(pool) for _ in range(args.latency_len)] for _ in range(args.latency_requests)
    ]
    lens = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_prompts)]
    burst = [[rng.choice(pool) for _ in range(n)] for n in lens]
    return latency, burst


class InProcess:
    def __init__(self, engine):
        self.engine = engine

    async def one(self, ids, max_tokens):
        from workers.sampling_params import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        first, n = None, 0
        async for out in self.engine.generate(ids, sp):
            if first is None and out.new_token_ids:
                first = time.perf_counter() - t0
            n += len(out.new_token_ids)
        return first, n


class Served:
    def __init__(self, stub, timeout, app):
        self.stub, self.timeout = stub, timeout
        self.metadata = (("application", app),)

    async def one(self, ids, max_tokens):
        from router.proto import flotilla_pb2 as pb

        req = pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=ids),
            params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
        t0 = time.perf_counter()
        first, n = None, 0
        async for msg in self.stub.GenerateStream(
            req, timeout=self.timeout, metadata=self.metadata
        ):
            if first is None and msg.token_ids:
                first = time.perf_counter() - t0
            n += len(msg.token_ids)
        return first, n


class NoOp:
    """What Serve's gRPC proxy costs on its own: a deployment whose GenerateStream answers at
    once with one message per requested token. Deployed as its own app behind the same proxy,
    measured in the same interleaved loop; its TTFT is the floor any Serve gRPC app pays."""

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        from router.proto import flotilla_pb2 as pb

        for i in range(request.params.max_tokens):
            yield pb.GenerateStreamResponse(request_id="noop", token_ids=[i])


async def latency_pairs(systems: dict, latency, args) -> dict[str, list[float]]:
    """TTFT of each latency prompt on every system, one request at a time, interleaved
    request by request (the order reverses every prompt) so that drift and bursts of noise on
    the machine hit all sides alike; the added TTFT is the median of the pairs' differences."""
    ttfts: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for i, ids in enumerate(latency):
        for name in names if i % 2 == 0 else names[::-1]:
            first, _ = await systems[name].one(ids, args.latency_output)
            ttfts[name].append(first)
    return ttfts


async def burst(system, burst_prompts, args) -> dict:
    t0 = time.perf_counter()
    res = await asyncio.gather(*(system.one(ids, args.output_len) for ids in burst_prompts))
    wall = time.perf_counter() - t0
    out_tokens = sum(n for _, n in res)
    assert out_tokens == args.num_prompts * args.output_len, out_tokens
    return {
        "burst_ttft_p50_ms": 1000 * statistics.median(f for f, _ in res),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
    }


async def run_rounds(engine, address, pool, args) -> list[dict]:
    import grpc

    from router.proto import flotilla_pb2_grpc as pb_grpc

    rng = random.Random(args.seed)
    rounds = []
    async with grpc.aio.insecure_channel(address) as channel:
        systems = {
            INPROC: InProcess(engine),
            SERVED: Served(pb_grpc.FlotillaStub(channel), args.timeout, args.app_name),
        }
        floor = {FLOOR: Served(pb_grpc.FlotillaStub(channel), args.timeout, FLOOR_APP)}
        for system in [
            *systems.values(),
            *floor.values(),
        ]:  # warm-up: first-call paths, connections, handles
            for _ in range(3):
                await system.one([rng.choice(pool) for _ in range(args.max_len)], 4)
        for r in range(args.rounds):
            latency, burst_prompts = make_workload(args, rng, pool)
            ttfts = await latency_pairs(systems | floor, latency, args)
            order = [INPROC, SERVED] if r % 2 == 0 else [SERVED, INPROC]
            result = {}
            for name in order:
                t = ttfts[name]
                result[name] = {
                    "ttft_p50_ms": 1000 * statistics.median(t),
                    "ttft_p90_ms": 1000 * sorted(t)[int(0.9 * (len(t) - 1))],
                    **await burst(systems[name], burst_prompts, args),
                }
                print(f"round {r + 1} {name}: {json.dumps(result[name])}", flush=True)
            diffs = [s - i for s, i in zip(ttfts[SERVED], ttfts[INPROC], strict=True)]
            result["added_ttft_ms"] = 1000 * statistics.median(diffs)
            result["added_ttft_all_ms"] = [1000 * d for d in diffs]
            result["floor_ttft_all_ms"] = [1000 * t for t in ttfts[FLOOR]]
            rounds.append(result)
    return rounds


def engine_config(args):
    from cluster.config import EngineConfig

    return EngineConfig.model_validate(
        {
            "model": {"model": args.model, "num_threads": args.threads},
            "scheduler": {"max_num_seqs": max(64, args.num_prompts)},
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each engine")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--latency-requests", type=int, default=40)
    p.add_argument("--latency-len", type=int, default=16)
    p.add_argument("--latency-output", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpc-port", type=int, default=19100)
    p.add_argument("--app-name", default="flotilla")
    p.add_argument("--http-port", type=int, default=18100)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--record", action="store_true", help="update benchmarks/RESULTS.md")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    from ray import serve

    from cluster.async_engine import AsyncEngine
    from deploy.app import runtime_env, start
    from deploy.config import FlotillaConfig

    cfg = engine_config(args)
    engine = AsyncEngine(cfg)
    special = set(engine.tokenizer.all_special_ids)
    pool = [t for t in range(engine.engine.vocab_size) if t not in special]
    fcfg = FlotillaConfig.model_validate(
        {
            "engine": cfg.model_dump(),
            "groups": 1,
            "serve": {
                "grpc_port": args.grpc_port,
                "http_port": args.http_port,
                "app_name": args.app_name,
            },
        }
    )
    ray.init(
        num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env(fcfg)
    )
    try:
        start(fcfg)
        serve.run(
            serve.deployment(NoOp).options(max_ongoing_requests=1000).bind(),
            name=FLOOR_APP,
            route_prefix="/" + FLOOR_APP,
        )
        rounds = asyncio.run(run_rounds(engine, f"127.0.0.1:{args.grpc_port}", pool, args))
    finally:
        serve.shutdown()
        ray.shutdown()
        engine.shutdown()

    def med(name, key):
        return statistics.median(r[name][key] for r in rounds)

    keys = ["ttft_p50_ms", "ttft_p90_ms", "burst_ttft_p50_ms", "output_tok_s"]
    results = [{"system": n, **{k: med(n, k) for k in keys}} for n in (INPROC, SERVED)]
    added = [r["added_ttft_ms"] for r in rounds]
    pairs = [d for r in rounds for d in r["added_ttft_all_ms"]]
    floor = [t for r in rounds for t in r["floor_ttft_all_ms"]]
    ratio = [r[SERVED]["output_tok_s"] / r[INPROC]["output_tok_s"] for r in rounds]
    report = {
        "command": "python benchmarks/serving_overhead.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
        },
        "workload": {k: v for k, v in vars(args).items() if k != "record"},
        "rounds": rounds,
        "results": results,
        "added_ttft_p50_ms": statistics.median(pairs),
        "added_ttft_p50_ms_per_round": added,
        "serve_proxy_floor_ttft_p50_ms": statistics.median(floor),
        "serve_proxy_floor_ttft_p90_ms": sorted(floor)[int(0.9 * (len(floor) - 1))],
        "throughput_ratio": statistics.median(ratio),
        "throughput_ratio_per_round": ratio,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serving_overhead.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    print(table)
    if args.record:
        record(table)


def render(r) -> str:
    w = r["workload"]
    rows = "\n".join(
        f"| {x['system']} | {x['ttft_p50_ms']:.1f} | {x['ttft_p90_ms']:.1f} | "
        f"{x['burst_ttft_p50_ms']:.0f} | {x['output_tok_s']:.1f} |"
        for x in r["results"]
    )
    per_round_ttft = ", ".join(f"{x:+.1f}" for x in r["added_ttft_p50_ms_per_round"])
    per_round_tput = ", ".join(f"{100 * x:.0f}%" for x in r["throughput_ratio_per_round"])
    verdict_ttft = "met" if r["added_ttft_p50_ms"] <= 5 else "missed"
    verdict_tput = "met" if r["throughput_ratio"] >= 0.9 else "missed"
    return f"""## Serving overhead: gRPC -> router -> group vs. the in-process engine

Command: `{r["command"]}` ({r["date"]}, {r["machine"]["cpus"]} CPUs, load average at the end
{r["machine"]["loadavg_at_end"][0]:.1f}). Model `{w["model"]}`, {w["threads"]} torch threads,
one replica group, Serve throughput-optimized mode with its gRPC proxy. {w["rounds"]} rounds.
Latency: {w["latency_requests"]} sequential requests a round of {w["latency_len"]} prompt tokens,
{w["latency_output"]} output tokens, the two systems alternating request by request; added TTFT
is the median over all {w["rounds"] * w["latency_requests"]} pairs. Throughput:
{w["num_prompts"]} concurrent requests, prompts of {w["min_len"]}-{w["max_len"]} tokens,
{w["output_len"]} output tokens each; greedy, EOS ignored.

| path | TTFT p50 (ms) | TTFT p90 (ms) | burst TTFT p50 (ms) | output tok/s |
|---|---|---|---|---|
{rows}

- Added p50 TTFT: **{r["added_ttft_p50_ms"]:.1f} ms** (per-round medians: {per_round_ttft}; target <= 5 ms:
  {verdict_ttft}).
- Of that, Serve's gRPC proxy alone: a no-op deployment behind the same proxy, in the same
  interleaved loop, answers with a first token after **{r["serve_proxy_floor_ttft_p50_ms"]:.1f} ms**
  p50 ({r["serve_proxy_floor_ttft_p90_ms"]:.1f} ms p90).
- Throughput: **{100 * r["throughput_ratio"]:.0f}%** of in-process (per round: {per_round_tput};
  target >= 90%: {verdict_tput}).
- Raw numbers: `benchmarks/out/serving_overhead.json`.
"""


def record(table: str) -> None:
    section = f"{BEGIN}\n{table}{END}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
