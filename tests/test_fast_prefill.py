"""Sparse prefill as masked tiles (minisparse/fast/prefill.py) against the reference kernel: exact
top-k fused into the tiles reads the keys TopK selects and computes what the reference kernel
computes on them; key-range selections as banded tiles likewise; and the fast path takes these
tiles exactly when it should.

The tiles are attend_tiles' arithmetic (tests/test_attention_tiles.py derives its bound) over
the keys the mask leaves: a hidden score is -inf, its weight exactly 0, and adding an exact 0
to a float32 sum adds no rounding, so the bound holds with n_keys = the keys a row reads.
"""
from functools import partial

import numpy as np
import pytest
from hypothesis import given, strategies as st
from numba import njit

from minisparse.attention import attend
from minisparse.attention.kernel import Inputs, Rows, reference_kernel
from minisparse.attention.topk import TopK
from minisparse.fast import attention as fa, prefill as fp
from minisparse.spec import parse_attention_spec

U = 2.0**-24          # float32 unit roundoff
C_EXP = 6             # the tiles' float32 exp: <= 3u relative (test_attention_tiles), 6u budgeted


def logit_err(q, k, logw=0.0):
    # one scaled logit, then s - max: the d-term float32 dot, the scale and the subtraction err
    # by <= (d + 3) u sum_i |q_i k_i| / sqrt(d) <= (d + 3) d u max|q| max|k| / sqrt(d); a
    # log-weight added in float32 errs by u (|s| + |logw|) and grows |s - max| by 2 max|logw|:
    # one more term and 3 u max|logw| (minisparse.testing.bounds.logit_err's derivation)
    d = q.shape[-1]
    lw = float(np.abs(logw).max()) if np.size(logw) else 0.0
    terms = d + 3 + (lw > 0)
    return terms * d * U * np.abs(q).max() * np.abs(k).max() / np.sqrt(d) + 3 * U * lw


def tiles_tol(q, k, v, n_keys, logw=0.0):
    # |tiles - float64 softmax| (test_attention_tiles.tiles_tol's derivation): a logit error e
    # moves the output by <= (e^(2e) - 1) max|v|; the exp by 2 C_EXP u max|v|; the float32 sums
    # of n_keys non-zero terms by 2 n_keys u max|v|; the division by u max|v|. The reference
    # kernel is float64 but for its final cast (u max|v|), hence one more u.
    e = logit_err(q, k, logw)
    return (np.expm1(2 * e) + (2 * n_keys + 2 * C_EXP + 2) * U) * np.abs(v).max() + 1e-12


def lse_tol(q, k, n_keys, logw=0.0):
    # lse = m + log l: the logit error e, and l's exp and summation error (C_EXP + n_keys) u
    # relative, which the log turns into an absolute error of the same size
    return logit_err(q, k, logw) + (C_EXP + n_keys) * U + 1e-12


@st.composite
def grid_problems(draw, grid=True):
    """A prefill chunk of Tq queries over Tk keys, q and k on the grid (1/8) Z with entries in
    [-1/2, 1/2]: every dot q.k is a multiple of 1/64 below 2^6 in size, exact in float32 in any
    summation order, and d in {16, 64} makes the scale 1/sqrt(d) a power of two, so the tiles'
    scaled scores rank the keys exactly as TopK's float32 dots do, ties included (the grid makes
    ties common). Keys in position order, with gaps or not. grid=False: standard normal q, k."""
    seed = draw(st.integers(0, 2**31 - 1))
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([16, 64]))
    tk = draw(st.integers(1, 120))
    tq = draw(st.integers(1, tk))
    gapped = draw(st.booleans())
    r = np.random.default_rng(seed)
    grid = ((lambda *s: (r.integers(-4, 5, s) / 8).astype(np.float32)) if grid else
            (lambda *s: r.standard_normal(s).astype(np.float32)))
    steps = r.integers(1, 4, tk) if gapped else np.ones(tk, np.int64)
    k_pos = np.cumsum(steps).astype(np.int64) + draw(st.integers(-1, 5))
    v = r.standard_normal((hkv, tk, d)).astype(np.float32)
    return grid(hkv * g, tq, d), grid(hkv, tk, d), v, k_pos[tk - tq:].copy(), k_pos


topk_selectors = st.builds(
    lambda budget, per, recent: TopK(**budget, per=per, recent=recent),
    st.one_of(st.builds(lambda k: {"k": k}, st.integers(0, 40)),
              st.builds(lambda f: {"fraction": f}, st.sampled_from([0.02, 0.1, 0.25, 0.5, 1.0]))),
    st.sampled_from(["q", "kv"]), st.sampled_from([0, 1, 5]))


@given(grid_problems(), topk_selectors, st.sampled_from([5, 16, None]))
def test_topk_tiles_read_topk_keys_and_equal_the_reference_kernel(prob, sel, block):
    q, k, v, q_pos, k_pos = prob
    out, lse, natt = fp.topk_tiles(q, k, v, q_pos, k_pos, 1 / np.sqrt(q.shape[2]), sel,
                                   block=block)
    ref, ref_lse, st_ = attend(q, k, v, sel, q_pos, k_pos, return_lse=True, return_stats=True,
                               kernel=reference_kernel)
    np.testing.assert_array_equal(natt, st_.n_attended)              # the same number of keys
    n_keys = max(int(natt.max()), 1)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tiles_tol(q, k, v, n_keys))
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=lse_tol(q, k, n_keys))


def read_keys(q, k, q_pos, k_pos, sel):
    """(Hq, Tq, Tk) bool: the keys topk_tiles reads, recovered through one-hot values: with
    v[:, j] = e_(j - c d) for keys j of batch c (d keys a call), out[h, t, j - c d] is key j's
    softmax weight, > 0 iff it is read (grid logits differ by at most 4, far from underflow)."""
    hkv, tk, d = k.shape
    read = np.zeros(q.shape[:2] + (tk,), bool)
    for c0 in range(0, tk, d):
        c1 = min(c0 + d, tk)
        v = np.zeros((hkv, tk, d), np.float32)
        v[:, np.arange(c0, c1), np.arange(c1 - c0)] = 1.0
        out, _, _ = fp.topk_tiles(q, k, v, q_pos, k_pos, 1 / np.sqrt(d), sel)
        read[:, :, c0:c1] = out[:, :, :c1 - c0] > 0
    return read


@given(grid_problems(), topk_selectors)
def test_topk_tiles_read_exactly_the_keys_topk_selects(prob, sel):
    q, k, _, q_pos, k_pos = prob
    hq, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    mask, _ = sel.select(q, k, q_pos, k_pos).to_mask(hq, tq, tk)           # (Hq, Tq, Tk)
    causal = k_pos[None, None, :] <= q_pos[None, :, None]                   # (1, Tq, Tk)
    np.testing.assert_array_equal(read_keys(q, k, q_pos, k_pos, sel), mask & causal)
    fast, _ = fp.topk_selection(q, k, q_pos, k_pos, sel, block=7).to_mask(hq, tq, tk)
    np.testing.assert_array_equal(fast, mask & causal)      # the lab's analysis reads the same


@given(st.integers(0, 2**31 - 1), st.integers(1, 400), st.sampled_from([2, 9, 1000]))
def test_kth_largest_equals_the_sorted_rows_kth(seed, n, spread):
    # spread 2: almost every entry tied; 1000: few ties
    r = np.random.default_rng(seed)
    x = r.integers(0, spread, n).astype(np.float32)
    kth = int(r.integers(1, n + 1))
    x0 = x.copy()
    assert fp.kth_largest(x, n, kth, np.empty(2 * n, np.float32)) == np.sort(x)[::-1][kth - 1]
    np.testing.assert_array_equal(x, x0)                    # read only: top_keys reuses its list


@st.composite
def long_rows(draw):
    """A row's context scores (e,) float32 with a budget keep < e, long enough for many lanes
    and list stretches: few distinct values (ties at the threshold), a smooth random walk
    (neighbours score alike: the high keys in a run, as a relevant passage gives), one block of
    high keys, or Gaussian noise."""
    r = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    e = draw(st.integers(2, 5000))
    keep = draw(st.integers(1, min(e - 1, 300)))
    kind = draw(st.sampled_from(["ties", "walk", "block", "noise"]))
    if kind == "ties":
        x = r.integers(0, 4, e)
    elif kind == "walk":
        x = np.cumsum(r.standard_normal(e))
    elif kind == "block":
        x = r.standard_normal(e)
        a = int(r.integers(0, e))
        x[a:a + 2 * keep] += 10
    else:
        x = r.standard_normal(e)
    # float32: a query head's scores; float64: a KV head's summed scores (per="kv")
    return x.astype(draw(st.sampled_from([np.float32, np.float64]))), keep


@given(long_rows())
def test_top_keys_keeps_what_take_top_keeps(row_keep):
    # topk.take_top is TopK's own rule (the keep highest, ties to the later keys); top_keys must
    # give the same keys through its lane bound and short list, on rows far longer than keep
    from minisparse.attention.topk import take_top
    x, keep = row_keep
    e = x.size
    want = np.empty(keep, np.int64)
    take_top(x.astype(np.float64), np.ones(e, np.bool_), keep, want, 0)
    got = np.empty(e, np.int64)
    n = fp.top_keys(x, e, keep, np.empty(e + 1, np.int64), np.empty(3 * e + 3, x.dtype), got)
    np.testing.assert_array_equal(got[:n], want)


@njit
def _ge_bits16(row, nb, floor, bits):                       # the intrinsic, called from Numba
    return fa._ge_bits16(row, nb, floor, bits)


@given(st.integers(0, 2**31 - 1), st.integers(0, 300), st.sampled_from([np.float32, np.float64]))
def test_ge_bits16_gives_each_blocks_compare_mask(seed, e, dtype):
    # the list of top_keys is read from these masks: bit u of block i must be
    # row[16 i + u] >= floor exactly (ties included, NaN never), and the count their popcount
    r = np.random.default_rng(seed)
    row = r.integers(0, 5, e).astype(dtype)                 # few values: many ties at the floor
    row[r.random(e) < 0.05] = np.nan
    floor = dtype(r.integers(0, 5))
    nb = e // 16
    bits = np.full(nb + 1, -1, np.int64)                    # one past the end: must stay untouched
    total = _ge_bits16(row, nb, floor, bits)
    want = (row[:16 * nb] >= floor).reshape(nb, 16)        # NaN >= floor is False
    np.testing.assert_array_equal(bits[:nb], (want * (1 << np.arange(16))).sum(axis=1))
    assert total == want.sum() and bits[nb] == -1


@njit
def _pick16(src, lo, hi, pivot, side, dst, at):             # the intrinsic, called from Numba
    return fa._pick16(src, lo, hi, pivot, side, dst, at)


@given(st.integers(0, 2**31 - 1), st.integers(0, 70), st.sampled_from([np.float32, np.float64]))
def test_pick16_writes_the_entries_below_or_above_the_pivot_in_order(seed, n, dtype):
    # kth_largest's partition: for any range [lo, hi) (full blocks and a partial one), exactly
    # the entries < pivot (side < 0) or > pivot (side > 0), in their order, at dst[at:], and
    # nothing else of dst written; ties with the pivot and NaN never written
    r = np.random.default_rng(seed)
    x = r.integers(0, 5, n).astype(dtype)                   # few values: many ties
    x[r.random(n) < 0.05] = np.nan
    lo = int(r.integers(0, n + 1))
    hi = int(r.integers(lo, n + 1))
    pivot, at = dtype(r.integers(0, 5)), int(r.integers(0, 5))
    for side in (-1, 1):
        dst = np.full(n + 25, -7, dtype)
        got = _pick16(x, lo, hi, pivot, side, dst, at)
        part = x[lo:hi]
        want = part[part < pivot] if side < 0 else part[part > pivot]
        assert got == want.size
        np.testing.assert_array_equal(dst[at:at + got], want)
        assert np.all(dst[:at] == -7) and np.all(dst[at + got:] == -7)


# ---- other selections as banded tiles -------------------------------------------------------


@st.composite
def range_selections(draw, prob):
    """A selection of 0-3 random key ranges and 0-3 explicit keys per row (log-weight 0 or in
    [-3, 0], as samplers give), for every head kind (shared, per KV head, per query head), or a
    pattern family's own (window, sinks + window, blocks, strided)."""
    from minisparse.attention.selection import KV, Q, SHARED, Selection
    q, k, v, q_pos, k_pos = prob
    hq, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    spec = draw(st.sampled_from([None, "window=3", "sinks=2,window=5", "blocks=8", "strided=4"]))
    if spec is not None:
        return parse_attention_spec(spec).select(q, k, q_pos, k_pos).normalize()
    kind = draw(st.sampled_from([SHARED, KV, Q]))
    nh = {SHARED: 1, KV: k.shape[0], Q: hq}[kind]
    r = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    n = r.integers(0, 4, nh * tq)                                          # ranges per row
    lo = r.integers(0, tk, n.sum())
    hi = np.minimum(lo + r.integers(1, 12, n.sum()), tk)
    ptr = np.concatenate([[0], np.cumsum(n)])
    m = r.integers(0, 4, nh * tq)                                          # indices per row
    idx = r.integers(0, tk, m.sum())
    logw = np.where(r.random(m.sum()) < 0.5, 0.0, -3 * r.random(m.sum())).astype(np.float32)
    iptr = np.concatenate([[0], np.cumsum(m)])
    return Selection.from_lists(iptr, idx, tk, head_kind=kind, n_heads=nh, tq=tq, logw=logw,
                                r_ptr=ptr, r_lo=lo, r_hi=hi).normalize()


def _rows(sel):
    return Rows(sel.head_kind, sel.range_ptr, sel.range_lo, sel.range_hi, sel.idx_ptr, sel.idx,
                sel.logw)


@given(st.data(), st.sampled_from([5, 16, None]))
def test_selection_tiles_equal_the_reference_kernel_on_the_same_keys(data, block):
    prob = data.draw(grid_problems(grid=False))
    sel = data.draw(range_selections(prob))
    q, k, v, q_pos, k_pos = prob
    out, lse, natt = fp.selection_tiles(q, k, v, q_pos, k_pos, 1 / np.sqrt(q.shape[2]),
                                        _rows(sel), block=block)
    ref, ref_lse, st_ = attend(q, k, v, sel, q_pos, k_pos, return_lse=True, return_stats=True,
                               kernel=reference_kernel)
    np.testing.assert_array_equal(natt, st_.n_attended)
    n_keys = max(int(natt.max()), 1)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tiles_tol(q, k, v, n_keys, sel.logw))
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=lse_tol(q, k, n_keys, sel.logw))


# ---- which path the fast path takes ---------------------------------------------------------------


def _spy(monkeypatch, name):
    calls = []
    real = getattr(fp, name)
    monkeypatch.setattr(fp, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _chunk(tq=256, tk=1024, hq=6, hkv=2, d=64, seed=0):
    r = np.random.default_rng(seed)
    q = r.standard_normal((hq, tq, d)).astype(np.float32)
    k, v = r.standard_normal((2, hkv, tk, d)).astype(np.float32)
    return q, k, v, np.arange(tk - tq, tk), np.arange(tk)


@pytest.mark.parametrize("spec, tq, tiles", [("topk=2%", 256, True), ("topk=8/kv/r4", 64, True),
                                             ("topk=2%", 1, False), ("topk=8", 2, False)])
def test_fast_attend_takes_topk_tiles_for_a_large_prefill_chunk_only(monkeypatch, spec, tq, tiles):
    calls = _spy(monkeypatch, "topk_tiles")
    q, k, v, q_pos, k_pos = _chunk(tq=tq, tk=max(tq, 256) if tq > 2 else 300)
    sel = parse_attention_spec(spec)
    a, sa = fp.attend(q, k, v, sel, q_pos, k_pos, return_stats=True)
    b, sb = attend(q, k, v, sel, q_pos, k_pos, return_stats=True, kernel=reference_kernel)
    assert bool(calls) == tiles
    np.testing.assert_array_equal(sa.n_attended, sb.n_attended)
    np.testing.assert_allclose(a, b, rtol=0, atol=tiles_tol(q, k, v, int(sa.n_attended.max())))


@pytest.mark.parametrize("spec, tiles", [("window=128", True), ("sinks=4,window=252", True),
                                         ("window=4", False), ("topk=8", False), ("dense", False)])
def test_fast_kernel_takes_selection_tiles_when_they_score_fewer_pairs(monkeypatch, spec, tiles):
    # window=4: a tile of 128 rows covers ~132 key columns for 4 read a row, ~33x the listed
    # pairs, beyond TILE_GAIN: the row kernel; a 128-key window covers ~2x: the tiles
    calls = _spy(monkeypatch, "selection_tiles")
    q, k, v, q_pos, k_pos = _chunk()
    sel = parse_attention_spec(spec)
    a, sa = attend(q, k, v, sel, q_pos, k_pos, return_stats=True, kernel=fp.kernel)
    b, sb = attend(q, k, v, sel, q_pos, k_pos, return_stats=True, kernel=reference_kernel)
    assert bool(calls) == tiles
    np.testing.assert_array_equal(sa.n_attended, sb.n_attended)
    np.testing.assert_allclose(a, b, rtol=0, atol=tiles_tol(q, k, v, int(sa.n_attended.max())))


def test_fast_attend_with_a_float16_cache_buffer_with_spare_rows_equals_float32(monkeypatch):
    # a cache hands over its whole buffer (spare rows after the Tk keys), float16 when asked:
    # the tiles read the first Tk rows, cast once to float32, as attend does
    calls = _spy(monkeypatch, "topk_tiles")
    q, k, v, q_pos, k_pos = _chunk()
    pad = np.zeros((k.shape[0], 40, k.shape[2]), np.float16)
    k16, v16 = np.concatenate([k.astype(np.float16), pad], 1), np.concatenate([v.astype(np.float16), pad], 1)
    sel = TopK(fraction=0.05)
    a = fp.attend(q, k16, v16, sel, q_pos, k_pos, buffer=True)
    b = fp.attend(q, k16[:, :len(k_pos)].astype(np.float32), v16[:, :len(k_pos)].astype(np.float32),
                  sel, q_pos, k_pos)
    assert len(calls) == 2
    np.testing.assert_array_equal(a, b)                 # the same float32 inputs: the same bits
