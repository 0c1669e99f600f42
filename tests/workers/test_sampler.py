"""Sampler on synthetic logits: filters, seeds, batch independence, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from workers.sampler import SamplingState, _apply_penalties, sample
from workers.sampling_params import SamplingParams

V = 32


def st(prompt: list[int] | None = None, outputs: list[int] | None = None, **kw) -> SamplingState:
    prompt = prompt if prompt is not None else [0]
    s = SamplingState.create(SamplingParams(**kw), len(prompt))
    s.token_ids = list(prompt) + list(outputs or [])
    return s


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def rand_logits(n: int, seed: int, vocab: int = V) -> torch.Tensor:
    return torch.randn(n, vocab, generator=gen(seed)) * 3


def draw_many(logits_row: torch.Tensor, n: int, seed: int = 0, **kw) -> list[int]:
    """n independent draws from one row (one batch of n identical unseeded rows)."""
    logits = logits_row[None, :].repeat(n, 1)
    toks, _ = sample(logits, [st(**kw) for _ in range(n)], gen(seed))
    return toks


def test_greedy_is_argmax():
    logits = rand_logits(6, 1)
    toks, lps = sample(logits.clone(), [st(temperature=0.0) for _ in range(6)], gen())
    assert toks == logits.argmax(dim=-1).tolist()
    assert lps is None


def test_greedy_consumes_no_randomness():
    g = gen(3)
    before = g.get_state().clone()
    sample(rand_logits(4, 2), [st(temperature=0.0) for _ in range(4)], g)
    assert torch.equal(g.get_state(), before)


def test_top_k_1_is_greedy():
    logits = rand_logits(8, 2)
    toks, _ = sample(logits, [st(temperature=1.5, top_k=1) for _ in range(8)], gen())
    assert toks == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_max():
    logits = torch.zeros(V)
    logits[5] = 1.0  # the max, but far from dominant: p ~ 0.08
    toks = draw_many(logits, 300, temperature=1.0, top_p=1e-6)
    assert set(toks) == {5}
    # Without top_p the same draws spread out.
    assert len(set(draw_many(logits, 300, temperature=1.0))) > 10


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # Mass before token 2 is 0.8 >= 0.75: tokens 2 and 3 are dropped.
    toks = draw_many(probs.log(), 2000, temperature=1.0, top_p=0.75)
    assert set(toks) == {0, 1}
    toks = draw_many(probs.log(), 2000, temperature=1.0, top_p=0.85)
    assert set(toks) == {0, 1, 2}


def test_top_k_keeps_k_most_likely():
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])
    toks = draw_many(probs.log(), 2000, temperature=1.0, top_k=2)
    assert set(toks) == {1, 3}


def test_min_p_filters_below_fraction_of_max():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # floor = 0.2 * 0.5 = 0.1: token 3 (0.05) is dropped, 2 (0.15) kept.
    toks = draw_many(probs.log(), 3000, temperature=1.0, min_p=0.2)
    assert set(toks) == {0, 1, 2}
    # floor = 0.5 * 0.5 = 0.25: only 0 and 1 survive.
    toks = draw_many(probs.log(), 3000, temperature=1.0, min_p=0.5)
    assert set(toks) == {0, 1}
    assert set(draw_many(probs.log(), 3000, temperature=1.0)) == {0, 1, 2, 3}


def test_sampled_frequencies_match_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 8000
    toks = draw_many(probs.log(), n, seed=1234, temperature=1.0)
    freq = torch.bincount(torch.tensor(toks), minlength=4).double() / n
    # 4.5 sigma for p=0.4 at n=8000 is ~0.025.
    for f, p in zip(freq.tolist(), probs.tolist(), strict=True):
        assert abs(f - p) < 0.025, (freq, probs)


def test_temperature_sharpens_and_flattens():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 8000
    # T=0.5 squares the probabilities: p ~ [1, 4, 9, 16] / 30.
    toks = draw_many(probs.log(), n, seed=5, temperature=0.5)
    freq = torch.bincount(torch.tensor(toks), minlength=4).double() / n
    want = [1 / 30, 4 / 30, 9 / 30, 16 / 30]
    for f, p in zip(freq.tolist(), want, strict=True):
        assert abs(f - p) < 0.025, (freq, want)


def test_seeded_sampling_repeats():
    logits = [rand_logits(1, 100 + i) for i in range(20)]

    def run(seed: int) -> list[int]:
        s = st(temperature=1.0, seed=seed)
        return [sample(lg.clone(), [s], gen(999))[0][0] for lg in logits]

    a, b = run(42), run(42)
    assert a == b
    assert run(43) != a  # the seed matters (20 draws from near-flat rows)


def test_seed_independent_of_batch_composition():
    steps = 15
    logits = [rand_logits(1, 200 + i)[0] for i in range(steps)]

    def alone() -> list[int]:
        s = st(temperature=1.0, seed=7, top_p=0.95)
        return [sample(lg[None].clone(), [s], gen(0))[0][0] for lg in logits]

    def in_batch(default_seed: int) -> list[int]:
        target = st(temperature=1.0, seed=7, top_p=0.95)
        others = [
            st(temperature=1.0),  # unseeded: draws from the shared generator
            st(temperature=0.0),  # greedy
            st(temperature=0.8, seed=9, top_k=5),  # another seeded row
            st(temperature=1.3, min_p=0.1),
        ]
        out = []
        g = gen(default_seed)
        for i, lg in enumerate(logits):
            # Vary the position and the neighbours at every step.
            rows = others[: i % 5]
            pos = i % (len(rows) + 1)
            batch = rows[:pos] + [target] + rows[pos:]
            mat = torch.stack([rand_logits(1, 1000 * i + j)[0] for j in range(len(batch))])
            mat[pos] = lg
            toks, _ = sample(mat, batch, g)
            out.append(toks[pos])
        return out

    ref = alone()
    assert in_batch(0) == ref
    assert in_batch(12345) == ref


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0, 1.0]])
    s = st(prompt=[0, 1], outputs=[1, 4], repetition_penalty=2.0)
    out = logits.clone()
    _apply_penalties(out, [s])
    # Seen ids {0, 1, 4}: positive logits divided, negative multiplied; others untouched.
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5, -4.0, 1.0]]


def test_presence_frequency_penalty_formula():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0, 1.0]])
    # Prompt tokens (0, 5) do not count; outputs: 2 twice, 3 once.
    s = st(prompt=[0, 5], outputs=[2, 3, 2], presence_penalty=0.5, frequency_penalty=0.25)
    out = logits.clone()
    _apply_penalties(out, [s])
    want = [2.0, -1.0, 3.0 - 0.5 - 2 * 0.25, 0.5 - 0.5 - 0.25, -2.0, 1.0]
    assert out[0].tolist() == pytest.approx(want, abs=1e-6)


def test_penalty_flips_argmax():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]])
    # Token 1 was generated before: repetition 1.5 gives 2.0 < 2.5.
    toks, lps = sample(
        logits.clone(),
        [st(prompt=[0], outputs=[1], temperature=0.0, repetition_penalty=1.5, logprobs=2)],
        gen(),
    )
    assert toks == [2]
    # Logprobs are of the raw logits, before penalties.
    raw = logits.log_softmax(-1)[0]
    assert lps[0].token_logprob == pytest.approx(float(raw[2]))
    assert lps[0].top_ids == [1, 2]
    # Frequency penalty on two earlier 1s: 3.0 - 2 * 0.3 = 2.4 < 2.5.
    toks, _ = sample(
        logits.clone(),
        [st(prompt=[0], outputs=[1, 1], temperature=0.0, frequency_penalty=0.3)],
        gen(),
    )
    assert toks == [2]
    toks, _ = sample(  # 0.2 each is not enough: 2.6 > 2.5
        logits.clone(),
        [st(prompt=[0], outputs=[1, 1], temperature=0.0, frequency_penalty=0.2)],
        gen(),
    )
    assert toks == [1]
    # Presence penalty counts once; a token only in the prompt is not penalised by it.
    toks, _ = sample(
        logits.clone(),
        [st(prompt=[0], outputs=[1, 1], temperature=0.0, presence_penalty=0.6)],
        gen(),
    )
    assert toks == [2]
    toks, _ = sample(
        logits.clone(), [st(prompt=[1], outputs=[0], temperature=0.0, presence_penalty=2.0)], gen()
    )
    assert toks == [1]
    # Penalties only touch the rows that ask for them, and not the caller's tensor.
    batch = torch.cat([logits, logits])
    toks, _ = sample(
        batch,
        [
            st(prompt=[0], outputs=[1], temperature=0.0, repetition_penalty=1.5),
            st(prompt=[0], outputs=[1], temperature=0.0),
        ],
        gen(),
    )
    assert toks == [2, 1]
    assert torch.equal(batch, torch.cat([logits, logits]))


def test_logprobs():
    logits = rand_logits(5, 9)
    states = [
        st(temperature=1.0, logprobs=5),
        st(temperature=0.0, logprobs=3),
        st(temperature=1.0),  # no logprobs asked
        st(temperature=0.7, top_k=4, logprobs=0),
        st(temperature=1.0, seed=3, logprobs=20),
    ]
    toks, lps = sample(logits.clone(), states, gen(4))
    raw = logits.log_softmax(dim=-1)
    assert lps is not None and len(lps) == 5
    assert lps[2] is None
    for i in (0, 1, 3, 4):
        assert lps[i].token_logprob == pytest.approx(float(raw[i, toks[i]]), abs=1e-6)
    for i, n in ((0, 5), (1, 3), (4, 20)):
        lp = lps[i]
        assert len(lp.top_ids) == len(lp.top_logprobs) == n
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.top_ids == raw[i].argsort(descending=True)[:n].tolist()
        assert lp.top_logprobs == pytest.approx(raw[i, lp.top_ids].tolist(), abs=1e-6)
        assert math.isclose(sum(math.exp(x) for x in raw[i].tolist()), 1.0, rel_tol=1e-5)
    assert lps[1].top_ids[0] == toks[1]  # greedy picks the top logprob
    assert lps[3].top_ids == [] and lps[3].top_logprobs == []


def _mask_words(allowed_per_row: list[list[int]], vocab: int) -> torch.Tensor:
    words = torch.zeros(len(allowed_per_row), (vocab + 31) // 32, dtype=torch.int64)
    for i, allowed in enumerate(allowed_per_row):
        for t in allowed:
            words[i, t // 32] |= 1 << (t % 32)
    return words.to(torch.int32)  # bit 31 wraps to the sign bit, as the grammar library writes it


@pytest.mark.parametrize("native", [False, True])
def test_grammar_masks_bind_constrained_rows_only(native):
    """Masked rows pick only allowed tokens (greedy, sampled, with penalties, with the native
    argmax); unmasked rows and reported logprobs are what they are without masks."""
    if native:
        pytest.importorskip("workers.kernels.dispatch")
        from workers.kernels.dispatch import decide

        if not decide("auto", torch.device("cpu")).native:
            pytest.skip("native kernels not built here")
    vocab = 100  # not a multiple of 32: the last word is partial
    logits = rand_logits(5, 7, vocab)
    kws = [
        dict(temperature=0.0, logprobs=2),
        dict(temperature=0.0),
        dict(temperature=1.0, seed=1),
        dict(temperature=0.7, top_k=5, repetition_penalty=1.3),
        dict(temperature=0.0),
    ]
    states = [st(prompt=[1, 2, 3], **kw) for kw in kws]
    allowed = {0: [31, 63, 99], 2: [5, 6, 95], 3: [40]}
    rows = sorted(allowed)
    words = _mask_words([allowed[r] for r in rows], vocab)
    free, free_lp = sample(logits, [st(prompt=[1, 2, 3], **kw) for kw in kws], gen(0), native)
    before = logits.clone()
    toks, lps = sample(logits, states, gen(0), native, (rows, words))
    assert torch.equal(logits, before)  # the caller's logits untouched
    for r in rows:
        assert toks[r] in allowed[r]
    assert toks[0] == max(allowed[0], key=lambda t: logits[0, t])  # greedy among allowed
    assert toks[3] == 40
    assert [toks[i] for i in (1, 4)] == [free[i] for i in (1, 4)]
    assert lps[0].top_ids == free_lp[0].top_ids  # raw logprobs, as the model gave them
    assert toks[0] != free[0] or free[0] in allowed[0]


# ---- logit_bias and min_tokens (workers.logits_adjust) ------------------------------------------
def test_logit_bias_moves_greedy_and_sampled_rows():
    logits = rand_logits(3, 7)
    before = logits.clone()
    low = int(logits[0].argmin())
    states = [
        st(temperature=0.0, logit_bias={low: 100.0}),
        st(temperature=1.0, seed=3, logit_bias={low: 100.0}),
        st(temperature=0.0, logit_bias={int(logits[2].argmax()): -100.0, V + 5: 100.0}),
    ]
    toks, _ = sample(logits, states, gen())
    assert toks[:2] == [low, low]
    assert toks[2] != int(logits[2].argmax())  # banned; the id past the vocabulary is ignored
    assert torch.equal(logits, before)  # the model's logits are not written


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # "EOS" is the argmax
    rows = [
        st(temperature=0.0, min_tokens=3, stop_token_ids=[2], outputs=out)
        for out in ([5, 6], [5, 6, 7])
    ]
    toks, lps = sample(
        logits, rows + [st(temperature=0.0, min_tokens=3, stop_token_ids=[2], logprobs=0)], gen()
    )
    assert toks[0] != 2 and toks[1] == 2  # 2 outputs so far: masked; 3: allowed
    assert toks[2] != 2 and lps[2].token_logprob < -9  # logprobs describe the model, unmasked
