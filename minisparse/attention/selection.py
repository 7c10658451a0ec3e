"""Selection (which keys each query row reads, as CSR lists of key ranges plus explicit
indices), the union of selections, and the small helpers selectors share (`reserve`,
`append_along`, `sorted_positions`, `span_means`). The Selector contract is in selector.py.

Deliberately leaves out any choice of keys (selectors in patterns.py etc. make those) and the
arithmetic (kernel.py). The layout is O(rows + ranges + indices), never O(Tq * Tk), so a window
or dense pattern costs one range per row. Union follows "exact wins": a key picked by several
members is read once, with log-weight 0 if any member picked it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

# head_kind: whose rows a Selection holds. Query head h of Hq reads row head
#   SHARED -> 0,  KV -> h // G,  Q -> h      (G = Hq // Hkv)
SHARED, KV, Q = 0, 1, 2
_KIND_NAMES = {SHARED: "shared", KV: "kv", Q: "q"}


@dataclass
class Selection:
    """Index sets for rows (row head s, query t), row r = s * Tq + t.

    head_kind  SHARED | KV | Q (see above); n_heads is 1, Hkv or Hq accordingly
    range_ptr  (R+1,) int64   CSR offsets into range_lo / range_hi
    range_lo, range_hi (nr,) int64   half-open key ranges [lo, hi) over the real keys (< Tk)
    idx_ptr    (R+1,) int64   CSR offsets into idx / logw / exact
    idx        (ni,) int64    explicit key indices; idx >= Tk names pseudo-key idx - Tk
    logw       (ni,) float32  additive log-weight on the logit (0 for exact picks; samplers: -log P)
    exact      (ni,) bool     True when the member picked the key exactly (wins unions)
    extra_k, extra_v (Hkv, E, d) float32   pseudo-keys (landmarks), or E = 0
    extra_pos  (E,) int64     position of each pseudo-key, for causality
    extra_lo, extra_hi (E,) int64   the real keys [lo, hi) a pseudo-key summarises; in a row
               that also reads c of them exactly, the pseudo-key's log-weight gains
               log((span - c) / span) and it is dropped when c = span (no double count)
    normalized True when ranges are sorted/disjoint, idx sorted/unique and outside the ranges

    Example:
    >>> from minisparse.attention import Window
    >>> import numpy as np
    >>> sel = Window(1).select(None, np.zeros((1, 4, 2), np.float32), np.arange(4), np.arange(4))
    >>> sel.rows(0, 3)
    ([(2, 4)], [])
    """
    head_kind: int
    n_heads: int
    tq: int
    tk: int
    range_ptr: np.ndarray
    range_lo: np.ndarray
    range_hi: np.ndarray
    idx_ptr: np.ndarray
    idx: np.ndarray
    logw: np.ndarray
    exact: np.ndarray
    extra_k: np.ndarray | None = None
    extra_v: np.ndarray | None = None
    extra_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    extra_lo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    extra_hi: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    normalized: bool = False

    # ---- constructors -------------------------------------------------------------------
    @staticmethod
    def from_ranges(lo, hi, tk, head_kind=SHARED, n_heads=1, tq=None):
        """One range per row: lo, hi (R,) int64 with R = n_heads * Tq. Empty when lo >= hi."""
        lo = np.asarray(lo, np.int64).ravel()
        hi = np.asarray(hi, np.int64).ravel()
        R = lo.size
        tq = R // n_heads if tq is None else tq
        keep = hi > lo                                           # (R,) drop empty ranges
        ptr = np.zeros(R + 1, np.int64)
        np.cumsum(keep, out=ptr[1:])
        z = np.zeros(0, np.int64)
        return Selection(head_kind, n_heads, tq, tk, ptr, lo[keep], hi[keep],
                         np.zeros(R + 1, np.int64), z, np.zeros(0, np.float32),
                         np.zeros(0, bool), normalized=True)

    @staticmethod
    def from_lists(ptr, idx, tk, head_kind=SHARED, n_heads=1, tq=None, logw=None,
                   r_ptr=None, r_lo=None, r_hi=None, normalized=False):
        """Explicit indices in CSR form (ptr (R+1,), idx (ni,)), optionally with ranges too."""
        ptr = np.asarray(ptr, np.int64)
        idx = np.asarray(idx, np.int64)
        R = ptr.size - 1
        tq = R // n_heads if tq is None else tq
        exact = np.ones(idx.size, bool) if logw is None else np.zeros(idx.size, bool)
        logw = np.zeros(idx.size, np.float32) if logw is None else np.asarray(logw, np.float32)
        if r_ptr is None:
            r_ptr, r_lo, r_hi = np.zeros(R + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return Selection(head_kind, n_heads, tq, tk, np.asarray(r_ptr, np.int64),
                         np.asarray(r_lo, np.int64), np.asarray(r_hi, np.int64),
                         ptr, idx, logw, exact, normalized=normalized)

    # ---- inspection ----------------------------------------------------------------------
    @property
    def n_extra(self) -> int:
        return int(self.extra_pos.size)

    def rows(self, s: int, t: int):
        """([(lo, hi), ...], [(idx, logw), ...]) read by row head s, query t (before causality)."""
        r = s * self.tq + t
        a, b = self.range_ptr[r], self.range_ptr[r + 1]
        c, e = self.idx_ptr[r], self.idx_ptr[r + 1]
        return ([(int(x), int(y)) for x, y in zip(self.range_lo[a:b], self.range_hi[a:b])],
                [(int(i), float(w)) for i, w in zip(self.idx[c:e], self.logw[c:e])])

    def row_head(self, h: int, hq: int, hkv: int) -> int:
        return _row_head(self.head_kind, h, hq // hkv)

    def to_mask(self, hq: int, tq: int, tk: int):
        """(mask (Hq, Tq, Tk) bool, logw (Hq, Tq, Tk) float64) over the REAL keys, normalised first.

        Pseudo-keys are not representable in a mask; a selection that still reads any raises.
        Causality is not applied here (the reference applies it by position)."""
        sel = self if self.normalized else self.normalize()
        g = hq // sel.n_heads if sel.head_kind == KV else 1       # KV rows serve G query heads
        mask = np.zeros((hq, tq, tk), bool)                      # (Hq, Tq, Tk)
        lw = np.zeros((hq, tq, tk), np.float64)                  # (Hq, Tq, Tk)
        for h in range(hq):
            s = _row_head(sel.head_kind, h, g)
            for t in range(tq):
                r = s * tq + t
                for a in range(sel.range_ptr[r], sel.range_ptr[r + 1]):
                    mask[h, t, sel.range_lo[a]:sel.range_hi[a]] = True
                for a in range(sel.idx_ptr[r], sel.idx_ptr[r + 1]):
                    j = sel.idx[a]
                    if j >= tk:
                        raise ValueError("Selection.to_mask: row reads pseudo-key "
                                         f"{j - tk}; masks cover real keys only")
                    mask[h, t, j] = True
                    lw[h, t, j] = sel.logw[a]
        return mask, lw

    def normalize(self) -> "Selection":
        """Sorted disjoint ranges; unique sorted indices outside the ranges; exact wins;
        a pseudo-key's multiplicity loses the keys of its span this row reads exactly."""
        if self.normalized:
            return self
        rp, rl, rh, ip, ii, iw, ie = _normalize(
            self.range_ptr, self.range_lo, self.range_hi, self.idx_ptr, self.idx,
            self.logw, self.exact, np.int64(self.tk), self.extra_lo, self.extra_hi)
        return Selection(self.head_kind, self.n_heads, self.tq, self.tk, rp, rl, rh, ip, ii, iw,
                         ie, self.extra_k, self.extra_v, self.extra_pos, self.extra_lo,
                         self.extra_hi, normalized=True)

    def __repr__(self):
        R = self.range_ptr.size - 1
        return (f"Selection(head_kind={_KIND_NAMES[self.head_kind]}, n_heads={self.n_heads}, "
                f"Tq={self.tq}, Tk={self.tk}, rows={R}, ranges={self.range_lo.size}, "
                f"indices={self.idx.size}, extra={self.n_extra}, normalized={self.normalized})")


@njit(cache=True)
def _row_head(kind, h, g):
    if kind == 0:
        return 0
    if kind == 1:
        return h // g
    return h


def default_positions(tq: int, tk: int, q_pos=None, k_pos=None):
    """k_pos = arange(Tk), q_pos = arange(Tk - Tq, Tk) unless given (then checked)."""
    k_pos = np.arange(tk, dtype=np.int64) if k_pos is None else np.asarray(k_pos, np.int64)
    q_pos = np.arange(tk - tq, tk, dtype=np.int64) if q_pos is None else np.asarray(q_pos, np.int64)
    if k_pos.shape != (tk,):
        raise ValueError(f"k_pos: expected shape ({tk},), got {k_pos.shape}")
    if q_pos.shape != (tq,):
        raise ValueError(f"q_pos: expected shape ({tq},), got {q_pos.shape}")
    return q_pos, k_pos


@njit(cache=True, parallel=True)
def span_means(x, lo, hi):
    """Mean of x (H, Tk, d) over each key span [lo[e], hi[e]) -> (H, E, d) float32.
    Float64 sums added key by key in order (RunningLandmarks reproduces them bit for bit)."""
    H, _, d = x.shape
    E = lo.size
    out = np.zeros((H, E, d), np.float32)
    for he in prange(H * E):                                     # spans are independent
        h, e = he // E, he % E
        acc = np.zeros(d, np.float64)
        for j in range(lo[e], hi[e]):
            for i in range(d):
                acc[i] += x[h, j, i]
        n = max(hi[e] - lo[e], 1)
        for i in range(d):
            out[h, e, i] = acc[i] / n
    return out


# ---- union ---------------------------------------------------------------------------------
def _gather(ptr, src_rows):
    """For target rows reading source rows src_rows (R,): (row id (n,), source position (n,))."""
    lens = ptr[src_rows + 1] - ptr[src_rows]                     # (R,)
    total = int(lens.sum())
    row = np.repeat(np.arange(src_rows.size, dtype=np.int64), lens)
    first = np.cumsum(lens) - lens                               # (R,) start of each row's run
    pos = np.repeat(ptr[src_rows] - first, lens) + np.arange(total, dtype=np.int64)
    return row, pos


def _place(rows, n_rows):
    """Members' row ids (each non-decreasing, from _gather) -> (ptr (R+1,), destination of every
    entry (n_m,) per member): row r holds member 0's entries, then member 1's, ... (O(n), no sort)."""
    counts = [np.bincount(r, minlength=n_rows) for r in rows]
    ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(sum(counts), out=ptr[1:])
    dests, before = [], np.zeros(n_rows, np.int64)
    for r, c in zip(rows, counts):
        first = np.cumsum(c) - c                                 # (R,) start of row r in member
        dests.append(ptr[r] + before[r] + np.arange(r.size, dtype=np.int64) - first[r])
        before += c
    return ptr, dests


def _scatter(vals, dests, n, dtype):
    out = np.empty(n, dtype)
    for x, d in zip(vals, dests):
        out[d] = x
    return out


def _cat_values(evs):
    # extra_v None means "mean of v over the span" (filled in by attend); members must agree
    if not evs or all(e is None for e in evs):
        return None
    if any(e is None for e in evs):
        raise ValueError("union: members mix pseudo-keys with and without stored values; "
                         "bind every landmark member to its state, or none")
    return np.concatenate(evs, axis=1)


def union(sels, hq: int, hkv: int) -> Selection:
    """Union of Selections over the same (Tq, Tk): rows broadcast to the finest head kind,
    lists concatenated, pseudo-keys concatenated (indices shifted), then normalised."""
    if len(sels) == 1:
        return sels[0].normalize()
    tq, tk = sels[0].tq, sels[0].tk
    kind = max(s.head_kind for s in sels)
    n_heads = {SHARED: 1, KV: hkv, Q: hq}[kind]
    g = hq // hkv
    R = n_heads * tq
    t_idx = np.arange(tq, dtype=np.int64)
    rr, rl, rh, ir, ii, iw, ie = [], [], [], [], [], [], []
    ek, ev, epos, elo, ehi = [], [], [], [], []
    e_off = 0
    for s in sels:
        if s.tq != tq or s.tk != tk:
            raise ValueError(f"union: member has Tq={s.tq}, Tk={s.tk}; expected Tq={tq}, Tk={tk}")
        heads = np.arange(n_heads)
        if s.head_kind == SHARED:
            src_h = np.zeros(n_heads, np.int64)
        elif s.head_kind == kind:
            src_h = heads
        else:                                                    # KV member inside a Q union
            src_h = heads // g
        src_rows = (src_h[:, None] * tq + t_idx[None, :]).ravel()   # (R,)
        row, pos = _gather(s.range_ptr, src_rows)
        rr.append(row); rl.append(s.range_lo[pos]); rh.append(s.range_hi[pos])
        row, pos = _gather(s.idx_ptr, src_rows)
        j = s.idx[pos]
        ir.append(row); ii.append(np.where(j >= tk, j + e_off, j))
        iw.append(s.logw[pos]); ie.append(s.exact[pos])
        if s.n_extra:
            ek.append(s.extra_k); ev.append(s.extra_v)
            epos.append(s.extra_pos); elo.append(s.extra_lo); ehi.append(s.extra_hi)
            e_off += s.n_extra
    rptr, rd = _place(rr, R)
    iptr, idd = _place(ir, R)
    nr, ni = int(rptr[-1]), int(iptr[-1])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt)
    out = Selection(kind, n_heads, tq, tk, rptr, _scatter(rl, rd, nr, np.int64),
                    _scatter(rh, rd, nr, np.int64), iptr, _scatter(ii, idd, ni, np.int64),
                    _scatter(iw, idd, ni, np.float32), _scatter(ie, idd, ni, bool),
                    np.concatenate(ek, axis=1) if ek else None,
                    _cat_values(ev),
                    cat(epos, np.int64), cat(elo, np.int64), cat(ehi, np.int64))
    return out.normalize()


# ---- normalisation kernel ------------------------------------------------------------------
@njit(cache=True)
def _merge_ranges(lo, hi):
    """Sort and merge half-open ranges (touching ones fuse). Returns (lo, hi) views."""
    n = lo.size
    if n == 0:
        return lo, hi
    o = np.argsort(lo, kind="mergesort")
    ml = np.empty(n, np.int64)
    mh = np.empty(n, np.int64)
    m = 0
    for a in range(n):
        x, y = lo[o[a]], hi[o[a]]
        if y <= x:
            continue
        if m > 0 and x <= mh[m - 1]:
            if y > mh[m - 1]:
                mh[m - 1] = y
        else:
            ml[m] = x
            mh[m] = y
            m += 1
    return ml[:m], mh[:m]


@njit(cache=True)
def _covered(ml, mh, j):
    """True when j lies in one of the sorted disjoint ranges [ml, mh)."""
    a = np.searchsorted(ml, j, side="right") - 1
    return a >= 0 and j < mh[a]


@njit(cache=True)
def _overlap(ml, mh, x, y):
    """Number of integers in [x, y) covered by the sorted disjoint ranges [ml, mh)."""
    c = 0
    a = max(np.searchsorted(ml, x, side="right") - 1, 0)
    while a < ml.size and ml[a] < y:
        c += max(0, min(mh[a], y) - max(ml[a], x))
        a += 1
    return c


@njit(cache=True, parallel=True)
def _normalize_rows(rptr, rlo, rhi, iptr, idx, logw, exact, tk, elo, ehi,
                    o_lo, o_hi, o_idx, o_w, o_ex, n_r, n_i):
    """Each row normalised in place of its input slots (a row never grows), rows in parallel."""
    R = rptr.size - 1
    for r in prange(R):
        a0, a1 = rptr[r], rptr[r + 1]
        b0, b1 = iptr[r], iptr[r + 1]
        ml, mh = _merge_ranges(rlo[a0:a1].copy(), rhi[a0:a1].copy())
        o_lo[a0:a0 + ml.size] = ml
        o_hi[a0:a0 + ml.size] = mh
        n_r[r] = ml.size
        # explicit keys sorted by index (stable: the first member's weight is kept); real keys
        # (< tk) therefore come before pseudo-keys, which need the final real set of the row
        o = np.argsort(idx[b0:b1], kind="mergesort")
        ni = b0
        n_real = 0
        last = -1
        for c in range(b1 - b0):
            src = b0 + o[c]
            j = idx[src]
            if j < tk and _covered(ml, mh, j):
                continue                                        # ranges are exact: they win
            if j == last:
                if exact[src] and not o_ex[ni - 1]:             # exact beats weighted
                    o_ex[ni - 1] = True
                    o_w[ni - 1] = 0.0
                continue
            w = np.float32(0.0) if exact[src] else logw[src]
            if j >= tk:
                # a pseudo-key stands for the real keys [x, y) of its span; those read exactly
                # in this row are taken out of its multiplicity, so no key is counted twice
                x, y = elo[j - tk], ehi[j - tk]
                real = o_idx[b0:b0 + n_real]
                cnt = _overlap(ml, mh, x, y) + (np.searchsorted(real, y) - np.searchsorted(real, x))
                if cnt >= y - x:
                    continue                                    # whole span read exactly
                if cnt > 0:
                    w = np.float32(logw[src] + np.log((y - x - cnt) / (y - x)))
            else:
                n_real += 1
            o_idx[ni] = j
            o_w[ni] = w
            o_ex[ni] = exact[src]
            ni += 1
            last = j
        n_i[r] = ni - b0


# The same rows on one thread: a decode step has Hq rows or fewer, and waking the thread pool
# for them costs more than the work (on a loaded machine, far more).
_normalize_rows_serial = njit(cache=True)(_normalize_rows.py_func)
SERIAL_MAX_ROWS = 64


def _compact(ptr, n, *arrays):
    """Keep the first n[r] slots of every CSR row r: (new ptr, compacted arrays)."""
    R = n.size
    new = np.zeros(R + 1, np.int64)
    np.cumsum(n, out=new[1:])
    take = np.repeat(ptr[:-1], n) + (np.arange(new[-1], dtype=np.int64) - np.repeat(new[:-1], n))
    return (new,) + tuple(x[take] for x in arrays)


def _normalize(rptr, rlo, rhi, iptr, idx, logw, exact, tk, elo, ehi):
    R = rptr.size - 1
    o_lo, o_hi = np.empty_like(rlo), np.empty_like(rhi)
    o_idx, o_w, o_ex = np.empty_like(idx), np.empty_like(logw), np.empty_like(exact)
    n_r, n_i = np.zeros(R, np.int64), np.zeros(R, np.int64)
    run = _normalize_rows_serial if R <= SERIAL_MAX_ROWS else _normalize_rows
    run(rptr, rlo, rhi, iptr, idx, logw, exact, tk, elo, ehi, o_lo, o_hi, o_idx, o_w, o_ex, n_r, n_i)
    o_rptr, o_lo, o_hi = _compact(rptr, n_r, o_lo, o_hi)
    o_iptr, o_idx, o_w, o_ex = _compact(iptr, n_i, o_idx, o_w, o_ex)
    return o_rptr, o_lo, o_hi, o_iptr, o_idx, o_w, o_ex


# ---- helpers selectors share ---------------------------------------------------------------
def reserve(buf, n, need, axis, zeros=np.zeros):
    """buf with room for `need` entries along `axis`, its first n kept: buf itself when it is
    big enough, else a zeroed buffer of max(need, twice the capacity) (so appending one entry at
    a time costs O(1) amortised), made by `zeros(shape, dtype)`. The one growth-by-doubling rule
    of the package: the dense KV cache, the gate's running state and the growing key indexes
    (IVF, LSH) all grow with it.

    >>> reserve(np.zeros((2, 3)), 3, 4, axis=1).shape
    (2, 6)
    """
    cap = buf.shape[axis]
    if need <= cap:
        return buf
    shape = list(buf.shape)
    shape[axis] = max(2 * cap, need)
    grown = zeros(shape, buf.dtype)
    keep = (slice(None),) * axis + (slice(0, n),)
    grown[keep] = buf[keep]
    return grown


def append_along(buf, n, new, axis):
    """buf, whose first n entries along `axis` are in use, with `new` written after them (in
    place when it fits, else in a buffer grown by `reserve`). Returns the buffer to keep."""
    T = new.shape[axis]
    buf = reserve(buf, n, n + T, axis)
    buf[(slice(None),) * axis + (slice(n, n + T),)] = new
    return buf


def sorted_positions(name, k_pos):
    """Range-based patterns need keys in position order (caches append in order)."""
    if k_pos.size > 1 and np.any(k_pos[1:] < k_pos[:-1]):
        raise ValueError(f"{name}: k_pos must be non-decreasing (keys held in position order)")
