"""One decode step's dense attention: one query per head against every causal key of the cache.

The general row kernel (attention.py) serves any selection, key by key with a running softmax;
a decode step over every key is simpler and is read from memory once: per KV head, the scores
of its G query heads against each key (each key loaded once for the G of them), the exact
maximum, then exp and the weighted sum of the values in chunks of CHUNK keys, float32 within a
chunk and float64 across chunks, the error model `minisparse.testing.bounds.kernel_tol`
derives (tests/test_decode_step.py holds it to the float64 reference). At long context the
KV cache is as large as the weights (SmolLM2 at 2048 tokens: 94 MB of float32 keys and values a
step), so reading it in order, with the dot products vectorised, is what decides the speed.
Left out: sparse selections, pseudo-keys, log-weights, the log-sum-exp (the row kernel's).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .attention import CHUNK, _expf
from .threads import on_threads, workers

# below this many (query head, key) pairs one thread does it all: a parallel region costs more
PARALLEL_MIN_PAIRS = 1 << 14

# the d-term dot of a score may be summed in any order (kernel_tol bounds every order), and so
# vectorised; the rest keeps its written order: with reassociation allowed there too, LLVM's
# loop versions made the bits depend on where the arrays lay (a restored cache then continued
# differently from the original)
_DOT = {"reassoc", "contract"}
_ORDERED = {"contract"}


# rows of keys / values asked for ahead of the one being read (4 KiB of float32 at d = 64)
AHEAD = 16


@intrinsic
def _prefetch(typingctx, a, i):
    """Ask the CPU to bring element i of the C-contiguous array a (flat index) into cache; a
    hint: an address past a's end is dropped, never a fault."""
    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.PointerType(ir.IntType(8))
        ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        fn = builder.module.globals.get("llvm.prefetch.p0") or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name="llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(a, types.intp), codegen


@njit(cache=True, fastmath=_DOT)
def _score(q, h, k, g, j, scale):
    s = np.float32(0.0)
    for i in range(q.shape[2]):
        s += q[h, 0, i] * k[g, j, i]
    return s * scale


@njit(cache=True, fastmath=_ORDERED)
def _head(q, k, v, k_pos, qp, scale, g, out, natt, s, pb, cacc):
    """Query heads g*G .. g*G+G-1 against KV head g; scratch s (G, S), pb (G, CHUNK), cacc (G, d)
    float32."""
    Hq, _, d = q.shape
    G = Hq // k.shape[0]
    S = k_pos.size
    h0 = g * G
    n = 0
    kf, vf = k.reshape(-1), v.reshape(-1)               # flat views, for the prefetch hints
    row0 = g * k.shape[1] * d
    for j in range(S):                                  # scores: each key read once for G heads
        _prefetch(kf, row0 + (j + AHEAD) * d)
        if k_pos[j] > qp:
            for c in range(G):
                s[c, j] = -np.inf                       # exp gives 0: no branch further on
            continue
        n += 1
        for c in range(G):
            s[c, j] = _score(q, h0 + c, k, g, j, scale)
    m = np.full(G, -np.inf, np.float32)
    for c in range(G):
        natt[h0 + c, 0] = n
        for j in range(S):
            m[c] = max(m[c], s[c, j])
    acc = np.zeros((G, d), np.float64)
    total = np.zeros(G, np.float64)
    if n == 0:
        m[:] = 0.0                                      # every weight exp(-inf) = 0, out 0
    for j0 in range(0, S, CHUNK):                       # float32 inside a chunk, float64 across
        nc = min(S, j0 + CHUNK) - j0
        for c in range(G):
            lsum = np.float32(0.0)
            for j in range(nc):
                p = _expf(s[c, j0 + j] - m[c])
                pb[c, j] = p
                lsum += p
            total[c] += lsum
        cacc[:, :] = 0.0
        for j in range(nc):                             # each value row read once for G heads
            _prefetch(vf, row0 + (j0 + j + AHEAD) * d)
            for c in range(G):
                p = pb[c, j]
                for i in range(d):
                    cacc[c, i] += p * v[g, j0 + j, i]
        for c in range(G):
            for i in range(d):
                acc[c, i] += cacc[c, i]
    for c in range(G):
        for i in range(d):
            out[h0 + c, 0, i] = acc[c, i] / total[c] if total[c] > 0 else 0.0


@njit(cache=True)
def attend_serial(q, k, v, k_pos, qp, scale):
    """out (Hq, 1, d) float32, natt (Hq, 1): q (Hq, 1, d) against keys k, v (Hkv, >= S, d) at
    positions k_pos (S,), causal to the query position qp; every causal key, on this thread."""
    Hq, _, d = q.shape
    out = np.empty((Hq, 1, d), np.float32)
    natt = np.zeros((Hq, 1), np.int64)
    G = Hq // k.shape[0]
    s, pb, cacc = np.empty((G, k_pos.size), np.float32), np.empty((G, CHUNK), np.float32), np.empty((G, d), np.float32)
    for g in range(k.shape[0]):
        _head(q, k, v, k_pos, qp, scale, g, out, natt, s, pb, cacc)
    return out, natt


@njit(cache=True, parallel=True)
def attend_parallel(q, k, v, k_pos, qp, scale):
    """attend_serial, KV heads in parallel."""
    Hq, _, d = q.shape
    out = np.empty((Hq, 1, d), np.float32)
    natt = np.zeros((Hq, 1), np.int64)
    G = Hq // k.shape[0]
    for g in prange(k.shape[0]):
        s, pb, cacc = np.empty((G, k_pos.size), np.float32), np.empty((G, CHUNK), np.float32), np.empty((G, d), np.float32)
        _head(q, k, v, k_pos, qp, scale, g, out, natt, s, pb, cacc)
    return out, natt


def attend(q, k, v, k_pos, qp, scale):
    """attend_serial's (out, natt), on the cores free now for a large step (threads.workers)."""
    n = workers() if q.shape[0] * k_pos.size >= PARALLEL_MIN_PAIRS and k.shape[0] > 1 else 1
    if n > 1:
        return on_threads(n, attend_parallel, q, k, v, k_pos, qp, np.float32(scale))
    return attend_serial(q, k, v, k_pos, qp, np.float32(scale))
