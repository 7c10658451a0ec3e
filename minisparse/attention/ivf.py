"""IVF: an inverted-file index over one layer's keys (k-means centroids per KV head, keys in
the list of their nearest centroid); a query scores the centroids, probes the `nprobe` lists
of highest q.c and takes the exact top-k of the causal keys found there.

Leaves out product quantisation (candidates are scored exactly) and GPU search. Follows the
IVF-Flat index of Jégou et al. 2011 / Faiss, used for long-context decode as in RetrievalAttention
(Liu et al. 2024) and the top-k paper's CPU-resident cache. A decode step touches C centroids +
about nprobe * S / C keys: with C ~ sqrt(S) that is O(nprobe * sqrt(S)), sublinear in S.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .selection import Q, Selection, append_along
from .selector import Budget, Selector
from .topk import dot, take_top, budget_text, check_budget, parse_budget, row_budgets


# ---- the index ---------------------------------------------------------------------------------
def _nearest(x, c):
    """Index of the nearest centroid (L2) for x (n, d) among c (C, d), in chunks -> (n,) int64."""
    cn = 0.5 * (c.astype(np.float64) ** 2).sum(1)                              # (C,)
    out = np.empty(x.shape[0], np.int64)
    for a in range(0, x.shape[0], 16384):
        s = x[a:a + 16384].astype(np.float64) @ c.T.astype(np.float64) - cn   # (n', C)
        out[a:a + 16384] = s.argmax(1)                                         # max k.c - |c|^2/2
    return out


@njit(cache=True)
def _list_sums(x, a, C):
    """Sum of the rows x (n, d) of each list a (n,) -> (C, d) float64, added in row order (what
    np.add.at(s, a, x) gives, without its per-element dispatch)."""
    n, d = x.shape
    s = np.zeros((C, d))
    for i in range(n):
        for j in range(d):
            s[a[i], j] += x[i, j]
    return s


def kmeans(x, n_lists, iters=10, seed=0):
    """Lloyd's k-means on x (n, d) -> centroids (C, d) float32. Seeded: the start is C distinct
    random rows; an emptied list restarts at a random row (same generator)."""
    rng = np.random.default_rng(seed)
    C = min(n_lists, x.shape[0])
    c = x[rng.choice(x.shape[0], C, replace=False)].astype(np.float64)         # (C, d)
    for _ in range(iters):
        a = _nearest(x, c)                                                     # (n,)
        cnt = np.bincount(a, minlength=C)                                      # (C,)
        s = _list_sums(x, a, C)                                                # (C, d)
        empty = cnt == 0
        c = np.where(empty[:, None], x[rng.integers(0, x.shape[0], C)], s / np.maximum(cnt, 1)[:, None])
    return c.astype(np.float32)


def _csr(assign, C):
    """Keys sorted by list: order (n,) int64 (stable: ascending key index within a list), ptr (C+1,)."""
    order = np.argsort(assign, kind="stable").astype(np.int64)
    ptr = np.zeros(C + 1, np.int64)
    np.cumsum(np.bincount(assign, minlength=C), out=ptr[1:])
    return order, ptr


class IVFIndex:
    """IVF over the keys k (Hkv, S, d) of one layer: built once after prefill, extended per token.

    n_lists C defaults to ceil(sqrt(S)); k-means trains on at most `train` keys per head (a
    seeded sample) for `iters` Lloyd steps, then assigns every key. New keys (`extend`) join the
    list of their nearest centroid; the centroids stay fixed, so rebuild (`IVFIndex(all keys)`)
    when `stale` says the cache has doubled since the fit: lists then grow unevenly and a probe
    reads more keys for the same recall. The model would keep one IVFIndex per layer next to
    its KVCache and `bind` the selector to it before each layer's attention.

    >>> import numpy as np
    >>> ix = IVFIndex(np.random.default_rng(0).standard_normal((2, 100, 8)).astype(np.float32))
    >>> ix.n_lists, ix.n
    (10, 100)
    """

    def __init__(self, k, n_lists=None, iters=10, seed=0, train=None):
        k = np.asarray(k, np.float32)
        hkv, S, d = k.shape
        if S == 0:
            raise ValueError("IVFIndex: needs at least one key to fit the centroids")
        self.C = int(n_lists) if n_lists else int(np.ceil(np.sqrt(S)))
        self.C = min(self.C, S)
        self.seed, self.iters, self.n_fit = int(seed), int(iters), S
        train = train or 64 * self.C
        rng = np.random.default_rng(self.seed)
        cents, assigns = [], []
        for g in range(hkv):
            sub = k[g] if S <= train else k[g, np.sort(rng.choice(S, train, replace=False))]
            c = kmeans(sub, self.C, self.iters, self.seed + g)                 # (C, d)
            cents.append(c)
            assigns.append(_nearest(k[g], c))                                  # (S,)
        self.centroids = np.stack(cents)                                       # (Hkv, C, d)
        self._buf = np.stack(assigns)                                          # (Hkv, cap)
        self.n = S
        self._reindex()

    @property
    def n_lists(self):
        return self.C

    @property
    def assign(self):
        """(Hkv, n) list of every key so far (a view of the growable buffer)."""
        return self._buf[:, :self.n]

    @property
    def stale(self):
        return self.n > 2 * self.n_fit

    def _reindex(self):
        o, p = zip(*[_csr(a, self.C) for a in self.assign])
        self.order, self.ptr = np.stack(o), np.stack(p)                        # (Hkv, n), (Hkv, C+1)
        self.n_csr = self.n

    def extend(self, k_new):
        """Assign the new keys k_new (Hkv, T, d) to their nearest centroids. They sit in a tail
        scanned by assignment until the tail exceeds max(1024, n/16) keys; then the lists are
        re-sorted (O(n), no refit)."""
        a = np.stack([_nearest(np.asarray(k_new[g], np.float32), self.centroids[g])
                      for g in range(self.centroids.shape[0])])               # (Hkv, T)
        self._buf = append_along(self._buf, self.n, a, axis=1)                # (Hkv, cap)
        self.n += a.shape[1]
        if self.n - self.n_csr > max(1024, self.n // 16):
            self._reindex()


@njit(cache=True)
def ivf_rows(q, k, q_pos, k_pos, cents, order, ptr, n_csr, assign, nprobe, budget):
    """Per (query head h, query t): probe the nprobe lists of highest q.c (ties to the later
    list), gather their causal keys (sorted lists, then the unsorted tail keys n_csr..),
    and keep the budget[r] of highest q.k (ties to the later key).
    Returns picks (R, max budget) -1 padded (ascending), counts (R,), touched (R,)."""
    Hq, Tq, d = q.shape
    Hkv, Tk, _ = k.shape
    C = cents.shape[1]
    G = Hq // Hkv
    R = Hq * Tq
    bmax = 0
    for r in range(R):
        bmax = max(bmax, budget[r])
    picks = np.full((R, bmax), -1, np.int64)
    cnt = np.zeros(R, np.int64)
    touched = np.zeros(R, np.int64)
    P = min(nprobe, C)
    for r in range(R):
        h = r // Tq
        t = r % Tq
        g = h // G
        qp = q_pos[t]
        cs = np.empty(C, np.float64)
        for c in range(C):
            cs[c] = dot(q[h, t], cents[g, c])
        probe = np.empty(P, np.int64)
        take_top(cs, np.ones(C, np.bool_), P, probe, 0)
        want = np.zeros(C, np.bool_)
        n = 0
        for a in range(P):
            want[probe[a]] = True
            n += ptr[g, probe[a] + 1] - ptr[g, probe[a]]
        cand = np.empty(n + max(0, min(Tk, assign.shape[1]) - n_csr), np.int64)
        m = 0
        for a in range(P):
            for b in range(ptr[g, probe[a]], ptr[g, probe[a] + 1]):
                j = order[g, b]
                if j < Tk and k_pos[j] <= qp:
                    cand[m] = j
                    m += 1
        for j in range(n_csr, min(Tk, assign.shape[1])):
            if want[assign[g, j]] and k_pos[j] <= qp:
                cand[m] = j
                m += 1
        cand = np.sort(cand[:m])                  # key order: ties resolve as in TopK
        sc = np.empty(m, np.float64)
        for a in range(m):
            sc[a] = dot(q[h, t], k[g, cand[a]])
        b = min(budget[r], m)
        sel = np.empty(b, np.int64)
        take_top(sc, np.ones(m, np.bool_), b, sel, 0)
        for a in range(b):
            picks[r, a] = cand[sel[a]]
        cnt[r] = b
        touched[r] = C + m
    return picks, cnt, touched


class IVF(Selector):
    """Approximate top-k per query head through an IVFIndex: k keys (or ceil(fraction *
    n_causal)) from the `nprobe` probed lists. With nprobe >= n_lists it is exact top-k.

    Unbound, it fits an IVFIndex on the keys of the call (seeded), so a decode step and a
    prefill row agree only if they probe the same index: bind(index) for decode (the index
    built after prefill and extended per token). `last_touched` (Hq, Tq) records the centroids
    plus candidate keys each row scored.

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> x = np.random.default_rng(0).standard_normal((1, 64, 8)).astype(np.float32)
    >>> sel = IVF(4, nprobe=2, n_lists=8)
    >>> _, st = attend(x, x, x, sel, return_stats=True)
    >>> int(st.n_attended[0, -1]), bool(sel.last_touched[0, -1] < 64)
    (4, True)
    """

    def __init__(self, k=None, fraction=None, nprobe=8, n_lists=None, seed=0, index=None):
        self.k, self.fraction = check_budget("IVF", k, fraction)
        if int(nprobe) < 1:
            raise ValueError(f"IVF: nprobe must be >= 1, got {nprobe}")
        self.nprobe, self.n_lists, self.seed, self.index = int(nprobe), n_lists, int(seed), index
        self.last_touched = None

    def bind(self, index):
        return IVF(self.k, self.fraction, self.nprobe, self.n_lists, self.seed, index)

    def for_layer(self, layer, state, k, v):
        """Bound to this layer's IVFIndex in the cache's state: built on the first call (after
        prefill), extended with the keys appended since, rebuilt when `stale`."""
        return self._indexed_for_layer(layer, state, k,
                                       lambda: IVFIndex(k, self.n_lists, seed=self.seed))

    options = ("seed",)

    def _with_options(self, seed=None):
        return IVF(self.k, self.fraction, self.nprobe, self.n_lists,
                   self.seed if seed is None else int(seed), self.index)

    def _select(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("IVF: needs the queries (content-based), got q=None")
        ix = self.index if self.index is not None else IVFIndex(k, self.n_lists, seed=self.seed)
        if ix.n < k.shape[1] or ix.centroids.shape[0] != k.shape[0]:
            raise ValueError(f"IVF: bound index holds {ix.n} keys for {ix.centroids.shape[0]} KV "
                             f"heads; attention got Tk={k.shape[1]}, Hkv={k.shape[0]}")
        b = row_budgets(self.k, self.fraction, q_pos, k_pos, q.shape[0])       # (R,)
        picks, cnt, touched = ivf_rows(q, k, q_pos, k_pos, ix.centroids, ix.order, ix.ptr,
                                       ix.n_csr, ix.assign, self.nprobe, b)
        self.last_touched = touched.reshape(q.shape[0], q_pos.size)
        ptr = np.zeros(cnt.size + 1, np.int64)
        np.cumsum(cnt, out=ptr[1:])
        return Selection.from_lists(ptr, picks[picks >= 0], k.shape[1], head_kind=Q,
                                    n_heads=q.shape[0], tq=q_pos.size, normalized=True)

    @property
    def budget(self):
        return Budget(self.k, self.fraction)

    def describe(self):
        s = f"ivf={budget_text(self.k, self.fraction)}/p{self.nprobe}"
        return s + (f"/c{self.n_lists}" if self.n_lists else "") + \
            (f",seed={self.seed}" if self.seed else "")

    @staticmethod
    def from_spec(val):
        """`ivf=64` (64 keys, nprobe 8, sqrt(S) lists), `ivf=2%/p16/c256`; seed via `,seed=N`."""
        if val is None:
            raise ValueError("attention spec: 'ivf' needs a budget, e.g. ivf=64/p8")
        parts = val.split("/")
        k, f = parse_budget(parts[0], f"ivf={val}")
        kw = {}
        for p in parts[1:]:
            if p[:1] in ("p", "c") and p[1:].isdigit():
                kw["nprobe" if p[0] == "p" else "n_lists"] = int(p[1:])
            else:
                raise ValueError(f"attention spec: 'ivf={val}': unknown option {p!r} "
                                 f"(expected pN = nprobe, cN = lists)")
        return IVF(k, f, **kw)
