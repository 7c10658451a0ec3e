"""Hybrid: split one key budget between two rankers: the primary picks round(ratio * budget)
keys, the secondary fills the rest from the keys the primary left (disjoint by construction).

Leaves out weighting or sampling (both members read their keys exactly) and the members'
own budgets and recent suffixes (only their rankings are used). Follows the top-k + LSH
mixtures of BMRT/LASER-KV (exact heavy hitters plus a hashed spread over the rest).
"""
from __future__ import annotations

import numpy as np

from .lsh import LSH
from .selection import KV, Q, Selection, union
from .selector import Budget, Selector
from .topk import Ranked, TopK, budget_text, check_budget, parse_budget, row_budgets, top_rows


def _per_query_head(kind, S, hq, hkv, tq):
    """Row scores (R, Tk) of a KV-kind ranking broadcast to query-head rows (Hq * Tq, Tk)."""
    if kind == Q:
        return S
    if kind != KV:
        raise ValueError("Hybrid: members must rank per query head or per KV head")
    return np.repeat(S.reshape(hkv, tq, -1), hq // hkv, axis=0).reshape(hq * tq, -1)


class Hybrid(Selector):
    """Budget (k keys or ceil(fraction * n_causal)) split: the primary's top round(ratio * b),
    then the secondary's top of the remaining causal keys until b (or every causal key).

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> x = np.random.default_rng(0).standard_normal((1, 30, 8)).astype(np.float32)
    >>> _, st = attend(x, x, x, Hybrid(TopK(0), LSH(4, 10, k=0), 0.5, k=6), return_stats=True)
    >>> int(st.n_attended[0, -1])
    6
    """

    def __init__(self, primary: Ranked, secondary: Ranked, ratio=0.5, k=None, fraction=None):
        if not (isinstance(primary, Ranked) and isinstance(secondary, Ranked)):
            raise ValueError("Hybrid: primary and secondary must be rankers (TopK, LSH rank mode)")
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"Hybrid: ratio must be in [0, 1], got {ratio}")
        self.primary, self.secondary, self.ratio = primary, secondary, float(ratio)
        self.k, self.fraction = check_budget("Hybrid", k, fraction)

    def parts(self, q, k, q_pos, k_pos):
        """(primary Selection, secondary Selection), both per query head, disjoint."""
        hq, tq = q.shape[0], q_pos.size
        hkv, tk = k.shape[0], k.shape[1]
        b = row_budgets(self.k, self.fraction, q_pos, k_pos, hq)               # (R,)
        b1 = np.floor(self.ratio * b + 0.5).astype(np.int64)                   # (R,)
        kind, _, S1 = self.primary.row_scores(q, k, q_pos, k_pos)
        S1 = _per_query_head(kind, S1, hq, hkv, tq)                            # (R, Tk)
        p1, i1 = top_rows(S1, b1, q_pos, k_pos, 0, np.zeros((0, 0), np.bool_))
        taken = np.zeros(S1.shape, bool)                                       # (R, Tk)
        taken[np.repeat(np.arange(S1.shape[0]), np.diff(p1)), i1] = True
        kind, _, S2 = self.secondary.row_scores(q, k, q_pos, k_pos)
        S2 = _per_query_head(kind, S2, hq, hkv, tq)
        p2, i2 = top_rows(S2, b - np.diff(p1), q_pos, k_pos, 0, taken)
        mk = lambda p, i: Selection.from_lists(p, i, tk, head_kind=Q, n_heads=hq, tq=tq,
                                               normalized=True)
        return mk(p1, i1), mk(p2, i2)

    def _select(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("Hybrid: needs the queries (content-based), got q=None")
        return union(list(self.parts(q, k, q_pos, k_pos)), q.shape[0], k.shape[0])

    @property
    def budget(self):
        return Budget(self.k, self.fraction)

    def describe(self):
        a, b = self.primary, self.secondary
        head = f"hybrid={budget_text(self.k, self.fraction)}/{self.ratio:g}"
        if isinstance(a, TopK) and a.per == "q" and isinstance(b, LSH) and b.seed == 0:
            return head + f"/K{b.K}L{b.L}"                     # the spec form (from_spec)
        return head + f"<{a.describe()} + {b.describe()}>"

    @staticmethod
    def from_spec(val):
        """`hybrid=5%/0.5`: 5% of causal keys, half exact top-k, half LSH K8L75 frequency rank
        (seed 0); `hybrid=64/0.75/K4L32` picks the LSH shape."""
        parts = (val or "").split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"attention spec: 'hybrid={val}': expected BUDGET/RATIO[/KbLt], "
                             f"e.g. hybrid=5%/0.5")
        k, f = parse_budget(parts[0], f"hybrid={val}")
        K, L = LSH.parse_kl(parts[2], f"hybrid={val}") if len(parts) == 3 else (8, 75)
        try:
            ratio = float(parts[1])
        except ValueError:
            raise ValueError(f"attention spec: 'hybrid={val}': ratio {parts[1]!r} is not a number") from None
        return Hybrid(TopK(0), LSH(K, L, 0, "rank", k=0), ratio, k, f)
