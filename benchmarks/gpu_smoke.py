"""GPU smoke run: the checks the CPU test suite cannot make, in one script of a few minutes.

Command (from the repo root, in the project's venv):
    python benchmarks/gpu_smoke.py

The tests run everything with model.device=cpu and gloo. This script runs the same engine with
model.device=cuda when CUDA devices exist:

1. Hugging Face parity on one GPU: small seeded random-weight Llama-family models (GQA; sliding
   window; experts; q/k norms), greedy tokens of the engine in float32 and bfloat16 against
   transformers `generate()` in float32 on the same GPU, by vLLM's criterion for random models
   (tokens equal up to the first difference, and there each side's token is in the other's
   top-5; tests/cluster/test_engine_hf_parity.py does the same on the CPU). The prompts mix
   lengths, share a cached prefix and are chunked, so decode groups, causal prefill and
   offset-masked chunks all run on the GPU.
2. Two GPUs: replica groups of the last model (mixtral) with tp=2, pp=2 and ep=2 (NCCL
   all-reduce, send/recv and all-to-all; one Ray actor per GPU), same criterion. With one GPU
   this part is skipped, and the script says so.

No CUDA device: prints "no CUDA device: nothing run" and exits 0. Exit status 1 if any check
fails. Nothing here is timed: it checks that the CUDA path works, not how fast it is.
`--device cpu` runs the same checks on the CPU (two ranks = two processes over gloo): a dry run
of this script itself, for a machine without a GPU; the test suite covers the CPU engine.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NEW_TOKENS = 16
ARCHS = ["llama", "mistral", "qwen3", "mixtral"]


def tiny_config(arch: str):
    """The test suite's tiny shapes (tests/conftest.py), 3 layers, 49,152-token vocabulary."""
    import transformers

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, head_dim=16)
    if arch == "mistral":
        return transformers.MistralConfig(**common, head_dim=16, sliding_window=12)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32)
    if arch == "mixtral":
        return transformers.MixtralConfig(
            **common, head_dim=16, num_local_experts=4, num_experts_per_tok=2
        )
    raise ValueError(arch)


def make_model(arch: str, root: str) -> str:
    """A seeded random-weight HF directory (weights x4 so logits are not all near-ties), with
    SmolLM2's tokenizer (the engine loads one; prompts here are token ids)."""
    import torch
    import transformers

    from workers.loader import load_tokenizer, resolve_model_path

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    path = os.path.join(root, arch)
    model.save_pretrained(path)
    load_tokenizer(resolve_model_path("smollm2-135m-instruct")).save_pretrained(path)
    return path


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(100, 49000) for _ in range(33)]
    shared = [prefix + [rng.randrange(100, 49000) for _ in range(n)] for n in (3, 20)]
    alone = [[rng.randrange(100, 49000) for _ in range(n)] for n in (5, 40, 63, 1)]
    return shared + alone


def hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[set[int]]]:
    import torch

    out = model.generate(
        torch.tensor([prompt], device=model.device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    toks = out.sequences[0, len(prompt) :].tolist()
    return toks, [set(step[0].float().topk(5).indices.tolist()) for step in out.logits]


def first_mismatch(ours, our_tops, theirs, their_tops) -> str | None:
    """None when the tokens pass the top-5 criterion, else what differs."""
    if len(ours) != len(theirs):
        return f"{len(ours)} tokens, HF {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            if a in their_tops[i] and b in our_tops[i]:
                return None
            return f"token {i}: ours {a} not in HF top-5 {their_tops[i]} or HF {b} not in ours"
    return None


def run_engine(config, batch: list[list[int]]):
    """Warm the prefix cache with the first prompt, then run the whole batch."""
    from cluster.engine import LLMEngine
    from workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    engine = LLMEngine(config)
    try:
        engine.generate(batch[:1], params)
        outs = engine.generate(batch, params)
        cached = outs[1].num_cached_tokens
    finally:
        engine.shutdown()
    return [(o.token_ids, [set(lp.top_ids) for lp in o.logprobs]) for o in outs], cached


def check(label: str, config, batch, refs, results: list) -> None:
    t0 = time.perf_counter()
    try:
        outs, cached = run_engine(config, batch)
        errors = [
            f"prompt {i}: {msg}"
            for i, ((ours, ot), (theirs, tt)) in enumerate(zip(outs, refs, strict=True))
            if (msg := first_mismatch(ours, ot, theirs, tt)) is not None
        ]
        if cached < 32:
            errors.append(f"prefix cache: {cached} cached tokens, expected >= 32")
    except Exception as e:  # report every check, then fail at the end
        errors = [f"{type(e).__name__}: {e}"]
    results.append((label, not errors))
    status = "ok  " if not errors else "FAIL"
    print(f"{status} {label} ({time.perf_counter() - t0:.1f}s)", flush=True)
    for e in errors:
        print(f"       {e}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, of " + str(ARCHS))
    args = ap.parse_args()
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing run")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
    from parallel.config import ParallelConfig
    from workers.config import ModelConfig

    if device == "cuda":
        n_dev = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        print(f"{n_dev} CUDA device(s), {name}; torch {torch.__version__}", flush=True)
    else:
        n_dev = 2  # ranks are processes
        print(f"dry run on the CPU; torch {torch.__version__}", flush=True)
    archs = args.archs.split(",")
    t_start = time.perf_counter()
    batch = prompts()
    results: list[tuple[str, bool]] = []
    models: dict[str, tuple[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="flotilla-gpu-smoke-") as root:
        for arch in archs:
            path = make_model(arch, root)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            hf = hf.to(device).eval()
            refs = [hf_greedy(hf, p) for p in batch]
            del hf
            models[arch] = (path, refs)
            for dtype in ("float32", "bfloat16"):
                config = EngineConfig(
                    model=ModelConfig(model=path, dtype=dtype, device=device),
                    cache=CacheConfig(block_size=8, num_blocks=256),
                    scheduler=SchedulerConfig(max_num_batched_tokens=32),  # chunked prefill
                )
                check(f"1 rank  {arch:8s} {dtype:8s} vs HF", config, batch, refs, results)

        parallel_arch = archs[-1]
        if n_dev < 2:
            print("1 CUDA device: the tp=2 and pp=2 checks need 2, skipped")
        else:
            import ray

            gpus = {"num_gpus": 2} if device == "cuda" else {}
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, **gpus)
            try:
                path, refs = models[parallel_arch]
                layouts = [dict(tp=2), dict(pp=2)]
                if parallel_arch == "mixtral":
                    layouts.append(dict(ep=2))  # experts split, all-to-all dispatch
                for layout in layouts:
                    config = EngineConfig(
                        model=ModelConfig(model=path, dtype="float32", device=device),
                        cache=CacheConfig(block_size=8, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=32),
                        # backend auto: nccl on CUDA (one Ray actor per GPU), gloo on the CPU
                        parallel=ParallelConfig(**layout),
                    )
                    name = ",".join(f"{k}={v}" for k, v in layout.items())
                    label = f"2 ranks {parallel_arch:8s} {name:8s} vs HF"
                    check(label, config, batch, refs, results)
            finally:
                ray.shutdown()

    failed = [label for label, ok in results if not ok]
    took = time.perf_counter() - t_start
    print(f"{len(results) - len(failed)} of {len(results)} checks passed in {took:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
