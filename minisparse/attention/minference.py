"""MInference's prefill head patterns: vertical-slash (the last queries' softmax picks key columns
and diagonals, every query reads its causal keys on them) and A-shape (sinks + a local window).

Follows Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention" (the vertical-slash estimate with the last 64 queries, first columns and
nearest diagonals forced on; the Λ-shape head). Leaves out the offline search that assigns each
head its pattern and budget (one pattern and budget for every head here), the block-sparse
pattern, and the GPU kernels that make the pattern fast: the selection is what is studied.
"""
from __future__ import annotations

import numpy as np

from .patterns import Sinks, Window, _ragged
from .selection import Q, Selection, sorted_positions
from .selector import Budget, Selector, Union
from .topk import budget_text, check_budget, parse_budget, take_top


def _count(k, fraction, n):
    """Keys for a budget given as a count k or a fraction of n."""
    return k if k is not None else int(np.ceil(fraction * n - 1e-9))   # 1e-9: 0.05*20 is 1 key


class VerticalSlash(Selector):
    """VerticalSlash(v, s, sinks=30, band=100, last=64): per query head, the softmax of the call's
    last min(last, Tq) queries (causal, logits q.k / sqrt(d)) is summed down each key column and
    along each diagonal (offset o = q_pos - k_pos); the v columns and s diagonals of largest sums
    are chosen, ON TOP of the forced ones: the sink columns (positions < sinks) and the band of
    diagonals o < band. Every query of the call then reads its causal keys on the chosen columns
    and diagonals. v or s may be a fraction of the keys causal to the call's last query
    (v_fraction, s_fraction).

    A row's keys depend on the other rows of its call (the last queries' estimate), so the
    selector is not `row_local`: a decode step (Tq = 1) estimates from its own query alone and
    equals a prefill row only when that prefill call holds that one query.

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> x = np.random.default_rng(0).standard_normal((1, 12, 4)).astype(np.float32)
    >>> _, st = attend(x, x, x, VerticalSlash(2, 1, sinks=1, band=2), return_stats=True)
    >>> int(st.n_attended[0].max()) <= 1 + 2 + 2 + 1      # sinks + band + v columns + s diagonals
    True
    """
    row_local = False

    def __init__(self, v=None, s=None, v_fraction=None, s_fraction=None, sinks=30, band=100,
                 last=64):
        self.v, self.v_fraction = check_budget("VerticalSlash (columns)", v, v_fraction)
        self.s, self.s_fraction = check_budget("VerticalSlash (diagonals)", s, s_fraction)
        for name, x, low in (("sinks", sinks, 0), ("band", band, 0), ("last", last, 1)):
            if int(x) < low:
                raise ValueError(f"VerticalSlash: {name} must be >= {low}, got {x}")
        self.sinks, self.band, self.last = int(sinks), int(band), int(last)

    # ---- the estimate: column and diagonal sums of the last queries' softmax ----------------
    def scores(self, q, k, q_pos, k_pos):
        """(columns (Hq, Tk), diagonals (Hq, n_off)) float64: the summed softmax of the call's last
        min(last, Tq) queries per key column and per offset o = q_pos - k_pos (0 .. n_off - 1)."""
        Hq, Tq, d = q.shape
        Hkv, Tk, _ = k.shape
        L = min(self.last, Tq)
        qe, pe = q[:, Tq - L:].astype(np.float64), q_pos[Tq - L:]                   # (Hq, L, d), (L,)
        kk = k.astype(np.float64)[np.arange(Hq) // (Hq // Hkv)]                    # (Hq, Tk, d)
        s = np.einsum("hld,htd->hlt", qe, kk) / np.sqrt(d)                           # (Hq, L, Tk)
        causal = k_pos[None, :] <= pe[:, None]                                       # (L, Tk)
        s = np.where(causal, s, -np.inf)
        m = s.max(-1, keepdims=True)                                                 # (Hq, L, 1)
        p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
        p /= np.maximum(p.sum(-1, keepdims=True), np.finfo(np.float64).tiny)        # a row with no
        cols = p.sum(1)                                                              # causal key adds 0
        off = (pe[:, None] - k_pos[None, :])[causal]                                 # (n,) offsets
        n_off = int(off.max()) + 1 if off.size else 0
        diags = np.stack([np.bincount(off, weights=p[h][causal], minlength=n_off)
                          for h in range(Hq)]) if n_off else np.zeros((Hq, 0))     # (Hq, n_off)
        return cols, diags

    def choose(self, q, k, q_pos, k_pos):
        """(columns, offsets): per query head, the sorted key indices of the chosen columns and
        the descending chosen offsets, forced ones included."""
        sorted_positions("VerticalSlash", k_pos)
        cols, diags = self.scores(q, k, q_pos, k_pos)
        seen = k_pos <= q_pos.max() if q_pos.size else np.zeros(k_pos.size, bool)    # (Tk,)
        n = int(seen.sum())
        nv = _count(self.v, self.v_fraction, n)
        ns = _count(self.s, self.s_fraction, n)
        sink = k_pos < self.sinks                                                    # (Tk,)
        n_off = diags.shape[1]
        offs = np.arange(n_off)
        on_diag = np.zeros(n_off, bool)                                              # offsets some
        if n_off:                                                                    # estimate row has
            L = min(self.last, q_pos.size)
            pe = q_pos[q_pos.size - L:]
            o = (pe[:, None] - k_pos[None, :])
            on_diag[o[(o >= 0) & (o < n_off)]] = True
        col_sets, off_sets = [], []
        for h in range(cols.shape[0]):
            elig = seen & ~sink
            top = np.empty(min(nv, int(elig.sum())), np.int64)
            take_top(cols[h], elig, top.size, top, 0)
            col_sets.append(np.union1d(np.flatnonzero(sink & seen), top))
            elig = on_diag & (offs >= self.band)
            top = np.empty(min(ns, int(elig.sum())), np.int64)
            take_top(diags[h], elig, top.size, top, 0)
            off_sets.append(np.union1d(np.arange(min(self.band, n_off)), top)[::-1])
        return col_sets, off_sets

    def _select(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("VerticalSlash: needs the queries (the last queries' softmax picks "
                             "the pattern), got q=None")
        Hq, Tq, Tk = q.shape[0], q_pos.size, k.shape[1]
        col_sets, off_sets = self.choose(q, k, q_pos, k_pos)
        rows, idx = [], []
        for h in range(Hq):
            # columns: row t reads the chosen columns at positions <= q_pos[t] (keys sorted)
            c = col_sets[h]
            cnt = np.searchsorted(k_pos[c], q_pos, side="right")                     # (Tq,)
            r, a = _ragged(cnt)
            rows.append(h * Tq + r), idx.append(c[a])
            # diagonals: row t reads the key at position q_pos[t] - o, where one is held
            o = off_sets[h]
            pos = (q_pos[:, None] - o[None, :]).ravel()                               # (Tq*n_o,)
            r = np.repeat(np.arange(Tq, dtype=np.int64), o.size)
            j = np.searchsorted(k_pos, pos)
            jc = np.minimum(j, max(Tk - 1, 0))
            ok = (j < Tk) & (k_pos[jc] == pos) if Tk else np.zeros(pos.size, bool)
            rows.append(h * Tq + r[ok]), idx.append(jc[ok])
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        j = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        order = np.argsort(row, kind="stable")
        ptr = np.zeros(Hq * Tq + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=Hq * Tq), out=ptr[1:])
        # the forced sinks and band as ranges too, so that a long band costs one range per row
        # (the explicit copies of the same keys are merged away by normalize)
        lo_b = np.searchsorted(k_pos, q_pos - self.band + 1, side="left")            # (Tq,)
        hi_b = np.searchsorted(k_pos, q_pos, side="right") if self.band else lo_b
        hi_s = np.full(Tq, np.searchsorted(k_pos, self.sinks, side="left"))
        r_lo = np.tile(np.stack([np.zeros(Tq, np.int64), lo_b], 1).ravel(), Hq)
        r_hi = np.tile(np.stack([hi_s, hi_b], 1).ravel(), Hq)
        r_ptr = np.arange(Hq * Tq + 1, dtype=np.int64) * 2
        return Selection.from_lists(ptr, j[order], Tk, head_kind=Q, n_heads=Hq, tq=Tq,
                                    r_ptr=r_ptr, r_lo=r_lo, r_hi=np.maximum(r_hi, r_lo)).normalize()

    @property
    def budget(self):
        """At most v + s + sinks + band keys per query (fewer where columns and diagonals meet)."""
        keys = self.sinks + self.band + (self.v or 0) + (self.s or 0)
        f = (self.v_fraction or 0) + (self.s_fraction or 0)
        return Budget(keys, f or None)

    def describe(self):
        s = f"vslash={budget_text(self.v, self.v_fraction)}/{budget_text(self.s, self.s_fraction)}"
        for tag, x, default in (("s", self.sinks, 30), ("b", self.band, 100), ("q", self.last, 64)):
            s += f"/{tag}{x}" if x != default else ""
        return s

    @staticmethod
    def from_spec(val):
        """`vslash=V/S[/sN][/bN][/qN]`: V columns, S diagonals (counts, or `2%` of the causal
        keys), sN sink columns forced on (default 30), bN nearest diagonals forced on (default
        100), qN queries in the estimate (default 64)."""
        parts = (val or "").split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(f"'vslash={val}': expected V/S (columns/diagonals), e.g. vslash=64/64 "
                             f"or vslash=2%/2%/s4/b64")
        v, vf = parse_budget(parts[0], f"vslash={val}")
        s, sf = parse_budget(parts[1], f"vslash={val}")
        kw = {}
        for p in parts[2:]:
            name = {"s": "sinks", "b": "band", "q": "last"}.get(p[:1])
            if name is None or not p[1:].isdigit() or name in kw:
                raise ValueError(f"'vslash={val}': unknown or repeated part {p!r} (sN sinks, "
                                 f"bN band, qN last queries)")
            kw[name] = int(p[1:])
        return VerticalSlash(v, s, vf, sf, **kw)


# ---- A-shape: sinks + a local window --------------------------------------------------------
def AShape(sinks: int, window: int):
    """MInference's Λ-shape head: the first `sinks` key positions and the `window` newest causal
    keys (the query's own included), i.e. Sinks(sinks) | Window(window - 1) by name.

    >>> str(AShape(4, 64))
    'ashape=4/64'
    """
    if int(window) < 1:
        raise ValueError(f"AShape: window must be >= 1 key (the query's own), got {window}")
    return _AShape(Sinks(sinks), Window(int(window) - 1))


class _AShape(Union):
    """The named union Sinks | Window that AShape builds (Union.at_layer and bind rebuild it)."""

    @property
    def budget(self):
        s, w = self.members
        return Budget(s.n + w.w + 1)

    def describe(self):
        s, w = self.members
        return f"ashape={s.n}/{w.w + 1}"


def ashape_from_spec(val):
    """`ashape=S/W`: S sink keys and a W-key local window."""
    parts = (val or "").split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"'ashape={val}': expected SINKS/WINDOW counts, e.g. ashape=4/64")
    return AShape(int(parts[0]), int(parts[1]))
