"""Per-token overhead of grammar-constrained sampling with llguidance, xgrammar and
outlines-core, side by side in one process, on the default model's tokenizer.

Command (from the repo root; a library that is not installed is skipped):
    .venv/bin/python benchmarks/grammar_overhead.py --rounds 3

For each library and each grammar (a JSON schema with nested objects / arrays / enums, free
JSON, a regex): compile once (timed, cold and cached), then walk a fixed valid output token by
token as the engine does: build the next-token bitmask (one int32 word per 32 tokens), apply it
to a [1, vocab] float32 logits row, then advance the matcher by the token. Reported: compile
ms, and per token the mask fill, the apply and the advance in microseconds (median of rounds
of the mean over the walk). The sampler's own cost (~0.1-1 ms per step at batch 1) is not here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
}
DOC = {
    "name": "Alice Johnson",
    "age": 42,
    "email": "alice@example.com",
    "tags": ["engineering", "distributed systems", "serving"],
    "address": {"city": "Zurich", "zip": "8001"},
    "role": "admin",
}
REGEX = r"(\d{3})-(\d{3})-(\d{4}) [A-Z][a-z]+ [A-Z][a-z]+"
REGEX_TEXT = "415-555-0123 Grace Hopper"
CASES = {  # name -> (kind, spec, text to walk)
    "json_schema": ("json_schema", SCHEMA, json.dumps(DOC)),
    "json_object": ("json_object", None, json.dumps(DOC)),
    "regex": ("regex", REGEX, REGEX_TEXT),
}


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.fill = llguidance.torch.fill_next_token_bitmask
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.version = metadata.version("llguidance")

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        if kind == "json_schema":
            g = M.grammar_from_json_schema(spec)
        elif kind == "json_object":
            g = M.grammar_from_json_schema({"type": "object"})
        else:
            g = M.grammar_from_regex(spec)
        return g

    def matcher(self, compiled):
        m = self.ll.LLMatcher(self.tok, compiled)
        assert not m.is_error(), m.get_error()
        return m

    def fill_mask(self, m, mask):
        self.fill(m, mask, 0)

    def advance(self, m, t):
        assert m.consume_token(t), m.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import xgrammar as xgr

        self.x = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.version = metadata.version("xgrammar")

    def compile(self, kind, spec):
        if kind == "json_schema":
            return self.compiler.compile_json_schema(json.dumps(spec))
        if kind == "json_object":
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_regex(spec)

    def matcher(self, compiled):
        return self.x.GrammarMatcher(compiled)

    def fill_mask(self, m, mask):
        m.fill_next_token_bitmask(mask)

    def advance(self, m, t):
        assert m.accept_token(t)


def _bytes_of_tokens(tok) -> dict[int, bytes]:
    """Byte string of every token of a byte-level BPE tokenizer (GPT-2 byte alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode
    chars = keep + [256 + n for n in range(256 - len(keep))]
    dec = dict(zip(map(chr, chars), keep + [b for b in range(256) if b not in keep], strict=True))
    out = {}
    for piece, i in tok.get_vocab().items():
        try:
            out[i] = bytes(dec[c] for c in piece)
        except KeyError:  # special tokens
            out[i] = piece.encode()
    return out


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab):
        import outlines_core as oc
        from outlines_core import json_schema

        self.oc, self.js = oc, json_schema
        eos = tok.eos_token_id
        special = set(tok.all_special_ids)
        vmap: dict[bytes, list[int]] = {}
        for i, b in _bytes_of_tokens(tok).items():
            if i not in special:
                vmap.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(eos, vmap)
        self.version = metadata.version("outlines-core")

    def compile(self, kind, spec):
        if kind == "json_schema":
            regex = self.js.build_regex_from_schema(json.dumps(spec))
        elif kind == "json_object":
            regex = self.js.build_regex_from_schema(json.dumps({"type": "object"}))
        else:
            regex = spec
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill_mask(self, m, mask):
        m.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

    def advance(self, m, t):
        m.advance(t)


def walk(lib, compiled, ids, vocab, torch):
    """One pass over `ids`: (fill us, apply us, advance us) per token."""
    mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    logits = torch.randn(1, vocab)
    t0 = time.perf_counter()
    m = lib.matcher(compiled)
    lib.fill_mask(m, mask)  # the first mask (llguidance builds its lexer lazily, here)
    first = time.perf_counter() - t0
    m = lib.matcher(compiled)
    fill = apply = adv = 0.0
    for t in ids:
        t0 = time.perf_counter()
        lib.fill_mask(m, mask)
        t1 = time.perf_counter()
        masked = apply_bitmask(logits, mask, vocab, torch)
        assert masked[0, t] > float("-inf"), f"{lib.name}: token {t} masked off"
        t2 = time.perf_counter()
        lib.advance(m, t)
        t3 = time.perf_counter()
        fill, apply, adv = fill + t1 - t0, apply + t2 - t1, adv + t3 - t2
    n = len(ids)
    return fill / n * 1e6, apply / n * 1e6, adv / n * 1e6, first * 1e3


def apply_bitmask(logits, mask, vocab, torch):
    """The sampler's way (workers.token_mask): unpack the int32 words, add 0 or float32's
    lowest to each logit."""
    from workers.token_mask import apply_token_mask

    return apply_token_mask(logits, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    import torch

    from workers.loader import load_hf_config, load_tokenizer, resolve_model_path

    torch.set_num_threads(1)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    vocab = load_hf_config(path).vocab_size
    libs = []
    for cls in (Llguidance, Xgrammar, OutlinesCore):
        t0 = time.perf_counter()
        try:
            libs.append((cls(tok, vocab), time.perf_counter() - t0))
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})")
    print(f"model {args.model}: vocab {vocab}; torch threads 1")
    print(
        "| library | version | tokenizer setup ms | grammar | tokens | compile ms (cold / again) "
        "| matcher + 1st mask ms | mask fill us/tok | apply us/tok | advance us/tok | total us/tok |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for lib, setup in libs:
        for case, (kind, spec, text) in CASES.items():
            ids = tok.encode(text, add_special_tokens=False)
            t0 = time.perf_counter()
            lib.compile(kind, spec)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled = lib.compile(kind, spec)
            again = time.perf_counter() - t0
            try:
                rounds = [walk(lib, compiled, ids, vocab, torch) for _ in range(args.rounds)]
            except AssertionError as e:
                print(f"| {lib.name} | {lib.version} | | {case} | {len(ids)} | failed: {e} |")
                continue
            f, a, v, first = (statistics.median(r[i] for r in rounds) for i in range(4))
            print(
                f"| {lib.name} | {lib.version} | {setup * 1e3:.0f} | {case} | {len(ids)} "
                f"| {cold * 1e3:.1f} / {again * 1e3:.1f} | {first:.1f} | {f:.0f} | {a:.0f} | {v:.0f} "
                f"| {f + a + v:.0f} |"
            )


if __name__ == "__main__":
    main()
