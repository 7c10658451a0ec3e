"""SparQ: each query scores every key approximately from its r largest-magnitude components, then
reads the top k keys exactly.

Follows Ribar et al. 2024, "SparQ Attention: Bandwidth-Efficient LLM Inference" (steps 1-2:
s_hat = q[i_r] . K[:, i_r] with i_r the r largest |q_i|, then exact attention on the top k of
s_hat). Leaves out step 3, the mean-value reallocation (alpha * v_mean added with the weight the
approximate softmax puts outside the top k): the kernel reads only exact keys, so SparQ here is
an exact subset. The softmax temperature correction of step 1 does not change the ranking, so it
is not computed. Also leaves out the bandwidth win itself (the keys are not stored twice, once
per component-major layout): the selection is what is studied.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .selection import Q
from .topk import ApproxTopK, budget_text, check_budget, dot, parse_budget


@njit(cache=True)
def sparq_rows(q, k, q_pos, k_pos, r):
    """Approximate scores S (Hq * Tq, Tk) float64, -inf where k_pos[j] > q_pos[t]: row (h, t)
    dots q[h, t] with each key on the r components of largest |q[h, t]| (ties: the lower
    component), taken in ascending component order, so r = d is the exact float32 dot of
    topk.score_rows bit for bit."""
    Hq, Tq, d = q.shape
    Hkv, Tk, _ = k.shape
    G = Hq // Hkv
    out = np.empty((Hq * Tq, Tk), np.float64)
    qs = np.empty(r, np.float32)
    ks = np.empty(r, np.float32)
    for row in range(Hq * Tq):
        h = row // Tq
        t = row % Tq
        comp = np.sort(np.argsort(-np.abs(q[h, t]), kind="mergesort")[:r])    # (r,) ascending
        for c in range(r):
            qs[c] = q[h, t, comp[c]]
        for j in range(Tk):
            if k_pos[j] > q_pos[t]:
                out[row, j] = -np.inf
                continue
            for c in range(r):
                ks[c] = k[h // G, j, comp[c]]
            out[row, j] = np.float64(dot(qs, ks))
    return out


class SparQ(ApproxTopK):
    """SparQ(r, k): per query head, rank the causal keys by the dot over the query's r largest
    |q_i| components, read the top k (or ceil(fraction * n_causal)) exactly.

    >>> x = np.random.default_rng(0).standard_normal((1, 8, 4)).astype(np.float32)
    >>> float(SparQ(4, 3).recall(x, x).min())        # r = d: the exact scores: exact top-k
    1.0
    """

    def __init__(self, r, k=None, fraction=None):
        if int(r) < 1:
            raise ValueError(f"SparQ: r (query components) must be >= 1, got {r}")
        self.r = int(r)
        self.k, self.fraction = check_budget("SparQ", k, fraction)

    def row_scores(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("SparQ: needs the queries (content-based), got q=None")
        if self.r > q.shape[-1]:
            raise ValueError(f"SparQ: r = {self.r} components, but the head width d is {q.shape[-1]}")
        S = sparq_rows(np.ascontiguousarray(q, np.float32), np.ascontiguousarray(k, np.float32),
                       q_pos, k_pos, self.r)                                   # (Hq*Tq, Tk)
        return Q, q.shape[0], S

    def describe(self):
        return f"sparq={self.r}/{budget_text(self.k, self.fraction)}"

    @staticmethod
    def from_spec(val):
        """`sparq=16/64`: r = 16 query components, k = 64 keys (or `sparq=16/2%`)."""
        parts = (val or "").split("/")
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"'sparq={val}': expected r/k, e.g. sparq=16/64 or sparq=16/2%")
        k, f = parse_budget(parts[1], f"sparq={val}")
        return SparQ(int(parts[0]), k, f)
