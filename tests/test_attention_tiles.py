"""attend_tiles (dense causal attention as BLAS matrix products, by query tiles) against the
float64 reference and against the fast row kernel, and that the fast path's kernel really takes
it for Dense.

The row kernels stay the path for every other selection; the tiles are the same math in a
different float32 order, so every comparison below carries a tolerance derived from that order.
"""
import tracemalloc
from functools import partial

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minisparse.fast.attention as kernel
from minisparse.attention import (Dense, Landmarks, Sinks, Window, attend, dense_reference,
                                  store_kv)
from minisparse.fast import threads
from minisparse.fast.attention import TILE_MIN_PAIRS, _exp_rows, _softmax_rows, attend_tiles
from minisparse.spec import parse_attention_spec

from minisparse.testing import kernel_tol

TILES = partial(kernel.kernel, tiles=True)     # the fast path's kernels, each forced
ROWS = partial(kernel.kernel, tiles=False)

U = 2.0**-24          # float32 unit roundoff
C_EXP = 6             # the tiles' float32 exp (kernel._expf): <= 1.5 ulp asserted below (1.02
                      # measured; an ulp is <= 2u relative), so <= 3u relative; 6u budgeted
EXP_ULP = 1.5


def logit_err(q, k):
    # One scaled logit: q_i * scale rounded (exact for d = 16, 64; 1/sqrt(32) costs one more u,
    # within the + 3), a d-term float32 dot in sgemm's or the register blocks' order and the max subtraction (|s - m| <= 2 max|s|):
    # Higham's gamma_n bound gives <= (d + 3) * u * sum_i |q_i k_i| * scale, with
    # sum_i |q_i k_i| <= d * max|q| * max|k|. The same e as kernel_tol's.
    d = q.shape[-1]
    return (d + 3) * d * U * np.abs(q).max() * np.abs(k).max() / np.sqrt(d)


def tiles_tol(q, k, v, n_keys):
    # Per-element |attend_tiles - float64 reference| over rows that read at most n_keys keys:
    # - logit error e (logit_err) scales every softmax weight by <= e^(2e) after renormalising,
    #   so the output, a convex combination of the v_j, moves by <= (e^(2e) - 1) * max|v|;
    # - exp: relative error <= C_EXP * u per weight -> <= 2 * C_EXP * u * max|v| after
    #   renormalising;
    # - the numerator sum_j p_j v_j (sgemm) and the normaliser l = sum_j p_j (NumPy's row sum)
    #   are float32 sums of n_keys terms in any order: gamma_n = n * u relative to
    #   sum_j p_j |v_j| <= l * max|v| and to l, so <= 2 * n_keys * u * max|v| on the ratio;
    # - the division: u * max|v|.
    # Unlike the row kernel (float32 within CHUNK keys, float64 across), nothing here folds
    # into float64, so the sum term grows with n_keys (the worst case; in practice ~sqrt(n)).
    e = logit_err(q, k)
    return (np.expm1(2 * e) + (2 * n_keys + 2 * C_EXP + 1) * U) * np.abs(v).max() + 1e-12


def lse_tol(q, k, n_keys):
    # lse = m + log(l): logits off by <= e move the log-sum-exp by <= e; l carries the exp and
    # summation errors, (C_EXP + n_keys) * u relative, which log turns into an absolute error
    # of the same size; the float64 log and the exact float32 -> float64 cast of m add ~1e-16.
    return logit_err(q, k) + (C_EXP + n_keys) * U + 1e-12


def row_lse_tol(q, k):
    # the row kernel's lse: the same logit error; exp (2u) and float32 chunk sums of CHUNK keys
    # folded into float64: (CHUNK + 2) * u relative on the normaliser
    return logit_err(q, k) + (kernel.CHUNK + 2) * U + 1e-12


@st.composite
def prefill_problems(draw, widths=(16, 32, 64)):
    """A chunk of Tq queries appended to a cache of Tk keys (q_pos = the last Tq key positions),
    GQA groups G = 1, 2, 3, head widths 32 and 64 (attend_blocks' register blocks) and 16 (the
    BLAS tiles), positions starting anywhere, with gaps (a
    bounded cache keeps keys at their original positions) or without."""
    seed = draw(st.integers(0, 2**31 - 1))
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from(widths))
    tk = draw(st.integers(1, 160))
    tq = draw(st.integers(1, tk))
    gapped = draw(st.booleans())
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    steps = r.integers(1, 4, tk) if gapped else np.ones(tk, np.int64)
    k_pos = np.cumsum(steps).astype(np.int64) + draw(st.integers(-1, 5))    # (Tk,) increasing
    return f(hkv * g, tq, d), f(hkv, tk, d), f(hkv, tk, d), k_pos[tk - tq:].copy(), k_pos


@given(prefill_problems(), st.sampled_from([7, 16, 64]))
def test_tiles_equal_float64_reference_within_derived_bound(prob, block):
    q, k, v, q_pos, k_pos = prob
    out, lse, n_att = attend_tiles(q, k, v, q_pos, k_pos, 1 / np.sqrt(q.shape[2]), block=block)
    ref, ref_lse = dense_reference(q, k, v, q_pos, k_pos, return_lse=True)
    n_keys = k.shape[1]
    np.testing.assert_allclose(out, ref, rtol=0, atol=tiles_tol(q, k, v, n_keys))
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=lse_tol(q, k, n_keys))
    assert out.dtype == np.float32 and lse.dtype == np.float64
    assert (n_att == (k_pos[None, None, :] <= q_pos[None, :, None]).sum(-1)).all()


@given(prefill_problems(), st.sampled_from([7, 16]), st.sampled_from([2, 3]))
def test_tiles_side_by_side_equal_reference_within_the_same_bound(prob, block, workers):
    # tiles computed on a thread pool (BLAS limited to one thread meanwhile) write disjoint rows:
    # the same arithmetic per tile, so the same bound holds, and no tile may be lost or repeated
    q, k, v, q_pos, k_pos = prob
    out, lse, n_att = attend_tiles(q, k, v, q_pos, k_pos, 1 / np.sqrt(q.shape[2]), block=block,
                                   workers=workers)
    ref, ref_lse = dense_reference(q, k, v, q_pos, k_pos, return_lse=True)
    n_keys = k.shape[1]
    np.testing.assert_allclose(out, ref, rtol=0, atol=tiles_tol(q, k, v, n_keys))
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=lse_tol(q, k, n_keys))
    assert (n_att == (k_pos[None, None, :] <= q_pos[None, :, None]).sum(-1)).all()


@given(prefill_problems(widths=(32, 64)), st.sampled_from([1, 7, 12, 64]), st.sampled_from([1, 2]))
def test_register_blocks_give_the_same_bits_however_the_queries_are_split(prob, item, workers):
    # each row's scores, softmax and P V sums run over its own keys in one order, whichever
    # register block (item, workers) holds it: a block's extra keys past a row's last enter
    # its P V sum as exact zeros (0 * v = 0 for finite v), so the bits cannot move
    q, k, v, q_pos, k_pos = prob
    n_vis = np.searchsorted(k_pos, q_pos, side="right")
    out, lse = kernel.attend_blocks(q, k, v, n_vis, 0.125)
    split, split_lse = kernel.attend_blocks(q, k, v, n_vis, 0.125, item=item, workers=workers)
    np.testing.assert_array_equal(split, out)
    np.testing.assert_array_equal(split_lse, lse)
    ref, ref_lse = dense_reference(q, k, v, q_pos, k_pos, scale=0.125, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tiles_tol(q, k, v, k.shape[1]))


def test_tiles_run_side_by_side_only_inside_a_long_prefill(monkeypatch):
    # attend_tiles' default (workers=None) uses the pool inside threads.prefill_threads, where
    # BLAS is held to one thread; outside it, one tile at a time on BLAS's own threads
    pools = []
    real = threads._pool
    monkeypatch.setattr(threads, "_pool", lambda n: pools.append(n) or real(n))
    monkeypatch.setattr(threads.numba, "get_num_threads", lambda: 2)
    r = np.random.default_rng(0)
    T = 300
    q, kv = r.standard_normal((2, T, 32)).astype(np.float32), r.standard_normal((1, T, 32)).astype(np.float32)
    alone = attend_tiles(q, kv, kv, np.arange(T), np.arange(T), 0.125, block=16)[0]
    assert pools == []
    with threads.prefill_threads(threads.PREFILL_MIN_T):
        assert threads.active()
        split = attend_tiles(q, kv, kv, np.arange(T), np.arange(T), 0.125, block=16)[0]
    assert pools and not threads.active()
    # the same tiles and the same element-wise passes; OpenBLAS's threads split a product's rows
    # and columns, never one dot product's terms, so one or two BLAS threads give the same bits
    np.testing.assert_array_equal(split, alone)


@given(prefill_problems())
def test_tiles_equal_row_kernel_out_lse_and_n_attended(prob):
    q, k, v, q_pos, k_pos = prob
    kw = dict(q_pos=q_pos, k_pos=k_pos, return_lse=True, return_stats=True)
    a, la, sa = attend(q, k, v, Dense(), kernel=TILES, **kw)
    b, lb, sb = attend(q, k, v, Dense(), kernel=ROWS, **kw)
    # both within their bounds of the float64 reference, so within the sum of the two bounds
    n_keys = k.shape[1]
    np.testing.assert_allclose(a, b, rtol=0, atol=tiles_tol(q, k, v, n_keys) + kernel_tol(q, k, v))
    np.testing.assert_allclose(la, lb, rtol=0, atol=lse_tol(q, k, n_keys) + row_lse_tol(q, k))
    assert (sa.n_attended == sb.n_attended).all()                 # the same visible keys
    assert (sa.n_causal == sb.n_causal).all()


@given(prefill_problems(), st.integers(0, 2**31 - 1))
def test_tiles_with_keys_out_of_position_order_equal_reference(prob, seed):
    # attend accepts any k_pos (the caches hand keys over in position order, but nothing in the
    # interface demands it): the tiles then score all Tk keys and mask by position
    q, k, v, q_pos, k_pos = prob
    perm = np.random.default_rng(seed).permutation(k.shape[1])
    k, v, k_pos = k[:, perm].copy(), v[:, perm].copy(), k_pos[perm].copy()
    out, lse = attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, return_lse=True, kernel=TILES)
    ref, ref_lse = dense_reference(q, k, v, q_pos, k_pos, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tiles_tol(q, k, v, k.shape[1]))
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=lse_tol(q, k, k.shape[1]))


@given(prefill_problems(), st.data())
def test_tiled_output_at_i_unchanged_when_later_keys_change(prob, data):
    q, k, v, q_pos, k_pos = prob
    i = data.draw(st.integers(0, q.shape[1] - 1))
    later = k_pos > q_pos[i]                                     # keys query i must not see
    k2, v2 = k.copy(), v.copy()
    k2[:, later] = 100.0 * np.random.default_rng(i).standard_normal(k2[:, later].shape)
    v2[:, later] = -7.0
    a = attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, kernel=TILES)
    b = attend(q, k2, v2, Dense(), q_pos=q_pos, k_pos=k_pos, kernel=TILES)
    # exact: an invisible key is scored -inf whatever its value, so its weight is exactly 0 and
    # adds exactly 0 (0 * v_j) to the row's sums, which read the same columns in the same order
    np.testing.assert_array_equal(a[:, i], b[:, i])


@pytest.mark.parametrize("sorted_keys", [True, False])
def test_rows_without_visible_keys_give_zero_and_minus_inf_as_the_row_kernel(sorted_keys):
    # keys at positions 10..49; queries at 0..39, so queries 0..9 see no key at all
    r = np.random.default_rng(3)
    q = r.standard_normal((4, 40, 32)).astype(np.float32)
    k, v = r.standard_normal((2, 2, 40, 32)).astype(np.float32)
    k_pos, q_pos = np.arange(10, 50), np.arange(40)
    if not sorted_keys:
        perm = r.permutation(40)
        k, v, k_pos = k[:, perm], v[:, perm], k_pos[perm]
    kw = dict(q_pos=q_pos, k_pos=k_pos, return_lse=True, return_stats=True)
    a, la, sa = attend(q, k, v, Dense(), kernel=TILES, **kw)
    b, lb, sb = attend(q, k, v, Dense(), kernel=ROWS, **kw)
    assert (a[:, :10] == 0).all() and (la[:, :10] == -np.inf).all()   # exactly, as the rows
    assert (b[:, :10] == 0).all() and (lb[:, :10] == -np.inf).all()
    assert (sa.n_attended[:, :10] == 0).all() and (sa.n_attended == sb.n_attended).all()
    assert np.isfinite(a).all() and np.isfinite(la[:, 10:]).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=tiles_tol(q, k, v, 40) + kernel_tol(q, k, v))


@given(prefill_problems(), st.sampled_from([1e4, -1e4]))
def test_extreme_logits_give_no_nan_in_tiles(prob, big):
    q, k, v, q_pos, k_pos = prob
    q = q / np.maximum(np.abs(q).max(), 1e-6) * np.float32(np.sqrt(abs(big)))
    k = k / np.maximum(np.abs(k).max(), 1e-6) * np.float32(np.sqrt(abs(big)) * np.sign(big))
    out, lse = attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, return_lse=True, kernel=TILES)
    assert np.isfinite(out).all() and np.isfinite(lse).all()     # every query sees a key here
    # any weights give a convex combination of the values, up to the exp, sum and division
    # rounding of tiles_tol (relative (2 * Tk + 2 * C_EXP + 1) * u; the logit term does not apply)
    bound = np.abs(v).max() * (1 + (2 * k.shape[1] + 2 * C_EXP + 1) * U)
    assert (np.abs(out) <= bound).all()


@given(prefill_problems())
def test_decode_step_equals_tiled_prefill_row_within_bound(prob):
    # a prefill of many queries runs the tiles, a decode step (Tq = 1) attend_decode:
    # the same keys, so the rows differ by at most the two paths' bounds added
    q, k, v, q_pos, k_pos = prob
    pre, lse = attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, return_lse=True, kernel=TILES)
    tq, tk = q.shape[1], k.shape[1]
    for i in sorted({0, tq // 2, tq - 1}):
        n = tk - tq + i + 1                                      # keys up to query i's position
        dec, dl = attend(q[:, i:i + 1], k[:, :n], v[:, :n], Dense(), q_pos=q_pos[i:i + 1],
                         k_pos=k_pos[:n], return_lse=True)
        np.testing.assert_allclose(dec[:, 0], pre[:, i], rtol=0,
                                   atol=tiles_tol(q, k, v, n) + kernel_tol(q, k, v))
        np.testing.assert_allclose(dl[:, 0], lse[:, i], rtol=0,
                                   atol=lse_tol(q, k, n) + row_lse_tol(q, k))


def test_float16_cache_buffer_with_spare_rows_takes_tiles_and_matches_rows():
    # the model hands attend its cache's whole buffers (buffer=True), possibly float16
    r = np.random.default_rng(5)
    q = r.standard_normal((6, 48, 64)).astype(np.float32)
    kb = store_kv(r.standard_normal((2, 100, 64)))                    # (Hkv, capacity, d) f16
    vb = store_kv(r.standard_normal((2, 100, 64)))
    k_pos = np.arange(70)                                              # 70 keys held
    kw = dict(q_pos=k_pos[-48:], k_pos=k_pos, buffer=True, return_lse=True)
    a, la = attend(q, kb, vb, Dense(), kernel=kernel.kernel, **kw)     # Tq = 48: the tiles
    b, lb = attend(q, kb, vb, Dense(), kernel=ROWS, **kw)
    k32, v32 = kb[:, :70].astype(np.float32), vb[:, :70].astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=0,
                               atol=tiles_tol(q, k32, v32, 70) + kernel_tol(q, k32, v32))
    np.testing.assert_allclose(la, lb, rtol=0, atol=lse_tol(q, k32, 70) + row_lse_tol(q, k32))


def test_attend_takes_the_tile_path_exactly_when_it_applies(monkeypatch):
    calls = []
    real = kernel.attend_tiles

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(kernel, "attend_tiles", spy)
    r = np.random.default_rng(0)
    tk = 64
    q = r.standard_normal((4, tk, 32)).astype(np.float32)
    k, v = r.standard_normal((2, 2, tk, 32)).astype(np.float32)

    def path(sel, tq, n_keys=tk, tiles=None):
        calls.clear()
        out = attend(q[:, n_keys - tq:n_keys], k[:, :n_keys], v[:, :n_keys], sel,
                     kernel=partial(kernel.kernel, tiles=tiles))
        return ("tiles" if calls else "rows"), out

    big = TILE_MIN_PAIRS // tk                                # Tq * Tk at the threshold
    assert path(Dense(), big)[0] == "tiles"
    assert path(Dense(), big - 1)[0] == "rows"                          # below the threshold
    assert path(Dense(), 32, n_keys=32)[0] == "tiles"                   # 32 x 32 = 1024
    assert path(Dense(), 31, n_keys=31)[0] == "rows"
    assert path(None, tk)[0] == "tiles"                                 # None means Dense
    assert path(parse_attention_spec("dense"), tk)[0] == "tiles"       # specs are parsed by callers
    assert path(Sinks(10**6), tk)[0] == "tiles"       # its Selection is "every key": the same
    assert path(Dense(), 1)[0] == "rows"                                # decode: not tiles
    assert path(Dense(), tk, tiles=False)[0] == "rows"                  # the switch
    assert path(Dense(), 1, tiles=True)[0] == "tiles"
    assert path(Window(4), tk)[0] == "rows"
    assert path(Window(4) | Landmarks(8), tk)[0] == "rows"              # pseudo-keys
    with pytest.raises(ValueError, match="tiles=True"):
        path(Window(4), tk, tiles=True)
    # the automatic choice returns exactly what attend_tiles returns (not vacuous)
    _, auto = path(Dense(), tk)
    direct = real(q, k, v, np.arange(tk), np.arange(tk), 1 / np.sqrt(32))[0]
    np.testing.assert_array_equal(auto, direct)


def test_tiles_memory_is_per_tile_not_the_full_score_matrix():
    # Hq = 8 heads at Tq = Tk = 1024: the (Hq, Tq, Tk) float32 scores would take 32 MiB; one
    # tile's scores take G * B * Tk * 4 = TILE_ROWS * 1024 * 4 = 1 MiB; q, k, v, out 2 MiB each
    r = np.random.default_rng(1)
    q, k, v = r.standard_normal((3, 8, 1024, 64)).astype(np.float32)
    tracemalloc.start()
    attend_tiles(q, k, v, np.arange(1024), np.arange(1024), 0.125)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= 8 * 2**20, peak / 2**20                  # out + lse + per-tile work, not 32 MiB


def exp_rows(s, m):
    """(exp(s - m) by the tiles' kernel, row sums) for s (R, S), m (R,) float32."""
    s, l = np.array(s, np.float32), np.empty(len(m), np.float32)
    _exp_rows(s, np.asarray(m, np.float32), l)
    return s, l


def ulps(y, x):
    # |y - exp(x)| in units in the last place of float32 exp(x), exp taken in float64
    ref = np.exp(x.astype(np.float64))
    return np.abs(y - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)


def test_expf_within_one_and_a_half_ulp_on_its_whole_range():
    # every 2^20th-spaced point of [-87, 0] plus random points dense near 0, where softmax
    # weights are large: the error C_EXP budgets (1.02 ulp measured over 2^24 points)
    r = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87, 0, 2**20, dtype=np.float32),
                        -np.abs(r.standard_normal(2**18)).astype(np.float32),
                        -r.uniform(0, 1e-3, 2**12).astype(np.float32)])
    y, _ = exp_rows(x[None, :], [0.0])
    assert ulps(y[0], x).max() <= EXP_ULP


def test_expf_special_values():
    x = np.array([0.0, -0.0, -1e-30, -87.0, -87.5, -100.0, -3e38, -np.inf], np.float32)
    y, l = exp_rows(x[None, :], [0.0])
    assert y[0, 0] == 1.0 and y[0, 1] == 1.0 and y[0, 2] == 1.0        # exp(0) exactly
    assert ulps(y[0, 3:4], x[3:4]).max() <= EXP_ULP                     # the last normal input
    assert (y[0, 4:] == 0).all()          # below -87 (true value < 1.7e-38) and -inf: exactly 0
    y, l = exp_rows(np.array([[0.0, np.nan, -1.0]], np.float32), [0.0])
    assert np.isnan(y[0, 1]) and np.isnan(l[0]) and y[0, 0] == 1.0      # NaN is not hidden


@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 300))
def test_exp_rows_equal_float64_softmax_numerators_and_sums(seed, R, S):
    # S over any residue mod 16 (the kernel's lanes and its tail), hidden (-inf) entries,
    # and a row that sees nothing (all -inf, m = 0 as attend_tiles sets it)
    r = np.random.default_rng(seed)
    s = (r.standard_normal((R, S)) * r.choice([1, 10, 100])).astype(np.float32)
    s[r.random((R, S)) < 0.3] = -np.inf
    if R > 1:
        s[R - 1] = -np.inf
    m = s.max(axis=1)
    m[m == -np.inf] = 0.0
    e, l = exp_rows(s, m)
    x = s - m[:, None]                        # exact or -inf: float32 minus its row's max
    kept = x >= -87                           # below, exp < 1.7e-38 and the kernel gives 0
    assert (ulps(e[kept], x[kept]) <= EXP_ULP).all()
    assert (e[~kept] == 0).all()
    # l: a float32 sum of S terms each within EXP_ULP ulp (<= 2 * EXP_ULP * u relative) or
    # flushed from below 1.7e-38 to 0: |l - sum exp| <= (S + 2 * EXP_ULP) * u * sum exp
    # (gamma_S for the sum in any order) + S * 1.7e-38
    ref = np.exp(x.astype(np.float64)).sum(axis=1)
    assert (np.abs(l - ref) <= (S + 2 * EXP_ULP) * U * ref + S * 1.7e-38).all()


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 6), st.integers(1, 300))
def test_softmax_rows_mask_max_exp_and_sum_as_numpy_and_exp_rows_would(seed, G, b, S):
    # the sorted-keys tiles' one pass: row h*b + t sees keys [0, n_vis[t]) (any count 0..S, so
    # every residue mod 16 and rows that see nothing), -inf scores among them too (a score can
    # be -inf only from infinite inputs, but the pass must not treat it as hidden by accident)
    r = np.random.default_rng(seed)
    s = (r.standard_normal((G * b, S)) * r.choice([1, 10, 100])).astype(np.float32)
    s[r.random(s.shape) < 0.05] = -np.inf
    n_vis = r.integers(0, S + 1, b)
    n_vis[0] = S if b > 1 else n_vis[0]
    rows_n = np.tile(n_vis, G)                                    # (G*b,) each row's visible count
    vis = np.arange(S)[None, :] < rows_n[:, None]                 # (G*b, S)
    m_np = np.where(vis, s, -np.inf).max(axis=1)                  # what the masked NumPy max gives
    m_np[m_np == -np.inf] = 0.0
    e, m, l = s.copy(), np.empty(G * b, np.float32), np.empty(G * b, np.float32)
    _softmax_rows(e, n_vis, m, l)
    np.testing.assert_array_equal(m, m_np)                        # a max is exact in any order
    assert (e[~vis] == 0).all()                                   # hidden keys: weight exactly 0
    x = np.where(vis, s - m[:, None], -np.inf)                    # exact or -inf
    kept = x >= -87                                               # below: _expf gives exactly 0
    assert (ulps(e[kept], x[kept]) <= EXP_ULP).all()
    assert (e[vis & ~kept] == 0).all()
    # l: exp_rows' bound (a float32 sum in another order of the same terms), gamma_S
    ref = np.exp(x.astype(np.float64)).sum(axis=1)
    assert (np.abs(l - ref) <= (S + 2 * EXP_ULP) * U * ref + S * 1.7e-38).all()
    # and it is what _exp_rows gives after NumPy's masking and max, but for the sum's order
    s2 = np.where(vis, s, -np.inf).astype(np.float32)
    l2 = np.empty_like(l)
    _exp_rows(s2, m_np, l2)
    np.testing.assert_array_equal(e, s2)
    np.testing.assert_allclose(l, l2, rtol=2 * S * U, atol=0)


def test_softmax_rows_nan_score_makes_its_row_nan():
    # NaN (from NaN inputs) must not be hidden by the max: NumPy's max gives NaN there, which
    # the old path's exp turned into a NaN row; here the exp of the NaN itself does it
    s = np.array([[0.0, np.nan, -1.0, 2.0], [0.0, 1.0, np.nan, 3.0]], np.float32)
    m, l = np.empty(2, np.float32), np.empty(2, np.float32)
    _softmax_rows(s, np.array([4, 2]), m, l)
    assert np.isnan(l[0]) and np.isnan(s[0, 1])
    assert np.isfinite(l[1]) and (s[1, 2:] == 0).all() and m[1] == 1.0


def test_tiles_nan_input_gives_nan_rows_not_minus_inf():
    # a NaN score must show in out and lse (as NumPy's division and log showed it), not pass
    # for a row without keys (lse -inf)
    r = np.random.default_rng(2)
    q = r.standard_normal((2, 40, 32)).astype(np.float32)
    k, v = r.standard_normal((2, 1, 40, 32)).astype(np.float32)
    q[0, 5, 3] = np.nan
    out, lse, _ = attend_tiles(q, k, v, np.arange(40), np.arange(40), 0.125, block=16)
    assert np.isnan(out[0, 5]).all() and np.isnan(lse[0, 5])
    assert np.isfinite(out[1]).all() and np.isfinite(lse[1]).all() and np.isfinite(lse[0, :5]).all()


def test_softmax_rows_exp_within_one_and_a_half_ulp_on_its_whole_range_and_special_values():
    # _softmax_rows' 16-lane exp (_exp16) on the points test_expf_... checks, in one row whose
    # max is 0 (so s - m = s exactly); then special values, each at a lane position and in the
    # scalar tail (a row of 16 + 8 entries)
    r = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87, 0, 2**20, dtype=np.float32),
                        -np.abs(r.standard_normal(2**18)).astype(np.float32),
                        -r.uniform(0, 1e-3, 2**12).astype(np.float32)])
    x[-1] = 0.0
    s, m, l = x[None, :].copy(), np.empty(1, np.float32), np.empty(1, np.float32)
    _softmax_rows(s, np.array([x.size]), m, l)
    assert m[0] == 0.0 and ulps(s[0], x).max() <= EXP_ULP
    special = np.array([0.0, -0.0, -1e-30, -87.0, -87.5, -100.0, -3e38, -np.inf], np.float32)
    row = np.concatenate([special, special, special])[None, :]          # lanes 0-15, tail 16-23
    s = row.copy()
    _softmax_rows(s, np.array([24]), m, l)
    for part in (s[0, :8], s[0, 8:16], s[0, 16:]):
        assert part[0] == 1.0 and part[1] == 1.0 and part[2] == 1.0      # exp(0) exactly
        assert ulps(part[3:4], special[3:4]).max() <= EXP_ULP            # the last normal input
        assert (part[4:] == 0).all()                                     # below -87 and -inf: 0
