"""Sparse prefill as dense tiles: the same query tiles and BLAS products as `attend_tiles`, with
the keys a row does not read masked out before the softmax. Two uses:

- exact top-k (TopK) fused into the tiles: a tile's scores come from one sgemm, a Numba pass
  finds each row's k-th largest causal score and hides the rest, then softmax and PV as dense.
  The reference rule scores every (row, key) pair one dot at a time and lists the kept keys;
  here the same ranking costs what the dense prefill costs.
- any other selection without pseudo-keys (window, sinks, blocks, their unions, Quest's pages):
  a tile scores only the key columns some row of it reads, so a window's tiles are a band,
  cheaper than dense; chosen where that scores fewer pairs than the row kernel's cost allows.

Both compute what the reference kernel (minisparse/attention/kernel.py) computes for the same
keys; only float32 rounding differs (tests/test_fast_prefill.py). Left out: pseudo-keys
(landmarks), and selections whose tiles would score too many pairs (scattered keys: IVF, LSH),
which stay with the row kernel. Decode (Tq = 1) never comes here. Shape legend as in fast/attention.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..attention.kernel import AttentionStats, Rows, attend as plain_attend
from ..attention.selection import default_positions
from ..attention.topk import TopK, row_budgets
from . import attention as fa
from .threads import side_by_side


# ---- per-tile masks -------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _sift_down(heap, n, i):
    """Restore the min-heap property of heap[:n] below position i."""
    x = heap[i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and heap[c + 1] < heap[c]:
            c += 1
        if heap[c] >= x:
            break
        heap[i] = heap[c]
        i = c
    heap[i] = x


@njit(cache=True, nogil=True)
def kth_largest(row, n, keep, heap):
    """The keep-th largest of row[:n] (1 <= keep <= n). A min-heap of the keep largest seen so
    far when keep is small (most values fail one comparison with its root: about one pass over
    the row), else a partition; heap: scratch of at least keep entries, row's dtype."""
    if 2 * keep > n:
        return np.partition(row[:n].copy(), n - keep)[n - keep]
    for j in range(keep):
        heap[j] = row[j]
    for i in range(keep // 2 - 1, -1, -1):
        _sift_down(heap, keep, i)
    for j in range(keep, n):
        if row[j] > heap[0]:
            heap[0] = row[j]
            _sift_down(heap, keep, 0)
    return heap[0]


@njit(cache=True, nogil=True)
def _keep_top(rank, e, c, keep, heap):
    """(thr, cut): the row keeps context key j < e iff rank[j] > thr or (rank[j] == thr and
    j >= cut), keep of them (all when keep >= e): `topk.take_top`'s rule, ties at the
    threshold to the later keys. Keys [e, c) are the recent ones, kept whatever their score."""
    if keep >= e:
        return -np.inf, 0
    if keep <= 0:
        return np.inf, e
    thr = kth_largest(rank, e, keep, heap)
    need = keep
    for j in range(e):
        if rank[j] > thr:
            need -= 1
    cut = e
    j = e - 1
    while need > 0:
        if rank[j] == thr:
            cut = j
            need -= 1
        j -= 1
    return thr, cut


@njit(cache=True, nogil=True)
def topk_mask(s, qp, k_pos, budget, recent, G, per_kv, natt):
    """Hide, in place, every score of the tile s (G*b, S) float32 (row h*b + t: query head h of
    the group, query t) that TopK does not read: keys after q_pos, and among the context keys
    (k_pos <= qp - recent) all but the budget[t] of highest score; the recent keys
    (qp - recent < k_pos <= qp) are all kept. per_kv ranks the group's summed scores (float64,
    as TopK sums them), shared by its G rows. Keys are in position order, so a row's context
    keys are a prefix [0, e) and its causal ones [0, c). natt (G*b,) receives the keys each row
    keeps. qp (b,), k_pos (S,), budget (b,) int64."""
    GB, S = s.shape
    b = GB // G
    heap32 = np.empty(S, np.float32)
    rank = np.empty(S, np.float64)
    heap64 = np.empty(S, np.float64)
    for r in range(b if per_kv else GB):
        t = r % b
        c = np.searchsorted(k_pos, qp[t], side="right")
        e = np.searchsorted(k_pos, qp[t] - recent, side="right")
        keep = min(budget[t], e)
        if per_kv:
            for j in range(e):
                acc = 0.0
                for h in range(G):
                    acc += np.float64(s[h * b + t, j])
                rank[j] = acc
            thr, cut = _keep_top(rank, e, c, keep, heap64)
            for j in range(S):
                if j >= c or (j < e and (rank[j] < thr or (rank[j] == thr and j < cut))):
                    for h in range(G):
                        s[h * b + t, j] = -np.inf
            for h in range(G):
                natt[h * b + t] = keep + c - e
        else:
            row = s[r]
            thr32, cut = _keep_top(row, e, c, keep, heap32)
            for j in range(S):
                if j >= c or (j < e and (row[j] < thr32 or (row[j] == thr32 and j < cut))):
                    row[j] = -np.inf
            natt[r] = keep + c - e


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
    Hkv = k.shape[0]
    G = Hq // Hkv
    block = max(1, fa.TILE_ROWS // G) if block is None else int(block)
    out = np.zeros((Hq, Tq, d), np.float32)                      # (Hq, Tq, d)
    lse = np.full((Hq, Tq), -np.inf)                             # (Hq, Tq)
    natt = np.zeros((Hq, Tq), np.int64)                          # (Hq, Tq)
    sc = np.float32(scale)

    def tile(t0, g):
        t1 = min(t0 + block, Tq)
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

    items = [(t0, g) for t0 in range(0, Tq, block) for g in range(Hkv)]
    side_by_side(lambda item: tile(*item), items, workers)
    return out, lse, natt


def topk_tiles(q, k, v, q_pos, k_pos, scale, sel: TopK, block=None, workers=None):
    """TopK's attention (every row reads its sel.k or ceil(sel.fraction * causal) keys of highest
    logit, plus its sel.recent newest) as masked dense tiles; keys in position order.
    Returns (out, lse, n_attended) as masked_tiles.

    >>> x = np.random.default_rng(0).standard_normal((1, 10, 4)).astype(np.float32)
    >>> _, _, n = topk_tiles(x, x, x, np.arange(10), np.arange(10), 0.5, TopK(3, recent=2))
    >>> n[0].tolist()
    [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]
    """
    Hq, Tq, d = q.shape
    G = Hq // k.shape[0]
    n_vis = np.searchsorted(k_pos, q_pos, side="right")                 # (Tq,) causal prefix
    budget = row_budgets(sel.k, sel.fraction, q_pos, k_pos, 1)          # (Tq,)
    per_kv = sel.per == "kv"

    def mask(g, t0, t1, scores, natt):
        S = int(n_vis[t0:t1].max())
        if S == 0:
            return None, None
        s = scores(slice(0, S))                                         # (G*b, S)
        topk_mask(s, q_pos[t0:t1], k_pos[:S], budget[t0:t1], sel.recent, G, per_kv, natt)
        return slice(0, S), s

    return masked_tiles(q, k, v, q_pos, k_pos, scale, mask, block, workers)


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
