"""Where a decode step's time goes: SmolLM2-135M-Instruct (bf16 by default), B requests with
prompts of --prompt-len random tokens, decoding --tokens tokens each.

    .venv/bin/python benchmarks/profile_decode.py --batch 1 --threads 2
    .venv/bin/python benchmarks/profile_decode.py --batch 32 --attention sdpa --profile
    .venv/bin/python benchmarks/profile_decode.py --w1 --dtype float32 --profile

Prints ms per decode step ((T_n - T_1) / (n - 1), best of --repeats) and, with --profile, the
torch profiler's top operators by self CPU time over the decode steps of one run.

--w1: the offline benchmark's workload instead (benchmarks/offline_throughput.py: 64 prompts of
32..512 random tokens, 128 greedy tokens each, one engine.generate after a warm-up): its wall
time and output tok/s, and where the time went -- decode-only steps against steps carrying
prefill, and inside the runner its input preparation, the layers, the final norm + LM head
and the sampler (the rest: scheduler, output processing). With --profile, the operator table
of that run.
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernels", default="auto", choices=["auto", "native", "torch"])
    p.add_argument("--no-prepack", action="store_true")
    p.add_argument("--quantization", default="none", choices=["none", "int8"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--w1", action="store_true", help="the offline benchmark's workload")
    args = p.parse_args()

    import torch

    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine
    from workers.config import ModelConfig
    from workers.sampling_params import SamplingParams

    mc = ModelConfig(
        dtype=args.dtype,
        num_threads=args.threads,
        kernels=args.kernels,
        prepack=not args.no_prepack,
        quantization=args.quantization,
    )
    engine = LLMEngine(EngineConfig(model=mc))
    if args.w1:
        return w1(engine, args)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 49000) for _ in range(args.prompt_len)] for _ in range(args.batch)
    ]

    def run(n: int) -> float:
        sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, sp)
        assert all(len(o.token_ids) == n for o in outs)
        return time.perf_counter() - t0

    run(4)  # warm-up
    t1 = min(run(1) for _ in range(args.repeats))
    tn = min(run(args.tokens) for _ in range(args.repeats))
    step = (tn - t1) / (args.tokens - 1)
    print(
        f"batch {args.batch} prompt {args.prompt_len} threads {args.threads} "
        f"kernels {args.kernels} ({'native' if engine.executor.runner.native else 'torch'})"
        f": {step * 1e3:.2f} ms/step, {args.batch / step:.1f} tok/s, prefill {t1 * 1e3:.1f} ms"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(args.tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    del torch


def _timed(obj, name: str, acc: dict, key: str) -> None:
    """Make obj.name add its wall time to acc[key] (an instance attribute over the method)."""
    f = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)


def w1(engine, args) -> None:
    """The offline benchmark's W1 through `engine`, with the time split by phase."""
    from workers import model_runner
    from workers.sampling_params import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(32, 512))] for _ in range(64)]
    sp = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0)
    engine.generate(
        [[rng.randrange(100, 49000) for _ in range(16)] for _ in range(4)],
        SamplingParams(max_tokens=8, ignore_eos=True, temperature=0),
    )
    runner = engine.executor.runner
    acc: dict[str, float] = {}
    steps = {"decode": [0, 0.0, 0], "mixed": [0, 0.0, 0]}  # count, seconds, tokens
    execute = engine.executor.execute

    def timed_execute(plan):
        t0 = time.perf_counter()
        out = execute(plan)
        kind = "decode" if all(s.is_decode for s in plan.seqs) else "mixed"
        st = steps[kind]
        st[0] += 1
        st[1] += time.perf_counter() - t0
        st[2] += sum(len(s.token_ids) for s in plan.seqs)
        return out

    engine.executor.execute = timed_execute
    _timed(runner, "_prepare", acc, "prepare")
    _timed(runner.model, "forward", acc, "layers")
    _timed(runner.model, "compute_logits", acc, "norm + LM head")
    _timed(model_runner, "sample_with_drafts", acc, "sample")

    def run():
        t0 = time.perf_counter()
        outs = engine.generate(prompts, sp)
        assert all(len(o.token_ids) == 128 for o in outs)
        return time.perf_counter() - t0

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = run()
    else:
        wall = run()
    print(f"W1: {wall:.2f} s, {64 * 128 / wall:.1f} output tok/s ({args.dtype})")
    for kind, (n, s, toks) in steps.items():
        print(f"  {kind} steps: {n}, {s:.2f} s, {toks} tokens, {1e3 * s / max(n, 1):.1f} ms/step")
    rest = wall - sum(acc.values())
    for k, v in [*acc.items(), ("rest (scheduler, outputs)", rest)]:
        print(f"  {k}: {v:.2f} s ({100 * v / wall:.1f}%)")
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
