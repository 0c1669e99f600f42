"""An online model of how long an engine step takes, for the scheduler's prefill cap.

    t(d, p) = a + b * d + c * p        d: decode tokens in the step, p: prefill tokens

The engine reports every step's wall time (`observe`); the scheduler asks how many prefill
tokens fit next to `d` decodes under a target step time (`max_prefill`). The fit is ordinary
least squares over the most recent steps, kept in two windows -- steps without prefill and
steps with prefill -- so a long stretch of pure decoding cannot push the prefill samples out
and leave `c` unknown. A tiny ridge term keeps the 3x3 solve defined when a window has no
spread (e.g. a constant batch size); coefficients are clamped at zero, since a step never gets
cheaper with more work.

Pure Python, no tensors: one observation is a few additions; a refit (once per step, only
when something changed) is a few hundred multiplications.
"""

from __future__ import annotations

import math
from collections import deque

_RIDGE = 1e-9  # relative to each feature's scale: only matters when the system is singular


class StepTimeModel:
    def __init__(self, window: int = 64, min_samples: int = 8):
        self.window = window
        self.min_samples = min_samples
        self._decode_only: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._with_prefill: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._coef: tuple[float, float, float] | None = None
        self._dirty = False

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        if num_decodes + num_prefill_tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        window = self._with_prefill if num_prefill_tokens else self._decode_only
        window.append((num_decodes, num_prefill_tokens, seconds))
        self._dirty = True

    @property
    def num_samples(self) -> int:
        return len(self._decode_only) + len(self._with_prefill)

    def coefficients(self) -> tuple[float, float, float] | None:
        """(a, b, c) in seconds, seconds per decode, seconds per prefill token; None until there
        are `min_samples` steps, some of them with prefill."""
        if self._dirty:
            self._dirty = False
            self._coef = self._fit()
        return self._coef

    def predict(self, num_decodes: int, num_prefill_tokens: int) -> float | None:
        coef = self.coefficients()
        if coef is None:
            return None
        a, b, c = coef
        return a + b * num_decodes + c * num_prefill_tokens

    def max_prefill(self, num_decodes: int, target_s: float) -> int | None:
        """Most prefill tokens whose predicted step with `num_decodes` decodes stays within
        `target_s` (0 when the decodes alone exceed it); None while the model knows nothing."""
        coef = self.coefficients()
        if coef is None:
            return None
        a, b, c = coef
        room = target_s - a - b * num_decodes
        if room <= 0:
            return 0
        if c <= 0:
            return None  # prefill looks free: no limit the model can justify
        return int(room / c + 1e-6)  # floor, forgiving the fit's last-digit rounding

    def _fit(self) -> tuple[float, float, float] | None:
        samples = [*self._decode_only, *self._with_prefill]
        if len(samples) < self.min_samples or not self._with_prefill:
            return None
        # Normal equations X^T X w = X^T t with rows x = (1, d, p).
        s = [[0.0] * 3 for _ in range(3)]
        r = [0.0] * 3
        for d, p, t in samples:
            x = (1.0, float(d), float(p))
            for i in range(3):
                r[i] += x[i] * t
                for j in range(i, 3):
                    s[i][j] += x[i] * x[j]
        for i in range(3):
            for j in range(i):
                s[i][j] = s[j][i]
            s[i][i] += _RIDGE * s[i][i] + 1e-12
        w = _solve3(s, r)
        if w is None:
            return None
        return (max(w[0], 0.0), max(w[1], 0.0), max(w[2], 0.0))


def _solve3(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting on a 3x3 system (m and v are consumed)."""
    n = 3
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
