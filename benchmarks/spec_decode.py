"""Speculative decoding (n-gram prompt lookup, or a layer-truncated draft model) vs plain
decoding, SmolLM2-135M-Instruct, float32.

Commands (from the repo root):
    .venv/bin/python benchmarks/spec_decode.py
    .venv/bin/python benchmarks/spec_decode.py --method draft_model --draft-layers 8

One engine with `speculative: {method: ngram, num_tokens: 4}` (or `{method: draft_model,
draft: {num_layers: N}}`: SmolLM2's own first N layers draft, in the target's KV cache; with
the proposer detached the draft never runs) runs each workload with its
proposer attached (spec) and detached (plain: exactly the non-speculative scheduler),
alternately, --repeats times each, best run kept (the machine may be shared). One engine, not
two: with two SmolLM2 engines in one process the first one's decode steps ran 2-3x slower
(not investigated), which made the speed-up look far larger than it is.
  lookup  chat prompts asking to repeat or lightly edit a given paragraph (lookup hits)
  random  prompts of seeded random token ids, sampled (temperature 1, a seed per prompt):
          text that does not repeat, so lookup rarely hits (measures the overhead). Greedy
          decoding is not used here: on random prompts it falls into loops that lookup hits.
at batch 1 (prompts one after another) and batch 8 (8 prompts in one generate()). Greedy and
seeded requests get the same tokens with and without speculation (checked; with a draft model
greedy ones only: its own draws from q change a seeded request's tokens, not their
distribution, so "same tokens" reads False on the random workload there); tokens/s =
output tokens / wall time (prefill included), and decode tokens/s = tokens after the first /
the time from each request's first token to its last (what speculation speeds up: the lookup
answers are short, so prefill weighs heavily in the first figure).
Prints a markdown table with the speed-up and the acceptance rate.
"""

from __future__ import annotations

import argparse
import random
import time

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from cluster.engine import LLMEngine
from workers.config import DraftConfig, ModelConfig
from workers.sampling_params import SamplingParams

TEXTS = [
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
    "nothing to do: once or twice she had peeped into the book her sister was reading, but it "
    "had no pictures or conversations in it.",
    "The mitochondria is the powerhouse of the cell. It produces energy in the form of ATP "
    "through a process called cellular respiration, which uses oxygen and glucose.",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    return a * b\n",
    "Meeting notes: the team agreed to ship version 2.1 on Friday, move the database migration "
    "to next week, and ask Dana to review the new billing dashboard before the release.",
]
ASKS = [
    "Repeat this text exactly:\n{}",
    "Copy the following text, but write every number as a word:\n{}",
]


def lookup_prompts(eng: LLMEngine, n: int) -> list[list[int]]:
    tok = eng.tokenizer
    out = []
    for i in range(n):
        text = ASKS[i % len(ASKS)].format(TEXTS[i % len(TEXTS)])
        chat = [{"role": "user", "content": text}]
        out.append(
            tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        )
    return out


def random_prompts(n: int, length: int = 64, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(n)]


def make_engine(spec: SpeculativeConfig | None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(dtype="float32", max_model_len=1024),
            cache=CacheConfig(num_blocks=512),
            scheduler=SchedulerConfig(max_num_batched_tokens=2048),
            speculative=spec,
        )
    )


def timed(eng: LLMEngine, prompts, params, batch: int) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, decode seconds, tokens): decode seconds sum, per batch, the span from
    the batch's first first-token to its last finish."""
    t0 = time.perf_counter()
    outs = []
    decode = 0.0
    for i in range(0, len(prompts), batch):
        got = eng.generate(prompts[i : i + batch], params[i : i + batch])
        decode += max(o.finished_time for o in got) - min(o.first_token_time for o in got)
        outs += got
    return time.perf_counter() - t0, decode, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-tokens", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--method", choices=["ngram", "draft_model"], default="ngram")
    ap.add_argument(
        "--draft-layers", type=int, default=8, help="draft_model: the target's first N layers"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch1-prompts", type=int, default=4)
    ap.add_argument("--workloads", default="lookup,random")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    if args.method == "draft_model":
        spec_cfg = SpeculativeConfig(
            method="draft_model",
            num_tokens=args.num_tokens,
            draft=DraftConfig(num_layers=args.draft_layers),
        )
    else:
        spec_cfg = SpeculativeConfig(num_tokens=args.num_tokens)
    eng = make_engine(spec_cfg)
    proposer = eng.scheduler.proposer
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    workloads = {
        "lookup": (lookup_prompts(eng, 8), [greedy] * 8),
        "random": (
            random_prompts(8),
            [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i) for i in range(8)],
        ),
    }
    eng.generate(workloads["random"][0][:1], SamplingParams(max_tokens=8, temperature=0.0))
    rows = []
    for name in args.workloads.split(","):
        prompts, params = workloads[name]
        for batch in map(int, args.batches.split(",")):
            todo = prompts[: args.batch1_prompts] if batch == 1 else prompts
            best: dict[str, float] = {}
            best_dec: dict[str, float] = {}
            toks: dict[str, list[list[int]]] = {}
            stats0 = eng.stats()
            for _ in range(args.repeats):
                for kind in ("plain", "spec"):
                    eng.scheduler.proposer = proposer if kind == "spec" else None
                    eng.block_manager.reset_prefix_cache()
                    dt, dec, toks[kind] = timed(eng, todo, params, batch)
                    best[kind] = min(best.get(kind, dt), dt)
                    best_dec[kind] = min(best_dec.get(kind, dec), dec)
            eng.scheduler.proposer = proposer
            s = eng.stats()
            drafted = s.spec_num_draft_tokens - stats0.spec_num_draft_tokens
            accepted = s.spec_num_accepted_tokens - stats0.spec_num_accepted_tokens
            same = toks["plain"] == toks["spec"]
            n = sum(len(t) for t in toks["plain"])
            tps = {k: n / v for k, v in best.items()}
            n_dec = n - len(todo)  # the first token of each request is the prefill's
            dps = {k: n_dec / v for k, v in best_dec.items()}
            rows.append(
                (name, batch, n, tps["plain"], tps["spec"], dps["plain"], dps["spec"], drafted,
                 accepted, same)
            )  # fmt: skip
            print(rows[-1], flush=True)
    print()
    print(
        "| workload | batch | output tokens | plain / spec tok/s | speed-up | plain / spec "
        "decode tok/s | decode speed-up | drafts (accepted) | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, n, p, sp, dp, dsp, d, a, same in rows:
        rate = f"{d} ({a / d:.0%})" if d else "0"
        print(
            f"| {name} | {batch} | {n} | {p:.1f} / {sp:.1f} | {sp / p:.2f}x | {dp:.1f} / "
            f"{dsp:.1f} | {dsp / dp:.2f}x | {rate} | {same} |"
        )


if __name__ == "__main__":
    main()
