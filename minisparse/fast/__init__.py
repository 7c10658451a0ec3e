"""The fast path: the same forward as minisparse/model.py, with every step that costs time
replaced by a faster computation of the same numbers.

What is here, and which plain function each piece must equal (tests/test_fast_path.py):
- threads.py: a long forward's NumPy work split into row blocks on a few threads, BLAS held to
  one thread meanwhile (`by_rows` for rms_norm, rope and glu: the same bits; `matmul_t` for a
  float32 `linear`), and glibc's allocator kept from returning memory mid-forward
  (`prefill_heap`); both enter through `long_forward`.
- quant.py: Numba kernels that multiply straight from GGUF quant blocks (`linear` on a
  QuantMatrix), bit-exact in their dequantisation (`embed`), float32 sums in another order;
  q8.py: its decode products on 8-bit activations rounded as llama.cpp rounds them, the default
  (MINISPARSE_INT8=0: quant.py's float32 kernels; bounds and ggml's arithmetic bit for bit in
  tests/test_q8_kernels.py); q8mm.py: prefill's products on the same 8-bit activations where the
  CPU has AVX512-VNNI, under the same switch (tests/test_q8mm.py).
- `rope` here: RoPE as Numba passes (by row blocks on a prefill), apply_rope's bits
  (tests/test_decode_step.py); `fast_rms_norm`: RMSNorm as one Numba pass per row block, within
  one ulp of its float32 scale; `fast_glu`: SwiGLU's gate silu(g) * u as one Numba pass per row
  block, within 9u of it (tests/test_fast_path.py).
- attention.py: the chunked float32 row kernel, `attend_decode` (one query, the query heads of
  a KV head reading its keys once) and `attend_tiles` (dense causal attention as BLAS products,
  with a vectorised exp), against the reference kernel in minisparse/attention/kernel.py.
- decode.py: a decode step of a position pattern (dense, sinks, window, their unions) straight
  to attend_decode as ranges, the same bits as attend with the fast kernel.
- step.py: a one-token forward of dense attention over a dense cache in one compiled call a
  layer (the SwiGLU gate between them NumPy's), the same bits as the forward on the rest of FAST.
- prefill.py: sparse prefill as masked tiles (exact top-k fused into the tiles; key-range
  selections as banded tiles), against the same reference kernel.
`attend` here sends a decode step (one query) to decode.py and any other call to prefill.py.

The seam: a forward calls its model's `Ops` (model.py); `FAST` here holds the functions above,
`model.PLAIN` the textbook ones. `minisparse.load_model(path, fast=None)` picks FAST unless
fast=False or the environment variable MINISPARSE_FAST=0. Importing this package (minisparse's
own __init__ does) also makes the fast attention kernel the one `minisparse.attention.attend`
runs by default, again unless MINISPARSE_FAST=0, so the lab and the selectors follow the same
switch.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
from numba import njit

from ..attention.kernel import use_kernel
from ..model import Ops, apply_rope, glu, rms_norm
from ..quant import QuantMatrix
from . import attention, decode, prefill, quant
from .attention import _expf
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


def linears(x, ws, bs):
    """[linear(x, w, b) for w, b in zip(ws, bs)], the same bits: QuantMatrix products that share
    x quantise it once (quant.matmul_many)."""
    if not all(isinstance(w, QuantMatrix) for w in ws):
        return [linear(x, w, b) for w, b in zip(ws, bs)]
    return [y if b is None else y + b for y, b in zip(quant.matmul_many(x, ws), bs)]


def attend(q, k, v, selector=None, *args, **kwargs):
    """minisparse.attention.attend on the fast path (same arguments and results): a decode step
    (one query) through decode.py, a prefill chunk through prefill.py."""
    return (decode.attend if q.shape[1] == 1 else prefill.attend)(q, k, v, selector, *args, **kwargs)


@njit(cache=True, nogil=True)       # nogil: a prefill's row blocks run side by side
def _rms_rows(x, w, eps, out):
    """model.rms_norm on x (T, D), row by row: the squares summed in float64 in order (einsum sums
    them in its own order), then x * scale * w in float32, as rms_norm multiplies."""
    T, D = x.shape
    for t in range(T):
        ms = 0.0
        for j in range(D):
            v = np.float64(x[t, j])
            ms += v * v
        scale = np.float32(1.0 / np.sqrt(ms / D + eps))
        for j in range(D):
            out[t, j] = (x[t, j] * scale) * w[j]


def _rms_norm_numba(x, w, eps, out=None):
    out = np.empty_like(x) if out is None else out                            # (T, D)
    _rms_rows(x, w, float(eps), out)
    return out


_rms_norm_by_rows = by_rows(0, None, None)(rms_norm)    # row t of the output reads row t of x only
_rms_norm_numba_by_rows = by_rows(0, None, None)(_rms_norm_numba)


def fast_rms_norm(x, w, eps, out=None):
    """model.rms_norm: one Numba pass per row block for float32 (T, D) rows, where einsum and two
    NumPy products cost ~6 us of calls on a decode step's one row; else NumPy's by row blocks.
    The float64 sum in another order may move the float32 scale by one ulp: within a bound
    derived in tests/test_fast_path.py."""
    if (x.ndim == 2 and x.dtype == w.dtype == np.float32 and w.shape == (x.shape[1],)
            and (out is None or (out.shape == x.shape and out.dtype == np.float32))):
        return _rms_norm_numba_by_rows(x, w, eps, out=out)
    return _rms_norm_by_rows(x, w, eps, out=out)


# nogil: a prefill's row blocks run side by side. error_model="numpy": a float division by zero
# gives inf or NaN as in NumPy; Numba's default checks every divisor to raise
# ZeroDivisionError, and that branch keeps LLVM from vectorising the loop (1 + e >= 1 here).
@njit(cache=True, fastmath={"contract"}, nogil=True, error_model="numpy")
def _glu_rows(g, u, out):
    """model.glu, silu(g) * u, in one pass over (T, F) rows, the exp vectorised (attention's
    _expf, which takes x <= 0): with e = exp(-|g|) in (0, 1], silu(g) = g / (1 + e) for g >= 0
    and g e / (1 + e) for g < 0 (g / (1 + 1/e)), so the exp never overflows."""
    T, F = g.shape
    for t in range(T):
        gr, ur, orow = g[t], u[t], out[t]
        for j in range(F):
            x = gr[j]
            e = _expf(-abs(x))
            num = x if x >= np.float32(0.0) else x * e
            orow[j] = num / (np.float32(1.0) + e) * ur[j]


def _glu_numba(g, u, out=None):
    out = np.empty_like(g) if out is None else out                            # (T, F)
    _glu_rows(g, u, out)
    return out


_glu_by_rows = by_rows(0, 0)(glu)
_glu_numba_by_rows = by_rows(0, 0)(_glu_numba)


def fast_glu(g, u, out=None):
    """model.glu (silu(g) * u) as one Numba pass per row block for float32 (T, F) rows, where
    NumPy makes five (negate, exp, + 1, divide, times u); else NumPy's by row blocks. Not
    NumPy's bits (another exp and another formula for g < 0): within a bound derived in
    tests/test_fast_path.py of silu(g) * u in float64."""
    if (g.ndim == 2 and g.dtype == u.dtype == np.float32 and u.shape == g.shape
            and (out is None or (out.shape == g.shape and out.dtype == np.float32))):
        return _glu_numba_by_rows(g, u, out=out)
    return _glu_by_rows(g, u, out=out)


# Up to this many positions RoPE runs as one Numba call on this thread; above, by row blocks
# side by side (threads.by_rows), which costs a few microseconds of its own.
ROPE_NUMBA_MAX_T = 8


@njit(cache=True, nogil=True)       # nogil: a prefill's row blocks run side by side
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


def _rope_numba(x, cos, sin, style, rope_dim, out=None):
    """apply_rope by _rope_rows, into out (or a new array): float32 arrays, a known style."""
    out = np.empty_like(x) if out is None else out                            # (H, T, d)
    _rope_rows(x, cos, sin, style == "interleaved", rope_dim, out)
    return out


# x (H, T, d) and the tables (T, r/2) per position; NumPy's apply_rope for what _rope_rows
# does not take. The Numba pass is also faster on a prefill's rows: NumPy's ~12 calls (slices,
# products, strided stores) each pass over the data, the Numba loop once (docs/performance.md).
_rope_by_rows = by_rows(1, 0, 0)(apply_rope)
_rope_numba_by_rows = by_rows(1, 0, 0)(_rope_numba)


def rope(x, cos, sin, style: str, rope_dim: int, out=None):
    """model.apply_rope as Numba passes (float32 arrays): one for a decode step's few positions,
    by row blocks for more; else NumPy's by row blocks. The same bits every way
    (tests/test_decode_step.py, tests/test_fast_path.py)."""
    if (x.ndim == 3 and x.dtype == cos.dtype == sin.dtype == np.float32
            and style in ("interleaved", "neox") and 0 < rope_dim <= x.shape[2]
            and rope_dim % 2 == 0 and cos.shape == sin.shape == (x.shape[1], rope_dim // 2)
            and (out is None or (out.shape == x.shape and out.dtype == np.float32))):
        if x.shape[1] <= ROPE_NUMBA_MAX_T and out is None:
            return _rope_numba(x, cos, sin, style, rope_dim)
        return _rope_numba_by_rows(x, cos, sin, style, rope_dim, out=out)
    return _rope_by_rows(x, cos, sin, style, rope_dim, out=out)


@contextmanager
def long_forward(T: int):
    """A T-token forward: NumPy work split over the cores, freed memory kept until the end."""
    with prefill_heap(T), prefill_threads(T):
        yield


from . import step  # noqa: E402  (step.py calls the Numba passes above)

FAST = Ops(
    embed=embed,
    rms_norm=fast_rms_norm,
    linear=linear,
    rope=rope,
    glu=fast_glu,
    attend=attend,
    forward_context=long_forward,
    decode_step=step.decode_step,
    linears=linears,
)

if enabled():
    use_kernel(attention.kernel)
