"""Speculative decoding, worker side: verify k draft tokens with the target's logits at the
k+1 positions of one step, exactly.

Greedy: keep drafts while they equal the target's argmax; then the argmax where they first
differ (or after the last draft). The output is the target's greedy output, token for token.

Sampling: n-gram drafts have a point-mass draft distribution q = onehot(d), for which
rejection sampling is: accept d with probability p(d); on rejection, draw from
max(0, p - q) normalised, i.e. p with d removed. One exponential race does both: with
E ~ Exp(1) per token, x = argmax p / E is distributed as p, so P(x == d) = p(d) (accept), and
given x != d, x is distributed as p without d, renormalised (the residual). We draw one race
per position, in order, stopping at the first rejection -- one row of noise per output token,
the very draws the plain sampler makes (workers/sampler.py). So a seeded request gets the same
tokens with and without speculation, whatever the batch, and its generator stays in step with
skip_draws() for a resumed request.

A draft model's drafts come with their distribution q (workers/draft_model.py) and take the
general rule (accept_speculative; Leviathan et al. 2023): accept d with probability
min(1, p(d) / q(d)); on rejection draw from max(0, p - q) normalised; after k accepted
drafts, the bonus token from p. Each output token then follows the target's p exactly,
whatever q is. Greedy requests keep the argmax rule above.
"""

from __future__ import annotations

import torch

from workers.messages import SeqPlan, TokenLogprobs
from workers.sampler import SamplingState, _filter, sample


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """`targets`: the argmax at each of the len(drafts) + 1 positions."""
    out: list[int] = []
    for j, t in enumerate(targets):
        out.append(t)
        if j == len(drafts) or t != drafts[j]:
            break
    return out


def rejection_sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A token per row of `probs` [..., V] that is a row's draft d with probability p(d) and
    otherwise follows p without d, renormalised: the caller accepts d when it is the token
    (see the module docstring; the race needs no d)."""
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def accept_sampled(
    logits: torch.Tensor, drafts: list[int], state: SamplingState, default_gen: torch.Generator
) -> list[int]:
    """`logits`: [len(drafts) + 1, V], the target's at each position."""
    if state.params.greedy:
        return accept_greedy(logits.argmax(dim=-1).tolist(), drafts)
    probs = _filter(logits.float(), [state.params] * len(logits))
    gen = state.generator or default_gen
    out: list[int] = []
    for j in range(len(logits)):
        tok = int(rejection_sample(probs[j], gen))  # one row of noise, as the plain sampler
        out.append(tok)
        if j == len(drafts) or tok != drafts[j]:
            break
    return out


def accept_speculative(
    logits: torch.Tensor,
    drafts: list[int],
    q: torch.Tensor,
    state: SamplingState,
    default_gen: torch.Generator,
) -> list[int]:
    """`logits`: [len(drafts) + 1, V], the target's at each position; `q`: [len(drafts), V],
    the draft distribution each draft was drawn from (the request's temperature / top-k /
    top-p applied to the draft model's logits, as p gets them here)."""
    if state.params.greedy:
        return accept_greedy(logits.argmax(dim=-1).tolist(), drafts)
    p = _filter(logits.float(), [state.params] * len(logits))
    gen = state.generator or default_gen
    k = len(drafts)
    a = 0  # drafts accepted
    if k:
        rows = torch.arange(k, device=p.device)
        d = torch.tensor(drafts, device=p.device)
        u = torch.rand(k, generator=gen, device=p.device)
        # accept d_j with probability min(1, p/q) (q(d_j) > 0: d_j was drawn from q), up to
        # the first rejection; one vector op, one host read
        ok = (u * q[rows, d].to(p.dtype) < p[rows, d]).tolist()
        a = ok.index(False) if False in ok else k
    if a == k:
        return drafts + [int(rejection_sample(p[k], gen))]  # the bonus token, from p
    residual = (p[a] - q[a].to(p.dtype)).clamp_min_(0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: a rejection cannot happen
        residual = p[a]
    return drafts[:a] + [int(rejection_sample(residual, gen))]  # the race needs no normalising


def sample_rows(seq: SeqPlan) -> int:
    """Rows of the step's hidden states this sequence samples from (its last ones)."""
    return seq.num_draft + 1 if seq.sample else 0


def split_greedy(seqs: list[SeqPlan], targets: list[int]) -> list[list[int]]:
    """Per sequence, its tokens from the argmax of every sampled row (rows in `seqs` order)."""
    out, r = [], 0
    for seq in seqs:
        n = sample_rows(seq)
        out.append(accept_greedy(targets[r : r + n], seq.token_ids[len(seq.token_ids) - n + 1 :]))
        r += n
    return out


def sample_with_drafts(
    logits: torch.Tensor,
    seqs: list[SeqPlan],
    states: list[SamplingState],
    default_gen: torch.Generator,
    native: bool = False,
    masks: tuple[list[int], torch.Tensor] | None = None,
    draft_probs: dict[str, torch.Tensor] | None = None,
) -> tuple[list[list[int]], list[TokenLogprobs | None] | None]:
    """`logits`: every sampled row of `seqs`, in order (sample_rows() each). Plain sequences
    go to the sampler together; speculating ones are verified one by one. `masks`: grammar
    masks by index into `seqs` (workers/sampler.py's form); only plain sequences have them.
    `draft_probs`: by request id, the q of a draft model's sampled drafts (accept_speculative);
    drafts without one are point masses (n-gram drafts, or a greedy request's).
    Speculating requests never ask for logprobs, a grammar, a logit bias or min_tokens
    (cluster.spec_decode.can_speculate): their drafts are checked on the raw logits."""
    if all(s.num_draft == 0 for s in seqs):
        tokens, lps = sample(logits, states, default_gen, native, masks)
        return [[t] for t in tokens], lps
    starts, r = [], 0
    for seq in seqs:
        starts.append(r)
        r += sample_rows(seq)
    plain = [i for i, s in enumerate(seqs) if s.num_draft == 0]
    out: list[list[int]] = [[] for _ in seqs]
    lps: list[TokenLogprobs | None] | None = None
    if plain:
        rows = torch.tensor([starts[i] for i in plain], device=logits.device)
        plain_masks = None
        if masks is not None:  # re-index the masked rows into the plain subset
            at = {seq_i: j for j, seq_i in enumerate(plain)}
            assert all(r in at for r in masks[0]), "a constrained request speculated"
            plain_masks = ([at[r] for r in masks[0]], masks[1])
        tokens, plain_lps = sample(
            logits[rows], [states[i] for i in plain], default_gen, native, plain_masks
        )
        for i, t in zip(plain, tokens, strict=True):
            out[i] = [t]
        if plain_lps is not None:
            lps = [None] * len(seqs)
            for i, lp in zip(plain, plain_lps, strict=True):
                lps[i] = lp
    for i, seq in enumerate(seqs):
        if seq.num_draft:
            rows = logits[starts[i] : starts[i] + seq.num_draft + 1]
            drafts = seq.token_ids[-seq.num_draft :]
            q = draft_probs.get(seq.req_id) if draft_probs else None
            if q is not None:
                out[i] = accept_speculative(rows, drafts, q, states[i], default_gen)
            else:
                out[i] = accept_sampled(rows, drafts, states[i], default_gen)
    return out, lps
