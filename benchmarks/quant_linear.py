"""Weight-only int8 (model.quantization: int8) against the unquantized model on this CPU.

    .venv/bin/python benchmarks/quant_linear.py model --threads 2
    .venv/bin/python benchmarks/quant_linear.py kernel --threads 2

`model`: SmolLM2-135M-Instruct through the engine, per configuration (float32 by default, then
int8, int8 with group-wise scales (--group-size, model.quantization_group_size), then int8 with
a float LM head): ms per decode step at batch 1 and 8 (each step timed,
--tokens tokens after prompts of 128 random tokens, --repeats times: the fastest step, and the
median, since a shared machine slows some steps) and the time of one 512-token prefill (a
fresh prompt, prefix caching off), the best of --repeats.
`kernel`: one linear's time per path at M rows, [M, K] x [N, K]^T: torch.ops.flotilla.linear_w8,
F.linear on the float weight, F.linear on the weight dequantized in the call, and torch's
_weight_int8pack_mm: where the native kernel stops paying (dispatch.W8_MAX_ROWS).
"""

from __future__ import annotations

import argparse
import random
import time


def _best(f, repeats: int, inner: int = 1) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def _steps(engine, prompts: list[list[int]], n: int) -> list[float]:
    """Each engine step's wall time; the first one prefills every prompt."""
    from workers.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
    for p in prompts:
        engine.add_request(p, sp)
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def model(args) -> None:
    import statistics

    from cluster.config import CacheConfig, EngineConfig
    from cluster.engine import LLMEngine
    from workers import model_runner
    from workers.config import ModelConfig

    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 49000) for _ in range(n)]

    configs = [("none", True, None), ("int8", True, None)]
    configs += [("int8", True, args.group_size)] if args.group_size else []
    for quant, head, group in [*configs, ("int8", False, None)]:
        model_runner.QUANTIZE_LM_HEAD = head
        mc = ModelConfig(
            dtype=args.dtype,
            num_threads=args.threads,
            quantization=quant,
            quantization_group_size=group,
        )
        engine = LLMEngine(EngineConfig(model=mc, cache=CacheConfig(enable_prefix_caching=False)))

        res = []
        for batch in (1, 8):
            _steps(engine, [prompt(128) for _ in range(batch)], 4)  # warm-up
            dec = []
            for _ in range(args.repeats):
                dec += _steps(engine, [prompt(128) for _ in range(batch)], args.tokens)[1:]
            res.append(
                f"decode b{batch} {min(dec) * 1e3:.1f} ms/step "
                f"(median {statistics.median(dec) * 1e3:.1f})"
            )
        prefill = min(_steps(engine, [prompt(512)], 1)[0] for _ in range(args.repeats))
        res.append(f"prefill 512 {prefill * 1e3:.0f} ms")
        name = quant + ("" if head or quant == "none" else " (float LM head)")
        name += f" (groups of {group})" if group else ""
        mb = engine.executor.runner.param_bytes() / 1e6
        print(f"{args.dtype} {name}, {mb:.0f} MB params: {', '.join(res)}", flush=True)


def _paths(out, x, q, s, wf, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    from workers.quantization import dequantize

    sd = s.to(dtype)
    return {
        "linear_w8": lambda: torch.ops.flotilla.linear_w8(out, x, q, s, None),
        "F.linear": lambda: F.linear(x, wf),
        "dequant+F.linear": lambda: F.linear(x, dequantize(q, s, dtype)),
        "int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, q, sd),
    }


def kernel(args) -> None:
    import torch

    from workers.kernels import load_cpu_kernels
    from workers.quantization import dequantize, quantize_rows

    assert load_cpu_kernels(), "the native kernels did not build"
    dtype = getattr(torch, args.dtype)
    for n, k in ((1536, 576), (576, 1536)):
        q, s = quantize_rows(torch.randn(n, k))
        wf = dequantize(q, s, dtype)
        for m in args.rows:
            x = torch.randn(m, k).to(dtype)
            out = torch.empty(m, n, dtype=dtype)
            inner = max(1, 64 // m)
            paths = _paths(out, x, q, s, wf, dtype)
            times = {p: _best(f, args.repeats, inner) * 1e6 for p, f in paths.items()}
            print(
                f"{args.dtype} [{m}, {k}] x [{n}, {k}]: "
                + ", ".join(f"{p} {t:.0f} us" for p, t in times.items()),
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["model", "kernel"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64, help="model: int8 with groups (0: skip)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 256, 1024])
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model(args) if args.what == "model" else kernel(args)


if __name__ == "__main__":
    main()
