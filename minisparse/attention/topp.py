"""Twilight's top-p: from the keys a candidate selector offers, keep the fewest whose softmax mass
reaches p; the budget adapts to how peaked each query's attention is.

Follows Lin et al. 2025, "Twilight: Adaptive Attention Sparsity with Hierarchical Top-p Pruning":
a base algorithm (Quest, top-k, ...) proposes candidates, then per query head the candidates are
pruned to the smallest set S with sum_{j in S} softmax(q.K_cand / sqrt(d))_j >= p. Leaves out
Twilight's estimate of those weights from int4-quantised keys and its binary search for the
threshold: the weights here are the exact float32 logits in float64, sorted. The candidates'
own budget is the upper bound; the realised keys per row are in `last_kept` (and in attend's
stats), since nothing fixes them in advance.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .patterns import Dense
from .selection import Q, Selection
from .selector import Selector
from .topk import score_rows


@njit(cache=True)
def top_p_rows(S, cand, p, scale):
    """Per row r of S (R, Tk) float64 logits (-inf: not causal) among the keys with cand[r]:
    keep the fewest keys whose softmax weights exp(scale * S) sum to >= p of the candidates'
    total, heaviest first (ties: the later key first, as top-k). -> keep (R, Tk) bool.

    The cumulative sum in that order is also the total, so p = 1 keeps every candidate."""
    R, Tk = S.shape
    keep = np.zeros((R, Tk), np.bool_)
    for r in range(R):
        n = 0
        m = -np.inf
        for j in range(Tk):
            if cand[r, j] and S[r, j] > -np.inf:
                n += 1
                m = max(m, S[r, j])
        if n == 0:
            continue
        idx = np.empty(n, np.int64)          # candidate keys, LATEST first
        w = np.empty(n, np.float64)
        a = 0
        for j in range(Tk - 1, -1, -1):
            if cand[r, j] and S[r, j] > -np.inf:
                idx[a] = j
                w[a] = np.exp((S[r, j] - m) * scale)
                a += 1
        order = np.argsort(-w, kind="mergesort")        # stable: equal weights keep latest first
        cs = np.cumsum(w[order])
        target = p * cs[-1]
        for i in range(n):
            keep[r, idx[order[i]]] = True
            if cs[i] >= target:
                break
    return keep


class TopP(Selector):
    """TopP(p, candidates): per query head, the fewest of the candidates' causal keys whose softmax
    mass (among the candidates) reaches p. candidates: any exact-subset selector (a Union for
    several); None = every causal key (Dense).

    In a spec, `topp=P` applies to the union of the OTHER members: `topp=0.95,quest=16/512` is
    TopP(0.95, Quest(16, k=512)); `topp=0.9` alone prunes dense attention.

    >>> import numpy as np
    >>> q = np.zeros((1, 1, 4), np.float32); k = np.zeros((1, 10, 4), np.float32)
    >>> TopP(0.5).select(q, k, np.array([9])).idx.tolist()     # uniform: 5 of 10 keys
    [5, 6, 7, 8, 9]
    """

    def __init__(self, p, candidates=None):
        if not 0.0 < float(p) <= 1.0:
            raise ValueError(f"TopP: p (softmax mass to keep) must be in (0, 1], got {p}")
        if candidates is not None and not isinstance(candidates, Selector):
            raise ValueError(f"TopP: candidates must be a Selector, got {type(candidates).__name__}")
        if candidates is not None and not candidates.exact_subset:
            raise ValueError(f"TopP: candidates must read real keys exactly (their softmax mass is "
                             f"what is pruned); {candidates.describe()} reads pseudo-keys or "
                             f"weighted samples")
        self.p, self.candidates = float(p), candidates
        self.last_kept = None                 # (Hq, Tq) keys kept per row by the last select

    @property
    def deterministic(self):
        return self.candidates is None or self.candidates.deterministic

    @property
    def row_local(self):
        return self.candidates is None or self.candidates.row_local

    def _select(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("TopP: needs the queries (content-based), got q=None")
        Hq, Tq, d = q.shape
        Tk = k.shape[1]
        cands = Dense() if self.candidates is None else self.candidates
        q = np.ascontiguousarray(q, np.float32)
        k = np.ascontiguousarray(k, np.float32)
        keep = np.zeros((Hq, Tq, Tk), np.bool_)
        step = max(1, 2**22 // max(1, Hq * Tk))          # queries per block: bounded masks
        if not cands.row_local:                          # its rows depend on the whole call
            step = max(Tq, 1)
        for a in range(0, Tq, step):
            b = min(Tq, a + step)
            qb = np.ascontiguousarray(q[:, a:b])
            mask, _ = cands.select(qb, k, q_pos[a:b], k_pos).to_mask(Hq, b - a, Tk)   # (Hq, b', Tk)
            S = score_rows(qb, k, q_pos[a:b], k_pos, False)                   # (Hq*b', Tk)
            kb = top_p_rows(S, mask.reshape(Hq * (b - a), Tk), self.p, 1.0 / np.sqrt(d))
            keep[:, a:b] = kb.reshape(Hq, b - a, Tk)
        self.last_kept = keep.sum(-1)                                          # (Hq, Tq)
        ptr = np.zeros(Hq * Tq + 1, np.int64)
        np.cumsum(self.last_kept.ravel(), out=ptr[1:])
        idx = np.nonzero(keep.reshape(Hq * Tq, Tk))[1]                        # row-major: ascending
        return Selection.from_lists(ptr, idx, Tk, head_kind=Q, n_heads=Hq, tq=Tq, normalized=True)

    def at_layer(self, layer, shared):
        if self.candidates is None:
            return self
        return TopP(self.p, self.candidates.at_layer(layer, shared))

    def for_layer(self, layer, state, k, v):
        if self.candidates is None:
            return self
        return TopP(self.p, self.candidates.for_layer(layer, state, k, v))

    def bind(self, state):
        return self if self.candidates is None else TopP(self.p, self.candidates.bind(state))

    def describe(self):
        s = f"topp={self.p:g}"
        return s if self.candidates is None else s + "," + self.candidates.describe()

    @staticmethod
    def from_spec(val):
        """`topp=0.95`: the candidates are filled in by the spec parser (the other members)."""
        if val is None:
            raise ValueError("'topp' needs the mass to keep, e.g. topp=0.95")
        try:
            p = float(val)
        except ValueError:
            raise ValueError(f"'topp={val}': expected a probability in (0, 1], e.g. topp=0.95") from None
        return TopP(p)
