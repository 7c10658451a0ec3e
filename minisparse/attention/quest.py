"""Quest: keys grouped into pages of `page` consecutive keys; each page keeps its element-wise
min and max key, which bound q.k over the page; each query reads the pages of highest bound.

Leaves out Quest's CUDA paging and its dense first layers (the model's `dense_layers` does
that). Follows Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference": bound(page) = sum_i max(q_i * min_i, q_i * max_i) >= q.k for every k in the page.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .selection import Q, Selection, append_along, sorted_positions
from .selector import Budget, Selector
from .topk import take_top, budget_text, check_budget, parse_budget, row_budgets


@njit(cache=True)
def page_minmax(k, lo, hi):
    """Element-wise min and max of k (Hkv, Tk, d) over keys [lo, hi) -> two (Hkv, d) arrays."""
    Hkv, _, d = k.shape
    mn = np.full((Hkv, d), np.inf, np.float32)
    mx = np.full((Hkv, d), -np.inf, np.float32)
    for g in range(Hkv):
        for j in range(lo, hi):
            for i in range(d):
                x = k[g, j, i]
                if x < mn[g, i]:
                    mn[g, i] = x
                if x > mx[g, i]:
                    mx[g, i] = x
    return mn, mx


@njit(cache=True, fastmath={"reassoc", "nsz"})
def page_bound(qv, mn, mx):
    """Upper bound of qv . k over a page with bounds mn, mx (d,): float64 products of float32
    inputs are exact, so only the d-term sum rounds (in an order the compiler picks, to add in
    SIMD lanes; one compiled order, so prefill rows and decode steps pick the same pages)."""
    s = 0.0
    for i in range(qv.size):
        a = np.float64(qv[i]) * mn[i]
        b = np.float64(qv[i]) * mx[i]
        s += max(a, b)
    return s


@njit(cache=True)
def page_bounds_all(k, page):
    """Bounds of the complete pages: mn, mx (Hkv, n_full, d) float32."""
    Hkv, Tk, d = k.shape
    nf = Tk // page
    mn = np.empty((Hkv, nf, d), np.float32)
    mx = np.empty((Hkv, nf, d), np.float32)
    for p in range(nf):
        a, b = page_minmax(k, p * page, (p + 1) * page)
        mn[:, p] = a
        mx[:, p] = b
    return mn, mx


def _quest_rows(q, k, k0, hi, page, n_pages, mn, mx):
    """Per (query head h, query t): bounds of the pages over the causal keys [0, hi[t]) — complete
    pages from mn/mx, the last partial page from its causal keys only — and the n_pages[r] pages
    of highest bound (ties to the later page). Returns CSR ranges (ptr, lo, hi). k holds the keys
    from position k0 on (k0 a multiple of page at or before every row's partial page): only the
    partial pages read keys, so a caller passes that tail, contiguous, not the whole cache. Each row writes
    its own CSR slice and depends on nothing else, so quest_rows_parallel (a prefill chunk's
    Hq * Tq rows on the threads) gives the same result as quest_rows (a decode step's Hq rows,
    where waking threads costs more than the rows)."""
    Hq, Tq, d = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    R = Hq * Tq
    cnt = np.zeros(R, np.int64)
    for r in range(R):
        t = r % Tq
        npg = (hi[t] + page - 1) // page
        cnt[r] = min(n_pages[r], npg)
    ptr = np.zeros(R + 1, np.int64)
    ptr[1:] = np.cumsum(cnt)
    rlo = np.empty(ptr[-1], np.int64)
    rhi = np.empty(ptr[-1], np.int64)
    for r in prange(R):
        h = r // Tq
        t = r % Tq
        g = h // G
        nfull = hi[t] // page
        npg = (hi[t] + page - 1) // page
        ub = np.empty(npg, np.float64)
        for p in range(nfull):
            ub[p] = page_bound(q[h, t], mn[g, p], mx[g, p])
        if npg > nfull:                                  # partial page: causal keys only
            a = np.full(d, np.inf, np.float32)
            b = np.full(d, -np.inf, np.float32)
            for j in range(nfull * page, hi[t]):
                for i in range(d):
                    a[i] = min(a[i], k[g, j - k0, i])
                    b[i] = max(b[i], k[g, j - k0, i])
            ub[nfull] = page_bound(q[h, t], a, b)
        pick = np.empty(cnt[r], np.int64)
        take_top(ub, np.ones(npg, np.bool_), cnt[r], pick, 0)
        for c in range(cnt[r]):
            rlo[ptr[r] + c] = pick[c] * page
            rhi[ptr[r] + c] = min((pick[c] + 1) * page, hi[t])
    return ptr, rlo, rhi


quest_rows = njit(cache=True)(_quest_rows)
quest_rows_parallel = njit(cache=True, parallel=True)(_quest_rows)
PARALLEL_MIN_ROWS = 256          # rows from which a call takes quest_rows_parallel


class PageBounds:
    """Running bounds of a decode cache's complete pages, one per layer (Quest.for_layer keeps it
    in the cache's selector_state): mn, mx (Hkv, pages, d) over the first pages * page of the n
    keys seen; the keys of the page still filling wait in `tail`. Min and max are exact, so
    the running bounds equal page_bounds_all's bit for bit and a decode step reads the same
    pages as the prefill row at its position."""
    stale = False

    def __init__(self, k, page):
        self.page, self.n = page, k.shape[1]
        self.mn, self.mx = page_bounds_all(k, page)                 # (Hkv, pages, d)
        self.pages = self.mn.shape[1]
        self.tail = np.array(k[:, self.pages * page:], np.float32)  # (Hkv, n % page, d)

    def extend(self, k_new):
        """Keys n, n+1, ... (Hkv, a, d) arrived: add the pages they complete."""
        self.n += k_new.shape[1]
        keys = np.concatenate([self.tail, k_new], axis=1)           # (Hkv, tail + a, d)
        done = keys.shape[1] // self.page
        if done:
            mn, mx = page_bounds_all(keys, self.page)               # (Hkv, done, d)
            self.mn = append_along(self.mn, self.pages, mn, axis=1)
            self.mx = append_along(self.mx, self.pages, mx, axis=1)
            self.pages += done
        self.tail = np.array(keys[:, done * self.page:], np.float32)


class Quest(Selector):
    """Each query head reads whole pages of `page` keys (by index; keys in position order): the
    max(1, budget // page) pages of highest bound, where budget = k keys or ceil(fraction *
    n_causal). The query's own partial page is bounded over its causal keys only, so a row
    never looks at a later key. A call computes the complete pages' bounds (O(S d) min/max, no
    exp); in decode, for_layer keeps them per layer in the cache (PageBounds) and adds a page
    each time one fills, so a step costs O(S d / page) bound products, not O(S d).

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> x = np.random.default_rng(0).standard_normal((1, 40, 4)).astype(np.float32)
    >>> _, st = attend(x, x, x, Quest(page=4, k=8), return_stats=True)
    >>> int(st.n_attended[0, -1])                   # two pages of 4
    8
    """

    def __init__(self, page=16, k=None, fraction=None):
        if int(page) < 1:
            raise ValueError(f"Quest: page must be >= 1, got {page}")
        self.page = int(page)
        self.k, self.fraction = check_budget("Quest", k, fraction)
        self._bounds = None

    def bind(self, bounds):
        """This selector reading running page bounds (PageBounds); anything else (a union binds
        every member to one state) leaves it unbound."""
        if not isinstance(bounds, PageBounds) or bounds.page != self.page:
            return self
        out = Quest(self.page, self.k, self.fraction)
        out._bounds = bounds
        return out

    def for_layer(self, layer, state, k, v):
        return self._indexed_for_layer(layer, state, k, lambda: PageBounds(k, self.page))

    def _select(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("Quest: needs the queries (content-based), got q=None")
        sorted_positions("Quest", k_pos)
        P = self.page
        hi = np.searchsorted(k_pos, q_pos, side="right")                    # (Tq,) causal keys
        n_pages = np.maximum(1, row_budgets(self.k, self.fraction, q_pos, k_pos, q.shape[0]) // P)
        b = self._bounds
        if b is not None and b.pages == k.shape[1] // P:                     # running bounds
            mn, mx = b.mn[:, :b.pages], b.mx[:, :b.pages]                    # (Hkv, n_full, d)
        else:
            mn, mx = page_bounds_all(k, P)                                   # (Hkv, n_full, d)
        rows = quest_rows_parallel if q.shape[0] * q_pos.size >= PARALLEL_MIN_ROWS else quest_rows
        # Compiled kernels get contiguous arrays: a cache buffer's view [:, :S] is not, and a
        # cached Numba kernel called with a non-contiguous array reloads itself at every call.
        k0 = (int(hi.min()) // P) * P if hi.size else 0
        tail = np.ascontiguousarray(k[:, k0:], np.float32)                   # (Hkv, Tk - k0, d)
        mn, mx = np.ascontiguousarray(mn), np.ascontiguousarray(mx)
        ptr, lo, rhi = rows(q, tail, k0, hi, P, n_pages, mn, mx)
        z = np.zeros(q.shape[0] * q_pos.size + 1, np.int64)
        return Selection.from_lists(z, np.zeros(0, np.int64), k.shape[1], head_kind=Q,
                                    n_heads=q.shape[0], tq=q_pos.size, r_ptr=ptr, r_lo=lo,
                                    r_hi=rhi)

    @property
    def budget(self):
        return Budget(self.k, self.fraction)

    def describe(self):
        return f"quest={self.page}/" + budget_text(self.k, self.fraction)

    @staticmethod
    def from_spec(val):
        """`quest=16/5%` (page 16, 5% of causal keys) or `quest=16/64` (64 keys)."""
        page, _, b = (val or "").partition("/")
        if not page.isdigit() or not b:
            raise ValueError(f"attention spec: 'quest={val}': expected PAGE/BUDGET, e.g. quest=16/5%")
        k, f = parse_budget(b, f"quest={val}")
        return Quest(int(page), k, f)
