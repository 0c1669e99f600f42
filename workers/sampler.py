"""Token sampling for a batch of requests with mixed parameters.

Order of operations (as in vLLM): raw logprobs (reported to clients) -> logit_bias and
min_tokens (workers.logits_adjust) -> penalties -> the grammar masks of constrained rows (workers.token_mask; before any argmax, native or
not) -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw. The draw is an
exponential race (argmax of p / E, E ~ Exp(1)), which samples exactly from p. A request with
a seed draws its noise from its own generator, one row of V values per token, so its tokens do
not depend on what else is in the batch.

Device: everything runs where the logits are (the model's device), generators included; only
the chosen token ids (and requested logprobs) go to the host, by one `.tolist()`. Copying the
[N, vocab] logits to the host instead would cost more per step on CUDA than the sampling
itself. The price: a seed reproduces its tokens on the same kind of device, not across CPU and
CUDA (their generators are different algorithms), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.logits_adjust import adjust
from workers.messages import TokenLogprobs
from workers.sampling_params import SamplingParams
from workers.token_mask import apply_token_mask


@dataclass
class SamplingState:
    """What one worker keeps per request across steps."""

    params: SamplingParams
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs fed so far
    generator: torch.Generator | None = None

    @classmethod
    def create(
        cls, params: SamplingParams, prompt_len: int, device: torch.device | str = "cpu"
    ) -> SamplingState:
        """`device`: where this request's logits will be (its seeded generator lives there)."""
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        return cls(params, prompt_len, [], gen)

    def skip_draws(self, n: int, vocab: int) -> None:
        """Advance the seeded generator past `n` tokens' noise (one row of `vocab` values each,
        as sample() draws it), for a request resumed after n output tokens elsewhere."""
        if self.generator is None or self.params.greedy:
            return
        row = torch.empty(vocab, device=self.generator.device)
        for _ in range(n):
            row.exponential_(generator=self.generator)


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    vocab = logits.shape[1]
    for i, st in enumerate(states):
        p = st.params
        if not p.needs_penalties:
            continue
        row = logits[i]
        ids = torch.tensor(st.token_ids, dtype=torch.long, device=logits.device)
        ids = ids[ids < vocab]
        if p.repetition_penalty != 1.0 and len(ids):
            seen = torch.unique(ids)
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        out = ids[st.prompt_len :] if len(ids) > st.prompt_len else ids[:0]
        if len(out) and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(out, minlength=vocab).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p, vectorised across rows."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits = logits / temps[:, None]
    vocab = logits.shape[1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if any(k < vocab for k in top_k) or any(tp < 1.0 for tp in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        drop = rank >= torch.tensor(top_k, device=dev)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (always keep the first).
        before = probs.cumsum(dim=-1) - probs
        drop = before >= torch.tensor(top_p, dtype=probs.dtype, device=dev)[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if any(m > 0 for m in min_p):
        floor = torch.tensor(min_p, dtype=probs.dtype, device=dev)[:, None]
        floor = floor * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _argmax(logits: torch.Tensor, native: bool) -> torch.Tensor:
    """Row argmax; `native`: torch.ops.flotilla.argmax_rows (both threads, reads bf16 logits
    as they are; torch's own argmax over [64, 49152] took ~4 ms here)."""
    if native and logits.device.type == "cpu" and logits.dim() == 2 and logits.is_contiguous():
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        torch.ops.flotilla.argmax_rows(out, logits)
        return out
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    states: list[SamplingState],
    default_gen: torch.Generator,
    native: bool = False,
    masks: tuple[list[int], torch.Tensor] | None = None,
) -> tuple[list[int], list[TokenLogprobs | None] | None]:
    """logits: [N, V] (any float dtype, on any device), one row per sampling request; the
    generators must be on the logits' device. `masks`: (rows, [len(rows), W] int32 words),
    the allowed tokens of grammar-constrained rows. Returns token ids (+ logprobs). Everything
    but a plain greedy argmax works on a float32 copy."""
    want_lp = [st.params.logprobs is not None for st in states]
    if any(want_lp) or any(st.params.needs_penalties or not st.params.greedy for st in states):
        logits = logits.float()
    raw_lp = logits.log_softmax(dim=-1) if any(want_lp) else None
    logits = adjust(logits, states)
    if any(st.params.needs_penalties for st in states):
        logits = logits.clone()
        _apply_penalties(logits, states)
    if masks is not None:
        rows, words = masks
        idx = torch.tensor(rows, device=logits.device)
        masked = apply_token_mask(logits[idx], words)
        # out of place: the caller's logits (the model's output) stay as they were
        logits = logits.float().index_put((idx,), masked)

    tokens = _argmax(logits, native)
    rand = [i for i, st in enumerate(states) if not st.params.greedy]
    if rand:
        idx = torch.tensor(rand, device=logits.device)
        probs = _filter(logits[idx], [states[i].params for i in rand])
        noise = torch.empty_like(probs)
        for j, i in enumerate(rand):
            gen = states[i].generator or default_gen
            noise[j].exponential_(generator=gen)
        tokens[idx] = (probs / noise).argmax(dim=-1)
    token_list = tokens.tolist()

    lps: list[TokenLogprobs | None] | None = None
    if raw_lp is not None:
        lps = []
        for i, st in enumerate(states):
            n = st.params.logprobs
            if n is None:
                lps.append(None)
                continue
            row = raw_lp[i]
            top = row.topk(n) if n else None
            lps.append(
                TokenLogprobs(
                    token_logprob=float(row[token_list[i]]),
                    top_ids=top.indices.tolist() if top is not None else [],
                    top_logprobs=top.values.tolist() if top is not None else [],
                )
            )
    return token_list, lps
