"""Sparse prefill as dense tiles: the query tiles and BLAS score products of `attend_tiles`, with
only the keys a row reads entering its softmax. Two uses:

- exact top-k (TopK) fused into the tiles: a tile's scores come from one sgemm, a Numba pass
  finds each row's keep-th largest causal score (a lower bound from lane maxima, then a
  quickselect of the few keys above it) and computes the softmax and weighted values over the
  kept keys only.
  The selector's own rule scores every (row, key) pair one dot at a time and lists the kept
  keys; here the same ranking costs about what a dense prefill costs. `topk_selection` gives
  the same keys as a Selection (for the lab's analysis).
- any other selection without pseudo-keys (window, sinks, blocks, their unions, Quest's pages):
  a tile scores only the key columns some row of it reads, so a window's tiles are a band,
  cheaper than dense; chosen where that scores fewer pairs than the row kernel's cost allows.

Both compute what the reference kernel (minisparse/attention/kernel.py) computes for the same
keys; only float32 rounding differs (tests/test_fast_prefill.py). Left out: pseudo-keys
(landmarks), and selections whose tiles would score too many pairs (scattered keys: IVF, LSH),
which stay with the row kernel. Decode (Tq = 1) never comes here. Shape legend as in
fast/attention.py.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from ..attention.kernel import AttentionStats, Rows, attend as plain_attend
from ..attention.selection import KV, Q, Selection, default_positions
from ..attention.topk import TopK, row_budgets
from . import attention as fa
from .threads import side_by_side


# ---- per-tile masks -------------------------------------------------------------------------


# A row's threshold: a lower bound from lane maxima, then an exact selection among the few keys
# above it. Lane u holds the maximum of the keys j = u mod L: one vectorised pass over the row
# whatever its length. The keep-th largest of L >= keep lane maxima is a lower bound of the
# keep-th largest score (keep distinct keys, one a lane, are at or above it). Lanes interleave
# the row, so a run of high-scoring neighbours (a relevant passage of the document) spreads over
# many lanes: contiguous blocks put it in one block, whose other maxima then lie low, which on
# a real document left most of a row above the bound. LANES_PER_KEEP lanes per kept key: more
# tighten the bound (a shorter list), fewer cost less to select from.
LANES_PER_KEEP = 2
# The list is made from 16-key blocks' compare masks (fa._ge_bits16), walked one set bit at a
# time, so a key that is no candidate costs one lane of a vector compare, not a store.


@njit(cache=True, nogil=True, fastmath={"nnan", "nsz"})
def _lane_max(rank, e, L, lanes):
    """lanes[u] = max of rank[j] over j < e with j = u mod L, for u < L <= e. Context scores are
    finite, so the max may ignore NaN (nnan), which lets the loop vectorise."""
    for u in range(L):
        lanes[u] = rank[u]
    j0 = L
    while j0 + L <= e:
        for u in range(L):
            lanes[u] = max(lanes[u], rank[j0 + u])
        j0 += L
    for u in range(e - j0):
        lanes[u] = max(lanes[u], rank[j0 + u])


@njit(cache=True, nogil=True)
def kth_largest(x, n, kth, w):
    """The kth largest (1 <= kth <= n) of x[:n] (no NaN), which it only reads; w: scratch of
    2 n entries of x's dtype (no allocation, unlike np.partition). Quickselect with a
    median-of-three pivot, each step two 16-lane passes from one half of w into the other
    (fa._pick16): the entries below the pivot, then those above it after them; those equal to
    it are dropped (their value is known). No branch on a comparison of entries, so its cost
    does not depend on how well a branch predictor guesses random comparisons, and no scalar
    loop over the entries (a partition in place swaps one entry a step, each swap's load
    waiting on the store before it). The last few by counting, for each, the entries below it
    and equal to it."""
    want = n - kth                            # its index in ascending order, in w[src + lo:]
    for i in range(n):
        w[i] = x[i]
    src, dst = 0, n                           # the halves of w: entries [src + lo, src + hi)
    lo, hi = 0, n
    while hi - lo > 16:
        u, v, z = w[src + lo], w[src + (lo + hi) // 2], w[src + hi - 1]
        pivot = max(min(u, v), min(max(u, v), z))
        n_lt = fa._pick16(w, src + lo, src + hi, pivot, -1, w, dst + lo)       # first
        n_gt = fa._pick16(w, src + lo, src + hi, pivot, 1, w, dst + lo + n_lt)  # after them
        n_eq = hi - lo - n_lt - n_gt                                  # >= 1: the pivot
        if want < lo + n_lt:
            hi = lo + n_lt
        elif want < lo + n_lt + n_eq:
            return pivot
        else:
            want -= n_eq
            lo, hi = lo + n_lt, lo + n_lt + n_gt
        src, dst = dst, src
    lo += src
    hi += src
    want += src
    for i in range(lo, hi):                   # the one whose rank among the few holds want
        y = w[i]
        less = 0
        same = 0
        for j in range(lo, hi):               # counts, branch-free
            less += w[j] < y
            same += w[j] == y
        if less <= want - lo < less + same:
            return y
    return w[want]                            # not reached: some entry's ranks hold want


@njit(cache=True, nogil=True)
def listed(rank, bits, nb, cand_i, cand_v):
    """The keys of rank's first nb blocks of 16 whose bit is set in bits[:nb] (as _ge_bits16
    writes them), ascending: their indices into cand_i, their ranks into cand_v, one set bit at
    a time. Returns their count."""
    n = 0
    for i in range(nb):
        m = bits[i]
        while m:
            j = 16 * i + trailing_zeros(m)
            cand_i[n] = j
            cand_v[n] = rank[j]
            n += 1
            m &= m - 1
    return n


@njit(cache=True, nogil=True)
def top_keys(rank, e, keep, cand_i, cand_v, out):
    """Write to out[:n] (ascending) the context keys [0, e) that TopK keeps: the keep of highest
    rank (all when keep >= e), ties at the threshold to the later keys as `topk.take_top` rules;
    returns n = min(keep, e). cand_i, cand_v: scratch of e + 1 and 3 e + 3 entries (int64,
    rank's dtype); out (>= e entries) also holds the list's block masks before the keys.

    The threshold comes from a short list: every key at or above the lane bound (typically a
    little more than keep of them: one vectorised pass, a selection among 2 keep lane maxima and
    one compare pass over the row, 16 keys a mask), then a partition of that list, not of the
    whole row."""
    if keep >= e:
        for j in range(e):
            out[j] = j
        return e
    if keep <= 0:
        return 0
    L = min(e, (LANES_PER_KEEP * keep + 15) // 16 * 16)       # a multiple of the SIMD width
    _lane_max(rank, e, L, cand_v)             # cand_v is free until the list below is made
    floor = kth_largest(cand_v, L, keep, cand_v[L:])
    nb = e // 16
    fa._ge_bits16(rank, nb, floor, out)       # out[:nb] is free until the keys are written
    n = listed(rank, out, nb, cand_i, cand_v)
    for j in range(nb * 16, e):               # the tail, branch-free
        cand_i[n] = j
        cand_v[n] = rank[j]
        n += rank[j] >= floor
    thr = kth_largest(cand_v, n, keep, cand_v[n:])
    need = keep
    for a in range(n):
        if cand_v[a] > thr:
            need -= 1
    cut = n                                   # candidates [cut, n) at thr are kept
    a = n - 1
    while need > 0:
        if cand_v[a] == thr:
            cut = a
            need -= 1
        a -= 1
    o = 0
    for a in range(n):                        # branch-free: written always, kept by the test
        out[o] = cand_i[a]
        o += (cand_v[a] > thr) | ((cand_v[a] == thr) & (a >= cut))
    return o


class TopKScratch(NamedTuple):
    """One tile's buffers for topk_row_keys, for S keys."""
    rank64: np.ndarray
    cand_i: np.ndarray
    cand32: np.ndarray
    cand64: np.ndarray


@njit(cache=True, nogil=True)
def topk_scratch(S):
    return TopKScratch(np.empty(S, np.float64), np.empty(S + 1, np.int64),
                       np.empty(3 * S + 3, np.float32), np.empty(3 * S + 3, np.float64))


@njit(cache=True, nogil=True)
def topk_row_keys(s, r, qp, k_pos, budget, recent, G, per_kv, w, kept):
    """The keys TopK reads for tile row r (per_kv: for query t = r of the group's b rows), from
    the tile's scaled scores s (G*b, S) float32 (row h*b + t: query head h of the group, query
    t), into kept[:n] ascending; returns n. A row reads its recent keys
    (qp - recent < k_pos <= qp) and, among the context keys (k_pos <= qp - recent), the
    budget[t] of highest score (top_keys); per_kv ranks the group's summed scores (float64, as
    TopK sums them). Keys are in position order, so a row's context keys are a prefix [0, e)
    and its causal ones [0, c). w: topk_scratch(S)."""
    b = s.shape[0] // G
    t = r % b
    c = np.searchsorted(k_pos, qp[t], side="right")
    e = np.searchsorted(k_pos, qp[t] - recent, side="right")
    keep = min(budget[t], e)
    if per_kv:
        # head by head over the row (vectorised), in the order of a sum over h per key: the same
        # float64 sums, TopK's
        for j in range(e):
            w.rank64[j] = np.float64(s[t, j])
        for h in range(1, G):
            for j in range(e):
                w.rank64[j] += np.float64(s[h * b + t, j])
        n = top_keys(w.rank64, e, keep, w.cand_i, w.cand64, kept)
    else:
        n = top_keys(s[r], e, keep, w.cand_i, w.cand32, kept)
    for j in range(e, c):                                        # the recent keys, after
        kept[n] = j
        n += 1
    return n


@njit(cache=True, nogil=True)
def topk_attend(s, vg, qp, k_pos, budget, recent, G, per_kv, out, lse, natt):
    """TopK's attention for one tile from its scaled scores s (G*b, S) float32 and the values
    vg (>= S, d) of its KV head: per row the keys topk_row_keys keeps (per_kv: one set for the
    group's G rows), then softmax and weighted values over those keys only (a few percent of S,
    where a dense tile's exp and PV product run over all S), in float32 like the tiles. Writes
    out (G*b, d) f32, lse (G*b,) f64 (-inf and a zero row when a row keeps nothing), natt."""
    GB, S = s.shape
    d = vg.shape[1]
    b = GB // G
    w = topk_scratch(S)
    kept = np.empty(S, np.int64)
    acc = np.empty(d, np.float32)
    for r in range(b if per_kv else GB):
        n = topk_row_keys(s, r, qp, k_pos, budget, recent, G, per_kv, w, kept)
        for i in range(G if per_kv else 1):                      # the rows sharing the keys
            row = i * b + r if per_kv else r
            m = np.float32(-np.inf)
            for a in range(n):
                m = max(m, s[row, kept[a]])
            acc[:] = 0.0
            l = np.float32(0.0)
            for a in range(n):
                j = kept[a]
                p = fa._expf(s[row, j] - m)
                l += p
                for z in range(d):
                    acc[z] += p * vg[j, z]
            natt[row] = n
            if n > 0:
                for z in range(d):
                    out[row, z] = acc[z] / l
                lse[row] = np.float64(m) + np.log(np.float64(l))
            else:
                out[row, :] = 0.0
                lse[row] = -np.inf


@njit(cache=True, nogil=True)
def topk_tile_keys(s, qp, k_pos, budget, recent, G, per_kv, kept, counts):
    """The keys topk_attend reads, per ranking row of the tile (G*b rows, or b when per_kv):
    kept[r, :counts[r]] ascending."""
    w = topk_scratch(s.shape[1])
    for r in range(counts.size):
        counts[r] = topk_row_keys(s, r, qp, k_pos, budget, recent, G, per_kv, w, kept[r])


@njit(cache=True, nogil=True)
def selection_columns(rptr, rlo, rhi, iptr, idx, rows, S):
    """The sorted key columns (< S) that any of `rows` (row indices of a normalised Selection
    without pseudo-keys) reads, by range or by index: (n,) int64."""
    seen = np.zeros(S, np.bool_)
    for r in rows:
        for a in range(rptr[r], rptr[r + 1]):
            for j in range(rlo[a], min(rhi[a], S)):
                seen[j] = True
        for a in range(iptr[r], iptr[r + 1]):
            if idx[a] < S:
                seen[idx[a]] = True
    return np.nonzero(seen)[0]


@njit(cache=True, nogil=True)
def selection_mask(s, cols, rptr, rlo, rhi, iptr, idx, logw, rows, qp, k_pos, b, natt):
    """Hide, in place, the scores of s (G*b, n) over the sorted key columns cols (n,) that tile
    row i (Selection row rows[i], query qp[i % b]) does not read or may not see (k_pos > qp);
    add the log-weight of each key it reads by index. natt (G*b,) receives the keys read."""
    GB, n = s.shape
    vis = np.empty(n, np.bool_)
    lw = np.zeros(n, np.float32)
    for i in range(GB):
        r = rows[i]
        vis[:] = False
        for a in range(rptr[r], rptr[r + 1]):
            c = np.searchsorted(cols, rlo[a])
            while c < n and cols[c] < rhi[a]:
                vis[c] = True
                c += 1
        for a in range(iptr[r], iptr[r + 1]):
            c = np.searchsorted(cols, idx[a])
            if c < n and cols[c] == idx[a]:
                vis[c] = True
                lw[c] = logw[a]
        q_at = qp[i % b]
        cnt = 0
        for c in range(n):
            if vis[c] and k_pos[cols[c]] <= q_at:
                cnt += 1
                if lw[c] != 0:
                    s[i, c] += lw[c]
                    lw[c] = 0
            else:
                s[i, c] = -np.inf
                lw[c] = 0
        natt[i] = cnt


# ---- the tile loop ----------------------------------------------------------------------------


def by_tiles(q, k, tile, block=None, workers=None):
    """Run tile(t0, t1, g, out, lse, natt) for every query tile [t0, t1) of `block` rows and KV
    head g, side by side; each writes its rows of out (Hq, Tq, d) f32, lse (Hq, Tq) f64 and natt
    (Hq, Tq) int64, which start as 0, -inf and 0 (a tile that reads no key leaves them so).
    Returns (out, lse, natt). The default block: as few tiles as tiles of at most fa.TILE_ROWS
    query-head rows need, all of one size, so the threads get equal shares (a 256-query chunk
    with 3 query heads a KV head: 4 tiles of 64 queries, not 3 of 85 and one of a single query,
    which left one thread a whole tile more work than the other)."""
    Hq, Tq, d = q.shape
    Hkv = k.shape[0]
    if block is None:
        most = max(1, fa.TILE_ROWS // (Hq // Hkv))                       # queries a tile
        block = -(-Tq // -(-Tq // most)) if Tq else 1                   # ceil(Tq / n_tiles)
    block = int(block)
    out = np.zeros((Hq, Tq, d), np.float32)                      # (Hq, Tq, d)
    lse = np.full((Hq, Tq), -np.inf)                             # (Hq, Tq)
    natt = np.zeros((Hq, Tq), np.int64)                          # (Hq, Tq)
    items = [(t0, g) for t0 in range(0, Tq, block) for g in range(Hkv)]
    side_by_side(lambda item: tile(item[0], min(item[0] + block, Tq), item[1], out, lse, natt),
                 items, workers)
    return out, lse, natt


def masked_tiles(q, k, v, q_pos, k_pos, scale, mask, block=None, workers=None):
    """Causal attention of q (Hq, Tq, d) over k, v (Hkv, Tk, d) f32 by query tiles, each tile's
    scores hidden by `mask` before the softmax; keys must be in position order.

    mask(g, t0, t1, s_cols, natt) -> cols: called per tile (KV head g, queries [t0, t1)) with
    s_cols(cols) -> s, the (G*b, n) f32 scaled scores over the key columns cols (a slice or an
    index array; the mask picks them, at most the causal prefix); it hides scores in place
    (-inf), writes natt (G*b,) and returns (cols, s). Returns out (Hq, Tq, d) f32, lse (Hq, Tq)
    f64 (-inf and a 0 row where a query reads nothing), n_attended (Hq, Tq) int64: what
    attend_tiles returns, for the keys the mask leaves.
    """
    Hq, Tq, d = q.shape
    G = Hq // k.shape[0]
    sc = np.float32(scale)

    def tile(t0, t1, g, out, lse, natt):
        b = t1 - t0
        h0, h1 = g * G, (g + 1) * G
        qt = np.multiply(q[h0:h1, t0:t1], sc).reshape(G * b, d)         # (G*b, d) scaled rows
        n_att = np.zeros(G * b, np.int64)                               # (G*b,)
        cols, s = mask(g, t0, t1, lambda c: qt @ k[g, c].T, n_att)      # (G*b, n)
        natt[h0:h1, t0:t1] = n_att.reshape(G, b)
        if s is None:
            return                                                      # no key read: 0, -inf
        m = s.max(axis=1)                                               # (G*b,) row max
        m[m == -np.inf] = 0.0                                           # rows reading no key
        l = np.empty(G * b, np.float32)                                 # (G*b,)
        fa._exp_rows(s, m, l)            # s <- exp(s - m) in [0, 1]; l <- row sums, >= 1 or 0
        m, l = m[:, None], l[:, None]                                   # (G*b, 1)
        o = s @ v[g, cols]                                              # (G*b, n) @ (n, d)
        o /= np.where(l > 0, l, 1)                                      # (G*b, d)
        out[h0:h1, t0:t1] = o.reshape(G, b, d)
        with np.errstate(divide="ignore"):                              # log 0 = -inf: no key
            lse[h0:h1, t0:t1] = (m + np.log(l.astype(np.float64))).reshape(G, b)

    return by_tiles(q, k, tile, block, workers)


def topk_tiles(q, k, v, q_pos, k_pos, scale, sel: TopK, block=None, workers=None):
    """TopK's attention (every row reads its sel.k or ceil(sel.fraction * causal) keys of highest
    logit, plus its sel.recent newest) by query tiles: one sgemm for a tile's scores, then
    topk_attend. Keys in position order. Returns (out, lse, n_attended) as masked_tiles.

    >>> x = np.random.default_rng(0).standard_normal((1, 10, 4)).astype(np.float32)
    >>> _, _, n = topk_tiles(x, x, x, np.arange(10), np.arange(10), 0.5, TopK(3, recent=2))
    >>> n[0].tolist()
    [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]
    """
    Hq, Tq, d = q.shape
    G = Hq // k.shape[0]
    n_vis = np.searchsorted(k_pos, q_pos, side="right")                 # (Tq,) causal prefix
    budget = row_budgets(sel.k, sel.fraction, q_pos, k_pos, 1)          # (Tq,)
    sc = np.float32(scale)

    def tile(t0, t1, g, out, lse, natt):
        b = t1 - t0
        S = int(n_vis[t0:t1].max())
        if S == 0:
            return                                                      # no key visible
        h0, h1 = g * G, (g + 1) * G
        qt = np.multiply(q[h0:h1, t0:t1], sc).reshape(G * b, d)         # (G*b, d) scaled rows
        s = qt @ k[g, :S].T                                             # (G*b, S)
        o = np.empty((G * b, d), np.float32)                            # (G*b, d)
        ls = np.empty(G * b)                                            # (G*b,)
        n_att = np.empty(G * b, np.int64)                               # (G*b,)
        topk_attend(s, v[g], q_pos[t0:t1], k_pos[:S], budget[t0:t1], sel.recent, G,
                    sel.per == "kv", o, ls, n_att)
        out[h0:h1, t0:t1] = o.reshape(G, b, d)
        lse[h0:h1, t0:t1] = ls.reshape(G, b)
        natt[h0:h1, t0:t1] = n_att.reshape(G, b)

    return by_tiles(q, k, tile, block, workers)


def topk_selection(q, k, q_pos, k_pos, sel: TopK, block=None) -> Selection:
    """The keys topk_tiles reads, as a normalised Selection (head kind Q, or KV for per="kv"):
    what TopK.select gives, up to the float32 rounding of near-tied scores, from one sgemm per
    tile instead of one dot per (row, key). For the lab's analysis of the rows the fast path
    prefilled. Keys in position order."""
    Hq, Tq, d = q.shape
    Hkv, Tk = k.shape[0], k_pos.shape[0]
    G = Hq // Hkv
    per_kv = sel.per == "kv"
    block = max(1, fa.TILE_ROWS // G) if block is None else int(block)
    n_vis = np.searchsorted(k_pos, q_pos, side="right")                 # (Tq,)
    budget = row_budgets(sel.k, sel.fraction, q_pos, k_pos, 1)          # (Tq,)
    sc = np.float32(1.0 / np.sqrt(d))       # a positive scale: the ranking is the logits'
    nh = Hkv if per_kv else Hq
    lists = [[None] * Tq for _ in range(nh)]                            # [row head][query]
    for g in range(Hkv):
        for t0 in range(0, Tq, block):
            t1 = min(t0 + block, Tq)
            b, S = t1 - t0, int(n_vis[t0:t1].max())
            qt = np.multiply(q[g * G:(g + 1) * G, t0:t1], sc).reshape(G * b, d)
            s = qt @ k[g, :S].T if S else np.zeros((G * b, 0), np.float32)   # (G*b, S)
            rows = b if per_kv else G * b
            kept = np.empty((rows, S), np.int64)
            counts = np.zeros(rows, np.int64)
            topk_tile_keys(s, q_pos[t0:t1], k_pos[:S], budget[t0:t1], sel.recent, G, per_kv,
                           kept, counts)
            for r in range(rows):
                head = g if per_kv else g * G + r // b
                lists[head][t0 + r % b] = kept[r, :counts[r]]
    flat = [x for per_head in lists for x in per_head]                  # row = head * Tq + t
    ptr = np.concatenate([[0], np.cumsum([x.size for x in flat])])
    idx = np.concatenate(flat) if flat else np.zeros(0, np.int64)
    return Selection.from_lists(ptr, idx, Tk, head_kind=KV if per_kv else Q, n_heads=nh, tq=Tq,
                                normalized=True)


def select(selector, q, k, q_pos, k_pos):
    """selector.select(q, k, q_pos, k_pos), except for an exact TopK over a large call (keys in
    position order): topk_selection, the keys the fast path's prefill read."""
    Tq, Tk = q.shape[1], len(k_pos)
    if type(selector) is TopK and _large(Tq, Tk) and np.all(k_pos[1:] >= k_pos[:-1]):
        return topk_selection(np.ascontiguousarray(q, np.float32),
                              np.ascontiguousarray(k, np.float32), q_pos, k_pos, selector)
    return selector.select(q, k, q_pos, k_pos)


def selection_tiles(q, k, v, q_pos, k_pos, scale, rows: Rows, block=None, workers=None):
    """Attention over a normalised selection without pseudo-keys (rows: its CSR arrays; key
    ranges, and explicit indices with their log-weights) as masked tiles that score only the key
    columns some row of the tile reads: a window's tiles are a band. Keys in position order.
    Returns (out, lse, n_attended) as masked_tiles."""
    Hq, Tq, d = q.shape
    G = Hq // k.shape[0]
    n_vis = np.searchsorted(k_pos, q_pos, side="right")                 # (Tq,)

    def mask(g, t0, t1, scores, natt):
        S = int(n_vis[t0:t1].max())
        h = np.arange(g * G, (g + 1) * G)                               # (G,) query heads
        row_head = {0: np.zeros(G, np.int64), 1: np.full(G, g), 2: h}[rows.head_kind]
        tile_rows = (row_head[:, None] * Tq + np.arange(t0, t1)[None, :]).ravel()   # (G*b,)
        cols = selection_columns(rows.range_ptr, rows.range_lo, rows.range_hi, rows.idx_ptr,
                                 rows.idx, tile_rows, S)
        if cols.size == 0:
            return None, None
        idx = cols
        if cols[-1] - cols[0] + 1 == cols.size:                         # contiguous: a view
            cols = slice(int(cols[0]), int(cols[-1]) + 1)
        s = scores(cols)                                                # (G*b, n)
        selection_mask(s, idx, rows.range_ptr, rows.range_lo, rows.range_hi, rows.idx_ptr,
                       rows.idx, rows.logw, tile_rows, q_pos[t0:t1], k_pos, t1 - t0, natt)
        return cols, s

    return masked_tiles(q, k, v, q_pos, k_pos, scale, mask, block, workers)


# ---- choosing the path ----------------------------------------------------------------------------

# A (row, key) pair costs the row kernel about this many times what it costs inside a tile's
# sgemm + exp (docs/performance.md: the measurement), so selection tiles pay when the key
# columns their tiles score, over all rows of each tile, are fewer than TILE_GAIN times the
# pairs the selection lists.
TILE_GAIN = 3


@njit(cache=True)
def tile_cover(rptr, rlo, rhi, iptr, idx, head_kind, Hq, Hkv, Tq, block, n_vis):
    """Pairs selection_tiles would score: sum over tiles (KV head g, queries [t0, t0 + block))
    of G * b * (key columns below the tile's causal end that any row of it reads)."""
    G = Hq // Hkv
    total = 0
    for g in range(Hkv):
        for t0 in range(0, Tq, block):
            t1 = min(t0 + block, Tq)
            S = 0
            for t in range(t0, t1):
                S = max(S, n_vis[t])
            seen = np.zeros(S, np.bool_)
            for hh in range(G):
                s = 0 if head_kind == 0 else (g if head_kind == 1 else g * G + hh)
                for t in range(t0, t1):
                    r = s * Tq + t
                    for a in range(rptr[r], rptr[r + 1]):
                        for j in range(rlo[a], min(rhi[a], S)):
                            seen[j] = True
                    for a in range(iptr[r], iptr[r + 1]):
                        if idx[a] < S:
                            seen[idx[a]] = True
            total += G * (t1 - t0) * np.count_nonzero(seen)
    return total


def kernel(x, rows: Rows, scale, k_sorted, tiles=None):
    """The fast path's kernel: `fa.kernel`, except that a large call over a selection without
    pseudo-keys that is not every key (a window, sinks, blocks, Quest's pages; keys in position
    order) runs as selection tiles when they score fewer than TILE_GAIN times the pairs the
    selection lists. tiles: as fa.kernel's (None chooses; True / False force fa.kernel's own
    choice, the selection tiles never)."""
    Hq, Tq, d = x.q.shape
    Tk = x.k_pos.shape[0]
    if (tiles is None and k_sorted and x.extra_pos.size == 0 and _large(Tq, Tk)
            and not fa._every_key(rows, Tk, 0)):
        Hkv = x.k.shape[0]
        n_row_heads = (rows.range_ptr.size - 1) // Tq
        listed = (int((rows.range_hi - rows.range_lo).sum()) + rows.idx.size) * (Hq // n_row_heads)
        n_vis = np.searchsorted(x.k_pos, x.q_pos, side="right")       # (Tq,)
        cover = tile_cover(rows.range_ptr, rows.range_lo, rows.range_hi, rows.idx_ptr, rows.idx,
                           rows.head_kind, Hq, Hkv, Tq, max(1, fa.TILE_ROWS // (Hq // Hkv)), n_vis)
        if cover <= TILE_GAIN * listed:
            return selection_tiles(x.q, x.k[:, :Tk], x.v[:, :Tk], x.q_pos, x.k_pos, scale, rows)
    return fa.kernel(x, rows, scale, k_sorted, tiles)


KERNEL = kernel      # attend's default below, whose own argument is named kernel as attend's is


# ---- the fast path's attend ---------------------------------------------------------------------


def _large(Tq, Tk):
    return Tq >= fa.TILE_MIN_TQ and Tq * Tk >= fa.TILE_MIN_PAIRS


def attend(q, k, v, selector=None, q_pos=None, k_pos=None, return_lse=False, return_stats=False,
           scale=None, buffer=False, kernel=None):
    """minisparse.attention.attend on the fast path: a large exact TopK call (a prefill chunk)
    runs as masked tiles (topk_tiles); everything else goes to attend with `kernel` (default
    this module's, which takes tiles for dense and range selections). Same arguments and
    results as attend."""
    kernel = KERNEL if kernel is None else kernel
    Tq = np.shape(q)[1]
    Tk = np.shape(k)[1] if k_pos is None else len(k_pos)
    if type(selector) is not TopK or not _large(Tq, Tk):
        return plain_attend(q, k, v, selector, q_pos, k_pos, return_lse, return_stats, scale,
                            buffer, kernel)
    q, k, v = (np.asarray(a) for a in (q, k, v))
    if Tk > k.shape[1] or (Tk != k.shape[1] and not buffer) or q.ndim != 3 or q.shape[2] != k.shape[2]:
        # let attend word the error
        return plain_attend(q, k, v, selector, q_pos, k_pos, return_lse, return_stats, scale,
                            buffer, kernel)
    q_pos, k_pos = default_positions(Tq, Tk, q_pos, k_pos)
    if not np.all(k_pos[1:] >= k_pos[:-1]):                       # tiles stop at the causal prefix
        return plain_attend(q, k, v, selector, q_pos, k_pos, return_lse, return_stats, scale,
                            buffer, kernel)
    Hq, d = q.shape[0], q.shape[2]
    if k.shape[0] == 0 or Hq % k.shape[0]:
        raise ValueError(f"attend: Hq={Hq} must be a multiple of Hkv={k.shape[0]}")
    q = np.ascontiguousarray(q, np.float32)
    k = np.ascontiguousarray(k[:, :Tk], np.float32) if k.dtype != np.float32 else k[:, :Tk]
    v = np.ascontiguousarray(v[:, :Tk], np.float32) if v.dtype != np.float32 else v[:, :Tk]
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    out, lse, natt = topk_tiles(q, k, v, q_pos, k_pos, scale, selector)
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_stats:
        n_causal = np.searchsorted(k_pos, q_pos, side="right")                  # (Tq,)
        res += (AttentionStats(natt, np.broadcast_to(n_causal, (Hq, Tq)).copy()),)
    return res[0] if len(res) == 1 else res
