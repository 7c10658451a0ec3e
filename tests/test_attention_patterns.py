"""Closed-form index sets, landmarks, random masks, union rules, FP16 storage, degenerate inputs."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import (BlockLocal, Dense, Globals, Landmarks, LogStride, RandomMask,
                                  RunningLandmarks, RuvLLM, Selection, Sinks, Strided, Window,
                                  attend, dense_reference, merge_lse, store_kv, union)
from minisparse.spec import parse_attention_spec
from minisparse.testing import kernel_tol


def rows_of(sel, t, tk):
    """Sorted real key indices row t of head 0 reads (causality not applied)."""
    m, _ = sel.to_mask(1, sel.tq, tk)
    return set(np.flatnonzero(m[0, t]).tolist())


def rnd(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- closed forms ---------------------------------------------------------------------------
@given(st.integers(0, 40), st.integers(1, 80))
def test_window_reads_exactly_w_plus_1_keys_once_i_reaches_w(w, n):
    q = np.zeros((1, n, 4), np.float32)
    _, st_ = attend(q, q, q, Window(w), return_stats=True)
    i = np.arange(n)
    assert (st_.n_attended[0] == np.minimum(i, w) + 1).all()


@given(st.integers(1, 9), st.integers(1, 70), st.sampled_from(["strided", "fixed"]))
def test_strided_pair_reaches_every_earlier_key_in_two_hops(l, n, mode):
    k = np.zeros((1, n, 1), np.float32)
    sel = Strided(l, mode).select(None, k, np.arange(n), np.arange(n))
    reach = [rows_of(sel, t, n) for t in range(n)]
    for i in range(n):
        assert all(j <= i for j in reach[i])                   # causal by construction
        two = set().union(*(reach[j] for j in reach[i])) | reach[i]
        assert two == set(range(i + 1))


@given(st.integers(1, 200))
def test_logstride_reads_i_minus_powers_of_two(n):
    k = np.zeros((1, n, 1), np.float32)
    sel = LogStride().select(None, k, np.arange(n), np.arange(n))
    for i in range(n):
        want = {i} | {i - 2**m for m in range(12) if i - 2**m >= 0}
        assert rows_of(sel, i, n) == want


@given(st.integers(1, 9), st.integers(1, 50))
def test_blocklocal_reads_own_block(b, n):
    k = np.zeros((1, n, 1), np.float32)
    sel = BlockLocal(b).select(None, k, np.arange(n), np.arange(n))
    for i in range(n):
        assert rows_of(sel, i, n) == set(range((i // b) * b, i + 1))


def test_sinks_and_globals_read_their_positions_at_nonzero_offsets():
    k = np.zeros((1, 10, 1), np.float32)
    k_pos = np.arange(10) + 3                                  # cache starting at position 3
    sel = (Sinks(5) | Globals([7, 100])).select(None, k, k_pos[-2:], k_pos)
    assert rows_of(sel, 0, 10) == {0, 1, 4}                    # positions 3, 4 and 7


# ---- union ----------------------------------------------------------------------------------
def test_union_reads_a_key_picked_twice_once_and_exact_beats_weighted():
    k = np.zeros((1, 6, 1), np.float32)
    q_pos = k_pos = np.arange(6)
    weighted = Selection.from_lists(np.arange(7) * 2, np.tile([0, 5], 6), 6,
                                    logw=np.full(12, -3.0, np.float32))
    sel = union([weighted, Window(1).select(None, k, q_pos, k_pos),
                 Sinks(1).select(None, k, q_pos, k_pos)], 1, 1)
    ranges, idx = sel.rows(0, 5)
    assert ranges == [(0, 1), (4, 6)] and idx == []            # 0 and 5 taken by exact members
    ranges, idx = sel.rows(0, 2)
    assert ranges == [(0, 3)] and idx == [(5, -3.0)]           # 5: only the weighted member
    _, st_ = attend(np.zeros((1, 6, 1), np.float32), k, k, sel, return_stats=True)
    assert st_.n_attended[0].tolist() == [1, 2, 3, 3, 3, 3]    # key 5 is never causal before 5


def test_landmark_multiplicity_loses_keys_read_exactly():
    k = rnd(0, 1, 12, 4)
    sel = (Window(1) | Landmarks(4)).select(None, k, np.array([9]), np.arange(12))
    ranges, idx = sel.rows(0, 0)
    # row 9: own block 8..9 exact (landmark's own range), window 8..9; landmarks of blocks 0, 1
    assert ranges == [(8, 10)]
    assert [i for i, _ in idx] == [12, 13]
    assert all(abs(w - math.log(4)) < 1e-6 for _, w in idx)
    sel = (Window(2) | Landmarks(4)).select(None, k, np.array([9]), np.arange(12))
    _, idx = sel.rows(0, 0)
    # window 7..9 reads key 7 of block 1 exactly: block 1's landmark stands for 3 keys
    assert [i for i, _ in idx] == [12, 13]
    assert abs(idx[1][1] - math.log(3)) < 1e-6


# ---- landmarks ------------------------------------------------------------------------------
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_landmarks_use_complete_blocks_only(B, n, seed):
    k = rnd(seed, 2, n, 4)
    sel = Landmarks(B).select(None, k, np.arange(n), np.arange(n))
    nb = n // B
    assert sel.n_extra == nb
    assert (sel.extra_hi - sel.extra_lo == B).all() and (sel.extra_hi <= n).all()
    assert (sel.extra_pos == sel.extra_hi - 1).all()
    np.testing.assert_allclose(sel.extra_k, k[:, :nb * B].reshape(2, nb, B, 4).mean(2), atol=1e-6)


@given(st.integers(1, 6), st.integers(1, 120))
def test_log_reach_landmarks_are_blocks_at_power_of_two_distances(B, n):
    k = np.zeros((1, n, 1), np.float32)
    sel = Landmarks(B, reach="log").select(None, k, np.arange(n), np.arange(n))
    for i in range(n):
        own = i // B
        ranges, idx = sel.rows(0, i)
        assert ranges == [(own * B, i + 1)]                     # own block exact
        assert [j - n for j, _ in idx] == sorted({own - 2**m for m in range(12) if own - 2**m >= 0})


def test_ruvllm_edges_match_the_published_table_within_2_percent():
    # ruvllm_sparse_attention's docs/benchmark_edge_estimates.csv: sparse edges per head
    for n, published in ((8192, 1146498), (65536, 9625026)):
        assert abs(RuvLLM().estimate_edges(n) / published - 1) < 0.02


@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_landmarks_equal_dense_when_keys_are_constant_within_blocks(B, n, seed):
    # a landmark of weight log B stands for B identical keys, so this is dense attention
    r = np.random.default_rng(seed)
    kb = r.standard_normal((1, -(-n // B), 4)).astype(np.float32)
    vb = r.standard_normal((1, -(-n // B), 4)).astype(np.float32)
    k, v = np.repeat(kb, B, 1)[:, :n].copy(), np.repeat(vb, B, 1)[:, :n].copy()
    q = rnd(seed + 1, 2, n, 4)
    for sel in (Landmarks(B), Window(2) | Landmarks(B), RuvLLM(window=3, block=B, reach="all")):
        out = attend(q, k, v, sel)
        # extra slack: the landmark log-weight log B is float32 (rel. 2^-24) and the block mean
        # of identical keys is exact, so the logit error is within kernel_tol's e plus 2^-24*log B
        np.testing.assert_allclose(out, dense_reference(q, k, v), rtol=0,
                                   atol=kernel_tol(q, k, v) + 4 * 2.0**-24 * np.abs(v).max())


@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_incremental_landmarks_equal_static(B, n, chunk, seed):
    k, v = rnd(seed, 2, n, 4), rnd(seed + 1, 2, n, 4)
    run = RunningLandmarks(B)
    for a in range(0, n, chunk):
        run.append(k[:, a:a + chunk], v[:, a:a + chunk])
    ek, ev = run.means()
    sel = Landmarks(B).select(None, k, np.arange(n), np.arange(n))
    from minisparse.attention.selection import span_means
    # bit-equal: both add float64 keys one by one in index order, then divide by B
    np.testing.assert_array_equal(ek.reshape(sel.extra_k.shape), sel.extra_k)
    np.testing.assert_array_equal(ev.reshape(sel.extra_k.shape),
                                  span_means(v, sel.extra_lo, sel.extra_hi))


@given(st.integers(1, 6), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_decode_with_running_landmarks_equals_prefill_row(B, n, seed):
    q, k, v = rnd(seed, 2, n, 4), rnd(seed + 1, 1, n, 4), rnd(seed + 2, 1, n, 4)
    for make in (lambda: Landmarks(B), lambda: Window(2) | Landmarks(B)):
        pre = attend(q, k, v, make())
        run = RunningLandmarks(B)
        for i in range(n):
            run.append(k[:, i:i + 1], v[:, i:i + 1])
            dec = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], make().bind(run),
                         q_pos=np.array([i]))
            np.testing.assert_allclose(dec[:, 0], pre[:, i], rtol=0, atol=kernel_tol(q, k, v))


def test_ruvllm_estimate_edges_equals_attended_count():
    n = 300
    sel = RuvLLM(window=16, block=8)
    q = np.zeros((1, n, 2), np.float32)
    _, st_ = attend(q, q, q, sel, return_stats=True)
    assert sel.estimate_edges(n, chunk=64) == int(st_.n_attended.sum())
    assert parse_attention_spec("ruvllm").describe() == "ruvllm"


# ---- random masks ---------------------------------------------------------------------------
@given(st.integers(0, 2**31 - 1), st.sampled_from(["stochastic", "structural"]))
def test_same_seed_gives_same_random_mask(seed, mode):
    k = np.zeros((1, 200, 1), np.float32)
    pos = np.arange(200)
    a = RandomMask(0.05, 3, mode=mode, seed=seed).select(None, k, pos, pos)
    b = RandomMask(0.05, 3, mode=mode, seed=seed).select(None, k, pos, pos)
    c = RandomMask(0.05, 3, mode=mode, seed=seed + 1).select(None, k, pos, pos)
    for f in ("range_ptr", "range_lo", "range_hi", "idx_ptr", "idx"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.idx, c.idx)       # P(equal) over ~1e3 hashed draws is nil
    assert f"seed={seed}" in RandomMask(0.05, 3, mode=mode, seed=seed).describe()


@pytest.mark.parametrize("mode", ["stochastic", "structural"])
@pytest.mark.parametrize("density,seeds", [(0.01, 70), (0.05, 10), (0.2, 2)])
def test_random_mask_coverage_matches_one_minus_exp(mode, density, seeds):
    n = 8000
    rm = RandomMask(density, seeds, mode=mode, seed=11)
    k_pos = np.arange(n)
    rows = np.array([n - 1]) if mode == "structural" else np.arange(n - 8, n)
    sel = rm.random_part(k_pos, rows).normalize()
    covered, total = 0, 0
    for t, i in enumerate(rows):
        got = sel.idx[sel.idx_ptr[t]:sel.idx_ptr[t + 1]]
        covered += int((got < i).sum())                    # keys before the diagonal
        total += i
    p = np.mean([rm.expected_coverage(i + 1) for i in rows])
    # Within a row the indicators "key j covered" are negatively associated (stochastic: fixed
    # number of balls in bins) or independent (structural: each key hashed on its own), and rows
    # hash independently, so Hoeffding applies: P(|mean - p| >= eps) <= 2 exp(-2 N eps^2).
    # eps for a failure probability of 1e-9:
    eps = math.sqrt(math.log(2e9) / (2 * total))
    assert abs(covered / total - p) <= eps
    # and the finite-n expectation is the asymptotic 1 - e^(-S d) up to the ceil/rounding of d
    if mode == "stochastic":
        assert abs(p - (1 - math.exp(-seeds * density))) <= seeds * 2 / n + seeds * density**2


def test_random_mask_always_reads_diagonal_sinks_and_window():
    n = 100
    k = np.zeros((1, n, 1), np.float32)
    sel = RandomMask(0.01, 1, seed=0, sinks=4, window=8).select(None, k, np.arange(n), np.arange(n))
    for i in range(n):
        want = set(range(min(4, i + 1))) | set(range(max(0, i - 8), i + 1))
        assert want <= rows_of(sel, i, n)


# ---- merge, fp16, degenerate inputs ---------------------------------------------------------
@given(st.integers(0, 2**31 - 1), st.integers(2, 30))
def test_merge_lse_of_disjoint_kernel_parts_equals_union(seed, n):
    q, k, v = rnd(seed, 2, n, 8), rnd(seed + 1, 2, n, 8), rnd(seed + 2, 2, n, 8)
    o1, l1 = attend(q, k, v, Sinks(n // 2), return_lse=True)
    o2, l2 = attend(q, k, v, _Suffix(n // 2), return_lse=True)     # the complementary keys
    o, l = merge_lse(o1, l1, o2, l2)
    ref, rl = dense_reference(q, k, v, return_lse=True)
    # each part carries kernel_tol; merging in float64 and casting adds 2^-24 relative
    np.testing.assert_allclose(o, ref, rtol=0, atol=2 * kernel_tol(q, k, v))
    np.testing.assert_allclose(l, rl, rtol=0, atol=1e-5)


class _Suffix(Dense):
    """Keys at positions >= start (the complement of Sinks(start))."""

    def __init__(self, start):
        self.start = start

    def _select(self, q, k, q_pos, k_pos):
        return Selection.from_ranges(np.full(q_pos.size, self.start), np.full(q_pos.size, k.shape[1]),
                                     k.shape[1])


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.floats(0.1, 30))
def test_fp16_kv_error_within_derived_bound(seed, n, spread):
    q = rnd(seed, 2, n, 8)
    k, v = rnd(seed + 1, 1, n, 8) * np.float32(spread), rnd(seed + 2, 1, n, 8) * np.float32(spread)
    k16, v16 = store_kv(k), store_kv(v)
    assert k16.dtype == np.float16
    out = attend(q, k16, v16)
    ref = dense_reference(q, k, v)
    # float16 round to nearest: |dk| <= u|k| + 2^-25 (u = 2^-11; 2^-25 covers subnormals), same
    # for v. Logit error delta_j <= scale * sum_i |q_i| (u|k_ji| + 2^-25); softmax weights move by
    # a factor <= e^(2 delta), so the output moves by <= (e^(2 delta) - 1) max|v| + u max|v| + 2^-25
    # (the v rounding, under a convex combination); plus the float32 kernel error on the rounded
    # inputs. With |q||k| ~ 1 this is about 2^-10 * max|v|.
    u = 2.0**-11
    scale = 1 / np.sqrt(8)
    delta = scale * (np.abs(q).sum(-1).max() * (u * np.abs(k).max() + 2.0**-25))
    vmax = float(np.abs(v).max())
    bound = np.expm1(2 * delta) * vmax + u * vmax + 2.0**-25 + kernel_tol(q, k, v)
    assert np.abs(out - ref).max() <= bound


def test_store_kv_refuses_overflow():
    with pytest.raises(ValueError, match="65504"):
        store_kv(np.array([7e4], np.float32))


def test_single_key_window0_and_empty_rows_give_no_nan():
    v = rnd(0, 1, 5, 4)
    q = rnd(1, 2, 5, 4)
    out = attend(q[:, :1], v[:, :1], v[:, :1])                 # Tk = 1
    np.testing.assert_array_equal(out, np.repeat(v[:, :1], 2, 0))  # weight 1 on one value: exact
    out = attend(q, v, v, Window(0))                           # diagonal only
    np.testing.assert_array_equal(out, np.repeat(v, 2, 0))
    out, lse, st_ = attend(q, v, v, Sinks(0), return_lse=True, return_stats=True)
    assert (out == 0).all() and (lse == -np.inf).all() and (st_.n_attended == 0).all()
    out, lse = attend(q, v, v, Globals([99]), return_lse=True)  # position not held
    assert not np.isnan(out).any() and (lse == -np.inf).all()
    out = attend(q, v, v, Dense(), q_pos=np.full(5, -1))       # every key in the future
    assert (out == 0).all()
