"""TopK: each query reads the k causal keys of highest q.k (exact, per query head or shared per
KV head), plus an optional dense recent suffix; the ranking machinery the other content
selectors (LSH frequency rank, Hybrid) reuse.

Leaves out approximate search (ivf.py, lsh.py) and any learned scorer. Follows the top-k
attention decode rule (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention";
the recent-suffix variant of Quest/H2O-style decoding): the top-k of the *context* (causal keys
older than the recent suffix) plus every recent key, read in ONE joint softmax by the kernel —
the same as merging the two partial softmaxes with `merge_lse` (tests/test_selectors_content.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .selection import KV, Q, Selection, default_positions
from .selector import Budget, Selector


@njit(cache=True, fastmath={"reassoc", "contract", "nsz"})
def dot(a, b):
    # float32 dot as the kernel computes logits; reassociation lets LLVM vectorise, and one
    # compiled order is deterministic, so a row's scores do not depend on the call
    s = np.float32(0.0)
    for i in range(a.size):
        s += a[i] * b[i]
    return s


# ---- scores and per-row top-b ---------------------------------------------------------------
def score_rows(q, k, q_pos, k_pos, per_kv):
    """Logit ranking scores S (R, Tk) float64, -inf where k_pos[j] > q_pos[t].

    Rows r = s * Tq + t: s a query head (per_kv False) or a KV head (per_kv True: the sum of
    the G query heads' dots = (sum of the group's queries) . k). Each dot is a float32 dot like
    the kernel's, so the ranking is over the logits (up to rounding order), and a row's
    scores depend only on its query and the keys (decode step i == prefill row i bit for bit).

    One call per KV head: k[g] (Tk, d) is contiguous even when k is a cache buffer's view
    k[:, :Tk], so the compiled dot reads it with SIMD loads (a strided 3-d view compiles to
    scalar loads), and each key row is read once for the G query heads that share it.
    """
    Hq, Tq, d = q.shape
    Hkv, Tk, _ = k.shape
    G = Hq // Hkv
    nh = Hkv if per_kv else Hq
    out = np.empty((nh * Tq, Tk), np.float64)
    q = np.ascontiguousarray(q)
    for g in range(Hkv):
        rows = slice(g * Tq, (g + 1) * Tq) if per_kv else slice(g * G * Tq, (g + 1) * G * Tq)
        _score_group(q[g * G:(g + 1) * G], np.ascontiguousarray(k[g]), q_pos, k_pos, per_kv,
                     out[rows])
    return out


@njit(cache=True)
def _score_group(qg, kg, q_pos, k_pos, per_kv, out):
    """score_rows for the G query heads qg (G, Tq, d) sharing the keys kg (Tk, d): out is
    (Tq, Tk) when per_kv (the group's summed dots), else (G * Tq, Tk), row h * Tq + t."""
    G, Tq, d = qg.shape
    Tk = kg.shape[0]
    for t in range(Tq):
        qp = q_pos[t]
        for j in range(Tk):
            if k_pos[j] > qp:
                if per_kv:
                    out[t, j] = -np.inf
                else:
                    for h in range(G):
                        out[h * Tq + t, j] = -np.inf
            elif per_kv:
                acc = 0.0
                for h in range(G):
                    acc += np.float64(dot(qg[h, t], kg[j]))
                out[t, j] = acc
            else:
                for h in range(G):
                    out[h * Tq + t, j] = np.float64(dot(qg[h, t], kg[j]))


@njit(cache=True)
def take_top(row, elig, b, out, o):
    """Write the b eligible indices of highest row[j] into out[o:o+b], ascending; ties at the
    threshold go to the LATER keys (a rule of the row alone, so decode == prefill)."""
    n = 0
    for j in range(row.size):
        if elig[j]:
            n += 1
    if b <= 0:
        return
    vals = np.empty(n, np.float64)
    a = 0
    for j in range(row.size):
        if elig[j]:
            vals[a] = row[j]
            a += 1
    thr = np.partition(vals, n - b)[n - b] if b < n else -np.inf   # b-th largest
    above = 0
    for j in range(row.size):
        if elig[j] and row[j] > thr:
            above += 1
    need = b - above                                                 # ties taken from the end
    cut = row.size
    j = row.size - 1
    while need > 0 and j >= 0:
        if elig[j] and row[j] == thr:
            cut = j
            need -= 1
        j -= 1
    for j in range(row.size):
        if elig[j] and (row[j] > thr or (row[j] == thr and j >= cut)):
            out[o] = j
            o += 1


def top_rows(S, budget, q_pos, k_pos, recent, exclude):
    """Per row r (query t = r % Tq): the `budget[r]` causal, non-recent, non-excluded keys of
    highest S[r] (all of them when fewer), plus every recent key (q_pos - recent < k_pos <= q_pos).

    S (R, Tk) float64 (-inf = not causal); exclude (R, Tk) bool or (0, 0). Returns CSR
    (ptr (R+1,), idx (n,)) with ascending indices per row.

    Without recent keys or exclusions (a decode step of TopK), each row's threshold, its b-th
    largest eligible score, comes from NumPy's partition (SIMD, several times Numba's) and one
    compiled pass takes the keys above it and the ties take_top would take: the same keys.
    """
    R, Tk = S.shape
    if recent or exclude.shape[0] or R == 0:
        return _top_rows(S, budget, q_pos, k_pos, recent, exclude)
    causal = k_pos[None, :] <= q_pos[np.arange(R) % q_pos.size, None]          # (R, Tk)
    S = np.where(causal, S, -np.inf)                                           # (R, Tk)
    nv = (S > -np.inf).sum(axis=1)                                             # (R,) eligible
    b = np.minimum(np.asarray(budget, np.int64), nv)                           # (R,)
    thr = np.full(R, np.inf)                                                   # b = 0: none
    for r in np.flatnonzero(b > 0):
        thr[r] = np.partition(S[r], Tk - b[r])[Tk - b[r]]                     # b-th largest
    return _take_above(S, thr, b)


@njit(cache=True)
def _take_above(S, thr, b):
    """Rows of S (R, Tk) (-inf: not eligible): the keys above thr[r] and, of those equal to it,
    the later ones, b[r] keys in all, ascending (take_top's rule). Returns CSR (ptr, idx)."""
    R, Tk = S.shape
    ptr = np.zeros(R + 1, np.int64)
    ptr[1:] = np.cumsum(b)
    idx = np.empty(ptr[-1], np.int64)
    for r in range(R):
        if b[r] == 0:
            continue
        t = thr[r]
        above = 0
        for j in range(Tk):
            if S[r, j] > t:
                above += 1
        need = b[r] - above                                      # ties taken from the end
        cut = Tk
        j = Tk - 1
        while need > 0 and j >= 0:
            if S[r, j] == t:
                cut = j
                need -= 1
            j -= 1
        o = ptr[r]
        for j in range(Tk):
            if S[r, j] > t or (S[r, j] == t and j >= cut):
                idx[o] = j
                o += 1
    return ptr, idx


@njit(cache=True)
def _top_rows(S, budget, q_pos, k_pos, recent, exclude):
    """top_rows, any case, through take_top per row."""
    R, Tk = S.shape
    Tq = q_pos.size
    cnt = np.zeros(R, np.int64)
    for r in range(R):
        qp = q_pos[r % Tq]
        n_ctx = 0
        n_rec = 0
        for j in range(Tk):
            if k_pos[j] > qp or (exclude.shape[0] > 0 and exclude[r, j]):
                continue
            if k_pos[j] > qp - recent:
                n_rec += 1
            elif S[r, j] > -np.inf:
                n_ctx += 1
        cnt[r] = min(budget[r], n_ctx) + n_rec
    ptr = np.zeros(R + 1, np.int64)
    ptr[1:] = np.cumsum(cnt)
    idx = np.empty(ptr[-1], np.int64)
    for r in range(R):
        qp = q_pos[r % Tq]
        elig = np.zeros(Tk, np.bool_)
        rec = np.zeros(Tk, np.bool_)
        for j in range(Tk):
            if k_pos[j] > qp or (exclude.shape[0] > 0 and exclude[r, j]):
                continue
            if k_pos[j] > qp - recent:
                rec[j] = True
            elif S[r, j] > -np.inf:
                elig[j] = True
        b = cnt[r] - np.sum(rec)
        tmp = np.empty(b, np.int64)
        take_top(S[r], elig, b, tmp, 0)
        # merge the top-b (ascending) with the recent keys (ascending)
        o = ptr[r]
        a = 0
        for j in range(Tk):
            if rec[j]:
                while a < b and tmp[a] < j:
                    idx[o] = tmp[a]
                    o += 1
                    a += 1
                idx[o] = j
                o += 1
        while a < b:
            idx[o] = tmp[a]
            o += 1
            a += 1
    return ptr, idx


# ---- budgets ----------------------------------------------------------------------------------
def parse_budget(text, name):
    """'64' -> (64, None); '2%' -> (None, 0.02); '0.02' -> (None, 0.02)."""
    try:
        if text.endswith("%"):
            return None, float(text[:-1]) / 100
        if "." in text:
            return None, float(text)
        return int(text), None
    except ValueError:
        raise ValueError(f"attention spec: '{name}': budget {text!r} is not an integer count "
                         f"(64), a percentage (2%) or a fraction (0.02)") from None


def check_budget(name, k, fraction):
    if (k is None) == (fraction is None):
        raise ValueError(f"{name}: give exactly one of k (keys) or fraction (of causal keys); "
                         f"got k={k}, fraction={fraction}")
    if k is not None and int(k) < 0:
        raise ValueError(f"{name}: k must be >= 0, got {k}")
    if fraction is not None and not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{name}: fraction must be in (0, 1], got {fraction}")
    return (None if k is None else int(k)), (None if fraction is None else float(fraction))


def row_budgets(k, fraction, q_pos, k_pos, n_heads):
    """(R,) keys per row: k, or ceil(fraction * n_causal) so the realised density is honest."""
    if k is not None:
        b = np.full(q_pos.size, k, np.int64)
    else:
        n_causal = np.searchsorted(np.sort(k_pos), q_pos, side="right")          # (Tq,)
        b = np.ceil(fraction * n_causal - 1e-9).astype(np.int64)   # 1e-9: 0.05*20 is exactly 1 key
    return np.tile(b, n_heads)                                                  # (R,)


def budget_text(k, fraction):
    return str(k) if k is not None else f"{100 * fraction:g}%"


# ---- the ranked-selector base and TopK -----------------------------------------------------------
class Ranked(Selector):
    """Base for selectors that rank each row's causal keys by a score and keep the top budget.

    Subclasses implement `row_scores(q, k, q_pos, k_pos) -> (head_kind, n_heads, S (R, Tk))`
    with -inf for non-causal keys; Hybrid combines two of them.
    """
    recent = 0

    @property
    def budget(self):
        """k (plus the `recent` keys) or the fraction; None for a sampler (LSH mode="sample")."""
        if self.k is None and self.fraction is None:
            return None
        return Budget((self.k or 0) + self.recent or None, self.fraction)

    def row_scores(self, q, k, q_pos, k_pos):
        raise NotImplementedError

    def _select(self, q, k, q_pos, k_pos):
        kind, nh, S = self.row_scores(q, k, q_pos, k_pos)
        b = row_budgets(self.k, self.fraction, q_pos, k_pos, nh)
        ptr, idx = top_rows(S, b, q_pos, k_pos, self.recent, np.zeros((0, 0), np.bool_))
        return Selection.from_lists(ptr, idx, k.shape[1], head_kind=kind, n_heads=nh,
                                    tq=q_pos.size, normalized=True)


class TopK(Ranked):
    """Exact top-k: each row reads the k causal keys of highest logit q.k (rows with fewer
    causal context keys read them all), plus the `recent` newest causal keys.

    per="q" (default): one ranking per query head. per="kv": one ranking per KV head, shared by
    its G query heads, on the summed scores sum_h q_h.k (= the group's mean query, up to G):
    a KV cache that loads keys per KV head reads each chosen key once for the whole group.
    k counts keys; fraction=f reads ceil(f * n_causal) instead. recent=r adds every key with
    q_pos - r < k_pos <= q_pos; the k are then chosen among the older keys.

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> x = np.random.default_rng(0).standard_normal((1, 10, 4)).astype(np.float32)
    >>> _, st = attend(x, x, x, TopK(3, recent=2), return_stats=True)
    >>> st.n_attended[0].tolist()
    [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]
    """

    def __init__(self, k=None, fraction=None, per="q", recent=0):
        self.k, self.fraction = check_budget("TopK", k, fraction)
        if per not in ("q", "kv"):
            raise ValueError(f"TopK: per must be 'q' (per query head) or 'kv' (shared per KV "
                             f"head), got {per!r}")
        if int(recent) < 0:
            raise ValueError(f"TopK: recent must be >= 0, got {recent}")
        self.per, self.recent = per, int(recent)

    def row_scores(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("TopK: needs the queries (content-based), got q=None")
        per_kv = self.per == "kv"
        S = score_rows(q, k, q_pos, k_pos, per_kv)                             # (R, Tk)
        return (KV, k.shape[0], S) if per_kv else (Q, q.shape[0], S)

    def describe(self):
        s = "topk=" + budget_text(self.k, self.fraction)
        s += "/kv" if self.per == "kv" else ""
        return s + (f"/r{self.recent}" if self.recent else "")

    @staticmethod
    def from_spec(val):
        """`topk=64`, `topk=2%`, `topk=64/kv` (shared per KV head), `topk=64/r16` (recent 16)."""
        if val is None:
            raise ValueError("attention spec: 'topk' needs a budget, e.g. topk=64 or topk=2%")
        parts = val.split("/")
        k, f = parse_budget(parts[0], f"topk={val}")
        per, rec = "q", 0
        for p in parts[1:]:
            if p == "kv":
                per = "kv"
            elif p.startswith("r") and p[1:].isdigit():
                rec = int(p[1:])
            else:
                raise ValueError(f"attention spec: 'topk={val}': unknown option {p!r} "
                                 f"(expected kv or rN)")
        return TopK(k, f, per, rec)


# ---- approximate scoring, exact attention: the base of SparQ, Loki and the indexer -------------
def recall_at_k(sel, exact, q, k, q_pos=None, k_pos=None):
    """Recall@k of selector `sel` against the exact top-k `exact` (a TopK): per query head and
    query, the fraction of the keys `exact` reads that `sel` reads too; 1 where exact reads none.

    q (Hq, Tq, d), k (Hkv, Tk, d) -> (Hq, Tq) float64. Faiss's rule: an approximate index is
    measured against the exact brute-force one (IndexFlat) on the same keys.

    >>> x = np.random.default_rng(0).standard_normal((1, 6, 4)).astype(np.float32)
    >>> recall_at_k(TopK(2), TopK(2), x, x).tolist()
    [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    """
    hq, tq = q.shape[:2]
    tk = k.shape[1]
    a, _ = sel.select(q, k, q_pos, k_pos).to_mask(hq, tq, tk)                # (Hq, Tq, Tk)
    e, _ = exact.select(q, k, q_pos, k_pos).to_mask(hq, tq, tk)
    q_pos, k_pos = default_positions(tq, tk, q_pos, k_pos)
    causal = k_pos[None, None, :] <= q_pos[None, :, None]                    # (1, Tq, Tk)
    e &= causal
    n = e.sum(-1)
    return np.where(n > 0, (a & e).sum(-1) / np.maximum(n, 1), 1.0)         # (Hq, Tq)


class ApproxTopK(Ranked):
    """Base for "cheap approximate scores over every key, exact attention on the top k" (SparQ,
    Loki, the lightning indexer): subclasses give `row_scores` (the approximate ranking); the
    kernel then reads the chosen keys exactly. `exact()` is the TopK it approximates (same
    budget, same head sharing) and `recall(q, k, ...)` its recall@k against it (recall_at_k)."""
    per = "q"

    def exact(self) -> TopK:
        return TopK(self.k, self.fraction, per=self.per)

    def recall(self, q, k, q_pos=None, k_pos=None):
        """(Hq, Tq) recall@k against exact top-k on the same queries and keys."""
        return recall_at_k(self, self.exact(), q, k, q_pos, k_pos)
