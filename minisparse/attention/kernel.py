"""The reference attention kernel: every query row reads its key ranges then its explicit
indices, causal by position, with a plain online (running-max) softmax; plus `attend`, which
turns a Selection into the kernel's arguments, `merge_lse` and `store_kv`.

Written to be read and to be the floor every faster kernel is tested against: one key at a time,
scores and accumulators in float64, no chunking and no compiler licence to reorder sums. The fast
path (minisparse/fast/attention.py) plugs its own kernel into `attend` through `kernel=` or
`use_kernel`. Leaves out choosing keys (selectors), spec strings (callers parse them) and any
batching. Online softmax as in Milakov & Gimelshein (2018) / FlashAttention; log-sum-exp merging
of partial results as in FlashDecoding.

Shape legend: Hq / Hkv query / KV heads, G = Hq // Hkv, Tq queries, Tk keys, d head width,
E pseudo-keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from .selection import KV, Q, SHARED, Selection, default_positions, span_means


class Inputs(NamedTuple):
    """What attention reads, as one argument of the kernels.

    q (Hq, Tq, d) float32; k, v (Hkv, >= Tk, d) float32 (a cache's buffers may hold spare rows
    after the Tk keys); extra_k, extra_v (Hkv, E, d) float32 pseudo-keys; q_pos (Tq,),
    k_pos (Tk,), extra_pos (E,) int64 positions."""
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    extra_k: np.ndarray
    extra_v: np.ndarray
    q_pos: np.ndarray
    k_pos: np.ndarray
    extra_pos: np.ndarray


class Rows(NamedTuple):
    """A normalised Selection's CSR arrays, as one argument of the kernels (see Selection):
    row r = s * Tq + t of row head s reads keys [range_lo[a], range_hi[a]) for a in
    range_ptr[r] .. range_ptr[r+1], then idx[a] (>= Tk: pseudo-key idx - Tk) with log-weight
    logw[a] for a in idx_ptr[r] .. idx_ptr[r+1]. head_kind: SHARED, KV or Q."""
    head_kind: int
    range_ptr: np.ndarray
    range_lo: np.ndarray
    range_hi: np.ndarray
    idx_ptr: np.ndarray
    idx: np.ndarray
    logw: np.ndarray


# ---- the reference kernel -----------------------------------------------------------------


@njit(cache=True)
def _fold(score, vrow, state, acc):
    """Fold one key of score `score` (float64) and value vrow (d,) into the running softmax:
    state = [max m, normaliser l], acc (d,) = sum of exp(score - m) * value, all float64."""
    if score == -np.inf:                   # weight 0 (a -inf log-weight): nothing to add
        return
    if score > state[0]:                   # a new max: rescale what is summed so far
        alpha = np.exp(state[0] - score)   # exp(-inf) = 0 for the first key
        state[1] *= alpha
        acc *= alpha
        state[0] = score
    p = np.exp(score - state[0])           # in (0, 1]
    state[1] += p
    for i in range(acc.size):
        acc[i] += p * vrow[i]


@njit(cache=True)
def _score(q, k, scale):
    """scale * q . k in float64; q, k (d,)."""
    s = 0.0
    for i in range(q.size):
        s += np.float64(q[i]) * np.float64(k[i])
    return s * scale


@njit(cache=True)
def attend_row(x, rows, h, t, scale, out, lse, natt):
    """Query (h, t): read its row's ranges then its explicit indices, skip keys after q_pos[t],
    and write out[h, t] (d,), lse[h, t] (-inf and a zero row when it reads nothing) and
    natt[h, t], the keys and pseudo-keys it read."""
    Hq, Tq, d = x.q.shape
    Tk = x.k_pos.shape[0]
    g = h // (Hq // x.k.shape[0])                                 # the KV head query head h reads
    s = 0 if rows.head_kind == SHARED else (g if rows.head_kind == KV else h)
    r = s * Tq + t                                                # its Selection row
    qp = x.q_pos[t]
    state = np.array([-np.inf, 0.0])                              # running max, normaliser
    acc = np.zeros(d)                                             # (d,) float64
    n = 0
    for a in range(rows.range_ptr[r], rows.range_ptr[r + 1]):
        for j in range(rows.range_lo[a], rows.range_hi[a]):
            if x.k_pos[j] <= qp:                                  # causal by position
                _fold(_score(x.q[h, t], x.k[g, j], scale), x.v[g, j], state, acc)
                n += 1
    for a in range(rows.idx_ptr[r], rows.idx_ptr[r + 1]):
        j = rows.idx[a]
        if j < Tk:                                                # a real key
            if x.k_pos[j] <= qp:
                _fold(_score(x.q[h, t], x.k[g, j], scale) + rows.logw[a], x.v[g, j], state, acc)
                n += 1
        elif x.extra_pos[j - Tk] <= qp:                           # a pseudo-key
            e = j - Tk
            _fold(_score(x.q[h, t], x.extra_k[g, e], scale) + rows.logw[a], x.extra_v[g, e],
                  state, acc)
            n += 1
    natt[h, t] = n
    if state[1] > 0.0:
        for i in range(d):
            out[h, t, i] = acc[i] / state[1]
        lse[h, t] = state[0] + np.log(state[1])


@njit(cache=True)
def attend_rows(x, rows, scale):
    """Every (query head, query) row of x (Inputs) over its Selection row (Rows).

    Returns out (Hq, Tq, d) float32, lse (Hq, Tq) float64 (-inf for a row that reads nothing,
    whose out is 0) and n_attended (Hq, Tq) int64."""
    Hq, Tq, d = x.q.shape
    out = np.zeros((Hq, Tq, d), np.float32)
    lse = np.full((Hq, Tq), -np.inf)
    natt = np.zeros((Hq, Tq), np.int64)
    for h in range(Hq):
        for t in range(Tq):
            attend_row(x, rows, h, t, scale, out, lse, natt)
    return out, lse, natt


def reference_kernel(x: Inputs, rows: Rows, scale: float, k_sorted: bool):
    """The kernel `attend` runs unless told otherwise: attend_rows. k_sorted (keys in position
    order) is for kernels that stop at the last causal key; this one checks every key."""
    return attend_rows(x, rows, float(scale))


# The kernel attend uses when none is passed: the reference, until a faster one is installed
# (minisparse.fast does, unless MINISPARSE_FAST=0).
_DEFAULT = [reference_kernel]


def use_kernel(kernel) -> None:
    """Make kernel(x: Inputs, rows: Rows, scale, k_sorted) -> (out, lse, n_attended) the one
    `attend` runs when called without kernel=; reference_kernel restores the reference."""
    _DEFAULT[0] = kernel


def default_kernel():
    return _DEFAULT[0]


@dataclass
class AttentionStats:
    """n_attended (Hq, Tq): keys (and pseudo-keys) the kernel actually read, after causality.
    n_causal (Hq, Tq): real keys causality allows. attended_fraction is the realised density."""
    n_attended: np.ndarray
    n_causal: np.ndarray

    @property
    def attended_fraction(self) -> np.ndarray:
        return self.n_attended / np.maximum(self.n_causal, 1)


def _f32(name, x):
    # Conversion point for FP16 KV storage: the cache may hold float16, the kernel computes
    # in float32 (one cast here keeps a single jitted signature).
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"{name}: expected a float32 or float16 array, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _every_key(sel):
    """True when the normalised Selection reads every real key in every row and nothing else
    (what Dense() produces, or any union that merges to it): one range [0, Tk) per row, no
    explicit indices (so no log-weights), no pseudo-keys. Decided from the arrays, not the
    selector's class, so a precomputed Selection or a Union covering all keys qualifies too."""
    R = sel.range_ptr.size - 1
    return (sel.idx.size == 0 and sel.n_extra == 0 and sel.range_lo.size == R and R > 0
            and not sel.range_lo.any() and bool(np.all(sel.range_hi == sel.tk)))


def _f32(name, x):
    # Conversion point for FP16 KV storage: the cache may hold float16, the kernel computes
    # in float32 (one cast here keeps a single jitted signature).
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"{name}: expected a float32 or float16 array, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def attend(q, k, v, selector=None, q_pos=None, k_pos=None, return_lse=False,
           return_stats=False, scale=None, buffer=False, kernel=None):
    """Sparse (or dense) causal attention over the keys `selector` picks.

    q (Hq, Tq, d), k, v (Hkv, Tk, d) float32 (k, v may be float16: computed in float32);
    selector: a Selector, a precomputed Selection, or None (every key). buffer=True: k, v may
    hold spare rows after the len(k_pos) keys (a KV cache's capacity), read in place. Returns
    out (Hq, Tq, d) float32 [, lse (Hq, Tq) float64] [, AttentionStats]. scale defaults to
    1/sqrt(d). kernel: the function that computes (see use_kernel); None takes the default.

    >>> import numpy as np
    >>> from minisparse.attention import attend, Window
    >>> q = np.ones((2, 3, 4), np.float32); k = v = np.ones((1, 3, 4), np.float32)
    >>> attend(q, k, v, Window(1)).shape
    (2, 3, 4)
    """
    if isinstance(selector, str):
        raise ValueError(f"attend: selector {selector!r} is a spec string; parse it first "
                         f"(minisparse.spec.parse_attention_spec)")
    q, k, v = _f32("q", q), np.asarray(k), np.asarray(v)
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"attend: expected q (Hq, Tq, d), k = v (Hkv, Tk, d); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    Hq, Tq, d = q.shape
    Hkv, Tk = k.shape[0], k.shape[1] if k_pos is None else len(k_pos)
    if Tk > k.shape[1] or (Tk != k.shape[1] and not buffer):
        raise ValueError(f"attend: k_pos has {Tk} positions but k holds {k.shape[1]} keys "
                         f"(pass buffer=True when k, v are a cache's buffers with spare rows)")
    # A KV cache hands over its whole buffer (Hkv, capacity, d) with k_pos for the S keys held:
    # the kernel reads rows < S of the contiguous buffer in place (slicing k[:, :S] would make a
    # strided view that Numba either copies or reads without SIMD: O(S) per decode step).
    kk, vv = (k, v) if k.dtype == np.float32 else (k[:, :Tk], v[:, :Tk])
    kk, vv = _f32("k", kk), _f32("v", vv)
    k = kk[:, :Tk]                                                # (Hkv, Tk, d) view for selectors
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attend: Hq={Hq} must be a multiple of Hkv={Hkv}")
    q_pos, k_pos = default_positions(Tq, Tk, q_pos, k_pos)
    if selector is None:                                          # every key: one range a row
        sel = Selection.from_ranges(np.zeros(Tq, np.int64), np.full(Tq, Tk, np.int64), Tk)
    elif isinstance(selector, Selection):
        sel = selector
    else:
        sel = selector.select(q, k, q_pos, k_pos)
    sel = sel.normalize()
    want = {SHARED: 1, KV: Hkv, Q: Hq}[sel.head_kind]
    if sel.n_heads != want or sel.tq != Tq or sel.tk != Tk:
        raise ValueError(f"attend: selection is for {sel.n_heads} heads, Tq={sel.tq}, Tk={sel.tk}; "
                         f"expected {want} heads, Tq={Tq}, Tk={Tk}")
    if sel.n_extra:
        ek = _f32("extra_k", sel.extra_k)
        # pseudo-keys without their own values (static landmarks) take the mean of v over their span
        ev = span_means(vv, sel.extra_lo, sel.extra_hi) if sel.extra_v is None else \
            _f32("extra_v", sel.extra_v)
    else:
        ek = ev = np.zeros((Hkv, 0, d), np.float32)              # (Hkv, 0, d)
    k_sorted = bool(np.all(k_pos[1:] >= k_pos[:-1]))
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    x = Inputs(q, kk, vv, ek, ev, q_pos, k_pos, sel.extra_pos)
    rows = Rows(sel.head_kind, sel.range_ptr, sel.range_lo, sel.range_hi, sel.idx_ptr, sel.idx,
                sel.logw)
    out, lse, natt = (default_kernel() if kernel is None else kernel)(x, rows, scale, k_sorted)
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_stats:
        kp = k_pos if k_sorted else np.sort(k_pos)          # a cache holds keys in order: no sort
        n_causal = np.searchsorted(kp, q_pos, side="right")                # (Tq,)
        res += (AttentionStats(natt, np.broadcast_to(n_causal, (Hq, Tq)).copy()),)
    return res[0] if len(res) == 1 else res


def merge_lse(o1, lse1, o2, lse2):
    """Merge two partial attentions over disjoint key sets into the joint softmax.

    o1, o2 (..., d); lse1, lse2 (...). Returns (o (..., d) float32, lse (...) float64).
    An empty part (lse = -inf) contributes nothing; both empty gives o = 0, lse = -inf.

    >>> import numpy as np
    >>> o, l = merge_lse(np.ones((1, 2)), np.zeros(1), np.zeros((1, 2)), np.zeros(1))
    >>> o.tolist(), round(float(l[0]), 4)
    ([[0.5, 0.5]], 0.6931)
    """
    lse1 = np.asarray(lse1, np.float64)
    lse2 = np.asarray(lse2, np.float64)
    m = np.maximum(lse1, lse2)
    m_safe = np.where(np.isfinite(m), m, 0.0)                    # both -inf: avoid inf - inf
    w1 = np.exp(lse1 - m_safe)
    w2 = np.exp(lse2 - m_safe)
    tot = w1 + w2
    o = (w1[..., None] * o1 + w2[..., None] * o2) / np.where(tot > 0, tot, 1.0)[..., None]
    lse = np.where(tot > 0, m_safe + np.log(np.where(tot > 0, tot, 1.0)), -np.inf)
    return o.astype(np.float32), lse


FP16_MAX = 65504.0


def store_kv(x, dtype=np.float16):
    """K/V as the cache stores them: float16 halves memory; attend casts back to float32 (the one
    conversion point), so attention arithmetic is unchanged. Raises when a value overflows.

    Error: round-to-nearest float16 has unit roundoff u = 2^-11, so |k16 - k| <= u|k| and
    |v16 - v| <= u|v| elementwise; see tests/test_attention_properties.py for the output bound.

    >>> store_kv(np.array([1.0, 2.5], np.float32)).dtype
    dtype('float16')
    """
    x = np.asarray(x)
    if dtype == np.float16:
        m = float(np.abs(x).max()) if x.size else 0.0
        if not np.isfinite(m) or m > FP16_MAX:
            raise ValueError(f"store_kv: |value| up to {m:g} exceeds float16's max {FP16_MAX:g}")
    return x.astype(dtype)
