"""Scheduler A/B in one process: TTFT and inter-token latency under a Poisson stream, and
offline throughput, for several `engine.scheduler` settings on the same loaded model.

Command (from the repo root):
    .venv/bin/python benchmarks/sched_latency.py --rate 2 --num-requests 32 --rounds 2

The model loads once (default EngineConfig: SmolLM2-135M-Instruct, dtype auto); each setting
gets a fresh Scheduler (and step-time model) on the same block manager, an emptied prefix
cache, 2 warm-up requests, then the same seeded workload: prompts of random token ids, lengths
uniform in [--min-len, --max-len], --output-len greedy tokens (EOS ignored), arrivals Poisson at
--rate req/s (requests carry their scheduled arrival time, so queueing counts in TTFT). --num-requests 0 skips the stream. TTFT:
first token - arrival; ITL: time between a request's successive tokens (as the engine emits
them). --offline N also times N prompts submitted at once (generate()). Settings run
round-robin --rounds times; the table has every round. Writes benchmarks/out/sched_latency.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not another editable install


def knobs_of(name: str) -> dict:
    """'fcfs/none', 'fcfs/256', 'sjf/auto@500', 'fcfs/auto@500:2000:1500' -> SchedulerConfig
    fields (policy/cap[@target_step_ms[:ttft_target_ms:max_step_ms]])."""
    policy, cap = name.split("/")
    cap, _, target = cap.partition("@")
    target, _, ttft = target.partition(":")
    if ttft:
        ttft, _, max_step = ttft.partition(":")
        knobs = knobs_of(f"{policy}/{cap}@{target}")
        knobs["ttft_target_ms"] = float(ttft)
        if max_step:
            knobs["max_step_ms"] = float(max_step)
        return knobs
    knobs = dict(
        policy={"fcfs": "fcfs", "sjf": "sjf_aging"}[policy],
        max_prefill_tokens_when_decoding=None
        if cap == "none"
        else cap
        if cap == "auto"
        else int(cap),
    )
    if target:
        knobs["target_step_ms"] = float(target)
    return knobs


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def workload(args, vocab: int, seed: int, n: int):
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        length = rng.randint(args.min_len, args.max_len)
        out.append((t, [rng.randrange(100, vocab - 100) for _ in range(length)]))
        t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
    return out


def fresh_scheduler(eng, knobs: dict) -> None:
    from cluster.config import SchedulerConfig
    from cluster.scheduler import Scheduler

    assert not eng.has_unfinished()
    eng.block_manager.reset_prefix_cache()
    cfg = SchedulerConfig(**{**eng.config.scheduler.model_dump(), **knobs})
    eng.scheduler = Scheduler(cfg, eng.block_manager)


def run_stream(eng, reqs, params) -> dict:
    times: dict[str, list[float]] = {}
    arrival: dict[str, float] = {}
    pending = list(reversed(list(enumerate(reqs))))
    t0 = time.monotonic()
    while pending or eng.has_unfinished():
        now = time.monotonic()
        while pending and t0 + pending[-1][1][0] <= now:
            i, (at, prompt) = pending.pop()
            rid = f"s{i}"
            arrival[rid] = t0 + at
            eng.add_request(prompt, params, request_id=rid, arrival_time=t0 + at)
            times[rid] = []
        if not eng.has_unfinished():
            time.sleep(max(0.0, t0 + pending[-1][1][0] - time.monotonic()))
            continue
        outs = eng.step()
        now = time.monotonic()
        for o in outs:
            times[o.request_id] += [now] * len(o.new_token_ids)
    wall = time.monotonic() - t0
    ttft = [ts[0] - arrival[r] for r, ts in times.items()]
    itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:], strict=False)]
    mean_itl = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in times.values() if len(ts) > 1]
    good = sum(
        t <= 2.0 and m <= 0.1 for t, m in zip(ttft, mean_itl, strict=True)
    )  # the serving sweep's SLO
    tokens = sum(len(ts) for ts in times.values())
    ms = lambda x: round(1000 * x, 1)  # noqa: E731
    return dict(
        wall_s=round(wall, 2),
        out_tok_s=round(tokens / wall, 1),
        ttft_p50_ms=ms(pct(ttft, 50)),
        ttft_p99_ms=ms(pct(ttft, 99)),
        itl_p50_ms=ms(pct(itl, 50)),
        itl_p99_ms=ms(pct(itl, 99)),
        itl_max_ms=ms(max(itl)),
        slo_ok=good,
        steps=eng.scheduler._step_id,
    )


def run_offline(eng, prompts, params) -> dict:
    t, cpu = time.monotonic(), time.process_time()
    outs = eng.generate(prompts, params)
    wall, cpu = time.monotonic() - t, time.process_time() - cpu
    assert all(len(o.token_ids) == params.max_tokens for o in outs)
    n = sum(len(o.token_ids) for o in outs)
    # CPU time is the steadier figure on a shared machine (run with --threads 1).
    return dict(
        offline_wall_s=round(wall, 2),
        offline_out_tok_s=round(n / wall, 1),
        offline_cpu_s=round(cpu, 2),
        offline_out_tok_per_cpu_s=round(n / cpu, 1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="fcfs/none,fcfs/256,fcfs/auto,sjf/auto")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--offline", type=int, default=0, help="also time N prompts at once")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine
    from workers.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model={"num_threads": args.threads}))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    reqs = workload(args, eng.vocab_size, args.seed, args.num_requests)
    offline = [p for _, p in workload(args, eng.vocab_size, args.seed + 1, args.offline)]
    warm = [p for _, p in workload(args, eng.vocab_size, args.seed + 2, 2)]
    names = args.settings.split(",")
    rows = []
    for rnd in range(args.rounds):
        for name in names:
            knobs = knobs_of(name)
            fresh_scheduler(eng, knobs)
            eng.generate(warm, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
            row = dict(setting=name, round=rnd)
            if reqs:
                row.update(run_stream(eng, reqs, params))
            coef = eng.scheduler.step_model.coefficients()  # t = a + b*decodes + c*prefill
            row["step_model_ms"] = coef and [round(1000 * x, 3) for x in coef]
            if offline:  # same scheduler (its step-time model is warm), empty prefix cache
                eng.block_manager.reset_prefix_cache()
                row.update(run_offline(eng, offline, params))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sched_latency.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    keys = [k for k in rows[0] if k not in ("setting", "round", "step_model_ms")]
    print("| setting | round | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['setting']} | {r['round']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    for name in names:
        mine = [r for r in rows if r["setting"] == name]
        summary = {k: statistics.median(r[k] for r in mine) for k in keys}
        print(name, "median of rounds:", json.dumps(summary))


if __name__ == "__main__":
    main()
