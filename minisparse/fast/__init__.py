"""The fast path: the same forward as minisparse/model.py, with every step that costs time
replaced by a faster computation of the same numbers.

What is here, and which plain function each piece must equal (tests/test_fast_path.py):
- threads.py: a long forward's NumPy work split into row blocks on a few threads, BLAS held to
  one thread meanwhile (`by_rows` for rms_norm, rope and glu: the same bits; `matmul_t` for a
  float32 `linear`), and glibc's allocator kept from returning memory mid-forward
  (`prefill_heap`); both enter through `long_forward`.
- quant.py: Numba kernels that multiply straight from GGUF quant blocks (`linear` on a
  QuantMatrix), bit-exact in their dequantisation (`embed`), float32 sums in another order;
  q8.py: its decode products on 8-bit activations, with MINISPARSE_INT8=1 (within a derived
  bound of the exact product, tests/test_q8_kernels.py).
- decode.py: a decode step's attention over every key (`attend_step` with a Dense selector),
  within kernel_tol of the reference like the row kernel (tests/test_decode_step.py).
- attention.py: the chunked float32 row kernel and `attend_tiles` (dense causal attention as
  BLAS products, with a vectorised exp), against the reference kernel in
  minisparse/attention/kernel.py.

The seam: a forward calls its model's `Ops` (model.py); `FAST` here holds the functions above,
`model.PLAIN` the textbook ones. `minisparse.load_model(path, fast=None)` picks FAST unless
fast=False or the environment variable MINISPARSE_FAST=0. Importing this package (minisparse's
own __init__ does) also makes the fast attention kernel the one `minisparse.attention.attend`
runs by default, again unless MINISPARSE_FAST=0, so the lab and the selectors follow the same
switch.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from functools import lru_cache, partial

import numpy as np
from numba import njit

from ..attention import Dense
from ..attention.kernel import AttentionStats, Inputs, Rows, attend, default_kernel, use_kernel
from ..attention.selection import SHARED
from ..model import Ops, apply_rope, glu, rms_norm
from ..quant import QuantMatrix
from . import attention, decode, quant
from .threads import by_rows, matmul_t, prefill_heap, prefill_threads

ENV = "MINISPARSE_FAST"


def enabled() -> bool:
    """False when the environment sets MINISPARSE_FAST=0, True when it is unset or 1."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 (the plain path) or 1 (the fast path)")
    return value == "1"


def embed(table, tokens):
    """model.embed: rows tokens (T,) of table -> (T, D), a QuantMatrix's by the Numba kernels."""
    return quant.rows(table, tokens) if isinstance(table, QuantMatrix) else table[tokens]


def linear(x, w, b=None):
    """model.linear: x (T, in) @ w.T (+ b) -> (T, out), from quant blocks or by row blocks."""
    y = quant.matmul(x, w) if isinstance(w, QuantMatrix) else matmul_t(x, w)   # (T, out)
    return y if b is None else y + b


@njit(cache=True)
def _order_and_count(k_pos, q):
    """(k_pos is non-decreasing, how many k_pos <= q): the kernel's k_sorted flag and the
    causal count of a decode step's one query, in one pass."""
    ordered, n = True, 0
    for i in range(k_pos.size):
        n += k_pos[i] <= q
        if i and k_pos[i] < k_pos[i - 1]:
            ordered = False
    return ordered, n


# a Dense decode step's one range [0, S) as the kernel's CSR arrays, but for S itself
_PTR, _ZERO, _NO_IDX = np.array([0, 1], np.int64), np.zeros(1, np.int64), np.zeros(2, np.int64)
_NO_KEYS, _NO_W = np.zeros(0, np.int64), np.zeros(0, np.float32)


_FLOATS = (np.float32, np.float16, np.float64)    # what attend takes (and computes in float32)


@lru_cache(maxsize=None)
def _no_pseudo_keys(Hkv: int, d: int):
    return np.zeros((Hkv, 0, d), np.float32)                                 # (Hkv, 0, d)


def attend_step(q, k, v, selector=None, q_pos=None, k_pos=None, return_lse=False,
                return_stats=False, scale=None, buffer=False, kernel=None, dense_decode=False):
    """minisparse.attention.attend, with kernel (None: the default one). A decode step that
    reads every key (a Dense selector, float32 arrays as the cache holds them) skips building,
    normalising and checking a Selection (Python work that costs as much as the kernel at short
    context): it hands the kernel its one range [0, S) directly (the same bits as attend), or
    with dense_decode=True (FAST's) runs decode.py's kernel, made for that one case (within
    kernel_tol of the float64 reference, as the row kernel; tests/test_decode_step.py)."""
    if not (type(selector) is Dense and not return_lse and q_pos is not None and k_pos is not None
            and q.ndim == 3 and q.shape[1] == 1 and k.ndim == 3 and k.shape == v.shape
            and q.shape[2] == k.shape[2] and k.shape[0] and q.shape[0] % k.shape[0] == 0
            and 0 < len(k_pos) <= k.shape[1] and (buffer or len(k_pos) == k.shape[1])
            and q.dtype in _FLOATS and k.dtype in _FLOATS and v.dtype == k.dtype):
        return attend(q, k, v, selector, q_pos, k_pos, return_lse, return_stats, scale, buffer,
                      kernel=kernel)
    if not (k.dtype == v.dtype == np.float32 and k.flags.c_contiguous and v.flags.c_contiguous):
        # float16 storage or another layout: the held keys as float32 rows, as attend does (its
        # one conversion point), so
        # that which kernel runs never depends on how a cache lays out its buffers
        k = np.ascontiguousarray(k[:, :len(k_pos)], np.float32)
        v = np.ascontiguousarray(v[:, :len(k_pos)], np.float32)
    Hq, _, d = q.shape
    q = np.ascontiguousarray(q, np.float32)
    q_pos, k_pos = np.asarray(q_pos, np.int64), np.asarray(k_pos, np.int64)
    k_sorted, n_causal = _order_and_count(k_pos, q_pos[0])
    none = _no_pseudo_keys(k.shape[0], d)
    x = Inputs(q, k, v, none, none, q_pos, k_pos, _NO_KEYS)
    rows = Rows(SHARED, _PTR, _ZERO, np.array([len(k_pos)], np.int64), _NO_IDX, _NO_KEYS, _NO_W)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)            # as attend's np.sqrt
    if dense_decode:
        out, natt = decode.attend(q, k, v, k_pos, q_pos[0], scale)  # (Hq, 1, d)
    else:
        out, _, natt = (default_kernel() if kernel is None else kernel)(x, rows, scale, k_sorted)
    if not return_stats:
        return out
    return out, AttentionStats(natt, np.full((Hq, 1), n_causal, np.int64))


# Up to this many positions RoPE runs as one Numba pass; NumPy's ~12 calls (slices, products,
# strided stores) cost more than the arithmetic on a decode step's few rows.
ROPE_NUMBA_MAX_T = 8


@njit(cache=True)
def _rope_rows(x, cos, sin, interleaved, rope_dim, out):
    """apply_rope's arithmetic, element by element: the same float32 products and differences
    in the same order (no fused multiply-add), so the same bits."""
    H, T, d = x.shape
    half = rope_dim // 2
    for h in range(H):
        for t in range(T):
            for i in range(half):
                ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
                a, b = x[h, t, ia], x[h, t, ib]
                c, s = cos[t, i], sin[t, i]
                out[h, t, ia] = a * c - b * s
                out[h, t, ib] = a * s + b * c
            for i in range(rope_dim, d):
                out[h, t, i] = x[h, t, i]


_rope_by_rows = by_rows(1, 0, 0)(apply_rope)     # x (H, T, d) and the tables (T, r/2) per position


def rope(x, cos, sin, style: str, rope_dim: int, out=None):
    """model.apply_rope: one Numba pass for a decode step's few positions (float32 arrays),
    else by row blocks; the same bits either way (tests/test_decode_step.py)."""
    if (x.ndim == 3 and x.shape[1] <= ROPE_NUMBA_MAX_T and x.dtype == cos.dtype == sin.dtype == np.float32
            and style in ("interleaved", "neox") and out is None and 0 < rope_dim <= x.shape[2]
            and rope_dim % 2 == 0 and cos.shape == sin.shape == (x.shape[1], rope_dim // 2)):
        out = np.empty_like(x)                                                # (H, T, d)
        _rope_rows(x, cos, sin, style == "interleaved", rope_dim, out)
        return out
    return _rope_by_rows(x, cos, sin, style, rope_dim, out=out)


@contextmanager
def long_forward(T: int):
    """A T-token forward: NumPy work split over the cores, freed memory kept until the end."""
    with prefill_heap(T), prefill_threads(T):
        yield


FAST = Ops(
    embed=embed,
    rms_norm=by_rows(0, None, None)(rms_norm),   # row t of the output reads row t of x only
    linear=linear,
    rope=rope,
    glu=by_rows(0, 0)(glu),
    attend=partial(attend_step, kernel=attention.kernel, dense_decode=True),
    forward_context=long_forward,
)

if enabled():
    use_kernel(attention.kernel)
