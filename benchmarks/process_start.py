"""CPU a fresh process spends reading a model before it can serve: what every group replica,
rank actor and scaled-up group pays.

    .venv/bin/python benchmarks/process_start.py [--repo PATH] [--repeat 3]

Each case runs in a new interpreter (python -c, torch imported first, as every Flotilla
process does) and reports its user+sys CPU seconds, best of --repeat. `--repo` runs the same
cases against another checkout (a `git worktree` of an older commit) for a before/after in one
run. The model cache is warm for both: tokenizers and configs were written by an earlier load.
Cases:
  torch            `import torch` alone (the floor)
  config-gguf      load_hf_config(the default SmolLM2 GGUF)    -- a rank actor
  config-hf        load_hf_config(a tiny Llama HF directory)
  tokenizer-gguf   load_tokenizer(the default GGUF)
  engine-gguf      LLMEngine(the default model, 64 KV blocks)   -- a group replica
  engine-hf        LLMEngine(the tiny HF directory)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENGINE = (
    "from cluster.engine import LLMEngine; from cluster.config import EngineConfig; "
    "LLMEngine(EngineConfig.model_validate({{'model': {{'model': {m!r}}}, "
    "'cache': {{'num_blocks': 64, 'block_size': 8}}}}))"
)
CASES = {
    "torch": "pass",
    "config-gguf": "from workers.loader import load_hf_config; load_hf_config({g!r})",
    "config-hf": "from workers.loader import load_hf_config; load_hf_config({h!r})",
    "tokenizer-gguf": "from workers.loader import load_tokenizer; load_tokenizer({g!r})",
    "engine-gguf": ENGINE.replace("{m!r}", "{g!r}"),
    "engine-hf": ENGINE.replace("{m!r}", "{h!r}"),
}


def cpu_seconds(repo: Path, code: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-c", "import torch\n" + code],
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=str(repo)),
        check=True,
        capture_output=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def tiny_llama(directory: str) -> str:
    """A tiny seeded Llama saved by transformers, with SmolLM2's tokenizer."""
    code = (
        "import torch, transformers; from workers.loader import load_tokenizer\n"
        "cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,"
        " max_position_embeddings=1024)\n"
        "torch.manual_seed(0)\n"
        f"transformers.LlamaForCausalLM(cfg).save_pretrained({directory!r})\n"
        f"load_tokenizer('smollm2-135m-instruct').save_pretrained({directory!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, action="append", default=[])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    repos = [ROOT, *args.repo]
    with tempfile.TemporaryDirectory() as tmp:
        gguf, hf = "smollm2-135m-instruct", tiny_llama(os.path.join(tmp, "tiny-llama"))
        for repo in repos:  # warm every cache each checkout keeps
            cpu_seconds(repo, CASES["engine-gguf"].format(g=gguf, h=hf))
            cpu_seconds(repo, CASES["engine-hf"].format(g=gguf, h=hf))
        print("case            " + "".join(f"{r.name[:14]:>16}" for r in repos))
        for name, code in CASES.items():
            code = code.format(g=gguf, h=hf)
            best = [min(cpu_seconds(r, code) for _ in range(args.repeat)) for r in repos]
            print(f"{name:16}" + "".join(f"{b:14.2f} s" for b in best), flush=True)


if __name__ == "__main__":
    main()
