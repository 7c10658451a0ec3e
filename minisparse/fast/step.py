"""A decode step with few calls: for one token of dense attention, or of a position pattern
(sinks, window and their unions: decode.py), over a dense float32 KV cache, each layer's work
from the previous layer's feed-forward output to this layer's gate and up products is one
compiled call (`_layer`), and the SwiGLU gate between them is one call of the kernel FAST's
`fast_glu` runs (`_glu_rows`).

Why: a decode step of a small model is mostly calls, not arithmetic. model.forward makes ~25
Python and NumPy calls a layer (norms, products, reshapes, RoPE, the cache append, attention,
residual adds), a few microseconds each; on the embedded 6-layer model they are most of a token,
and on SmolLM2 about 0.1 ms a layer. Here a layer is one Numba call and the gate's one.
Everything calls the very kernels the fast path's `Ops` call (q8.py's 8-bit products, the
RMSNorm, RoPE and SwiGLU passes of fast/__init__.py, decode.py's compiled attention step), in
the same order on the same values, so a step here gives the same bits as
model.forward on FAST (tests/test_step.py holds it to that, logits and cache).

It runs FAST's own functions: an `Ops` made from FAST with other functions in it should set
decode_step=None (dataclasses.replace) to have them called.

Left out (model.forward on FAST runs them): several tokens, any other selector, stats or trace,
a cache other than KVCache in float32 or with a block size, biases (qwen2), matrices without an
8-bit kernel or with MINISPARSE_INT8=0 (the float32 kernels).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..attention.patterns import Dense, Sinks, Window
from ..attention.selection import reserve
from ..attention.selector import Union
from ..cache.dense import KVCache, lazy_zeros
from ..model import rope_tables
from ..quant import QuantMatrix
from . import _glu_rows, _rms_rows, _rope_rows, q8, quant   # fast/__init__.py imports this module last
from .attention import DECODE_PARALLEL_MIN_KEYS
from .decode import _codes, _position_step, _position_step_parallel, position_codes
from .threads import on_threads, workers

_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# A product runs its rows side by side only from this many weights: below it a parallel region's
# start and end cost more than the second core gives. Measured on a quiet machine with the
# attention step side by side too, the embedded model's matrices (256 x 256 and up) gained
# (docs/performance.md); a busy machine takes one thread anyway (threads.workers).
PARALLEL_MIN_WEIGHTS = 1 << 15
_DENSE_CODES = position_codes(None)


@njit(cache=True)
def _product(code, u8, x):
    """(out,) = W x_hat, as quant.matmul's decode product computes it on one thread (q8.py)."""
    y = np.empty(u8.shape[0], np.float32)
    q8.matvec_serial(code, u8, x, y)
    return y


@njit(cache=True)
def _product_parallel(code, u8, x):
    """_product, its rows side by side when the matrix holds PARALLEL_MIN_WEIGHTS weights or
    more (the same bits)."""
    y = np.empty(u8.shape[0], np.float32)
    if u8.shape[0] * x.size >= PARALLEL_MIN_WEIGHTS:
        q8.matvec(code, u8, x, y)
    else:
        q8.matvec_serial(code, u8, x, y)
    return y


@njit(cache=True, parallel=True)
def _side_by_side(codes, raws, mats, x, ys):
    """ys[i] = W x_hat for W = raws[mats[i]], the rows of all of them in one parallel region
    (q8.ROWS_PER_TASK a task), x quantised once: what _product gives for each, in one start and
    one end of the region instead of one per matrix."""
    qx, dx, sx = q8._quantized(x)
    R = q8.ROWS_PER_TASK
    n = len(mats)
    starts = np.zeros(n + 1, np.int64)                    # the first task of each matrix
    for i in range(n):
        starts[i + 1] = starts[i] + (raws[mats[i]].shape[0] + R - 1) // R
    for t in prange(starts[n]):                           # tasks write disjoint rows
        i = 0
        while t >= starts[i + 1]:
            i += 1
        m = mats[i]
        r0 = (t - starts[i]) * R
        q8._rows(codes[m], raws[m], qx, dx, sx, ys[i], r0, min(raws[m].shape[0], r0 + R))


@njit(cache=True)
def _products(codes, raws, mats, x, ys):
    """ys[i] = _product of the matrix raws[mats[i]] and x, for each i, x quantised once (the
    same x_hat each _product makes)."""
    qx, dx, sx = q8._quantized(x)
    for i in range(len(mats)):
        m = mats[i]
        q8._rows(codes[m], raws[m], qx, dx, sx, ys[i], 0, raws[m].shape[0])


@njit(cache=True)
def _products_parallel(codes, raws, mats, x, ys):
    """_products, side by side when the group's largest matrix holds PARALLEL_MIN_WEIGHTS."""
    size = 0
    for m in mats:
        size = max(size, raws[m].shape[0] * x.size)
    if size >= PARALLEL_MIN_WEIGHTS:
        _side_by_side(codes, raws, mats, x, ys)
    else:
        _products(codes, raws, mats, x, ys)


@njit(cache=True)
def _norm(x, w, eps):
    """fast_rms_norm of one row x (D,) -> (D,)."""
    out = np.empty((1, x.size), np.float32)
    _rms_rows(x.reshape(1, x.size), w, eps, out)
    return out[0]


@njit(inline="always")
def _layer_body(x, h_prev, down_prev, codes, raws, attn_norm, ffn_norm, eps, cos, sin,
                interleaved, rope_dim, Hq, Hkv, K, V, k_pos, qp, pattern, scale, par):
    """One layer of a decode step, from the previous layer's gate output h_prev (F,) (empty for
    the first layer; its down product is added to x here) to this layer's gate and up products.
    x (D,) the residual stream; codes (7,) and raws the GGML types and blocks of _MATRICES;
    K, V this layer's cache buffers (Hkv, capacity, d), the new key written at row k_pos.size-1;
    pattern the position codes of the keys attended (decode.position_codes). par, a constant
    where inlined (_layer, _layer_parallel): products and attention side by side, so that a
    one-thread run never compiles the parallel kernels. Returns (x, g, u)."""
    if h_prev.size:
        if par:
            y = _product_parallel(down_prev[0], down_prev[1], h_prev)
        else:
            y = _product(down_prev[0], down_prev[1], h_prev)
        x = x + y                                                              # (D,)
    h = _norm(x, attn_norm, eps)                                               # (D,)
    q = np.empty(raws[0].shape[0], np.float32)                                 # (Hq*d,)
    k = np.empty(raws[1].shape[0], np.float32)                                 # (Hkv*d,)
    v = np.empty(raws[2].shape[0], np.float32)                                 # (Hkv*d,)
    if par:
        _products_parallel(codes, raws, (0, 1, 2), h, (q, k, v))
    else:
        _products(codes, raws, (0, 1, 2), h, (q, k, v))
    d = q.size // Hq
    qr = np.empty((Hq, 1, d), np.float32)
    kr = np.empty((Hkv, 1, d), np.float32)
    _rope_rows(q.reshape(Hq, 1, d), cos, sin, interleaved, rope_dim, qr)      # (Hq, 1, d)
    _rope_rows(k.reshape(Hkv, 1, d), cos, sin, interleaved, rope_dim, kr)     # (Hkv, 1, d)
    s = k_pos.size - 1
    K[:, s, :] = kr[:, 0, :]                                                   # the cache append
    V[:, s, :] = v.reshape(Hkv, d)
    if par and k_pos.size >= DECODE_PARALLEL_MIN_KEYS:       # decode.attend's choice
        ok, o, _, _ = _position_step_parallel(qr, K, V, k_pos, qp, pattern, scale)
    else:
        ok, o, _, _ = _position_step(qr, K, V, k_pos, qp, pattern, scale)
    if not ok:
        raise ValueError("decode step: the cache's positions are out of order")
    if par:
        y = _product_parallel(codes[3], raws[3], o.reshape(Hq * d))
    else:
        y = _product(codes[3], raws[3], o.reshape(Hq * d))
    x = x + y                                                                  # (D,)
    h = _norm(x, ffn_norm, eps)                                                # (D,)
    g = np.empty(raws[4].shape[0], np.float32)                                 # (F,)
    u = np.empty(raws[5].shape[0], np.float32)                                 # (F,)
    if par:
        _products_parallel(codes, raws, (4, 5), h, (g, u))
    else:
        _products(codes, raws, (4, 5), h, (g, u))
    return x, g, u


@njit(cache=True)
def _layer(x, h_prev, down_prev, codes, raws, attn_norm, ffn_norm, eps, cos, sin, interleaved,
           rope_dim, Hq, Hkv, K, V, k_pos, qp, pattern, scale):
    """_layer_body on this thread."""
    return _layer_body(x, h_prev, down_prev, codes, raws, attn_norm, ffn_norm, eps, cos, sin,
                       interleaved, rope_dim, Hq, Hkv, K, V, k_pos, qp, pattern, scale, False)


@njit(cache=True)
def _layer_parallel(x, h_prev, down_prev, codes, raws, attn_norm, ffn_norm, eps, cos, sin,
                    interleaved, rope_dim, Hq, Hkv, K, V, k_pos, qp, pattern, scale):
    """_layer_body with its products and attention side by side (the same bits)."""
    return _layer_body(x, h_prev, down_prev, codes, raws, attn_norm, ffn_norm, eps, cos, sin,
                       interleaved, rope_dim, Hq, Hkv, K, V, k_pos, qp, pattern, scale, True)


@njit(cache=True)
def _head(x, h_prev, down_prev, out_norm, eps, head):
    """The last layer's down product and residual, the output norm and the head: logits (1, V)."""
    x = x + _product(down_prev[0], down_prev[1], h_prev)                      # (D,)
    h = _norm(x, out_norm, eps)                                                # (D,)
    return _product(head[0], head[1], h).reshape(1, head[1].shape[0])         # (1, V)


@njit(cache=True)
def _head_parallel(x, h_prev, down_prev, out_norm, eps, head):
    """_head with its products side by side (the same bits)."""
    x = x + _product_parallel(down_prev[0], down_prev[1], h_prev)             # (D,)
    h = _norm(x, out_norm, eps)                                                # (D,)
    return _product_parallel(head[0], head[1], h).reshape(1, head[1].shape[0])  # (1, V)


def _fixed(selector) -> bool:
    """True when every layer reads `selector` as it is: None, Dense, Sinks, Window or a Union of
    them whose at_layer and for_layer are Union's (each member unchanged, so the union itself)."""
    if selector is None or type(selector) in (Dense, Sinks, Window):
        return True
    return (isinstance(selector, Union) and type(selector).at_layer is Union.at_layer
            and type(selector).for_layer is Union.for_layer and all(map(_fixed, selector.members)))


def _plan(model):
    """Per layer (codes (7,), raws), norms, the head: what the compiled calls take, or None when
    a matrix has no 8-bit kernel or a layer has biases. Built once per model."""
    plan = getattr(model, "_fast_step_plan", False)
    if plan is not False:
        return plan
    w, cfg = model.weights, model.config
    head = w["token_embd"] if cfg.tied_embeddings else w["output"]

    def kernel_of(m):
        ok = isinstance(m, QuantMatrix) and int(m.qtype) in q8.TYPES
        return (np.int64(m.qtype), m.raw) if ok else None
    layers = []
    for l in range(cfg.n_layers):
        p = f"blk.{l}."
        mats = [kernel_of(w[p + n]) for n in _MATRICES]
        if (any(m is None for m in mats) or any(p + n + ".bias" in w for n in ("attn_q", "attn_k", "attn_v"))
                or w[p + "attn_norm"].dtype != np.float32 or w[p + "ffn_norm"].dtype != np.float32):
            layers = None
            break
        layers.append((np.array([m[0] for m in mats], np.int64), tuple(m[1] for m in mats),
                       w[p + "attn_norm"], w[p + "ffn_norm"], mats[6]))
    plan = None
    if layers is not None and kernel_of(head) is not None and w["output_norm"].dtype == np.float32:
        big = any(w[f"blk.0.{n}"].shape[0] * w[f"blk.0.{n}"].shape[1] >= PARALLEL_MIN_WEIGHTS
                  for n in _MATRICES)               # a layer has a product worth two threads
        plan = (layers, w["output_norm"], kernel_of(head), big)
    model._fast_step_plan = plan
    return plan


def decode_step(model, tokens, cache, selector=None, dense_layers=(), stats=None, trace=None):
    """Logits (1, V) of one token appended to `cache`, as model.forward on FAST gives them, in
    few calls; None when this step is not one it covers (the forward then runs as written)."""
    cfg = model.config
    if (len(tokens) != 1 or cache is None or type(cache) is not KVCache
            or cache.dtype != np.float32 or cache.block or stats is not None or trace is not None
            or not quant.INT8_DECODE or cfg.rope_style not in ("interleaved", "neox")):
        return None
    plan = _plan(model)
    pattern = _codes(selector) if _fixed(selector) else None   # (m, 2) position codes
    if plan is None or pattern is None:
        return None
    layers, out_norm, head, big = plan
    w = model.weights
    n = cache.n
    S = n + 1
    pos = np.array([cache.next_pos], np.int64)                                # (1,)
    cache.k = reserve(cache.k, n, S, axis=2, zeros=lazy_zeros)                 # as cache.update
    cache.v = reserve(cache.v, n, S, axis=2, zeros=lazy_zeros)
    cache.pos = reserve(cache.pos, n, S, axis=0)
    cache.pos[n] = pos[0]
    k_pos = cache.pos[:S]
    cos, sin = rope_tables(pos, cfg, w.get("rope_freqs"))                    # (1, r/2)
    x = model.ops.embed(w["token_embd"], tokens)[0]                            # (D,)
    threads = workers()
    parallel = threads > 1 and (big or S >= DECODE_PARALLEL_MIN_KEYS)
    layer, last = (_layer_parallel, _head_parallel) if parallel else (_layer, _head)
    eps, scale = float(cfg.norm_eps), 1.0 / np.sqrt(cfg.head_dim)
    interleaved = cfg.rope_style == "interleaved"
    h, down = np.zeros(0, np.float32), (np.int64(0), layers[0][1][6])
    gated = np.empty((1, layers[0][1][4].shape[0]), np.float32)               # (1, F)
    for l, (codes, raws, attn_norm, ffn_norm, down_l) in enumerate(layers):
        x, g, u = on_threads(threads, layer, x, h, down, codes, raws, attn_norm, ffn_norm, eps,
                             cos, sin, interleaved, cfg.rope_dim, cfg.n_heads, cfg.n_kv_heads,
                             cache.k[l], cache.v[l], k_pos, int(pos[0]),
                             _DENSE_CODES if l in dense_layers else pattern, scale)
        # the kernel of FAST's glu (fast_glu, which the forward on FAST calls), straight, into
        # one buffer: fast_glu's checks and row split cost more than the pass on one row
        _glu_rows(g[None], u[None], gated)
        h = gated[0]                                                           # (F,)
        down = down_l
    logits = on_threads(threads, last, x, h, down, out_norm, eps, head)
    cache.advance(1)
    return logits

