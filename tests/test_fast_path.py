"""The fast path (minisparse/fast/) against the plain one (model.py, attention/kernel.py).

Each piece of the fast path must equal the plain function it stands in for: to the bit where
the arithmetic is the same (row blocks of an element-wise step, row blocks of a float32
product), within a bound derived from float32 rounding where it is not (the chunked row kernel,
the tiles, the quantised kernels). Then whole models: the plain path prints the same greedy text
as the fast one, with MINISPARSE_FAST=0 as with load_model(fast=False).
"""
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from hypothesis import given, strategies as st

import minisparse
from minisparse.attention import KV, Q, SHARED, Dense, Selection, attend, reference_kernel
from minisparse.fast import FAST, attention as fast_attention, threads
from minisparse.model import PLAIN, apply_rope, glu, linear, rms_norm, rope_tables
from minisparse.quant import QuantMatrix

from conftest import shared_fixture
from test_attention_tiles import tiles_tol

U = 2.0 ** -24                                  # float32 unit roundoff
ROOT = Path(__file__).resolve().parent.parent
PYDOC = ROOT / "models" / "minisparse-pydoc.gguf"


def gamma(n):
    """Higham's gamma_n = n u / (1 - n u): the relative error of n float32 roundings in a row."""
    return n * U / (1 - n * U)


# ----------------------------------------------------------------------------- same bits


def split_everything(monkeypatch, n=3):
    """Make the fast path split even tiny calls over n workers, and record each split."""
    monkeypatch.setattr(threads, "MIN_ROW_ELEMS", 1)
    monkeypatch.setattr(threads, "MIN_MACS", 1)
    monkeypatch.setattr(threads.numba, "get_num_threads", lambda: n)
    pools, real = [], threads._pool
    monkeypatch.setattr(threads, "_pool", lambda k: pools.append(k) or real(k))
    return pools


def test_row_wise_steps_split_over_threads_give_the_one_call_bits(monkeypatch):
    # RMSNorm, SwiGLU's gate and RoPE read one row (position) per output row, so running row
    # blocks side by side (threads.by_rows) must return exactly the one-call result: the plain
    # function's for RoPE and for float64 rows (NumPy's by blocks), the fast path's own Numba
    # pass's for float32 RMSNorm and SwiGLU's gate (their bounds against the plain functions
    # are tested below)
    r = np.random.default_rng(0)
    x, u = r.standard_normal((2, 37, 24)).astype(np.float32)
    w = r.standard_normal(24).astype(np.float32)
    h = r.standard_normal((4, 37, 16)).astype(np.float32)
    cfg = type("C", (), {"rope_dim": 16, "rope_base": 10000.0, "rope_scale": 1.0})
    cos, sin = rope_tables(np.arange(5, 42), cfg)
    x64, u64 = x.astype(np.float64), u.astype(np.float64)
    one_call = (FAST.rms_norm(x, w, 1e-5), FAST.glu(x, u), apply_rope(h, cos, sin, "neox", 16),
                glu(x64, u64))
    pools = split_everything(monkeypatch)
    with threads.prefill_threads(threads.PREFILL_MIN_T):
        fast = (FAST.rms_norm(x, w, 1e-5), FAST.glu(x, u),
                FAST.rope(h, cos, sin, "neox", 16), FAST.glu(x64, u64))
    assert pools == [3, 3, 3, 3]                                # each call really split
    for a, b in zip(one_call, fast):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_float32_linear_by_row_blocks_is_blockwise_the_plain_product(monkeypatch):
    # matmul_t hands each worker a block of x's rows and the whole of w: each block is exactly
    # the plain product of those rows. Against one product of all rows the bits may differ (BLAS
    # picks its kernel by the matrix size, and with it the order of each dot's d-term sum), so
    # there: every order errs by <= gamma_d sum_j |x_j w_j| (Higham, Thm 3.1), twice between two.
    r = np.random.default_rng(1)
    x = r.standard_normal((45, 64)).astype(np.float32)
    w = r.standard_normal((48, 64)).astype(np.float32)
    b = r.standard_normal(48).astype(np.float32)
    plain = linear(x, w, b)
    pools = split_everything(monkeypatch)
    with threads.prefill_threads(threads.PREFILL_MIN_T):
        fast = FAST.linear(x, w, b)
        blocks = threads.row_blocks(45, 64, 48)
        per_block = [linear(x[a:c], w, b) for a, c in blocks]    # BLAS on one thread, as there
    assert pools == [3] and len(blocks) == 3
    for (a, c), y in zip(blocks, per_block):
        np.testing.assert_array_equal(fast[a:c], y)
    bound = 2 * gamma(64 + 1) * (np.abs(x) @ np.abs(w).T + np.abs(b))   # + 1: the bias add
    assert np.all(np.abs(fast - plain) <= bound)


# ----------------------------------------------------------------------------- attention


@st.composite
def selections(draw, tq=None):
    """q, k, v (with a cache's spare rows) and a random normalised Selection of one head kind:
    ranges, explicit indices with float32 log-weights, and pseudo-keys with their own values,
    keys at increasing positions with gaps or in a shuffled order; tq queries (default 1 to 12)."""
    seed = draw(st.integers(0, 2**31 - 1))
    r = np.random.default_rng(seed)
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([8, 16, 64]))
    tq = draw(st.integers(1, 12)) if tq is None else tq
    tk, n_extra = draw(st.integers(1, 90)), draw(st.integers(0, 4))
    kind = draw(st.sampled_from([SHARED, KV, Q]))
    n_heads = {SHARED: 1, KV: hkv, Q: hq}[kind]
    scale_x = draw(st.sampled_from([0.5, 1.0, 3.0]))
    q = (r.standard_normal((hq, tq, d)) * scale_x).astype(np.float32)
    k = (r.standard_normal((hkv, tk + 5, d)) * scale_x).astype(np.float32)   # 5 spare rows
    v = r.standard_normal((hkv, tk + 5, d)).astype(np.float32)
    k_pos = np.cumsum(r.integers(1, 3, tk))                               # gaps
    if draw(st.booleans()):
        r.shuffle(k_pos)                                                  # unsorted keys
    q_pos = np.sort(r.integers(0, k_pos.max() + 2, tq))
    R = n_heads * tq
    r_ptr, r_lo, r_hi, i_ptr, idx, logw = [0], [], [], [0], [], []
    for _ in range(R):
        a = r.integers(0, tk + 1)
        b = r.integers(a, tk + 1)
        if b > a:
            r_lo.append(a), r_hi.append(b)
        r_ptr.append(len(r_lo))
        outside = [j for j in range(tk) if not a <= j < b]
        pick = r.choice(outside, size=min(len(outside), r.integers(0, 12)), replace=False) \
            if outside else []
        pseudo = tk + r.choice(n_extra, size=r.integers(0, n_extra + 1), replace=False) \
            if n_extra else []
        row = sorted(list(pick) + list(pseudo))
        idx += row
        logw += list(r.uniform(-3, 0, len(row)))
        i_ptr.append(len(idx))
    sel = Selection.from_lists(i_ptr, np.array(idx, np.int64), tk, kind, n_heads, tq,
                               logw=np.array(logw, np.float32), r_ptr=r_ptr, r_lo=r_lo,
                               r_hi=r_hi)
    if n_extra:
        sel.extra_k = (r.standard_normal((hkv, n_extra, d)) * scale_x).astype(np.float32)
        sel.extra_v = r.standard_normal((hkv, n_extra, d)).astype(np.float32)
        sel.extra_pos = r.integers(0, k_pos.max() + 2, n_extra)
        sel.extra_lo = r.integers(0, tk, n_extra)                          # the keys it summarises
        sel.extra_hi = np.minimum(sel.extra_lo + r.integers(1, 9, n_extra), tk)
    return q, k, v, q_pos, k_pos, sel


def row_kernel_tol(q, k, v, sel, exp_u=2):
    """|fast row kernel - reference kernel| on out and lse, from float32 rounding.

    Scores: the reference sums q . k in float64 (exact products of float32 inputs; its error,
    ~d 2^-53, is negligible here); the fast kernel sums d float32 products in any order, scales
    and adds the log-weight in float32: |e| <= gamma_{d+2} (A + L), A = scale * d * max|q| *
    max|k| bounding scale * sum_i |q_i k_i| and L = max|logw|. A weight exp(s - m): the float32
    subtraction adds u |s - m| <= 2u (A + L) and the exp exp_u * u (libm's expf: 1 ulp, 2u; the
    decode kernel's _expf: 1.5 ulp, 3u), so each weight is off by a factor within exp(+-eps0),
    eps0 = e + 2u(A + L) + exp_u u. Within a chunk of CHUNK keys the float32
    sums of the weights and of the weighted values err by gamma_CHUNK relative to sum p and to
    sum p |v| (across chunks the sums are float64). The output is a convex combination of the
    values: relative weight errors within eps = e^eps0 - 1 move it by <= 2 eps / (1 - eps) max|v|,
    the chunk sums by <= 2 gamma_CHUNK / (1 - gamma_CHUNK) max|v|, the final cast by u max|v|.
    lse = m + log l: the scores' error eps0 and the normaliser's relative error gamma_CHUNK
    (log turns a relative error into an absolute one of the same size)."""
    d = q.shape[2]
    kmax = max(np.abs(k).max(), np.abs(sel.extra_k).max() if sel.n_extra else 0.0)
    vmax = max(np.abs(v).max(), np.abs(sel.extra_v).max() if sel.n_extra else 0.0)
    A = d * np.abs(q).max() * kmax / np.sqrt(d)
    L = np.abs(sel.logw).max() if sel.logw.size else 0.0
    eps0 = gamma(d + 2) * (A + L) + 2 * U * (A + L) + exp_u * U
    eps = np.expm1(eps0)
    gc = gamma(fast_attention.CHUNK)
    out_tol = (2 * eps / (1 - eps) + 2 * gc / (1 - gc) + U) * vmax + 1e-12
    return out_tol, eps0 + 2 * gc + 1e-12


@given(selections())
def test_fast_row_kernel_equals_reference_kernel_within_float32_bound(prob):
    q, k, v, q_pos, k_pos, sel = prob
    tk = len(k_pos)
    kw = dict(q_pos=q_pos, k_pos=k_pos, return_lse=True, return_stats=True, buffer=True)
    a, la, sa = attend(q, k, v, sel, kernel=partial(fast_attention.kernel, tiles=False,
                                                     decode=False), **kw)
    b, lb, sb = attend(q, k, v, sel, kernel=reference_kernel, **kw)
    np.testing.assert_array_equal(sa.n_attended, sb.n_attended)      # the same keys read
    out_tol, lse_tol = row_kernel_tol(q, k[:, :tk], v[:, :tk], sel.normalize())
    np.testing.assert_allclose(a, b, rtol=0, atol=out_tol)
    np.testing.assert_allclose(la, lb, rtol=0, atol=lse_tol)         # -inf rows: equal
    assert np.isfinite(lb).any() or not sb.n_attended.any()


@given(selections(tq=1), st.sampled_from([None, 1, 7, 32]))
def test_decode_kernel_equals_reference_kernel_within_float32_bound(prob, part):
    # one query: attend_decode scores each key once for the query heads sharing it; the row
    # kernel's error structure (float32 within CHUNK keys, float64 across) with _expf (3u).
    # Parts of `part` keys (None: the default, one part here) merge by log-sum-exp in float64,
    # which adds rounding of order 2^-52, far below the float32 terms; on threads or not, the
    # same bits
    q, k, v, q_pos, k_pos, sel = prob
    tk = len(k_pos)
    kw = dict(q_pos=q_pos, k_pos=k_pos, return_lse=True, return_stats=True, buffer=True)
    if part is None:
        a, la, sa = attend(q, k, v, sel, kernel=fast_attention.kernel, **kw)
    else:
        def split(parallel):
            return partial(lambda x, rows, scale, k_sorted: fast_attention.attend_decode(
                x, rows, scale, k_sorted, parallel, part))
        a, la, sa = attend(q, k, v, sel, kernel=split(False), **kw)
        c, lc = attend(q, k, v, sel, kernel=split(True), **kw)[:2]
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(la, lc)
    b, lb, sb = attend(q, k, v, sel, kernel=reference_kernel, **kw)
    np.testing.assert_array_equal(sa.n_attended, sb.n_attended)      # the same keys read
    out_tol, lse_tol = row_kernel_tol(q, k[:, :tk], v[:, :tk], sel.normalize(), exp_u=3)
    np.testing.assert_allclose(a, b, rtol=0, atol=out_tol)
    np.testing.assert_allclose(la, lb, rtol=0, atol=lse_tol)         # -inf rows: equal
    assert np.isfinite(lb).any() or not sb.n_attended.any()


def test_decode_kernel_is_what_one_query_runs(monkeypatch):
    calls = []
    real = fast_attention.attend_decode
    monkeypatch.setattr(fast_attention, "attend_decode",
                        lambda *a, **kw: calls.append(a[0].q.shape) or real(*a, **kw))
    r = np.random.default_rng(0)
    q = r.standard_normal((6, 2, 16)).astype(np.float32)
    k, v = r.standard_normal((2, 3, 40, 16)).astype(np.float32)
    attend(q[:, :1], k, v, kernel=fast_attention.kernel)                  # decode
    attend(q, k, v, kernel=fast_attention.kernel)                         # Tq = 2: not
    attend(q[:, :1], k, v, kernel=partial(fast_attention.kernel, decode=False))
    assert calls == [(6, 1, 16)]


@given(seed=st.integers(0, 2**31 - 1), tq=st.integers(2, 40), extra=st.integers(0, 30),
       d=st.sampled_from([32, 64]))
def test_tiles_equal_reference_kernel_within_float32_bound(seed, tq, extra, d):
    r = np.random.default_rng(seed)
    tk = tq + extra
    q = r.standard_normal((4, tq, d)).astype(np.float32)
    k, v = r.standard_normal((2, 2, tk, d)).astype(np.float32)
    kw = dict(return_lse=True, return_stats=True)
    a, la, sa = attend(q, k, v, Dense(), kernel=partial(fast_attention.kernel, tiles=True), **kw)
    b, lb, sb = attend(q, k, v, Dense(), kernel=reference_kernel, **kw)
    np.testing.assert_array_equal(sa.n_attended, sb.n_attended)
    # tiles_tol bounds the tiles against the exact (float64) softmax; the reference kernel is
    # float64 throughout but for its final cast to float32 (u max|v|)
    np.testing.assert_allclose(a, b, rtol=0, atol=tiles_tol(q, k, v, tk) + U * np.abs(v).max())
    # lse: the tiles' logit error, the exp and the float32 sum of tk terms (test_attention_tiles)
    e = (d + 3) * d * U * np.abs(q).max() * np.abs(k).max() / np.sqrt(d)
    np.testing.assert_allclose(la, lb, rtol=0, atol=e + (6 + tk) * U + 1e-12)


def test_attend_default_kernel_follows_the_switch():
    from minisparse.attention.kernel import default_kernel
    assert default_kernel() is (fast_attention.kernel if minisparse.fast.enabled()
                                else reference_kernel)
    assert PLAIN.attend.keywords["kernel"] is reference_kernel         # a plain model: always
    # a fast model's attend: one query to decode.attend (its own kernel and fallback the fast
    # kernel), a prefill chunk to prefill.attend (sparse prefill as tiles, then the fast kernel)
    import inspect
    import minisparse.fast as fast
    from minisparse.fast import decode, prefill
    assert FAST.attend is fast.attend
    assert inspect.signature(decode.attend).parameters["kernel"].default is fast_attention.kernel
    assert prefill.KERNEL is prefill.kernel


def test_attend_refuses_a_spec_string():
    x = np.ones((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="parse_attention_spec"):
        attend(x, x, x, "window=1")


@pytest.mark.parametrize("T", [1, 5, 300])
@pytest.mark.parametrize("split", [True, False], ids=["split", "one-call"])
@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_fast_rms_norm_is_rms_norm_within_one_ulp_of_its_scale(monkeypatch, T, split, scale):
    # Both sum the squares of the float32 row in float64 (each square exact), in different
    # orders: the sums differ by at most gamma_D (float64) relative, D 2^-53 = 6e-14 here, and
    # the float64 steps after (/ D, + eps, sqrt, 1 /) add a few 2^-53 each. Two float64 values so
    # close round to the same float32 scale s or to neighbours: |s' - s| <= 2^-23 s. Each output
    # is fl(fl(x s) w), within 2u + u^2 (u = 2^-24) of x s w; so the two outputs differ by at most
    # |x w| (|s' - s| + (2u + u^2)(s + s')) <= |x w| s (2^-23 + 4u) (1 + 2^-23) <= 3.01 2^-23 |x w| s.
    r = np.random.default_rng(T + int(split))
    D = 576
    x = (r.standard_normal((T, D)) * scale).astype(np.float32)
    w = r.standard_normal(D).astype(np.float32)
    if T > 1:
        x[1] = 0                                                   # a row of zeros: 1 / sqrt(eps)
    eps = 1e-5
    plain = rms_norm(x, w, eps)
    if split:
        split_everything(monkeypatch)
    with threads.prefill_threads(T):
        fast = FAST.rms_norm(x, w, eps)
        into = FAST.rms_norm(x, w, eps, out=np.empty_like(x))
    x64 = x.astype(np.float64)
    s = 1 / np.sqrt((x64 * x64).mean(1, keepdims=True) + eps)     # (T, 1)
    bound = 3.01 * 2.0 ** -23 * np.abs(x64 * w) * s
    for got in (fast, into):
        assert got.dtype == np.float32 and got.shape == x.shape
        assert np.all(np.abs(got.astype(np.float64) - plain) <= bound)


@pytest.mark.parametrize("split", [True, False], ids=["split", "one-call"])
def test_fast_glu_is_silu_times_u_within_its_derived_bound(monkeypatch, split):
    # fast_glu computes e = _expf(-|g|), then g / (1 + e) for g >= 0 and (g e) / (1 + e) for
    # g < 0, times u. With u = 2^-24: _expf is within 1.5 ulp (tests/test_attention_tiles.py),
    # and an ulp of y is <= 2u|y|, so e = E (1 + d), |d| <= 3u, E = exp(-|g|) <= 1. Then
    # 1 + e = (1 + E)(1 + E d / (1 + E)) with E / (1 + E) <= 1/2: <= 1.5u, and its rounding u;
    # g e: 3u and its rounding u (g < 0 only); the division u; the product with u: u. First
    # order 4.5u (g >= 0) or 8.5u (g < 0) relative to silu(g) u; 9u covers the second order.
    # Below -87 _expf returns 0 (exp < 1.7e-38 there), so g < -87 gives 0 where the true value
    # is |g| E / (1 + E) |u| <= 87 e^-87 |u| <= 1.5e-36 |u| (g e^g shrinks as g falls).
    # Where the result is subnormal, each rounding is absolute: <= 2^-149, four of them.
    r = np.random.default_rng(7 + int(split))
    g = (r.standard_normal((64, 200)) * r.choice([0.1, 3, 30], (64, 1))).astype(np.float32)
    g[0, :12] = [0, -0.0, 87, -87, 87.5, -87.5, -89, 89, 1e30, -1e30, 1e-30, -1e-30]
    g[1, :60] = np.linspace(-100, 100, 60)
    u = r.standard_normal(g.shape).astype(np.float32)
    u[2] = 1e-30                                                   # subnormal results
    if split:
        split_everything(monkeypatch)
    with threads.prefill_threads(g.shape[0]):
        fast = FAST.glu(g, u)
        into = FAST.glu(g, u, out=np.empty_like(g))
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    with np.errstate(over="ignore"):
        exact = g64 / (1 + np.exp(-g64)) * u64                     # float64: ~1e-16 relative
    bound = 9 * U * np.abs(exact) + 1.5e-36 * np.abs(u64) + 4 * 2.0**-149
    for got in (fast, into):
        assert got.dtype == np.float32 and got.shape == g.shape
        assert np.all(np.abs(got - exact) <= bound)
    # special values as silu(g) * u gives them: +inf * 1 = inf; -inf: -inf * 0 = NaN, as
    # NumPy's -inf / inf; NaN stays NaN
    g2 = np.array([[np.inf, -np.inf, np.nan, 5.0]], np.float32)
    u2 = np.ones_like(g2)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(FAST.glu(g2, u2), glu(g2, u2))


@pytest.mark.parametrize("style", ["interleaved", "neox"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "one-call"])
@pytest.mark.parametrize("transposed", [True, False], ids=["head-view", "contiguous"])
def test_prefill_rope_gives_apply_ropes_bits(monkeypatch, style, split, transposed):
    # The Numba pass does apply_rope's float32 products and differences in its order (no fused
    # multiply-add), row by row, so on a prefill's many positions, in one call or in row blocks
    # side by side, into a new array or out, the bits are the same; rope_dim < d leaves the tail.
    r = np.random.default_rng(int(split) + 2 * int(transposed))
    T, H, d, rope_dim = 100, 3, 16, 12
    x = r.standard_normal((T, H, d)).astype(np.float32).transpose(1, 0, 2) if transposed else \
        r.standard_normal((H, T, d)).astype(np.float32)                    # (H, T, d)
    cfg = type("C", (), {"rope_dim": rope_dim, "rope_base": 10000.0, "rope_scale": 1.0})
    cos, sin = rope_tables(np.arange(7, 7 + T), cfg)                         # (T, r/2)
    want = apply_rope(x, cos, sin, style, rope_dim)
    if split:
        split_everything(monkeypatch)
    with threads.prefill_threads(T):
        got = FAST.rope(x, cos, sin, style, rope_dim)
        into = FAST.rope(x, cos, sin, style, rope_dim, out=np.empty_like(x))
    for a in (got, into):
        assert np.array_equal(a.view(np.uint32), want.view(np.uint32))


# ----------------------------------------------------------------------------- quantised linear


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 3, 20])
def test_fast_quant_linear_equals_plain_dequantise_then_matmul(qtype, T, float_decode):
    # Both multiply the same float32 weights (the kernels' dequantisation is bit-exact,
    # test_quant_kernels) and sum n = in products in float32 in some order; every order errs by
    # <= gamma_k sum_j |t_j| with k = n + 36 roundings on the longest path (test_quant_kernels)
    # and t_j the terms summed: w_j x_j, or for the fused Q4_0 / Q4_1 kernels d q_j x_j and
    # m x_j apart, where |d q| + |m| <= 3 max|w| (Q4_0: m = -8d, q <= 15, |d| = max|w| / 8 of
    # its block; Q4_1: |d q| <= 15 d = max - min <= 2 max|w|, |m| = |min| <= max|w|). So both
    # are within gamma_k * 3 max|w| * sum_j |x_j| of the exact product, and of each other twice.
    r = np.random.default_rng(int(qtype) * 10 + T)
    w = r.standard_normal((40, 96)).astype(np.float32)
    W = QuantMatrix(quantize(w, qtype), w.shape, qtype)
    x = r.standard_normal((T, 96)).astype(np.float32)
    plain, fast = linear(x, W), FAST.linear(x, W)
    n = 96 + 36
    mag = 3 * np.abs(W.dequantize()).max() * np.abs(x).astype(np.float64).sum(1)[:, None]  # (T, 1)
    assert np.all(np.abs(fast - plain) <= 2 * gamma(n) * mag)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1, QT.F16], ids=lambda t: t.name)
def test_fast_embedding_lookup_gives_the_plain_bits(qtype):
    # dequantisation has no sums: the Numba rows and gguf's NumPy rows are the same numbers
    r = np.random.default_rng(int(qtype))
    w = r.standard_normal((50, 64)).astype(np.float32)
    W = QuantMatrix(quantize(w, qtype), w.shape, qtype)
    tokens = r.integers(0, 50, 17)
    np.testing.assert_array_equal(FAST.embed(W, tokens), PLAIN.embed(W, tokens))
    np.testing.assert_array_equal(FAST.embed(w, tokens), PLAIN.embed(w, tokens))
    with pytest.raises(IndexError, match="out of range"):
        FAST.embed(W, np.array([50]))


# ----------------------------------------------------------------------------- whole models


def models():
    yield PYDOC
    yield shared_fixture("stories260K.gguf")


def greedy(model, prompt, n):
    return "".join(model.generate(prompt, max_new_tokens=n, temperature=0))


@pytest.mark.parametrize("which", ["pydoc", "stories260K"])
def test_plain_and_fast_models_print_the_same_greedy_text(which, monkeypatch):
    path = PYDOC if which == "pydoc" else shared_fixture("stories260K.gguf")
    prompt = "def " if which == "pydoc" else "Once upon a time"
    fast = minisparse.load_model(path, fast=True)
    plain = minisparse.load_model(path, fast=False)
    assert fast.ops is FAST and plain.ops is PLAIN
    a, b = greedy(fast, prompt, 24), greedy(plain, prompt, 24)
    assert a and a == b
    # logits: both paths evaluate one function in float32 with the same weights and differ only
    # in the order of their sums (and the plain attention's float64 accumulators, which only
    # shrink its error). A sum's worst-case error does not depend on its order, so the fast
    # path's distance to the float64 truth has the size of the plain path's, e: the two differ by
    # <= 2e, and 2x more is allowed for the spread between orders (+1e-6 when e is 0). So the
    # fast path's products on float32 activations here (MINISPARSE_INT8=0): its default 8-bit
    # activations (llama.cpp's) are another function, bounded in test_q8_kernels / test_q8mm.
    from minisparse.fast import quant as fast_quant
    monkeypatch.setattr(fast_quant, "INT8_DECODE", False)
    import oracle.np_reference as np_reference
    ids = plain.tokenizer.encode(prompt + a)[:40]
    truth = np_reference.forward(path, ids)                           # (T, V) float64
    lp, lf = plain.forward(ids), fast.forward(ids)
    e = np.abs(lp - truth).max()
    assert np.abs(lf - truth).max() <= 2 * e + 1e-6
    assert np.abs(lf - lp).max() <= 4 * e + 1e-6
    assert np.abs(lp).max() > 100 * e                      # the logits are not noise themselves


@pytest.mark.parametrize("which", ["pydoc", "stories260K"])
def test_minisparse_fast_0_cli_prints_what_the_fast_path_prints(which):
    path = PYDOC if which == "pydoc" else shared_fixture("stories260K.gguf")

    def run(flag):
        env = dict(os.environ, MINISPARSE_FAST=flag, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-m", "minisparse", "generate", "-m", str(path),
                              "-p", "Once", "-n", "16", "--temp", "0"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout
    fast, plain = run("1"), run("0")
    assert fast.strip() and fast == plain


def test_minisparse_fast_rejects_a_value_other_than_0_or_1(monkeypatch):
    monkeypatch.setenv("MINISPARSE_FAST", "no")
    with pytest.raises(ValueError, match="MINISPARSE_FAST='no'"):
        minisparse.fast.enabled()
    with pytest.raises(ValueError, match="MINISPARSE_FAST"):
        minisparse.load_model(PYDOC)


def test_model_rope_is_apply_rope_at_the_given_positions():
    model = minisparse.load_model(shared_fixture("stories260K.gguf"))
    cfg = model.config
    x = np.random.default_rng(3).standard_normal((cfg.n_kv_heads, 5, cfg.head_dim)).astype(np.float32)
    pos = np.array([0, 3, 4, 9, 10])
    cos, sin = rope_tables(pos, cfg, model.weights.get("rope_freqs"))
    np.testing.assert_array_equal(model.rope(x, pos),
                                  apply_rope(x, cos, sin, cfg.rope_style, cfg.rope_dim))


def test_generate_forwards_stats_to_every_forward():
    model = minisparse.load_model(shared_fixture("stories260K.gguf"))
    stats = []
    text = "".join(model.generate([1, 400], max_new_tokens=3, temperature=0, stop_at_eos=False,
                                  stats=stats))
    L = model.config.n_layers
    # the prompt, then one step per new token (each token enters the cache)
    assert text and len(stats) == 4 * L
    assert [s["layer"] for s in stats[:L]] == list(range(L))
    assert stats[0]["n_attended"].shape[1] == 2 and stats[-1]["n_attended"].shape[1] == 1


@given(seed=st.integers(0, 2**31 - 1), spec=st.sampled_from(
    ["dense", "sinks=4,window=8", "window=0", "sinks=3", "sinks=40,window=2",
     "sinks=2,window=5,window=30", "topk=4", "sinks=4,topk=3"]),
    tk=st.integers(1, 70), spare=st.integers(0, 3), gaps=st.booleans())
def test_fast_decode_of_a_position_pattern_gives_the_bits_of_attend(seed, spec, tk, spare, gaps):
    # decode.attend hands dense / sinks / window (and unions) to attend_decode as ranges it
    # computes itself; the same merged ranges read by the same kernel: equal to the bit, with
    # the same stats (top-k goes through attend itself: also equal)
    from minisparse.fast import decode
    from minisparse.spec import parse_attention_spec
    r = np.random.default_rng(seed)
    q = r.standard_normal((6, 1, 16)).astype(np.float32)
    k, v = r.standard_normal((2, 2, tk + spare, 16)).astype(np.float32)
    k_pos = np.cumsum(r.integers(1, 3, tk)) if gaps else np.arange(tk)
    q_pos = np.array([k_pos[-1] + r.integers(0, 2)])
    sel = parse_attention_spec(spec)
    kw = dict(q_pos=q_pos, k_pos=k_pos, buffer=True, return_stats=True)
    a, sa = decode.attend(q, k, v, sel, **kw)
    b, sb = attend(q, k, v, sel, kernel=fast_attention.kernel, **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa.n_attended, sb.n_attended)
    np.testing.assert_array_equal(sa.n_causal, sb.n_causal)


def test_position_ranges_cover_the_patterns_and_refuse_the_rest():
    from minisparse.attention import Sinks, TopK, Window
    from minisparse.fast.decode import position_ranges
    kp = np.arange(0, 20, 2)                                       # positions 0, 2, .., 18
    assert position_ranges(Dense(), 18, kp) == [(0, 10)]
    assert position_ranges(Window(4), 18, kp) == [(7, 10)]         # positions 14 .. 18
    assert position_ranges(Sinks(3) | Window(4), 18, kp) == [(0, 2), (7, 10)]
    assert position_ranges(Sinks(20) | Window(4), 18, kp) == [(0, 10)]   # fused
    assert position_ranges(Sinks(0), 18, kp) == []
    assert position_ranges(TopK(2), 18, kp) is None
    assert position_ranges(Sinks(3) | TopK(2), 18, kp) is None


@given(seed=st.integers(0, 2**31 - 1), spec=st.sampled_from(
    ["dense", "sinks=4,window=8", "window=0", "sinks=3", "sinks=40,window=2",
     "sinks=2,window=5,window=30", "window=3,sinks=1,window=12"]),
    tk=st.integers(0, 70), gaps=st.booleans())
def test_compiled_step_ranges_are_position_ranges(seed, spec, tk, gaps):
    # the compiled decode step computes its ranges from position_codes; they must be the
    # ranges position_ranges gives (the same list, in the same order)
    from minisparse.fast.decode import _step_ranges, position_codes, position_ranges
    from minisparse.spec import parse_attention_spec
    r = np.random.default_rng(seed)
    k_pos = np.cumsum(r.integers(1, 3, tk)) if gaps else np.arange(tk)
    qp = int(k_pos[-1] + r.integers(0, 2)) if tk else int(r.integers(0, 5))
    sel = parse_attention_spec(spec)
    lo, hi = _step_ranges(position_codes(sel), qp, k_pos.astype(np.int64))
    assert list(zip(lo.tolist(), hi.tolist())) == position_ranges(sel, qp, k_pos)
    assert position_codes(parse_attention_spec("topk=4")) is None


def test_a_window_decode_step_takes_the_compiled_step(monkeypatch):
    # the speed of a sinks + window decode rests on this path: a layer's step must not fall
    # back to attend (a Selection built in NumPy) for a cache buffer with spare rows
    from minisparse.fast import decode
    from minisparse.spec import parse_attention_spec
    calls = []
    real = decode._position_step
    monkeypatch.setattr(decode, "_position_step", lambda *a: calls.append(1) or real(*a))
    r = np.random.default_rng(0)
    q = r.standard_normal((6, 1, 16)).astype(np.float32)
    k, v = r.standard_normal((2, 2, 50, 16)).astype(np.float32)      # 40 keys held, 10 spare
    kw = dict(q_pos=np.array([39]), k_pos=np.arange(40), buffer=True, return_stats=True)
    sel = parse_attention_spec("sinks=4,window=8")
    decode.attend(q, k, v, sel.at_layer(0, {}), **kw)
    decode.attend(q, k, v, None, **kw)                                 # dense
    assert calls == [1, 1]
    decode.attend(q, k, v, parse_attention_spec("topk=4"), **kw)
    assert calls == [1, 1]
