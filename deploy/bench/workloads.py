"""Seeded synthetic workloads: the same config and seed give the same requests, byte for byte.

  random    prompts of random token ids, lengths from --input-len, outputs from --output-len.
  long-mix  like random, but a --long-fraction of the prompts take --long-input-len instead.
  chat      shared-prefix multi-turn chat: every conversation starts with the same system
            prompt (--prefix-len tokens) and grows turn by turn (--turns); turn t re-sends
            the whole history, with synthetic assistant replies, so consecutive turns share
            ever longer prefixes. Requests go out turn-major (turn 1 of every conversation,
            then turn 2, ...) and each conversation carries its own session id.

Prompt tokens are drawn uniformly from the tokenizer's vocabulary minus its special tokens.
`ids` prompts are sent as token ids (exact lengths on both APIs); `text` prompts and chat
messages are the decoded text, whose length after the server re-tokenizes it may differ --
the server's usage reports the real count. Length specs: `N` (= fixed:N), `uniform:LO,HI`
(inclusive), `normal:MEAN,STD` (rounded, at least 1).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deploy.bench.records import RequestSpec

WORKLOADS = ("random", "long-mix", "chat")
PromptFormat = Literal["ids", "text"]


@dataclass(frozen=True)
class LengthDist:
    kind: Literal["fixed", "uniform", "normal"]
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """'128', 'fixed:128', 'uniform:64,256', 'normal:128,32'; ValueError when malformed."""
        kind, _, rest = spec.partition(":") if ":" in spec else ("fixed", "", spec)
        try:
            nums = [float(x) for x in rest.split(",")]
        except ValueError:
            raise ValueError(f"length spec {spec!r}: numbers expected") from None
        if kind == "fixed" and len(nums) == 1 and nums[0] >= 1 and nums[0].is_integer():
            return cls("fixed", nums[0])
        if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
            if nums[0].is_integer() and nums[1].is_integer():
                return cls("uniform", nums[0], nums[1])
        if kind == "normal" and len(nums) == 2 and nums[0] >= 1 and nums[1] >= 0:
            return cls("normal", nums[0], nums[1])
        raise ValueError(
            f"length spec {spec!r}: expected N, fixed:N, uniform:LO,HI (1 <= LO <= HI) or "
            "normal:MEAN,STD (MEAN >= 1, STD >= 0), integers except normal's parameters"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def upper(self) -> float:
        """A bound that most samples stay under (for sizing checks and messages)."""
        return self.b if self.kind == "uniform" else self.a + 3 * self.b

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        return f"{self.kind}:{self.a:g},{self.b:g}"


class Vocab:
    """Token ids to draw prompts from, and how to turn them into text."""

    def __init__(self, pool: Sequence[int], decode: Callable[[list[int]], str] | None = None):
        if not pool:
            raise ValueError("empty vocabulary")
        self.pool = list(pool)
        self._decode = decode

    def decode(self, ids: list[int]) -> str:
        if self._decode is None:
            raise ValueError("this vocabulary has no tokenizer: text prompts need one")
        return self._decode(ids)

    @classmethod
    def from_tokenizer(cls, path: str) -> Vocab:
        """A Hugging Face model directory or tokenizer.json file (no torch, no network)."""
        from tokenizers import Tokenizer

        p = Path(path).expanduser()
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path!r}")
        tok = Tokenizer.from_file(str(file))
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        pool = [i for i in range(tok.get_vocab_size()) if i not in special]
        return cls(pool, lambda ids: tok.decode(ids, skip_special_tokens=True))


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "random"
    num_requests: int = 100
    input_len: LengthDist = LengthDist("fixed", 128)
    output_len: LengthDist = LengthDist("fixed", 64)
    prompt_format: PromptFormat = "ids"
    long_input_len: LengthDist = LengthDist("fixed", 1024)
    long_fraction: float = 0.25
    prefix_len: int = 256
    turns: int = 4
    seed: int = 0

    def describe(self) -> dict[str, object]:
        return {k: str(v) if isinstance(v, LengthDist) else v for k, v in vars(self).items()}


def _ids(rng: random.Random, vocab: Vocab, n: int) -> list[int]:
    return [rng.choice(vocab.pool) for _ in range(n)]


def _prompt_spec(
    i: int, ids: list[int], max_tokens: int, vocab: Vocab, fmt: PromptFormat
) -> RequestSpec:
    if fmt == "ids":
        return RequestSpec(i, max_tokens, len(ids), prompt_ids=tuple(ids))
    return RequestSpec(i, max_tokens, len(ids), prompt_text=vocab.decode(ids))


def random_workload(cfg: WorkloadConfig, vocab: Vocab) -> list[RequestSpec]:
    rng = random.Random(f"random-{cfg.seed}")
    specs = []
    for i in range(cfg.num_requests):
        n, out = cfg.input_len.sample(rng), cfg.output_len.sample(rng)
        specs.append(_prompt_spec(i, _ids(rng, vocab, n), out, vocab, cfg.prompt_format))
    return specs


def long_mix_workload(cfg: WorkloadConfig, vocab: Vocab) -> list[RequestSpec]:
    rng = random.Random(f"long-mix-{cfg.seed}")
    specs = []
    for i in range(cfg.num_requests):
        long = rng.random() < cfg.long_fraction
        n = (cfg.long_input_len if long else cfg.input_len).sample(rng)
        out = cfg.output_len.sample(rng)
        specs.append(_prompt_spec(i, _ids(rng, vocab, n), out, vocab, cfg.prompt_format))
    return specs


def chat_workload(cfg: WorkloadConfig, vocab: Vocab) -> list[RequestSpec]:
    rng = random.Random(f"chat-{cfg.seed}")
    system = vocab.decode(_ids(rng, vocab, cfg.prefix_len))
    num_convs = -(-cfg.num_requests // cfg.turns)
    convs = []  # per conversation: [(user text, user len, reply text, max_tokens)] per turn
    for _ in range(num_convs):
        turns = []
        for _ in range(cfg.turns):
            n, out = cfg.input_len.sample(rng), cfg.output_len.sample(rng)
            user = vocab.decode(_ids(rng, vocab, n))
            reply = vocab.decode(_ids(rng, vocab, out))
            turns.append((user, n, reply, out))
        convs.append(turns)
    specs: list[RequestSpec] = []
    for t in range(cfg.turns):
        for c, turns in enumerate(convs):
            if len(specs) == cfg.num_requests:
                return specs
            msgs: list[tuple[str, str]] = [("system", system)]
            for user, _, reply, _ in turns[:t]:
                msgs += [("user", user), ("assistant", reply)]
            msgs.append(("user", turns[t][0]))
            input_len = cfg.prefix_len + sum(x[1] + x[3] for x in turns[:t]) + turns[t][1]
            specs.append(
                RequestSpec(
                    len(specs),
                    turns[t][3],
                    input_len,
                    messages=tuple(msgs),
                    session_id=f"bench-{cfg.seed}-conv-{c}",
                )
            )
    return specs


def build(cfg: WorkloadConfig, vocab: Vocab) -> list[RequestSpec]:
    if cfg.kind == "random":
        return random_workload(cfg, vocab)
    if cfg.kind == "long-mix":
        return long_mix_workload(cfg, vocab)
    if cfg.kind == "chat":
        return chat_workload(cfg, vocab)
    raise ValueError(f"unknown workload {cfg.kind!r}; expected one of {', '.join(WORKLOADS)}")


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of n requests arriving as a Poisson process of
    `rate` per second; rate = inf sends everything at once."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out
