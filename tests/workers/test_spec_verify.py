"""Draft verification (workers/spec_decode.py) without a model: the greedy prefix rule, and
that accepted + resampled tokens follow the target distribution (many seeded draws, so the
bounds are deterministic), and that seeded requests draw exactly what the plain sampler does."""

from __future__ import annotations

import pytest
import torch

from workers.messages import SeqPlan
from workers.sampler import SamplingState, sample
from workers.sampling_params import SamplingParams
from workers.spec_decode import (
    accept_greedy,
    accept_sampled,
    accept_speculative,
    rejection_sample,
    sample_with_drafts,
    split_greedy,
)

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
N = 20000


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


@pytest.mark.parametrize(
    ("targets", "drafts", "want"),
    [
        ([5, 6, 7], [5, 6], [5, 6, 7]),  # all accepted + the bonus token
        ([5, 9, 7], [5, 6], [5, 9]),  # second rejected: the target's token instead
        ([4, 6, 7], [5, 6], [4]),  # first rejected: a later match does not count
        ([3], [], [3]),  # no drafts: a plain decode
    ],
)
def test_accept_greedy(targets, drafts, want):
    assert accept_greedy(targets, drafts) == want


def test_split_greedy_rows_per_sequence():
    seqs = [
        SeqPlan("a", [1, 5, 6], 10, [0], True, num_draft=2),
        SeqPlan("b", [2], 4, [1], True),
        SeqPlan("c", [3, 8], 7, [2], True, num_draft=1),
    ]
    assert split_greedy(seqs, [5, 9, 7, 11, 8, 4]) == [[5, 9], [11], [8, 4]]


@pytest.mark.parametrize("draft", [0, 1, 5])
def test_rejection_sample_keeps_the_target_distribution(draft):
    gen = torch.Generator().manual_seed(1234)
    toks = rejection_sample(P.expand(N, len(P)), gen)
    counts = torch.bincount(toks, minlength=len(P)).double()
    # accepted with probability p(d) ...
    assert abs(counts[draft] / N - P[draft]) < 0.015
    # ... all tokens together follow p ...
    assert tv(counts, P.double()) < 0.015
    # ... and on rejection, p without d, renormalised (the residual max(0, p - onehot(d))).
    residual = P.double().clone()
    residual[draft] = 0
    rejected = counts.clone()
    rejected[draft] = 0
    assert tv(rejected, residual / residual.sum()) < 0.02


def test_rejection_sample_bounds_can_fail():
    """The same bound rejects a sampler that accepts the draft half the time regardless."""
    gen = torch.Generator().manual_seed(1234)
    toks = rejection_sample(P.expand(N, len(P)), gen)
    toks[torch.rand(N, generator=gen) < 0.5] = 1
    counts = torch.bincount(toks, minlength=len(P)).double()
    assert tv(counts, P.double()) > 0.1


def test_two_drafts_follow_the_target_chain():
    """Positions with their own target distributions: the first token follows p1; after an
    accepted first draft, the second follows p2; the third position is reached only when
    both drafts are accepted (probability p1(d1) * p2(d2))."""
    p1 = P
    p2 = torch.tensor([0.05, 0.05, 0.5, 0.2, 0.1, 0.1])
    p3 = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
    logits = torch.stack([p1, p2, p3]).log()
    drafts = [0, 2]
    st = SamplingState.create(SamplingParams(temperature=1.0), 1)
    gen = torch.Generator().manual_seed(99)
    firsts, seconds, lengths = [], [], []
    for _ in range(N // 4):  # a loop of small tensor ops: fewer draws, wider bounds
        out = accept_sampled(logits, drafts, st, gen)
        lengths.append(len(out))
        firsts.append(out[0])
        if out[0] == drafts[0]:
            seconds.append(out[1])
    c1 = torch.bincount(torch.tensor(firsts), minlength=6).double()
    c2 = torch.bincount(torch.tensor(seconds), minlength=6).double()
    assert tv(c1, p1.double()) < 0.03
    assert tv(c2, p2.double()) < 0.05
    full = sum(1 for n in lengths if n == 3) / len(lengths)
    assert abs(full - float(p1[0] * p2[2])) < 0.03


def test_seeded_verification_draws_what_the_plain_sampler_draws():
    """A seeded request's tokens are the plain sampler's, position by position: one row of
    noise per output token, so speculation does not change a seeded output."""
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    params = SamplingParams(temperature=0.8, top_k=50, seed=7)
    plain = SamplingState.create(params, 1)
    want = [sample(logits[j : j + 1], [plain], torch.Generator())[0][0] for j in range(4)]
    # Drafts equal to the plain sampler's tokens: all accepted, then the same bonus token.
    st = SamplingState.create(params, 1)
    assert accept_sampled(logits, want[:3], st, torch.Generator()) == want
    # A wrong second draft: the first token, then the plain sampler's second token, and the
    # generator has advanced by exactly two rows (the next plain draw is want[2]).
    st = SamplingState.create(params, 1)
    bad = (want[1] + 1) % 300
    assert accept_sampled(logits, [want[0], bad, want[2]], st, torch.Generator()) == want[:2]
    assert sample(logits[2:3], [st], torch.Generator())[0][0] == want[2]


def test_mixed_batch_plain_and_speculating():
    torch.manual_seed(1)
    logits = torch.randn(5, 50)
    greedy = SamplingParams(temperature=0.0)
    seqs = [
        SeqPlan("a", [1], 3, [0], True),
        SeqPlan("b", [1, 9, 9, 9], 5, [1], True, num_draft=3),
        SeqPlan("c", [2], 8, [2], True),
    ]
    states = [SamplingState.create(greedy, 1) for _ in seqs]
    am = logits.argmax(dim=-1).tolist()
    b_want = accept_greedy(am[1:5], [9, 9, 9])
    tokens, lps = sample_with_drafts(
        torch.cat([logits[0:1], logits[1:5], logits[4:5]]), seqs, states, torch.Generator()
    )
    assert tokens == [[am[0]], b_want, [am[4]]] and lps is None


# ---- a draft model's drafts: q is a distribution, not a point mass ------------------------------
Q = torch.tensor([0.10, 0.10, 0.10, 0.10, 0.30, 0.30])
P2 = torch.tensor([0.05, 0.05, 0.5, 0.2, 0.1, 0.1])


def speculate(q_claimed: torch.Tensor, n: int = N // 8):
    """n rounds of: a draft d ~ Q, verified by accept_speculative against p1 (then p2 for the
    bonus) with `q_claimed` as its draft distribution. Returns (first tokens, tokens after an
    accepted draft, acceptance rate)."""
    logits = torch.stack([P, P2]).log()
    st = SamplingState.create(SamplingParams(temperature=1.0), 1)
    gen = torch.Generator().manual_seed(7)
    drafts = torch.multinomial(Q, n, replacement=True, generator=gen).tolist()
    firsts, seconds = [], []
    for d in drafts:
        out = accept_speculative(logits, [d], q_claimed[None], st, gen)
        firsts.append(out[0])
        if len(out) == 2:
            seconds.append(out[1])
    c1 = torch.bincount(torch.tensor(firsts), minlength=6).double()
    c2 = torch.bincount(torch.tensor(seconds), minlength=6).double()
    return c1, c2, len(seconds) / n


def test_speculative_sampling_keeps_the_target_distribution():
    """Accept d ~ q with probability min(1, p/q), else draw from max(0, p - q): every token
    follows p, and drafts are accepted with probability sum(min(p, q)) (0.5 here)."""
    c1, c2, rate = speculate(Q)
    assert tv(c1, P.double()) < 0.045
    assert tv(c2, P2.double()) < 0.06  # the bonus token after an accepted draft (half as many)
    assert abs(rate - float(torch.minimum(P, Q).sum())) < 0.03


def test_speculative_sampling_bound_can_fail():
    """The bound catches a sampler that verifies against the wrong q (uniform, while the
    drafts came from Q): its tokens lean towards Q, about three times past the 0.045 bound."""
    c1, _, _ = speculate(torch.full((6,), 1 / 6), n=N // 10)
    assert tv(c1, P.double()) > 0.09  # 0.126 in expectation


def test_speculative_sampling_greedy_is_the_argmax_rule():
    logits = torch.stack([P, P2, P]).log()
    st = SamplingState.create(SamplingParams(temperature=0.0), 1)
    q = torch.full((2, 6), 1 / 6)
    assert accept_speculative(logits, [0, 2], q, st, torch.Generator()) == [0, 2, 0]
    assert accept_speculative(logits, [0, 3], q, st, torch.Generator()) == [0, 2]
