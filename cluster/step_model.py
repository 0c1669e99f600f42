"""An online model of how long an engine step takes, for the scheduler's prefill cap.

    t(d, p, w) = a + b * d + c * p + e * w

d: decode tokens in the step, p: prefill tokens, w: the prefill's attention pairs (query x key
positions, in thousands: a chunk of p tokens after s cached ones has p * (s + p / 2)). The
pairs term is why the model has four coefficients, not three: attention grows with the
context and the linears do not (on SmolLM2 a query-key pair is ~70k FLOP, so a token at
position 1,000 carries a third more work than one at position 0), and a model linear in p
alone, fitted mostly on early chunks, under-predicts the late chunks of long prompts: those
steps overran the target (benchmarks/RESULTS.md).

The engine reports every step's wall time (`observe`); the scheduler asks how many prefill
tokens, starting at a given position, fit next to `d` decodes under a target step time
(`max_prefill`). The fit is ordinary least squares over the most recent steps, kept in two
windows -- steps without prefill and steps with prefill -- so a long stretch of pure decoding
cannot push the prefill samples out and leave `c` unknown. A tiny ridge term keeps the solve
defined when a window has no spread (e.g. a constant batch size); coefficients are clamped at
zero, since a step never gets cheaper with more work.

Pure Python, no tensors: one observation is a few additions; a refit (once per step, only
when something changed) is a few hundred multiplications.
"""

from __future__ import annotations

import math
from collections import deque

_RIDGE = 1e-9  # relative to each feature's scale: only matters when the system is singular
_N = 4  # features: 1, d, p, w


def attention_pairs(num_tokens: int, start: int) -> float:
    """The `w` of a prefill chunk of `num_tokens` after `start` cached tokens (thousands)."""
    return num_tokens * (start + num_tokens / 2) / 1000.0


class StepTimeModel:
    def __init__(self, window: int = 64, min_samples: int = 8):
        self.window = window
        self.min_samples = min_samples
        self._decode_only: deque[tuple[int, int, float, float]] = deque(maxlen=window)
        self._with_prefill: deque[tuple[int, int, float, float]] = deque(maxlen=window)
        self._coef: tuple[float, float, float, float] | None = None
        self._dirty = False

    def observe(
        self, num_decodes: int, num_prefill_tokens: int, seconds: float, pairs: float = 0.0
    ) -> None:
        if num_decodes + num_prefill_tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        window = self._with_prefill if num_prefill_tokens else self._decode_only
        window.append((num_decodes, num_prefill_tokens, pairs, seconds))
        self._dirty = True

    @property
    def num_samples(self) -> int:
        return len(self._decode_only) + len(self._with_prefill)

    def coefficients(self) -> tuple[float, float, float, float] | None:
        """(a, b, c, e) in seconds, seconds per decode, seconds per prefill token, seconds per
        thousand attention pairs; None until there are `min_samples` steps, some of them with
        prefill."""
        if self._dirty:
            self._dirty = False
            self._coef = self._fit()
        return self._coef

    def predict(
        self, num_decodes: int, num_prefill_tokens: int, pairs: float = 0.0
    ) -> float | None:
        coef = self.coefficients()
        if coef is None:
            return None
        a, b, c, e = coef
        return a + b * num_decodes + c * num_prefill_tokens + e * pairs

    def prefill_cost(self, num_tokens: int, start: int = 0) -> float:
        """Seconds the step model charges `num_tokens` prefill tokens after `start` cached ones
        (known coefficients assumed: max_prefill answered)."""
        _, _, c, e = self.coefficients()
        return c * num_tokens + e * attention_pairs(num_tokens, start)

    def max_prefill(self, num_decodes: int, target_s: float, start: int = 0) -> int | None:
        """Most prefill tokens, starting after `start` cached ones, whose predicted step with
        `num_decodes` decodes stays within `target_s` (0 when the decodes alone exceed it);
        None while the model knows nothing."""
        coef = self.coefficients()
        if coef is None:
            return None
        a, b, c, e = coef
        room = target_s - a - b * num_decodes
        if room <= 0:
            return 0
        # c*p + e*p*(start + p/2)/1000 <= room: the positive root of a quadratic in p.
        lin = c + e * start / 1000.0
        quad = e / 2000.0
        if quad <= 0:
            if lin <= 0:
                return None  # prefill looks free: no limit the model can justify
            return int(room / lin + 1e-6)  # floor, forgiving the fit's last-digit rounding
        return int((-lin + math.sqrt(lin * lin + 4.0 * quad * room)) / (2.0 * quad) + 1e-6)

    def _fit(self) -> tuple[float, float, float, float] | None:
        samples = [*self._decode_only, *self._with_prefill]
        if len(samples) < self.min_samples or not self._with_prefill:
            return None
        # Normal equations X^T X w = X^T t with rows x = (1, d, p, w).
        s = [[0.0] * _N for _ in range(_N)]
        r = [0.0] * _N
        for d, p, w, t in samples:
            x = (1.0, float(d), float(p), float(w))
            for i in range(_N):
                r[i] += x[i] * t
                for j in range(i, _N):
                    s[i][j] += x[i] * x[j]
        for i in range(_N):
            for j in range(i):
                s[i][j] = s[j][i]
            s[i][i] += _RIDGE * s[i][i] + 1e-12
        coef = _solve(s, r)
        if coef is None:
            return None
        a, b, c, e = (max(v, 0.0) for v in coef)
        return (a, b, c, e)


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting (m and v are consumed)."""
    n = len(v)
    for col in range(n):
        piv = max(range(col, n), key=lambda i: abs(m[i][col]))
        if abs(m[piv][col]) < 1e-300:
            return None
        m[col], m[piv] = m[piv], m[col]
        v[col], v[piv] = v[piv], v[col]
        for i in range(col + 1, n):
            f = m[i][col] / m[col][col]
            for j in range(col, n):
                m[i][j] -= f * m[col][j]
            v[i] -= f * v[col]
    out = [0.0] * n
    for i in reversed(range(n)):
        out[i] = (v[i] - sum(m[i][j] * out[j] for j in range(i + 1, n))) / m[i][i]
    return out
