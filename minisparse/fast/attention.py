"""The fast attention kernels: the row kernel in chunks of keys (float32 SIMD inside a chunk),
rows in parallel; `attend_decode`, one query (a decode step) with the query heads of a KV head
reading its keys once; `attend_tiles`, dense causal attention as BLAS products by query
tiles, with a vectorised float32 exp (a causal tile's softmax pass 16 lanes wide, in LLVM IR);
and `attend_blocks`, which it calls for keys in position order: the same attention in register
blocks of 12 queries (both products and the softmax in LLVM IR, no BLAS).
`kernel` picks between them and is what the fast path installs into
`minisparse.attention.attend`.

All compute what the reference kernel (minisparse/attention/kernel.py) computes; only float32
rounding differs, bounded in tests/test_fast_path.py and tests/test_attention_tiles.py. Query
tiles against every visible key as in FlashAttention-2's outer loop; decode parts merged by
log-sum-exp as in FlashDecoding.

Shape legend: Hq / Hkv query / KV heads, G = Hq // Hkv, Tq queries, Tk keys, d head width,
B query rows per tile (b <= B in the last one), S keys a tile reads, E pseudo-keys.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..attention.kernel import Inputs, Rows
from .threads import on_threads, side_by_side, workers


# ---- the row kernel, in chunks ------------------------------------------------------------
# Reassociation and FMA contraction let LLVM vectorise the d-loops and the chunk sums. Every
# error bound used here (|fl(sum x_i) - sum x_i| <= n * 2^-24 * sum |x_i|) holds for any summation
# order, and one compiled order is deterministic run to run. No finite-math or approximate-exp
# flags: infinities (-inf running max, empty rows) must keep their meaning.
_FM = {"reassoc", "contract", "nsz"}

CHUNK = 32      # keys scored together: one running-max update and one float64 fold per chunk


@njit(cache=True, fastmath=_FM)
def _dot(q, h, t, k, g, j):
    """q[h, t] . k[g, j] in float32."""
    s = np.float32(0.0)
    for i in range(q.shape[2]):
        s += q[h, t, i] * k[g, j, i]
    return s


# The per-row and per-chunk helpers below take the arrays they read one by one, not the Inputs /
# Rows / Scratch structures the kernels take: handing the structures down to the helper called
# once per chunk measured ~10% slower on a decode step's attention (docs/performance.md).


@njit(cache=True, fastmath=_FM)
def _flush(q, h, t, k, v, ek, ev, Tk, g, j0, js, lws, n, scale, sbuf, pbuf, cacc, acc, ml):
    """Fold n keys (j0 >= 0: the contiguous real keys j0 .. j0+n-1 with log-weight 0; else the
    buffered js[:n], lws[:n], where js >= Tk are pseudo-keys) into the running softmax state
    ml = [max, normaliser] (float64) and acc (d,) float64.

    Inside a chunk everything is float32 (8-wide SIMD, expf): scores, exp(s - max) and the
    chunk's weighted value sum; the chunk result is folded into the float64 row state, so float32
    rounding never accumulates over more than CHUNK terms (error <= CHUNK * 2^-24 relative)."""
    d = q.shape[2]
    cm = np.float32(-np.inf)
    if j0 >= 0:
        for c in range(n):
            sc = np.float32(0.0)
            for i in range(d):                                   # q[h, t] . k[g, j0 + c]
                sc += q[h, t, i] * k[g, j0 + c, i]
            sc *= scale
            sbuf[c] = sc
            cm = max(cm, sc)
    else:
        for c in range(n):
            j = js[c]
            if j < Tk:
                sc = _dot(q, h, t, k, g, j) * scale + lws[c]
            else:
                sc = _dot(q, h, t, ek, g, j - Tk) * scale + lws[c]
            sbuf[c] = sc
            cm = max(cm, sc)
    m = ml[0]
    if cm > m:                                                   # rescale old terms to new max
        alpha = np.exp(m - cm)
        ml[1] *= alpha
        for i in range(d):
            acc[i] *= alpha
        m = np.float64(cm)
        ml[0] = m
    mf = np.float32(m)
    for c in range(n):
        pbuf[c] = np.exp(sbuf[c] - mf)                           # in (0, 1]
    for i in range(d):
        cacc[i] = 0.0
    lsum = np.float32(0.0)
    for c in range(n):
        p = pbuf[c]
        lsum += p
        j = j0 + c if j0 >= 0 else js[c]
        if j < Tk:
            for i in range(d):
                cacc[i] += p * v[g, j, i]
        else:
            for i in range(d):
                cacc[i] += p * ev[g, j - Tk, i]
    ml[1] += lsum
    for i in range(d):
        acc[i] += cacc[i]


@njit(cache=True)
def _attend_row(r, q, k, v, ek, ev, q_pos, k_pos, e_pos, kind, rptr, rlo, rhi, iptr, idx, logw,
                scale, k_sorted, out, lse, natt, js, lws, sbuf, pbuf, cacc, acc, ml):
    """Row r of Hq * Tq: ranges, then explicit indices, causal by position, online softmax
    (Milakov & Gimelshein 2018) in chunks of CHUNK keys: float32 within a chunk, float64 across
    chunks (see _flush)."""
    Hq, Tq, d = q.shape
    Hkv = k.shape[0]
    Tk = k_pos.shape[0]             # k may hold spare rows beyond Tk (a cache's capacity)
    h = r // Tq
    u = r % Tq
    # interleave short and long causal rows so the static prange chunks balance
    t = u // 2 if u % 2 == 0 else Tq - 1 - u // 2
    g = h // (Hq // Hkv)
    s = 0 if kind == 0 else (g if kind == 1 else h)
    row = s * Tq + t
    qp = q_pos[t]
    kend = Tk
    if k_sorted:
        kend = np.searchsorted(k_pos, qp, side="right")          # keys [0, kend) are causal
    acc[:] = 0.0
    ml[0] = -np.inf
    ml[1] = 0.0
    n = 0
    cnt = 0
    for a in range(rptr[row], rptr[row + 1]):
        if k_sorted:                                             # causal part is a prefix
            j = rlo[a]
            hi = min(rhi[a], kend)
            while j < hi:
                nc = min(CHUNK, hi - j)
                _flush(q, h, t, k, v, ek, ev, Tk, g, j, js, lws, nc, scale, sbuf, pbuf, cacc, acc, ml)
                cnt += nc
                j += nc
            continue
        for j in range(rlo[a], rhi[a]):
            if k_pos[j] > qp:
                continue
            js[n] = j
            lws[n] = 0.0
            n += 1
            if n == CHUNK:
                _flush(q, h, t, k, v, ek, ev, Tk, g, -1, js, lws, n, scale, sbuf, pbuf, cacc, acc, ml)
                cnt += n
                n = 0
    for a in range(iptr[row], iptr[row + 1]):
        j = idx[a]
        if (k_pos[j] if j < Tk else e_pos[j - Tk]) > qp:
            continue
        js[n] = j
        lws[n] = logw[a]
        n += 1
        if n == CHUNK:
            _flush(q, h, t, k, v, ek, ev, Tk, g, -1, js, lws, n, scale, sbuf, pbuf, cacc, acc, ml)
            cnt += n
            n = 0
    if n > 0:
        _flush(q, h, t, k, v, ek, ev, Tk, g, -1, js, lws, n, scale, sbuf, pbuf, cacc, acc, ml)
        cnt += n
    natt[h, t] = cnt
    if cnt > 0 and ml[1] > 0.0:
        for i in range(d):
            out[h, t, i] = acc[i] / ml[1]
        lse[h, t] = ml[0] + np.log(ml[1])


class Scratch(NamedTuple):
    """One worker's buffers for the row kernel: a chunk's key indices js, log-weights lws,
    scores sbuf and weights pbuf (CHUNK,); the chunk's value sum cacc (d,) float32; the row's
    value sum acc (d,) float64 and softmax state ml = [max, normaliser] float64."""
    js: np.ndarray
    lws: np.ndarray
    sbuf: np.ndarray
    pbuf: np.ndarray
    cacc: np.ndarray
    acc: np.ndarray
    ml: np.ndarray


@njit(cache=True)
def _scratch(d):
    return Scratch(np.empty(CHUNK, np.int64), np.empty(CHUNK, np.float32),
                   np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32),
                   np.empty(d, np.float32), np.zeros(d, np.float64), np.array([-np.inf, 0.0]))


ROWS_PER_TASK = 16


@njit(cache=True, parallel=True)
def attend_rows(x, rows, scale, k_sorted):
    """Attend every (query head, query) row of x (Inputs) over its Selection row (Rows), rows in
    parallel. Returns out (Hq, Tq, d) f32, lse (Hq, Tq) f64 (-inf for an empty row),
    n_attended (Hq, Tq). Rows are independent, so the result does not depend on the thread
    count."""
    Hq, Tq, d = x.q.shape
    out = np.zeros((Hq, Tq, d), np.float32)
    lse = np.full((Hq, Tq), -np.inf)
    natt = np.zeros((Hq, Tq), np.int64)
    R = Hq * Tq
    nb = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for b in prange(nb):
        w = _scratch(d)                                          # one set per task, not per row
        for r in range(b * ROWS_PER_TASK, min(R, (b + 1) * ROWS_PER_TASK)):
            _attend_row(r, x.q, x.k, x.v, x.extra_k, x.extra_v, x.q_pos, x.k_pos, x.extra_pos,
                        rows.head_kind, rows.range_ptr, rows.range_lo, rows.range_hi,
                        rows.idx_ptr, rows.idx, rows.logw, np.float32(scale), k_sorted, out,
                        lse, natt, w.js, w.lws, w.sbuf, w.pbuf, w.cacc, w.acc, w.ml)
    return out, lse, natt


@njit(cache=True)
def attend_rows_serial(x, rows, scale, k_sorted):
    """attend_rows on one thread: for small calls (decode) where waking threads costs more."""
    Hq, Tq, d = x.q.shape
    out = np.zeros((Hq, Tq, d), np.float32)
    lse = np.full((Hq, Tq), -np.inf)
    natt = np.zeros((Hq, Tq), np.int64)
    w = _scratch(d)
    for r in range(Hq * Tq):
        _attend_row(r, x.q, x.k, x.v, x.extra_k, x.extra_v, x.q_pos, x.k_pos, x.extra_pos,
                    rows.head_kind, rows.range_ptr, rows.range_lo, rows.range_hi,
                    rows.idx_ptr, rows.idx, rows.logw, np.float32(scale), k_sorted, out,
                    lse, natt, w.js, w.lws, w.sbuf, w.pbuf, w.cacc, w.acc, w.ml)
    return out, lse, natt


# Below this many (row, key) reads a call runs on one thread: waking the pool costs more.
PARALLEL_MIN_WORK = 1 << 16


# ---- decode: the query heads of a KV head in one pass over its keys ----------------------
# A decode step (Tq = 1) is memory-bound: each KV head's K and V rows are the bytes it reads.
# The row kernel reads them once per query head (G times); here the G query heads that share a
# KV head and a Selection row (SHARED or KV kinds: every decode of dense, sinks + window, /kv
# top-k) score each key row once and weight each value row once. Two passes instead of an online
# softmax: a part's keys are listed first, so its max is known before any exp. A long row is cut
# into parts of DECODE_PART keys, merged by log-sum-exp in float64 (FlashDecoding's split): the
# parts are fixed by the row alone, so one thread or several give the same bits. Parts run side
# by side on the cores free now: one core alone does not read memory as fast as two do.

DECODE_PART = 1024
# A step whose rows list fewer keys than this (on average) runs on one thread: below it the
# parallel region's start and end cost about what the second core saves (measured on a quiet
# machine: a decode step of a short prompt gained from its KV heads side by side;
# docs/performance.md).
DECODE_PARALLEL_MIN_KEYS = 64


@njit(cache=True)
def _decode_keys(k_pos, e_pos, qp, k_sorted, r, rptr, rlo, rhi, iptr, idx, logw, js, lws):
    """List the keys row r reads, causal by position: js[:n] (>= Tk: pseudo-key js - Tk) and
    their log-weights lws[:n]; returns n."""
    Tk = k_pos.shape[0]
    kend = np.searchsorted(k_pos, qp, side="right") if k_sorted else Tk
    n = 0
    for a in range(rptr[r], rptr[r + 1]):
        if k_sorted:                                             # causal part is a prefix
            for j in range(rlo[a], min(rhi[a], kend)):
                js[n] = j
                lws[n] = 0.0
                n += 1
        else:
            for j in range(rlo[a], rhi[a]):
                if k_pos[j] <= qp:
                    js[n] = j
                    lws[n] = 0.0
                    n += 1
    for a in range(iptr[r], iptr[r + 1]):
        j = idx[a]
        if (k_pos[j] if j < Tk else e_pos[j - Tk]) <= qp:
            js[n] = j
            lws[n] = logw[a]
            n += 1
    return n


@njit(cache=True, inline="always")
def _weigh_one(v, ev, Tk, g, nh, j, sbuf, c, cacc):
    """cacc[a] += sbuf[a, c] * value j for a < nh (j >= Tk: pseudo-key j - Tk)."""
    d = cacc.shape[1]
    for a in range(nh):
        p = sbuf[a, c]
        if j < Tk:
            for i in range(d):
                cacc[a, i] += p * v[g, j, i]
        else:
            for i in range(d):
                cacc[a, i] += p * ev[g, j - Tk, i]


@intrinsic
def _prefetch(typingctx, a, g, j, i):
    """Ask the CPU to bring a[g, j, i] (a 3-d array, any layout) into cache: a hint (LLVM's
    prefetch: read, keep in every level); an address past a's end is dropped by the CPU, never
    a fault."""
    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        arr = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aty, arr, args[1:], wraparound=False)
        i8p = llvm_ir.PointerType(llvm_ir.IntType(8))
        i32 = llvm_ir.IntType(32)
        fn = builder.module.globals.get("llvm.prefetch.p0") or llvm_ir.Function(
            builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [i8p, i32, i32, i32]),
            name="llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), llvm_ir.Constant(i32, 0),
                          llvm_ir.Constant(i32, 3), llvm_ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(a, types.intp, types.intp, types.intp), codegen


# Key rows asked for ahead of the one being read: the hardware prefetcher alone left a decode
# step's attention waiting on memory (docs/performance.md has the measurement).
DECODE_AHEAD = 8


@njit(inline="always")
def _fetch_row(a, g, j, d):
    """Prefetch row j of head g of a (H, rows, d) float32 buffer: one hint per 64-byte line."""
    for i in range(0, d, 16):
        _prefetch(a, g, j, i)


@njit(cache=True)
def _decode_part(q, k, v, ek, ev, Tk, g, h0, nh, js, lws, c0, c1, scale, sbuf, cacc, m, l, acc):
    """Query heads h0 .. h0+nh-1 (one query each) over keys js[c0:c1], lws[c0:c1] of KV head g:
    m (nh,) float64 their max score (-inf: none has weight), l (nh,) float64 the sum of
    exp(s - m), acc (nh, d) float64 the sum of exp(s - m) v.

    Scores q . k in float32 (d products) into sbuf (nh, >= c1 - c0); weights exp(s - m) by
    _expf (float32, <= 1.5 ulp), summed with the weighted values in float32 within a chunk of
    CHUNK keys and in float64 across chunks: the row kernel's error structure, with the exact
    max known before the first weight (no rescaling).

    Only the scores' d-term dots may be summed in any order (vectorised); the rest keeps its
    written order."""
    _decode_scores(q, k, ek, Tk, g, h0, nh, js, lws, c0, c1, scale, sbuf)
    _decode_weigh(v, ev, Tk, g, nh, js, c0, c1, sbuf, cacc, m, l, acc)


# Each pass below is its own compiled function with its own float flags (a function inlined
# into another is compiled with the flags of the one it lands in). Inside, the head width most
# models use (64) is handed to the inlined body as a constant, which lets LLVM unroll the
# d-loops into registers; any other width runs the same code with d read at run time (each
# constant is one more copy of the body to compile on a cold cache).


@njit(cache=True, fastmath=_FM)
def _decode_scores(q, k, ek, Tk, g, h0, nh, js, lws, c0, c1, scale, sbuf):
    if q.shape[2] == 64:
        _scores_d(q, k, ek, Tk, g, h0, nh, js, lws, c0, c1, scale, sbuf, 64)
    else:
        _scores_d(q, k, ek, Tk, g, h0, nh, js, lws, c0, c1, scale, sbuf, q.shape[2])


@njit(cache=True, fastmath={"contract"})
def _decode_weigh(v, ev, Tk, g, nh, js, c0, c1, sbuf, cacc, m, l, acc):
    if v.shape[2] == 64:
        _weigh_d(v, ev, Tk, g, nh, js, c0, c1, sbuf, cacc, m, l, acc, 64)
    else:
        _weigh_d(v, ev, Tk, g, nh, js, c0, c1, sbuf, cacc, m, l, acc, v.shape[2])


@njit(inline="always")
def _scores_d(q, k, ek, Tk, g, h0, nh, js, lws, c0, c1, scale, sbuf, d):
    """sbuf[a, c] = scale q[h0 + a] . key js[c0 + c] + lws[c0 + c]. Real keys go four at a
    time: four dot products per pass over q's row; the rows DECODE_AHEAD keys on are asked for
    meanwhile."""
    n = c1 - c0
    c = 0
    while c < n:
        if c + 4 <= n and max(js[c0 + c], js[c0 + c + 1], js[c0 + c + 2], js[c0 + c + 3]) < Tk:
            j0, j1, j2, j3 = js[c0 + c], js[c0 + c + 1], js[c0 + c + 2], js[c0 + c + 3]
            if c + DECODE_AHEAD + 4 <= n:
                for u in range(4):
                    ja = js[c0 + c + DECODE_AHEAD + u]
                    if ja < Tk:
                        _fetch_row(k, g, ja, d)
            for a in range(nh):
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for i in range(d):
                    qi = q[h0 + a, 0, i]
                    s0 += qi * k[g, j0, i]
                    s1 += qi * k[g, j1, i]
                    s2 += qi * k[g, j2, i]
                    s3 += qi * k[g, j3, i]
                sbuf[a, c] = s0 * scale + lws[c0 + c]
                sbuf[a, c + 1] = s1 * scale + lws[c0 + c + 1]
                sbuf[a, c + 2] = s2 * scale + lws[c0 + c + 2]
                sbuf[a, c + 3] = s3 * scale + lws[c0 + c + 3]
            c += 4
        else:
            j = js[c0 + c]
            for a in range(nh):
                sc = np.float32(0.0)
                if j < Tk:
                    for i in range(d):
                        sc += q[h0 + a, 0, i] * k[g, j, i]
                else:
                    for i in range(d):
                        sc += q[h0 + a, 0, i] * ek[g, j - Tk, i]
                sbuf[a, c] = sc * scale + lws[c0 + c]
            c += 1


@njit(inline="always")
def _weigh_d(v, ev, Tk, g, nh, js, c0, c1, sbuf, cacc, m, l, acc, d):
    """From the scores in sbuf: m, l and acc as _decode_part describes. Four value rows per
    update of the chunk's sums (each loads and stores cacc once, not four times), so the loop is
    bound by the rows read rather than by the accumulator traffic; the rows DECODE_AHEAD keys on
    are asked for meanwhile. The grouping is a fixed function of js, so the bits depend on the
    keys listed alone."""
    n = c1 - c0
    for a in range(nh):                                          # the weights
        mx = np.float32(-np.inf)
        for c in range(n):
            mx = max(mx, sbuf[a, c])
        mm = mx if mx > -np.inf else np.float32(0.0)             # every weight -inf: l = 0
        for c in range(n):
            sbuf[a, c] = _expf(sbuf[a, c] - mm)                  # in [0, 1]
        m[a] = mx
        l[a] = 0.0
    acc[:nh] = 0.0
    for b0 in range(0, n, CHUNK):                                # pass 2: each V row once
        b1 = min(b0 + CHUNK, n)
        cacc[:nh] = 0.0
        c = b0
        while c < b1:
            if c + 4 <= b1 and max(js[c0 + c], js[c0 + c + 1], js[c0 + c + 2],
                                   js[c0 + c + 3]) < Tk:
                j0, j1, j2, j3 = js[c0 + c], js[c0 + c + 1], js[c0 + c + 2], js[c0 + c + 3]
                if c + DECODE_AHEAD + 4 <= n:
                    for u in range(4):
                        ja = js[c0 + c + DECODE_AHEAD + u]
                        if ja < Tk:
                            _fetch_row(v, g, ja, d)
                for a in range(nh):
                    p0, p1, p2, p3 = sbuf[a, c], sbuf[a, c + 1], sbuf[a, c + 2], sbuf[a, c + 3]
                    for i in range(d):
                        cacc[a, i] += ((p0 * v[g, j0, i] + p1 * v[g, j1, i])
                                       + (p2 * v[g, j2, i] + p3 * v[g, j3, i]))
                c += 4
            else:
                _weigh_one(v, ev, Tk, g, nh, js[c0 + c], sbuf, c, cacc)
                c += 1
        for a in range(nh):
            lsum = np.float32(0.0)
            for c in range(b0, b1):
                lsum += sbuf[a, c]
            l[a] += lsum
            for i in range(d):
                acc[a, i] += cacc[a, i]


@njit(cache=True)
def _decode_merge(h0, nh, P, m, l, acc, out, lse):
    """Parts p < P of query heads h0 .. h0+nh-1 (m, l (P, nh), acc (P, nh, d) float64) into
    out[h, 0] and lse[h, 0]: rescaled to the largest max in float64, then divided."""
    d = acc.shape[2]
    e = np.empty(P)                                              # a part's rescaling, once
    for a in range(nh):
        mx = -np.inf
        for p in range(P):
            mx = max(mx, m[p, a])
        lt = 0.0
        for p in range(P):
            if l[p, a] > 0.0:
                e[p] = np.exp(m[p, a] - mx)
                lt += l[p, a] * e[p]
        if lt > 0.0:
            for i in range(d):
                s = 0.0
                for p in range(P):
                    if l[p, a] > 0.0:
                        s += acc[p, a, i] * e[p]
                out[h0 + a, 0, i] = s / lt
            lse[h0 + a, 0] = mx + np.log(lt)


@njit(cache=True)
def _decode_plan(x, rows, part):
    """The groups of a decode step: query heads per row nh, the keys each group reads (js, lws
    (ngroups, nmax), counts n (ngroups,)) and its number of parts."""
    Hq = x.q.shape[0]
    G = Hq // x.k.shape[0]
    nh = 1 if rows.head_kind == 2 else G                         # query heads a row serves
    ng = Hq // nh
    nmax = 1                                                     # the longest row's entries
    for r in range(rows.range_ptr.size - 1):
        w = rows.idx_ptr[r + 1] - rows.idx_ptr[r]
        for a in range(rows.range_ptr[r], rows.range_ptr[r + 1]):
            w += rows.range_hi[a] - rows.range_lo[a]
        nmax = max(nmax, w)
    js = np.empty((ng, nmax), np.int64)
    lws = np.empty((ng, nmax), np.float32)
    n = np.zeros(ng, np.int64)
    for gi in range(ng):
        h0 = gi * nh
        r = 0 if rows.head_kind == 0 else (h0 // G if rows.head_kind == 1 else h0)
        n[gi] = _decode_keys(x.k_pos, x.extra_pos, x.q_pos[0], x.k_sorted, r, rows.range_ptr,
                             rows.range_lo, rows.range_hi, rows.idx_ptr, rows.idx, rows.logw,
                             js[gi], lws[gi])
    P = max(1, (nmax + part - 1) // part)
    return nh, js, lws, n, P


@njit(cache=True)
def _decode_task(x, scale, part, nh, js, lws, n, P, t, m, l, acc):
    """Task t = group * P + part: that part's keys into m, l, acc[t]."""
    G = x.q.shape[0] // x.k.shape[0]
    d = x.q.shape[2]
    gi, p = t // P, t % P
    h0 = gi * nh
    c0 = min(p * part, n[gi])
    c1 = min(c0 + part, n[gi])
    sbuf = np.empty((nh, max(c1 - c0, 1)), np.float32)
    cacc = np.empty((nh, d), np.float32)
    _decode_part(x.q, x.k, x.v, x.extra_k, x.extra_v, x.k_pos.shape[0], h0 // G, h0, nh, js[gi],
                 lws[gi], c0, c1, np.float32(scale), sbuf, cacc, m[t], l[t], acc[t])


@njit(cache=True)
def _decode_finish(x, nh, n, P, m, l, acc):
    Hq, _, d = x.q.shape
    out = np.zeros((Hq, 1, d), np.float32)
    lse = np.full((Hq, 1), -np.inf)
    natt = np.zeros((Hq, 1), np.int64)
    for gi in range(n.size):
        _decode_merge(gi * nh, nh, P, m[gi * P:(gi + 1) * P], l[gi * P:(gi + 1) * P],
                      acc[gi * P:(gi + 1) * P], out, lse)
        natt[gi * nh:(gi + 1) * nh, 0] = n[gi]
    return out, lse, natt


class DecodeInputs(NamedTuple):
    """Inputs plus k_sorted, for the decode kernels' helpers."""
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    extra_k: np.ndarray
    extra_v: np.ndarray
    q_pos: np.ndarray
    k_pos: np.ndarray
    extra_pos: np.ndarray
    k_sorted: bool


@njit(cache=True)
def _decode_serial(x, rows, scale, part):
    nh, js, lws, n, P = _decode_plan(x, rows, part)
    T = n.size * P
    d = x.q.shape[2]
    m, l, acc = np.empty((T, nh)), np.empty((T, nh)), np.empty((T, nh, d))
    for t in range(T):
        _decode_task(x, scale, part, nh, js, lws, n, P, t, m, l, acc)
    return _decode_finish(x, nh, n, P, m, l, acc)


@njit(cache=True, parallel=True)
def _decode_parallel(x, rows, scale, part):
    nh, js, lws, n, P = _decode_plan(x, rows, part)
    T = n.size * P
    d = x.q.shape[2]
    m, l, acc = np.empty((T, nh)), np.empty((T, nh)), np.empty((T, nh, d))
    for t in prange(T):                                          # parts write disjoint rows
        _decode_task(x, scale, part, nh, js, lws, n, P, t, m, l, acc)
    return _decode_finish(x, nh, n, P, m, l, acc)


def attend_decode(x, rows, scale, k_sorted, parallel=False, part=DECODE_PART):
    """attend_rows for one query (Tq = 1), query heads that share a Selection row and a KV
    head together (all G of a KV head for SHARED and KV kinds, one for Q): each of their key
    and value rows is read once, not once per query head. A row's parts (`part` keys) run
    side by side when parallel; the result is the same bits either way. Same returns as
    attend_rows."""
    xd = DecodeInputs(*x, bool(k_sorted))
    return (_decode_parallel if parallel else _decode_serial)(xd, rows, float(scale), int(part))


# ---- dense causal prefill as matrix products ---------------------------------------------
# The softmax of a tile is the memory-bound part: NumPy takes four passes over the (G*B, S)
# scores (max, subtract, exp, sum). `_exp_rows` does subtract, exp and sum in one pass. Its exp
# must vectorise, and Numba's np.exp/math.exp call libm's scalar expf (no SVML), so `_expf`
# writes out the classic float32 recipe: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite: ln2 split
# in two, the high part exact in 9 bits), exp(r) by the Cephes expf polynomial, and 2^n built
# from its exponent bits: within about 1 ulp of exp in float64 over [-87, 0]
# (docs/performance.md has the measurements).


@intrinsic
def _as_f32(typingctx, i):
    """The float32 whose bits are the int32 i (a register bitcast, which LLVM vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.int32), codegen


@njit(cache=True, fastmath={"contract"}, inline="always")   # no reassociation: it would undo
def _expf(x):                                                # the two-part ln2 reduction
    """exp(x) in float32 for x <= 0 (what a max-subtracted score is): 0 for x < -87 and -inf
    (the true value is below 1.7e-38 there), NaN for NaN."""
    xc = max(x, np.float32(-87.0))                       # keeps 2^n normal: n >= -126
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))   # round(x / ln2)
    r = (xc - n * np.float32(0.693359375)) + n * np.float32(2.12194440e-4)  # x - n ln2
    p = np.float32(1.9875691500e-4)                      # exp(r) - 1 - r = r^2 P(r)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)                  # exp(r), in [0.7, 1.42]
    e = p * _as_f32((np.int32(n) + np.int32(127)) << np.int32(23))   # * 2^n
    return e if x >= np.float32(-87.0) else (np.float32(0.0) if x < np.float32(-87.0) else x)


@njit(cache=True, fastmath={"contract"}, nogil=True)       # nogil: tiles run side by side
def _exp_rows(s, m, l):
    """In place s[r] = exp(s[r] - m[r]) and l[r] = its sum; s (R, S) f32 scores (-inf where
    hidden), m (R,) f32 row max (0 for a row seeing nothing), l (R,) f32. The sum runs in 16
    float32 lanes (the loop vectorises without reassociation flags): a float32 sum of S terms in
    another order than NumPy's, so its error is within the same gamma_S bound."""
    R, S = s.shape
    lanes = np.empty(16, np.float32)
    for r in range(R):
        row, mr = s[r], m[r]
        lanes[:] = 0.0
        for b in range(S // 16):
            for u in range(16):
                e = _expf(row[16 * b + u] - mr)
                row[16 * b + u] = e
                lanes[u] += e
        tail = np.float32(0.0)
        for j in range(S // 16 * 16, S):
            e = _expf(row[j] - mr)
            row[j] = e
            tail += e
        l[r] = lanes.sum() + tail


# A causal tile's softmax, 16 lanes at a time. LLVM (as Numba drives it) vectorises _exp_rows'
# loop 8 lanes wide and leaves a row max scalar (its select-and-store lanes are not
# vectorised), so the pass ran at ~0.6 ns an element where the arithmetic needs ~0.35: these
# two loops are written in LLVM IR (numba.extending.intrinsic) over <16 x float> vectors:
# _max16, a row's max; _exp16, _expf's steps lane by lane (Cody-Waite reduction, the Cephes
# polynomial, 2^n from exponent bits; llvm.fmuladd where Numba's "contract" may fuse), in
# place, and the sum of the results. Their tails (< 16 entries) run in Numba.

_F32 = llvm_ir.FloatType()
_V16 = llvm_ir.VectorType(_F32, 16)
_HAS_AVX512F = [None]           # filled below, once: whether _scale2 may emit vscalefps
_VI16 = llvm_ir.VectorType(llvm_ir.IntType(32), 16)
_I64 = llvm_ir.IntType(64)


def _llvm_fn(module, name, ret, args):
    """The LLVM function `name` declared in module (once)."""
    if name in module.globals:
        return module.globals[name]
    return llvm_ir.Function(module, llvm_ir.FunctionType(ret, args), name=name)


def _splat(value, ty=_V16):
    return llvm_ir.Constant(ty, [value] * 16)


def _halves(builder, v, op):
    """v <16 x float> folded to one float by halves: lanes i and i + 8 by op, then i and i + 4,
    i + 2, i + 1 (a fixed order: the same bits every run)."""
    i32 = llvm_ir.IntType(32)
    n = 16
    while n > 1:
        n //= 2
        lo = llvm_ir.Constant(llvm_ir.VectorType(i32, n), list(range(n)))
        hi = llvm_ir.Constant(llvm_ir.VectorType(i32, n), list(range(n, 2 * n)))
        v = op(builder.shuffle_vector(v, v, lo), builder.shuffle_vector(v, v, hi))
    return builder.extract_element(v, llvm_ir.Constant(i32, 0))


def _expf16(builder, x):
    """_expf on the 16 lanes of x, step for step (see _expf for the constants)."""
    mod = builder.module
    fma = _llvm_fn(mod, "llvm.fmuladd.v16f32", _V16, [_V16, _V16, _V16])
    floor = _llvm_fn(mod, "llvm.floor.v16f32", _V16, [_V16])
    low = _splat(-87.0)
    below = builder.fcmp_ordered("<", x, low)                   # NaN: false, kept as x
    xc = builder.select(below, low, x)
    n = builder.call(floor, [builder.call(fma, [xc, _splat(1.4426950408889634), _splat(0.5)])])
    r = builder.call(fma, [n, _splat(-0.693359375), xc])
    r = builder.call(fma, [n, _splat(2.12194440e-4), r])       # x - n ln2
    p = _splat(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = builder.call(fma, [p, r, _splat(c)])
    e = builder.fadd(builder.call(fma, [builder.fmul(p, r), r, r]), _splat(1.0))   # exp(r)
    e = _scale2(builder, e, n)                                  # * 2^n
    normal = builder.fcmp_ordered(">=", x, low)
    return builder.select(normal, e, builder.select(below, _splat(0.0), x))


def _scale2(builder, e, n):
    """e * 2^n, n integer-valued floats with 2^n normal: AVX-512's vscalefps (one instruction)
    where the CPU has it, else 2^n built from its exponent bits (three more, two of them on the
    port the exp's other vector steps also need). The same bits either way: a product by a power
    of two, rounded once."""
    if _HAS_AVX512F[0]:
        scalef = _llvm_fn(builder.module, "llvm.x86.avx512.mask.scalef.ps.512", _V16,
                          [_V16, _V16, _V16, llvm_ir.IntType(16), llvm_ir.IntType(32)])
        return builder.call(scalef, [e, n, e, llvm_ir.Constant(llvm_ir.IntType(16), -1),
                                     llvm_ir.Constant(llvm_ir.IntType(32), 4)])   # 4: MXCSR's rounding
    biased = builder.add(builder.fptosi(n, _VI16), _splat(127, _VI16))   # n + 127 in int32
    return builder.fmul(e, builder.bitcast(builder.shl(biased, _splat(23, _VI16)), _V16))


def _loop16(builder, count, init, body):
    """acc = init; for i in range(count): acc = body(i, acc); returns acc, in LLVM IR."""
    entry = builder.block
    loop = builder.append_basic_block("v16.loop")
    done = builder.append_basic_block("v16.done")
    builder.cbranch(builder.icmp_signed(">", count, llvm_ir.Constant(_I64, 0)), loop, done)
    builder.position_at_end(loop)
    i, acc = builder.phi(_I64), builder.phi(init.type)
    new = body(i, acc)
    i_next, end = builder.add(i, llvm_ir.Constant(_I64, 1)), builder.block
    i.add_incoming(llvm_ir.Constant(_I64, 0), entry)
    i.add_incoming(i_next, end)
    acc.add_incoming(init, entry)
    acc.add_incoming(new, end)
    builder.cbranch(builder.icmp_signed("<", i_next, count), loop, done)
    builder.position_at_end(done)
    out = builder.phi(init.type)
    out.add_incoming(init, entry)
    out.add_incoming(new, end)
    return out


def _block16(builder, data, i):
    """Pointer to the 16 floats data[16 i: 16 i + 16], as a <16 x float>*."""
    return builder.bitcast(builder.gep(data, [builder.mul(i, llvm_ir.Constant(_I64, 16))]),
                           _V16.as_pointer())


def _c_float32_row(row):
    """True for the Numba type of a contiguous 1-d float32 array (what _max16, _exp16 read)."""
    return (isinstance(row, types.Array) and row.dtype == types.float32 and row.layout == "C"
            and row.ndim == 1)


@intrinsic
def _max16(typingctx, row, nblk):
    """The max of row[:16 nblk] (a contiguous float32 row; nblk >= 0), -inf for none. A NaN entry
    is passed over (x > max is false for it); the exp pass then turns it into NaN."""
    if not _c_float32_row(row):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        gt = lambda a, b: builder.select(builder.fcmp_ordered(">", a, b), a, b)   # noqa: E731
        acc = _loop16(builder, args[1], _splat(float("-inf")),
                      lambda i, acc: gt(builder.load(_block16(builder, data, i), align=4), acc))
        return _halves(builder, acc, gt)
    return types.float32(row, types.int64), codegen


@intrinsic
def _exp16(typingctx, row, nblk, m):
    """row[:16 nblk] <- exp(row - m) in place (_expf's steps on 16 lanes); returns their sum,
    in 16 float32 lanes, then by halves."""
    if not (_c_float32_row(row) and m == types.float32):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        mv = builder.insert_element(llvm_ir.Constant(_V16, llvm_ir.Undefined), args[2],
                                    llvm_ir.Constant(llvm_ir.IntType(32), 0))
        mv = builder.shuffle_vector(mv, mv, llvm_ir.Constant(_VI16, [0] * 16))   # m in every lane

        def body(i, acc):
            ptr = _block16(builder, data, i)
            e = _expf16(builder, builder.fsub(builder.load(ptr, align=4), mv))
            builder.store(e, ptr, align=4)
            return builder.fadd(acc, e)
        return _halves(builder, _loop16(builder, args[1], _splat(0.0), body), builder.fadd)
    return types.float32(row, types.int64, types.float32), codegen


# Exact top-k's selection (fast/prefill.py top_keys, kth_largest) in 16 lanes. Its list is every
# key of a row at or above a bound: a few percent of the row, but spread over it, so a
# compaction by stretches of keys stores many stretches whole to keep a key or two. _ge_bits16
# gives each 16-key block's candidates as bits, which the caller walks one set bit at a time, so
# a key that is no candidate costs a lane of a compare; _pick16 is a quickselect's partition
# 16 entries a step, with no scalar store-then-load chain through the entries.


def _c_float_row(row):
    """True for the Numba type of a contiguous 1-d float32 or float64 array."""
    return (isinstance(row, types.Array) and row.dtype in (types.float32, types.float64)
            and row.layout == "C" and row.ndim == 1)


@intrinsic
def _ge_bits16(typingctx, row, nblk, floor, bits):
    """bits[i] <- the 16-bit mask of row[16 i: 16 i + 16] >= floor (bit u for entry 16 i + u),
    for i < nblk; returns the number of bits set. row: contiguous float32 or float64 and floor
    of its dtype; bits: contiguous int64, >= nblk entries. A NaN entry's bit is 0."""
    if not (_c_float_row(row) and floor == row.dtype and isinstance(bits, types.Array)
            and bits.dtype == types.int64 and bits.layout == "C" and bits.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        out = context.make_array(signature.args[3])(context, builder, args[3]).data
        f = context.get_value_type(signature.args[0].dtype)
        vt = llvm_ir.VectorType(f, 16)
        fv = builder.insert_element(llvm_ir.Constant(vt, llvm_ir.Undefined), args[2],
                                    llvm_ir.Constant(llvm_ir.IntType(32), 0))
        fv = builder.shuffle_vector(fv, fv, llvm_ir.Constant(_VI16, [0] * 16))   # in every lane
        ctpop = _llvm_fn(builder.module, "llvm.ctpop.i64", _I64, [_I64])
        width = context.get_abi_sizeof(f)

        def body(i, total):
            at = builder.gep(data, [builder.mul(i, llvm_ir.Constant(_I64, 16))])
            x = builder.load(builder.bitcast(at, vt.as_pointer()), align=width)
            mask = builder.bitcast(builder.fcmp_ordered(">=", x, fv), llvm_ir.IntType(16))
            mask = builder.zext(mask, _I64)
            builder.store(mask, builder.gep(out, [i]))
            return builder.add(total, builder.call(ctpop, [mask]))
        return _loop16(builder, args[1], llvm_ir.Constant(_I64, 0), body)
    return types.int64(row, types.int64, row.dtype, bits), codegen


@intrinsic
def _pick16(typingctx, src, lo, hi, pivot, side, dst, at):
    """Write the entries x of src[lo:hi] with x < pivot (side < 0) or x > pivot (side >= 0), in
    their order, to dst[at:at + n]; returns n. 16 lanes a step: a compare, then a compressing
    store of the lanes that pass (AVX-512's vcompress; elsewhere LLVM's own expansion of it),
    the last partial block read through a load of its lanes only. src, dst: contiguous 1-d
    float32 or float64 of one dtype, pivot of it; 0 <= lo <= hi <= len(src); dst must hold
    at + n entries and not overlap src[lo:hi]. A NaN entry is never written."""
    if not (_c_float_row(src) and src == dst and pivot == src.dtype):
        return None

    def codegen(context, builder, signature, args):
        x = context.make_array(signature.args[0])(context, builder, args[0]).data
        y = context.make_array(signature.args[5])(context, builder, args[5]).data
        lo, hi, pv, side, at = args[1], args[2], args[3], args[4], args[6]
        f = context.get_value_type(signature.args[0].dtype)
        vt = llvm_ir.VectorType(f, 16)
        i16 = llvm_ir.IntType(16)
        tag = "v16f32" if f == _F32 else "v16f64"
        compress = _llvm_fn(builder.module, f"llvm.masked.compressstore.{tag}",
                            llvm_ir.VoidType(), [vt, f.as_pointer(), llvm_ir.VectorType(
                                llvm_ir.IntType(1), 16)])
        expand = _llvm_fn(builder.module, f"llvm.masked.expandload.{tag}",
                          vt, [f.as_pointer(), llvm_ir.VectorType(llvm_ir.IntType(1), 16), vt])
        ctpop = _llvm_fn(builder.module, "llvm.ctpop.i16", i16, [i16])
        i64v = llvm_ir.VectorType(_I64, 16)

        def splat(value, ty):
            v = builder.insert_element(llvm_ir.Constant(ty, llvm_ir.Undefined), value,
                                       llvm_ir.Constant(llvm_ir.IntType(32), 0))
            return builder.shuffle_vector(v, v, llvm_ir.Constant(_VI16, [0] * 16))
        pvv = splat(pv, vt)
        below = builder.icmp_signed("<", side, llvm_ir.Constant(_I64, 0))
        width = context.get_abi_sizeof(f)
        sixteen = llvm_ir.Constant(_I64, 16)

        def step(start, n_written, lanes):
            """The block at src[start]: all 16 lanes (lanes None) or those set in lanes."""
            ptr = builder.gep(x, [start])
            if lanes is None:
                v = builder.load(builder.bitcast(ptr, vt.as_pointer()), align=width)
            else:
                v = builder.call(expand, [ptr, lanes, llvm_ir.Constant(vt, llvm_ir.Undefined)])
            keep = builder.select(below, builder.fcmp_ordered("<", v, pvv),
                                  builder.fcmp_ordered(">", v, pvv))
            if lanes is not None:
                keep = builder.and_(keep, lanes)
            builder.call(compress, [v, builder.gep(y, [builder.add(at, n_written)]), keep])
            count = builder.call(ctpop, [builder.bitcast(keep, i16)])
            return builder.add(n_written, builder.zext(count, _I64))

        nblk = builder.sdiv(builder.sub(hi, lo), sixteen)
        n = _loop16(builder, nblk, llvm_ir.Constant(_I64, 0),
                    lambda i, acc: step(builder.add(lo, builder.mul(i, sixteen)), acc, None))
        start = builder.add(lo, builder.mul(nblk, sixteen))
        rest = splat(builder.sub(hi, start), i64v)                      # 0 to 15 entries left
        iota = llvm_ir.Constant(i64v, list(range(16)))
        return step(start, n, builder.icmp_signed("<", iota, rest))    # none: reads nothing
    return (types.int64(src, types.int64, types.int64, src.dtype, types.int64, dst, types.int64),
            codegen)


@njit(cache=True, fastmath={"contract"}, nogil=True)       # nogil: tiles run side by side
def _softmax_rows(s, n_vis, m, l):
    """A causal tile's softmax numerators in one Numba pass per row, in place: for row r of s
    (G*b, S) f32, C-contiguous, scaled scores (row h*b + t: head h of the group, query t), whose
    keys [0, n = n_vis[t]) are visible (keys in position order: a prefix), m[r] <- the max of
    s[r, :n] (0 when n = 0), s[r, :n] <- exp(s[r, :n] - m[r]), s[r, n:] <- 0 and l[r] <- the
    sum of the row. n_vis (b,) int64 <= S; m, l (G*b,) f32.

    What the tiles did in NumPy and _exp_rows (mask the hidden keys with -inf, row max, then
    subtract, exp and sum) with the same numbers up to rounding: the max is exact in any order,
    the exp is _expf's recipe (16 lanes, _exp16: its multiply-adds may fuse where _expf's
    do not, within the same 1.5 ulp), a hidden key's weight is exactly 0; the sum runs in
    another order (16 lanes, then by halves). Per row, the max pass leaves the row in L1 for
    the exp pass, where NumPy's max and the masking each read the whole tile once more. A NaN
    score makes its row NaN (through the exp and the sum), as the max of NumPy would."""
    R, S = s.shape
    b = n_vis.shape[0]
    for r in range(R):
        row, n = s[r], n_vis[r % b]
        nb = n // 16
        mr = _max16(row, nb)                              # the 16-lane blocks, then the tail
        for j in range(nb * 16, n):
            mr = row[j] if row[j] > mr else mr
        if mr == -np.inf:
            mr = np.float32(0.0)                          # no visible key (or all -inf): l = 0
        total = _exp16(row, nb, mr)
        tail = np.float32(0.0)
        for j in range(nb * 16, n):
            e = _expf(row[j] - mr)
            row[j] = e
            tail += e
        for j in range(n, S):
            row[j] = 0.0
        m[r] = mr
        l[r] = total + tail


@njit(cache=True, nogil=True, error_model="numpy")           # nogil: tiles run side by side
def _finish_rows(o, m, l, out, lse):
    """A tile's results from its PV product o (G*b, d) f32 and its rows' max m and sum l (G*b,)
    f32: out (G, b, d) <- o / l, and lse (G, b) f64 <- m + log(l) (-inf where l = 0: a row
    that sees no key, whose o row is 0 and stays 0). The float32 division and the float64
    log-sum-exp that NumPy computed in four calls and two temporaries."""
    G, b, d = out.shape
    for h in range(G):
        for t in range(b):
            r = h * b + t
            lr = l[r]
            div = lr if lr > 0 else np.float32(1.0)
            for i in range(d):
                out[h, t, i] = o[r, i] / div
            lse[h, t] = -np.inf if lr == 0 else np.float64(m[r]) + np.log(np.float64(lr))


# Rows of one product (G * B): large enough for sgemm to run near its peak, small enough that
# a tile's scores (G * B, S) stay in cache-sized pieces (docs/performance.md: the measurement).
TILE_ROWS = 256
# `kernel` takes the tiles for an every-key selection when Tq >= TILE_MIN_TQ and Tq * Tk >=
# TILE_MIN_PAIRS: the tiles cost more to set up (Python, one product per KV head and tile) but
# then run faster; these are the measured break-even points. Decode (Tq = 1) takes
# attend_decode.
TILE_MIN_TQ = 2
TILE_MIN_PAIRS = 1024


def attend_tiles(q, k, v, q_pos, k_pos, scale, block=None, k_sorted=None, workers=None):
    """Dense causal attention (key j visible to query t iff k_pos[j] <= q_pos[t]) as BLAS
    matrix products, one tile of B queries at a time: what the row kernels give for every key.

    q (Hq, Tq, d) f32; k, v (Hkv, Tk, d) f32 (each head's rows contiguous: a cache buffer's
    first Tk rows are); q_pos (Tq,), k_pos (Tk,) int64; scale float. Returns out (Hq, Tq, d)
    f32, lse (Hq, Tq) f64 (log-sum-exp of the scaled scores, -inf for a query that sees no key,
    whose out row is 0, as in the row kernel) and n_attended (Hq, Tq) int64 (its visible keys).
    block: B, query rows per tile (default TILE_ROWS // G, so G * B ~ TILE_ROWS rows a product;
    with attend_blocks, queries per work item, default BLOCK_ITEM_T). workers: tiles computed
    side by side (default: all threads inside threads.py's prefill_threads, else one).
    Keys in position order and d a multiple of PV_DIMS (every cache of a Llama-family model)
    go to attend_blocks where the CPU has AVX-512 (REGISTER_BLOCKS); the tiles below take the
    rest.

    Why it exists: the dense T^2 part of a long prefill is matrix-product work, which the row
    kernel does one (row, key) dot at a time; here the G query heads sharing a KV head stack
    their B-row tiles into one (G*B, d) matrix, so both products run as sgemm. Memory is
    O(G * B * Tk), never (Hq, Tq, Tk). Same math as the row kernel: only the float32 rounding
    differs (scale folded into q, sgemm's summation order, a float32 exp, _expf; bounded in
    tests/test_attention_tiles.py and against the reference kernel in tests/test_fast_path.py).
    It leaves out everything but "every key, causal by position": ranges, explicit indices,
    log-weights and pseudo-keys stay with the row kernels. Keys in position order (every cache
    holds them so) let a tile stop at its last visible key; otherwise it scores all Tk and masks.

    >>> x = np.ones((2, 3, 4), np.float32); kv = np.ones((1, 3, 4), np.float32)
    >>> out, lse, n = attend_tiles(x, kv, kv, np.arange(3), np.arange(3), 0.5)
    >>> out.shape, n[0].tolist(), np.round(lse[0], 4).tolist()
    ((2, 3, 4), [1, 2, 3], [2.0, 2.6931, 3.0986])
    """
    Hq, Tq, d = q.shape
    Hkv, Tk = k.shape[0], k_pos.shape[0]
    G = Hq // Hkv
    block = max(1, TILE_ROWS // G) if block is None else int(block)
    if k_sorted is None:
        k_sorted = bool(np.all(k_pos[1:] >= k_pos[:-1]))
    n_vis = np.searchsorted(k_pos if k_sorted else np.sort(k_pos), q_pos, side="right")  # (Tq,)
    if REGISTER_BLOCKS and k_sorted and d % PV_DIMS == 0:   # each query's keys a prefix
        out, lse = attend_blocks(q, k, v, n_vis, scale, item=block, workers=workers)
        return out, lse, np.broadcast_to(n_vis, (Hq, Tq)).copy()
    out = np.zeros((Hq, Tq, d), np.float32)                      # (Hq, Tq, d)
    lse = np.full((Hq, Tq), -np.inf)                             # (Hq, Tq)
    sc = np.float32(scale)

    def tile(t0, g):
        """Query rows [t0, t0 + B) of the G heads sharing KV head g: writes out, lse there."""
        t1 = min(t0 + block, Tq)
        b = t1 - t0
        qp = q_pos[t0:t1]                                        # (b,)
        # keys [0, S) hold every key the tile sees; keys [0, S0) are seen by all its rows
        S, S0 = (int(n_vis[t0:t1].max()), int(n_vis[t0:t1].min())) if k_sorted else (Tk, 0)
        if S == 0:
            return                                               # no key visible: 0, -inf
        h0, h1 = g * G, (g + 1) * G
        qt = np.multiply(q[h0:h1, t0:t1], sc).reshape(G * b, d)         # (G*b, d) scaled rows
        s = qt @ k[g, :S].T                                             # (G*b, d) @ (d, S)
        m = np.empty(G * b, np.float32)                                 # (G*b,) row max
        l = np.empty(G * b, np.float32)                                 # (G*b,) row sums
        if k_sorted:                     # row t sees keys [0, n_vis[t0 + t]): mask, max, exp, sum
            _softmax_rows(s, n_vis[t0:t1], m, l)                        # in one pass per row
        else:
            if S0 < S:
                hidden = k_pos[S0:S] > qp[:, None]                      # (b, S - S0) not yet causal
                np.copyto(s.reshape(G, b, S)[:, :, S0:], -np.inf, where=hidden)  # (G, b, S-S0)
            s.max(axis=1, out=m)                                        # (G*b,) row max
            m[m == -np.inf] = 0.0                                       # rows seeing no key
            _exp_rows(s, m, l)           # s <- exp(s - m) in [0, 1]; l <- row sums, >= 1 or 0
        o = s @ v[g, :S]                                                # (G*b, S) @ (S, d)
        _finish_rows(o, m, l, out[h0:h1, t0:t1], lse[h0:h1, t0:t1])     # (G, b, d), (G, b)

    # Largest tiles first (a tile's work grows with its last query's keys): whichever worker
    # finishes early then takes the small ones, so no large tile is left to run alone at the end.
    items = [(t0, g) for t0 in reversed(range(0, Tq, block)) for g in range(Hkv)]
    # Tiles write disjoint rows of out and lse, so inside a long prefill they run side by side
    # (threads.py), softmax pass included (the Numba passes release the GIL).
    side_by_side(lambda item: tile(*item), items, workers)
    return out, lse, np.broadcast_to(n_vis, (Hq, Tq)).copy()


# ---- dense causal attention in register blocks ----------------------------------------------
# The tiles above hand their two products to BLAS, whose kernels are built for long inner
# dimensions (QK^T's is d), and write the (G*B, S) scores out between the products and the
# softmax. Here, for keys in position order, each block of QK_ROWS queries of one head goes
# through three steps while its scores stay in L1/L2: its scores against every key it sees
# (_qk_block: QK_ROWS x 32 float32 sums held in registers, per step of c one broadcast of q[i, c]
# and two fused multiply-adds per query, the keys read from k packed in panels of 32; the rows'
# maxima taken as the scores are stored), their exp and sums (_exp16, as the tiles' pass), and
# their P V product (_pv_block: the same register block over QK_ROWS x 32 of d, one broadcast of
# p per key). A block stops at its own last visible key, where a tile stopped at its last row's.
# LLVM IR, as the 16-lane softmax loops: Numba's loops keep a block of accumulators in memory.

def _avx512() -> bool:
    """True where LLVM sees AVX-512F on this CPU: 32 zmm registers hold a register block (24
    accumulators); with 16 ymm registers the blocks would spill, and the BLAS tiles run instead."""
    from llvmlite import binding
    return bool(binding.get_host_cpu_features().get("avx512f", False))


REGISTER_BLOCKS = _avx512()     # read once; tests set it
_HAS_AVX512F[0] = _avx512()     # for _scale2, when its loops compile (after this import)
QK_ROWS = 12    # queries a register block: 12 x 2 accumulators of 16 lanes (of 32 zmm), 2 loads a step
QK_KEYS = 32    # keys a register block (k's transpose is padded to a multiple of it)
PV_DIMS = 32    # head dims a P V register block: d must be a multiple of it


def _c_f32(a, ndim):
    return isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" and a.ndim == ndim


def _rank1(builder, fma, acc, scalar, w0, w1):
    """A register block's rank-one update, in IR: acc[2 i + h] <- fma(scalar(i), w_h, acc[2 i + h])
    for i < QK_ROWS, h < 2, scalar(i) a float32 broadcast to 16 lanes and w0, w1 <16 x float>:
    the step both _qk_block (q[i, c] times a panel's keys) and _pv_block (p[i, j] times a value
    row) repeat."""
    for i in range(QK_ROWS):
        x = _bcast(builder, scalar(i))
        for h, w in enumerate((w0, w1)):
            a = builder.extract_value(acc, 2 * i + h)
            acc = builder.insert_value(acc, builder.call(fma, [x, w, a]), 2 * i + h)
    return acc


def _qk_kernel(masked):
    """The intrinsic _qk_block (masked=False) or _qk_block_masked (True): see _qk_block."""
    @intrinsic
    def qk(typingctx, qb, kt, s, j0, mx, lim):
        if not (_c_f32(qb, 2) and _c_f32(kt, 2) and _c_f32(s, 2) and _c_f32(mx, 1)
                and isinstance(lim, types.Array) and lim.dtype == types.int64 and lim.layout == "C"):
            return None

        def codegen(context, builder, signature, args):
            qa, ka, sa, ma, la = (context.make_array(t)(context, builder, v)
                                  for t, v in zip(signature.args[:3] + signature.args[4:], args[:3] + args[4:]))
            j0 = args[3]
            fma = _llvm_fn(builder.module, "llvm.fma.v16f32", _V16, [_V16] * 3)
            d = builder.extract_value(qa.shape, 1)
            lds = builder.extract_value(sa.shape, 1)
            vp = lambda base, off: builder.bitcast(builder.gep(base, [off]), _V16.as_pointer())  # noqa: E731
            init = llvm_ir.Constant(llvm_ir.ArrayType(_V16, 2 * QK_ROWS), None)

            panel = builder.mul(j0, d)                            # (j0 / 32) * (32 d)

            def body(c, acc):
                at = builder.add(panel, builder.mul(c, llvm_ir.Constant(_I64, QK_KEYS)))
                k0 = builder.load(vp(ka.data, at), align=4)
                k1 = builder.load(vp(ka.data, builder.add(at, llvm_ir.Constant(_I64, 16))), align=4)
                return _rank1(builder, fma, acc, lambda i: builder.load(builder.gep(
                    qa.data, [builder.add(builder.mul(llvm_ir.Constant(_I64, i), d), c)])), k0, k1)
            acc = _loop16(builder, d, init, body)
            i32 = llvm_ir.IntType(32)
            iota = llvm_ir.Constant(_VI16, list(range(16)))
            for i in range(QK_ROWS):
                row = builder.add(builder.mul(llvm_ir.Constant(_I64, i), lds), j0)
                mp = vp(ma.data, llvm_ir.Constant(_I64, 16 * i))
                m = builder.load(mp, align=4)
                for p in range(2):
                    at = builder.add(row, llvm_ir.Constant(_I64, 16 * p))
                    v = builder.extract_value(acc, 2 * i + p)
                    builder.store(v, vp(sa.data, at), align=4)
                    take = builder.fcmp_ordered(">", v, m)           # NaN: passed over, as _max16
                    if masked:                                       # keys j0 + 16 p + lane < lim[i]
                        first = builder.trunc(builder.add(j0, llvm_ir.Constant(_I64, 16 * p)), i32)
                        keys = builder.add(_bcast_i32(builder, first), iota)
                        n = builder.trunc(builder.load(builder.gep(la.data, [llvm_ir.Constant(_I64, i)])), i32)
                        take = builder.and_(take, builder.icmp_signed("<", keys, _bcast_i32(builder, n)))
                    m = builder.select(take, v, m)
                builder.store(m, mp, align=4)
            return context.get_dummy_value()
        return types.none(qb, kt, s, types.int64, mx, lim), codegen
    return qk


_qk_block = _qk_kernel(False)
_qk_block.__doc__ = """_qk_block(qb, kt, s, j0, mx, lim): s[i, j0:j0 + 32] <- sum_c qb[i, c] k[j0 + l, c]
(l < 32) for i < QK_ROWS: qb (QK_ROWS, d); kt (Tk / 32, d * 32): k in panels of 32 keys,
kt[j0 // 32, 32 c + l] = k[j0 + l, c], so a block reads one contiguous panel; s (QK_ROWS,
>= j0 + 32); float32, C-contiguous, j0 a multiple of 32. Each sum runs over c in order, one
fused multiply-add a term. And the row maxima, 16 lanes a row: mx[16 i + u] <- the max of itself
and the scores of keys j0 + u, j0 + 16 + u (> as _max16 takes it); _qk_block_masked counts only
keys below lim[i] (int64, QK_ROWS), for a block holding some row's last visible key."""
_qk_block_masked = _qk_kernel(True)


@intrinsic
def _pv_block(typingctx, p, v, o, n, c0):
    """o[i, c0:c0 + 32] <- sum_{j < n} p[i, j] v[j, c0:c0 + 32] for i < QK_ROWS: p (QK_ROWS, >= n),
    v (>= n, d), o (QK_ROWS, d), float32, C-contiguous. Each sum runs over j in order, one
    fused multiply-add a term."""
    if not (_c_f32(p, 2) and _c_f32(v, 2) and _c_f32(o, 2)):
        return None

    def codegen(context, builder, signature, args):
        pa, va, oa = (context.make_array(t)(context, builder, x) for t, x in zip(signature.args[:3], args[:3]))
        n, c0 = args[3], args[4]
        fma = _llvm_fn(builder.module, "llvm.fma.v16f32", _V16, [_V16] * 3)
        ldp = builder.extract_value(pa.shape, 1)
        d = builder.extract_value(va.shape, 1)
        vp = lambda base, off: builder.bitcast(builder.gep(base, [off]), _V16.as_pointer())  # noqa: E731
        init = llvm_ir.Constant(llvm_ir.ArrayType(_V16, 2 * QK_ROWS), None)

        def body(j, acc):
            at = builder.add(builder.mul(j, d), c0)
            v0 = builder.load(vp(va.data, at), align=4)
            v1 = builder.load(vp(va.data, builder.add(at, llvm_ir.Constant(_I64, 16))), align=4)
            return _rank1(builder, fma, acc, lambda i: builder.load(builder.gep(
                pa.data, [builder.add(builder.mul(llvm_ir.Constant(_I64, i), ldp), j)])), v0, v1)
        acc = _loop16(builder, n, init, body)
        for i in range(QK_ROWS):
            row = builder.add(builder.mul(llvm_ir.Constant(_I64, i), d), c0)
            for h in range(2):
                at = builder.add(row, llvm_ir.Constant(_I64, 16 * h))
                builder.store(builder.extract_value(acc, 2 * i + h), vp(oa.data, at), align=4)
        return context.get_dummy_value()
    return types.none(p, v, o, types.int64, types.int64), codegen


def _bcast(builder, x):
    """x (float) in all 16 lanes."""
    v = builder.insert_element(llvm_ir.Constant(_V16, llvm_ir.Undefined), x, llvm_ir.Constant(llvm_ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, llvm_ir.Constant(_VI16, [0] * 16))


def _bcast_i32(builder, x):
    """x (int32) in all 16 lanes."""
    v = builder.insert_element(llvm_ir.Constant(_VI16, llvm_ir.Undefined), x, llvm_ir.Constant(llvm_ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, llvm_ir.Constant(_VI16, [0] * 16))


@njit(cache=True, nogil=True, error_model="numpy")           # nogil: items run side by side
def _blocks_item(q, kt, v, n_vis, scale, h0, h1, t0, t1, out, lse):
    """Heads h0..h1 (sharing kt, v), queries t0..t1: out[h, t] and lse[h, t] of dense causal
    attention, query t seeing keys [0, n_vis[t]), in blocks of QK_ROWS queries. q (Hq, Tq, d)
    f32; kt (Tk padded / QK_KEYS, d * QK_KEYS) f32 C, k in panels (_qk_block), zero past Tk;
    v (Tk, d) f32 C; out (Hq, Tq, d) f32, lse (Hq, Tq) f64."""
    d = q.shape[2]
    ldk = kt.shape[0] * QK_KEYS
    qb = np.zeros((QK_ROWS, d), np.float32)                  # the block's scaled queries
    s = np.empty((QK_ROWS, ldk), np.float32)                 # their scores, then weights
    o = np.empty((QK_ROWS, d), np.float32)
    mx = np.empty(QK_ROWS * 16, np.float32)                  # their running maxima, 16 lanes a row
    lim = np.zeros(QK_ROWS, np.int64)                        # their visible keys (0: rows past t1)
    ls = np.empty(QK_ROWS, np.float32)                       # their sums of weights
    sc = np.float32(scale)
    for h in range(h0, h1):
        for b0 in range(t0, t1, QK_ROWS):
            b1 = min(b0 + QK_ROWS, t1)
            S, S0 = 0, n_vis[b0]
            for t in range(b0, b1):
                S, S0 = max(S, n_vis[t]), min(S0, n_vis[t])
            if S == 0:                                       # no key visible: 0, -inf as set
                out[h, b0:b1] = 0.0
                continue
            for i in range(QK_ROWS):
                lim[i] = n_vis[b0 + i] if b0 + i < b1 else 0
                for c in range(d):
                    qb[i, c] = q[h, b0 + i, c] * sc if b0 + i < b1 else np.float32(0.0)
            mx[:] = -np.inf
            for j0 in range(0, S, QK_KEYS):
                if j0 + QK_KEYS <= S0:                       # every row sees every key here
                    _qk_block(qb, kt, s, j0, mx, lim)
                else:
                    _qk_block_masked(qb, kt, s, j0, mx, lim)
            for i in range(b1 - b0):
                row, n = s[i], n_vis[b0 + i]
                nb = n // 16
                mr = mx[16 * i]
                for u in range(1, 16):
                    mr = mx[16 * i + u] if mx[16 * i + u] > mr else mr
                if mr == -np.inf:
                    mr = np.float32(0.0)                     # all visible scores -inf: l = 0
                total = _exp16(row, nb, mr)
                for j in range(nb * 16, n):
                    e = _expf(row[j] - mr)
                    row[j] = e
                    total += e
                for j in range(n, S):
                    row[j] = 0.0
                lse[h, b0 + i] = -np.inf if total == 0 else np.float64(mr) + np.log(np.float64(total))
                ls[i] = total
            # rows past t1 (zero queries) go through P V on their raw scores; never read back
            for c0 in range(0, d, PV_DIMS):
                _pv_block(s, v, o, S, c0)
            for i in range(b1 - b0):
                div = ls[i] if ls[i] > 0 else np.float32(1.0)
                for c in range(d):
                    out[h, b0 + i, c] = o[i, c] / div


@njit(cache=True, nogil=True)       # nogil: the KV heads are packed side by side
def _pack_keys(k, kt):
    """kt (Tk padded / QK_KEYS, d * QK_KEYS) f32 <- k (Tk, d) in panels of QK_KEYS keys,
    kt[p, QK_KEYS c + l] = k[QK_KEYS p + l, c] (_qk_block's layout), zero past Tk."""
    Tk, d = k.shape
    for p in range(kt.shape[0]):
        for c in range(d):
            for l in range(QK_KEYS):
                j = p * QK_KEYS + l
                kt[p, c * QK_KEYS + l] = np.float32(k[j, c]) if j < Tk else np.float32(0.0)


# Queries a work item: large enough that the Python call per item is small beside it, small
# enough that the items of a long prefill balance over the workers.
BLOCK_ITEM_T = 128


def attend_blocks(q, k, v, n_vis, scale, item=None, workers=None):
    """Dense causal attention for keys in position order, query t of q (Hq, Tq, d) seeing keys
    [0, n_vis[t]) of k, v (Hkv, Tk, d): out (Hq, Tq, d) f32 and lse (Hq, Tq) f64, what the tiles
    give (-inf and 0 for a query that sees no key), within the same bound. d a multiple of
    PV_DIMS. Work items (KV head, `item` queries, default BLOCK_ITEM_T), largest first, side by
    side as the tiles (workers as attend_tiles')."""
    Hq, Tq, d = q.shape
    Hkv, Tk = k.shape[0], k.shape[1]
    G = Hq // Hkv
    ldk = -(-max(Tk, 1) // QK_KEYS) * QK_KEYS
    kts = np.empty((Hkv, ldk // QK_KEYS, d * QK_KEYS), np.float32)   # k in panels (_qk_block)
    side_by_side(lambda g: _pack_keys(k[g], kts[g]), list(range(Hkv)), workers)
    vs = [np.ascontiguousarray(v[g], np.float32) for g in range(Hkv)]  # (Tk, d) each
    out = np.empty((Hq, Tq, d), np.float32)                      # (Hq, Tq, d): items write all
    lse = np.full((Hq, Tq), -np.inf)                             # (Hq, Tq)
    qf = np.ascontiguousarray(q, np.float32)
    nv = np.ascontiguousarray(n_vis, np.int64)
    n = BLOCK_ITEM_T if item is None else int(item)
    items = [(t0, g) for t0 in reversed(range(0, Tq, n)) for g in range(Hkv)]
    side_by_side(lambda it: _blocks_item(qf, kts[it[1]], vs[it[1]], nv, scale, it[1] * G, (it[1] + 1) * G,
                                         it[0], min(Tq, it[0] + n), out, lse), items, workers)
    return out, lse


def _every_key(rows: Rows, Tk: int, n_extra: int) -> bool:
    """True when the normalised selection reads every real key in every row and nothing else:
    one range [0, Tk) per row, no explicit indices (so no log-weights), no pseudo-keys. Decided
    from the arrays, not a selector's class, so a Union covering all keys qualifies too."""
    R = rows.range_ptr.size - 1
    return (rows.idx.size == 0 and n_extra == 0 and rows.range_lo.size == R and R > 0
            and not rows.range_lo.any() and bool(np.all(rows.range_hi == Tk)))


def decode_step(x: Inputs, rows: Rows, scale: float, k_sorted: bool):
    """attend_decode, its parts side by side on the cores free now (threads.workers) when its
    rows list DECODE_PARALLEL_MIN_KEYS keys or more; the same bits either way. On a busy
    machine workers() answers 1 and the step stays on this thread: a part waiting for a
    descheduled worker would cost far more than the second core gives."""
    n_rows = max(rows.range_ptr.size - 1, 1)
    keys = (int((rows.range_hi - rows.range_lo).sum()) + rows.idx.size) // n_rows
    n = workers() if keys >= DECODE_PARALLEL_MIN_KEYS else 1
    if n > 1:
        return on_threads(n, attend_decode, x, rows, scale, k_sorted, True)
    return attend_decode(x, rows, scale, k_sorted)


def kernel(x: Inputs, rows: Rows, scale: float, k_sorted: bool, tiles=None, decode=None):
    """The fast path's attention kernel, for `minisparse.attention.attend(kernel=...)`.

    tiles: None takes attend_tiles (BLAS products) when the selection reads every key,
    Tq >= TILE_MIN_TQ and Tq * Tk >= TILE_MIN_PAIRS, else the chunked row kernel, in parallel
    when the call is large; False always the row kernel; True attend_tiles at any size (a
    ValueError unless the selection reads every key). decode: None or True takes attend_decode
    for one query (Tq = 1) unless tiles=True; False leaves one query to the row kernel."""
    Hq, Tq, d = x.q.shape
    Tk = x.k_pos.shape[0]
    if tiles is True and not _every_key(rows, Tk, x.extra_pos.size):
        raise ValueError("attend: tiles=True needs a selection of every key (Dense)")
    if Tq == 1 and decode is not False and tiles is not True:
        return decode_step(x, rows, scale, k_sorted)
    if tiles or (tiles is None and Tq >= TILE_MIN_TQ and Tq * Tk >= TILE_MIN_PAIRS
                 and _every_key(rows, Tk, x.extra_pos.size)):            # decode skips the check
        return attend_tiles(x.q, x.k[:, :Tk], x.v[:, :Tk], x.q_pos, x.k_pos, scale,
                            k_sorted=k_sorted)
    # work estimate: entries listed per row times the query heads sharing each row
    n_row_heads = (rows.range_ptr.size - 1) // max(Tq, 1)
    work = (int((rows.range_hi - rows.range_lo).sum()) + rows.idx.size) * (Hq // max(n_row_heads, 1))
    # attend_rows hands out ROWS_PER_TASK rows a task: a decode step's Hq rows make one task,
    # which gains nothing from the pool and pays its wake-up (at 8k keys, more than the rows);
    # a larger call runs on the cores free now (threads.py)
    n = workers() if work >= PARALLEL_MIN_WORK and Hq * Tq > ROWS_PER_TASK else 1
    if n > 1:
        return on_threads(n, attend_rows, x, rows, scale, k_sorted)
    return attend_rows_serial(x, rows, scale, k_sorted)
