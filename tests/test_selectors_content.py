"""Content-based selectors (issue 4): TopK, Quest, LSH (frequency rank, MagicPIG), IVF, Hybrid.

The shared suite (test_attention_properties.py) already runs them through causality, decode ==
prefill, GQA, the coverage bound and no-NaN; here: the properties specific to each.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import (IVF, LSH, Hybrid, IVFIndex, LSHIndex, Quest, Sinks, TopK,
                                  Window, attend, dense_reference, merge_lse, reference_kernel)
from minisparse.spec import parse_attention_spec
from minisparse.attention.lsh import lsh_counts, p_sampled, planes, project
from minisparse.attention.selection import append_along
from minisparse.attention.quest import PageBounds, page_bound, page_bounds_all, page_minmax
from minisparse.testing import kernel_tol


def rand(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def qkv(seed, hq=2, hkv=1, tq=6, tk=20, d=8):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    return f(hq, tq, d), f(hkv, tk, d), f(hkv, tk, d)


def sets(sel, hq, tq, tk):
    return sel.normalize().to_mask(hq, tq, tk)[0]                               # (Hq, Tq, Tk)


def scores64(q, k):
    g = q.shape[0] // k.shape[0]
    return np.einsum("htd,hsd->hts", q.astype(np.float64),
                     np.repeat(k, g, 0).astype(np.float64))                    # (Hq, Tq, Tk)


seeds = st.integers(0, 2**31 - 1)


# ---- TopK ------------------------------------------------------------------------------------
@given(seeds, st.integers(1, 30), st.sampled_from([(2, 1), (4, 2), (2, 2)]),
       st.sampled_from(["q", "kv"]))
def test_topk_with_k_at_least_n_equals_dense(seed, tk, heads, per):
    q, k, v = qkv(seed, heads[0], heads[1], min(tk, 5), tk)
    out = attend(q, k, v, TopK(tk + seed % 3, per=per))
    np.testing.assert_allclose(out, dense_reference(q, k, v), rtol=0, atol=kernel_tol(q, k, v))


@given(seeds, st.integers(1, 40), st.integers(1, 12))
def test_flat_topk_equals_bruteforce_argpartition(seed, tk, kk):
    q, k, v = qkv(seed, 2, 1, min(tk, 6), tk)
    hq, tq, d = q.shape
    got = sets(TopK(kk).select(q, k), hq, tq, tk)
    s = scores64(q, k)                                                         # (Hq, Tq, Tk)
    q_pos = np.arange(tk - tq, tk)
    # the selector ranks float32 dots: |fl32(q.k) - q.k| <= d*2^-24*sum|q_i k_i| (+ float64 dot
    # error, far smaller), so two keys may swap only when their exact scores are within 2e
    e = 2 * d * 2.0**-23 * np.einsum("htd,hsd->hts", np.abs(q), np.repeat(np.abs(k), hq, 0))
    for h in range(hq):
        for t in range(tq):
            n = q_pos[t] + 1                                                   # causal keys 0..n-1
            want = np.zeros(tk, bool)
            want[np.argpartition(-s[h, t, :n], min(kk, n) - 1)[:min(kk, n)]] = True
            assert got[h, t].sum() == min(kk, n) and not got[h, t, n:].any()
            thr = np.sort(s[h, t, :n])[::-1][min(kk, n) - 1]                   # k-th largest
            diff = got[h, t] != want
            assert (np.abs(s[h, t][diff] - thr) <= 2 * e[h, t][diff]).all()


@given(seeds)
def test_topk_sets_nested_and_error_non_increasing_in_k_on_average(seed):
    q, k, v = qkv(seed, 4, 2, 24, 48, 8)
    ref = dense_reference(q, k, v)
    prev_mask, errs = None, []
    for kk in (1, 2, 4, 8, 16, 32, 48):
        sel = TopK(kk)
        mask = sets(sel.select(q, k), 4, 24, 48)
        if prev_mask is not None:
            assert (mask >= prev_mask).all()                                   # exact: nested sets
        prev_mask = mask
        errs.append(np.linalg.norm(attend(q, k, v, sel) - ref, axis=-1).mean())
    # on average over 96 rows; per row it need not be monotone (a key can pull the output away).
    # Slack: the float32 kernel error (kernel_tol per element, sqrt(d) per row) on both sides
    slack = 2 * np.sqrt(8) * kernel_tol(q, k, v)
    assert all(b <= a + slack for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= slack                                                   # k = n is dense


@given(seeds, st.integers(1, 24), st.integers(0, 8), st.integers(0, 6))
def test_gqa_per_kv_head_with_group_one_equals_per_query_head(seed, tk, kk, rec):
    q, k, v = qkv(seed, 2, 2, min(tk, 5), tk)
    a = attend(q, k, v, TopK(kk, per="kv", recent=rec))
    b = attend(q, k, v, TopK(kk, per="q", recent=rec))
    np.testing.assert_array_equal(a, b)          # G = 1: the summed score is the head's own score


@given(seeds, st.integers(1, 24), st.sampled_from([0.05, 0.25, 0.5, 1.0]), st.integers(0, 4))
def test_topk_realised_density_is_honest(seed, tk, frac, rec):
    q, k, v = qkv(seed, 4, 2, tk, tk)
    _, stt = attend(q, k, v, TopK(fraction=frac, per="kv", recent=rec), return_stats=True)
    n = stt.n_causal                                                          # (Hq, Tq)
    ctx = np.maximum(n - rec, 0)                                              # older than the suffix
    want = np.minimum(np.ceil(frac * n - 1e-9), ctx) + np.minimum(n, rec)
    np.testing.assert_array_equal(stt.n_attended, want)


@given(seeds, st.integers(2, 30))
def test_topk_kv_shared_decode_step_equals_prefill_row(seed, tk):
    q, k, v = qkv(seed, 4, 2, tk, tk)
    sel = TopK(3, per="kv", recent=2)
    # the reference kernel reads each row alone: the same key set gives the same bits (the fast
    # path's decode kernel sums in its own float32 order)
    pre = attend(q, k, v, sel, kernel=reference_kernel)
    for i in range(tk):
        dec = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], sel, q_pos=[i],
                     kernel=reference_kernel)
        np.testing.assert_array_equal(dec[:, 0], pre[:, i])     # same row set, same arithmetic


@given(seeds, st.integers(1, 40), st.integers(0, 6), st.integers(0, 8))
def test_topk_plus_recent_is_one_joint_softmax_equal_to_merge_lse(seed, tk, kk, rec):
    q, k, v = qkv(seed, 2, 1, min(tk, 6), tk)
    hq, tq, _ = q.shape
    q_pos = np.arange(tk - tq, tk)
    out, lse = attend(q, k, v, TopK(kk, recent=rec), return_lse=True)
    mask = sets(TopK(kk, recent=rec).select(q, k), hq, tq, tk)
    recent = np.arange(tk)[None, None, :] > q_pos[None, :, None] - rec       # (1, Tq, Tk)
    o1, l1 = dense_reference(q, k, v, mask=mask & ~recent, return_lse=True)   # top-k of the context
    o2, l2 = dense_reference(q, k, v, mask=mask & recent, return_lse=True)    # dense recent suffix
    o, l = merge_lse(o1, l1, o2, l2)
    # merge_lse of float64 parts: float32 cast only; the kernel's error is kernel_tol; the lse
    # error is at most the logit error e <= 1e-5 for these N(0,1) inputs (see kernel_tol)
    np.testing.assert_allclose(out, o, rtol=0, atol=kernel_tol(q, k, v) + 2.0**-23 * np.abs(v).max())
    np.testing.assert_allclose(lse, l, rtol=0, atol=1e-5)


# ---- Quest -----------------------------------------------------------------------------------
@given(seeds, st.integers(1, 64), st.integers(1, 16), st.sampled_from([4, 8, 64]))
def test_quest_bound_at_least_max_score_within_every_page(seed, tk, page, d):
    q = rand(seed, d, scale=3.0)
    k = rand(seed + 1, 1, tk, d, scale=3.0)
    for lo in range(0, tk, page):
        hi = min(lo + page, tk)
        mn, mx = page_minmax(k, lo, hi)
        ub = page_bound(q, mn[0], mx[0])
        best = (k[0, lo:hi].astype(np.float64) @ q.astype(np.float64)).max()
        # float32 x float32 products are exact in float64; each side's d-term float64 sum errs by
        # <= d*2^-53*sum|terms|, and every term is <= |q_i|*max(|min_i|, |max_i|)
        tol = 2 * d * 2.0**-53 * (np.abs(q) * np.maximum(np.abs(mn[0]), np.abs(mx[0]))).sum()
        assert ub >= best - tol


@given(seeds, st.integers(1, 40), st.integers(1, 8), st.integers(1, 20))
def test_quest_reads_the_pages_of_highest_bound(seed, tk, page, budget):
    q, k, v = qkv(seed, 2, 1, 1, tk)
    got = sets(Quest(page, k=budget).select(q, k), 2, 1, tk)[:, 0]            # (Hq, Tk)
    npg = -(-tk // page)
    want_pages = min(max(1, budget // page), npg)
    for h in range(2):
        ub = np.array([page_bound(q[h, 0], *[a[0] for a in page_minmax(k, p * page, min(tk, p * page + page))])
                       for p in range(npg)])
        read = np.array([got[h, p * page:(p + 1) * page].all() for p in range(npg)])
        assert read.sum() == want_pages and got[h].sum() == sum(
            min(tk, p * page + page) - p * page for p in np.flatnonzero(read))
        assert ub[read].min() >= ub[~read].max(initial=-np.inf)               # best pages first


# ---- LSH / MagicPIG ----------------------------------------------------------------------------
@given(seeds, st.floats(0.05, 3.09), st.sampled_from([4, 16, 64]))
def test_simhash_bit_collision_rate_matches_one_minus_angle_over_pi(seed, theta, d):
    r = np.random.default_rng(seed)
    a = r.standard_normal(d)
    u = r.standard_normal(d)
    u -= (u @ a) / (a @ a) * a                                                 # orthogonal to a
    b = np.cos(theta) * a / np.linalg.norm(a) + np.sin(theta) * u / np.linalg.norm(u)
    N = 16384                                                                  # N one-bit tables
    W = planes(seed % 1000, 1, N, d)
    q = a.astype(np.float32).reshape(1, 1, d)
    k = b.astype(np.float32).reshape(1, 1, d)
    theta32 = math.acos(np.clip(q.ravel().astype(np.float64) @ k.ravel() /
                                np.linalg.norm(q) / np.linalg.norm(k), -1, 1))
    # K = 1: a table's code is its one bit; N > 255 tables also runs the count's byte carry
    kcodes = (project(k, W) > 0).astype(np.uint8).transpose(0, 2, 1)[None].copy()  # (1, 1, N, 1)
    qcodes = (project(q, W) > 0).astype(np.uint8).transpose(0, 2, 1).copy()      # (1, N, 1)
    counts = lsh_counts(qcodes, kcodes, np.array([0]), np.array([0]), np.array([0]), 1)
    rate = counts[0, 0] / N
    # Binomial(N, p): Hoeffding P(|rate - p| >= eps) <= 2 exp(-2 N eps^2) = 1e-9 at
    # eps = sqrt(ln(2e9) / (2N)) = 0.0256 (25 draws: failure odds < 3e-8 if the law holds)
    assert abs(rate - (1 - theta32 / math.pi)) <= math.sqrt(math.log(2e9) / (2 * N))


@given(seeds, st.integers(1, 30), st.integers(1, 6), st.integers(1, 12), st.integers(1, 12))
def test_lsh_counts_and_weights_equal_a_numpy_simhash_of_block_centred_keys(seed, tk, K, L, block):
    # the rule, written plainly: a query at position p centres the keys by the mean of its own
    # causal keys in the first block (p < block), else of the keys at positions < block*floor(p/block)
    q, k, _ = qkv(seed, 2, 1, min(tk, 4), tk)
    hq, tq, d = q.shape
    q_pos = np.arange(tk - tq, tk)
    sel = LSH(K, L, seed=seed % 97, mode="sample", block=block)
    counts, logw = sel.collisions(q, k, q_pos, np.arange(tk), True)
    W = planes(seed % 97, K, L, d)                                             # (KL, d)
    for h in range(hq):
        for t in range(tq):
            n = q_pos[t] + 1
            e = n if q_pos[t] < block else q_pos[t] // block * block
            mu = k[0, :e].astype(np.float64).mean(0)                           # the row's centre
            pk = (k[0, :n] - mu) @ W.T                                         # (n, KL)
            pq = q[h, t].astype(np.float64) @ W.T                              # (KL,)
            same = ((pk > 0) == (pq > 0)).reshape(n, L, K)
            # the kernel forms W.k - W.mu (sums in another order): a bit may flip only where
            # |W.(k - mu)| is within rounding, ~1e-12 here (|W|, |k| = O(1), d <= 8 terms)
            sure = (np.abs(pk) > 1e-9).reshape(n, L, K)
            lo = (same & sure).all(-1).sum(-1)                                 # tables surely colliding
            hi = (same | ~sure).all(-1).sum(-1)                                # tables possibly colliding
            r = h * tq + t
            assert (lo <= counts[r, :n]).all() and (counts[r, :n] <= hi).all()
            assert np.isneginf(counts[r, n:]).all()                            # later keys: not causal
            c = counts[r, :n] >= 2
            nk = np.linalg.norm(k[0, :n] - mu, axis=1) * np.linalg.norm(q[h, t])
            # a key equal to the mean has no angle: the selector's convention is p = 1 (weight 1)
            cos = np.where(nk > 0, ((k[0, :n] - mu) @ q[h, t]) / np.maximum(nk, 1e-300), 1.0)
            P = np.array([p_sampled(1 - np.arccos(np.clip(x, -1, 1)) / np.pi, K, L) for x in cos])
            # logw is float32: relative rounding 2^-24, plus float64 angle error ~1e-12
            np.testing.assert_allclose(logw[r, :n][c], -np.log(np.maximum(P[c], 1e-30)),
                                       rtol=2.0**-22, atol=1e-6)


@given(st.integers(1, 12), st.integers(1, 120))
def test_p_sampled_is_monotone_in_p_and_equals_the_closed_form(K, L):
    ps = np.linspace(0, 1, 401)
    P = np.array([p_sampled(p, K, L) for p in ps])
    # each binomial term is computed to ~1e-15 relative; a sum of L terms errs by < 1e-13
    assert (np.diff(P) >= -1e-13).all() and P[0] == 0 and P[-1] == (1.0 if L >= 2 else 0.0)
    x = ps ** K
    closed = 1 - (1 - x) ** L - L * x * (1 - x) ** (L - 1)
    ok = x > 1e-3               # the closed form cancels below; both are float64 sums there
    np.testing.assert_allclose(P[ok], closed[ok], rtol=1e-9, atol=1e-12)


def test_p_sampled_equals_the_sampling_frequency_over_seeds():
    # per key, the share of 200 plane seeds that sampled it ~ Binomial(200, P)/200: Hoeffding
    # at 1e-6 per key gives eps = sqrt(ln(2e6) / 400) = 0.19; checked over 40 keys
    q, k, _ = qkv(3, 1, 1, 1, 40, 8)
    hits = np.zeros(40)
    for s in range(200):
        counts, lw = LSH(2, 6, seed=s, mode="sample").collisions(q, k, np.array([39]), np.arange(40), True)
        hits += counts[0] >= 2
        P = np.where(counts[0] >= 2, np.exp(-lw[0].astype(np.float64)), np.nan)
        if s == 0:
            P0 = P
        else:
            P0 = np.where(np.isnan(P0), P, P0)     # P is a function of the key's angle only
    seen = ~np.isnan(P0)
    assert seen.sum() >= 20
    assert (np.abs(hits[seen] / 200 - P0[seen]) <= math.sqrt(math.log(2e6) / 400)).all()


@pytest.mark.parametrize("d,T,K,L", [(16, 256, 8, 75), (16, 256, 4, 20)])
def test_magicpig_over_32_seeds_approaches_dense_and_correction_lowers_error(d, T, K, L):
    k, v = rand(2, 1, T, d), rand(3, 1, T, d)
    q = rand(4, 1, 1, d, scale=2.0)
    o, lse = dense_reference(q, k, v, return_lse=True)
    n_seeds = 48
    oc, ou, Z = [], [], []
    for s in range(n_seeds):
        sel = (Sinks(1) | Window(4) | LSH(K, L, seed=s, mode="sample")).select(q, k).normalize()
        a, la = attend(q, k, v, sel, return_lse=True)
        sel.logw[:] = 0                                   # same sampled set, no importance weights
        oc.append(a[0, 0]), ou.append(attend(q, k, v, sel)[0, 0]), Z.append(np.exp(la[0, 0] - lse[0, 0]))
    oc, ou, Z = np.array(oc), np.array(ou), np.array(Z)
    err = lambda x: np.linalg.norm(x - o[0, 0], axis=-1)
    # Horvitz-Thompson: with weights 1/P the normaliser estimate is unbiased, E[Z_hat / Z] = 1;
    # the seeds are fixed, so this is a deterministic check at 4 standard errors
    assert abs(Z.mean() - 1) <= 4 * Z.std(ddof=1) / math.sqrt(n_seeds)
    assert err(oc).mean() < err(ou).mean()             # the correction lowers the mean error
    # the seed average removes the variance and leaves the (small, O(1/n)) ratio bias:
    # it lands well inside the single-seed error, and closer than the uncorrected average
    assert err(oc.mean(0)) < 0.5 * err(oc).mean()
    assert err(oc.mean(0)) < err(ou.mean(0))


@given(seeds, st.integers(4, 30), st.integers(1, 8))
def test_lsh_decode_through_its_index_equals_prefill_row(seed, tk, block):
    # decode as model.forward runs it: for_layer binds the layer's LSHIndex (built at the first
    # step, extended per token, rebuilt as the query enters each new block); step i must read
    # the keys, with the weights, that the unbound prefill gives row i
    q, k, v = qkv(seed, 2, 1, tk, tk)
    for mode, kw in (("rank", {"k": 4}), ("sample", {})):
        lsh = LSH(3, 12, seed=5, mode=mode, block=block, **kw)
        # the reference kernel reads each row alone: the same key set gives the same bits (the
        # fast path's decode kernel sums in its own float32 order)
        pre = attend(q, k, v, Window(1) | lsh, kernel=reference_kernel)
        state, last, built = {}, None, 0
        for i in range(tk):
            bound = lsh.for_layer(0, state, k[:, :i + 1], v[:, :i + 1])
            end = i + 1 if i < block else i // block * block           # keys the centre averages
            assert bound.index is not None and bound.index.end == end
            built, last = built + (bound.index is not last), bound.index
            dec = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], Window(1) | bound, q_pos=[i],
                         kernel=reference_kernel)
            np.testing.assert_array_equal(dec[:, 0], pre[:, i])
        # one index per centre: per step in the first block, then per block entered
        assert built == len({i + 1 if i < block else i // block * block for i in range(tk)})


@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 1), (4, 2), (3, 3)]), st.integers(1, 30),
       st.integers(0, 40), st.booleans(), st.sampled_from([(4, 8), (8, 3)]), st.integers(1, 16))
def test_lsh_collisions_of_a_chunk_equal_those_of_each_row_alone(seed, heads, tq, extra, gapped,
                                                                 kl, block):
    # a prefill chunk groups its rows by centre and hashes every key once per centre; a row's
    # counts and log-weights must not depend on the rows it came with (gapped positions too)
    (hq, hkv), (K, L) = heads, kl
    r = np.random.default_rng(seed)
    tk, d = tq + extra, 8
    q = r.standard_normal((hq, tq, d)).astype(np.float32)
    k = r.standard_normal((hkv, tk, d)).astype(np.float32)
    k_pos = np.cumsum(r.integers(1, 4, tk) if gapped else np.ones(tk, np.int64))
    q_pos = k_pos[tk - tq:].copy()
    sel = LSH(K, L, seed=seed % 7, mode="sample", block=block)
    counts, logw = sel.collisions(q, k, q_pos, k_pos, True)
    for t in range(tq):
        c1, w1 = sel.collisions(q[:, t:t + 1], k, q_pos[t:t + 1], k_pos, True)
        np.testing.assert_array_equal(counts.reshape(hq, tq, tk)[:, t], c1)
        np.testing.assert_array_equal(logw.reshape(hq, tq, tk)[:, t], w1)


@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 1), (4, 2)]), st.integers(1, 20),
       st.integers(0, 40), st.sampled_from([(2, 3), (4, 8), (1, 300)]), st.integers(0, 12),
       st.booleans())
def test_lsh_rank_takes_the_keys_of_ranked_select_over_its_counts(seed, heads, tq, extra, kl, b,
                                                                  frac):
    # LSH(mode="rank") thresholds each row's integer counts by a histogram; Ranked._select ranks
    # the same counts (float64, -inf where not causal) by topk.top_rows: the very same keys,
    # ties to the later key included (few tables: many ties)
    from minisparse.attention.topk import Ranked
    (hq, hkv), (K, L) = heads, kl
    r = np.random.default_rng(seed)
    tk, d = tq + extra, 8
    q = r.standard_normal((hq, tq, d)).astype(np.float32)
    k = r.standard_normal((hkv, tk, d)).astype(np.float32)
    k_pos = np.arange(tk)
    q_pos = k_pos[tk - tq:].copy()
    sel = LSH(K, L, seed=seed % 7, block=5, **({"fraction": (b + 1) / 13} if frac else {"k": b}))
    mine, ref = sel.select(q, k, q_pos, k_pos), Ranked._select(sel, q, k, q_pos, k_pos)
    np.testing.assert_array_equal(mine.idx_ptr, ref.idx_ptr)
    np.testing.assert_array_equal(mine.idx, ref.idx)


def test_lsh_for_layer_builds_its_index_per_block_and_extends_it_within_one():
    # the index holds codes against one block's centre: extended while the query stays in that
    # block, rebuilt when it enters the next (at every step in the first block, where each row
    # centres by its own causal keys); one index per layer; no state: unbound
    sel = LSH(3, 4, seed=5, k=4, block=8)
    k = rand(0, 2, 40, 8)
    state = {}
    ix = sel.for_layer(0, state, k[:, :10], None).index         # query at 9: block [8, 16)
    assert ix.n == 10 and ix.end == 8
    np.testing.assert_array_equal(ix.mu, k[:, :8].astype(np.float64).mean(1))
    for S in range(11, 17):
        assert sel.for_layer(0, state, k[:, :S], None).index is ix and ix.n == S   # extended
    fresh = sel.for_layer(0, state, k[:, :17], None).index      # query at 16: the next block
    assert fresh is not ix and fresh.end == 16 and state[(sel.describe(), 0)] is fresh
    assert sel.for_layer(1, state, k[:, :17], None).index is not fresh   # one index per layer
    first = sel.for_layer(0, state, k[:, :5], None).index               # fewer keys: a new cache
    assert first.n == 5 and first.end == 5                             # first block: own keys
    assert sel.for_layer(0, state, k[:, :6], None).index is not first  # a new centre per step
    assert sel.for_layer(0, None, k[:, :5], None) is sel                 # no state: unbound


# ---- Hybrid ------------------------------------------------------------------------------------
@given(seeds, st.integers(1, 40), st.integers(0, 16), st.floats(0, 1))
def test_hybrid_sets_are_disjoint_and_fill_the_budget(seed, tk, b, ratio):
    q, k, v = qkv(seed, 4, 2, min(tk, 6), tk)
    hq, tq, _ = q.shape
    for prim in (TopK(0), TopK(0, per="kv")):
        hy = Hybrid(prim, LSH(3, 6, seed=seed % 7, k=0), ratio, k=b)
        parts = hy.parts(q, k, np.arange(tk - tq, tk), np.arange(tk))
        a, c = (sets(x, hq, tq, tk) for x in parts)                            # (Hq, Tq, Tk)
        n = np.tile(np.arange(tk - tq, tk) + 1, (hq, 1))                       # (Hq, Tq) causal keys
        assert not (a & c).any()                                               # disjoint
        np.testing.assert_array_equal(a.sum(-1), np.minimum(np.floor(ratio * b + 0.5), n))
        np.testing.assert_array_equal((a | c).sum(-1), np.minimum(b, n))      # fills the budget
        _, stt = attend(q, k, v, hy, return_stats=True)
        np.testing.assert_array_equal(stt.n_attended, np.minimum(b, n))


# ---- IVF ---------------------------------------------------------------------------------------
@given(seeds, st.integers(8, 80), st.integers(1, 10), st.integers(1, 12))
def test_ivf_recall_is_one_when_every_list_is_probed(seed, tk, kk, lists):
    q, k, v = qkv(seed, 4, 2, min(tk, 6), tk)
    ix = IVFIndex(k, n_lists=lists, seed=seed % 5)
    a = sets(IVF(kk, nprobe=lists).bind(ix).select(q, k), 4, q.shape[1], tk)
    b = sets(TopK(kk).select(q, k), 4, q.shape[1], tk)
    np.testing.assert_array_equal(a, b)        # same candidates (all), same scores, same tie rule


@given(seeds, st.integers(8, 40))
def test_ivf_bound_index_decode_step_equals_prefill_row(seed, tk):
    q, k, v = qkv(seed, 4, 2, tk, tk)
    n0 = tk // 2
    ix = IVFIndex(k[:, :n0], n_lists=4, seed=1)               # built after "prefill"
    ix.extend(k[:, n0:])                                      # then extended per token
    sel = IVF(3, nprobe=2).bind(ix)
    # the reference kernel reads each row alone: the same key set gives the same bits (the fast
    # path's decode kernel sums in its own float32 order)
    pre = attend(q, k, v, sel, kernel=reference_kernel)
    for i in range(tk):
        dec = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], sel, q_pos=[i],
                     kernel=reference_kernel)
        np.testing.assert_array_equal(dec[:, 0], pre[:, i])


@given(seeds, st.integers(0, 2), st.lists(st.integers(0, 9), max_size=6))
def test_append_along_equals_concatenation_whatever_the_growth(seed, axis, sizes):
    # a buffer of capacity 3 along `axis` takes appends of any size: what it holds in use must
    # be exactly the concatenation of everything appended, however often it grew
    r = np.random.default_rng(seed)
    shape = [2, 3, 4]
    buf, n, parts = np.zeros(shape, np.int64), 0, []
    for T in sizes:
        shape[axis] = T
        new = r.integers(1, 100, shape)
        buf = append_along(buf, n, new, axis)
        n += T
        parts.append(new)
        shape[axis] = 3
    held = buf[(slice(None),) * axis + (slice(0, n),)]
    want = np.concatenate(parts, axis) if parts else held[(slice(None),) * axis + (slice(0, 0),)]
    np.testing.assert_array_equal(held, want)
    assert buf.shape[axis] >= n


@given(seeds, st.integers(8, 20), st.lists(st.integers(1, 30), min_size=1, max_size=4))
def test_extended_indexes_keep_every_earlier_key(seed, n0, steps):
    # IVF's assignments and LSH's codes grow by doubling as keys arrive: the entries of the
    # keys held before an extension must come through it unchanged
    k = rand(seed, 2, n0 + sum(steps), 8)
    ivf, lsh = IVFIndex(k[:, :n0], n_lists=3, seed=1), LSHIndex(k[:, :n0], bits=3, tables=4, seed=5)
    n = n0
    for t in steps:
        a, c = ivf.assign.copy(), lsh.codes.copy()
        ivf.extend(k[:, n:n + t])
        lsh.extend(k[:, n:n + t])
        np.testing.assert_array_equal(ivf.assign[:, :n], a)
        np.testing.assert_array_equal(lsh.codes[:, :, :n], c)
        n += t
        assert ivf.n == lsh.n == n and ivf.assign.shape[1] == n and lsh.codes.shape[2] == n


@pytest.mark.parametrize("sel", [IVF(4, nprobe=2)], ids=["ivf"])
def test_for_layer_extends_its_index_then_rebuilds_it_once_stale(sel):
    # a layer's index is built at the first decode step, extended while the keys at most double
    # (the centroids / the mean were fitted on the first n_fit keys), rebuilt after that; another
    # layer, or a fresh cache holding fewer keys, gets its own
    k = rand(0, 2, 40, 8)
    state = {}
    ix = sel.for_layer(0, state, k[:, :10], None).index
    assert ix.n == 10 and ix.n_fit == 10
    for S in range(11, 21):
        assert sel.for_layer(0, state, k[:, :S], None).index is ix and ix.n == S   # extended
    same = sel.for_layer(0, state, k[:, :21], None).index      # held 20 = 2 x 10: not stale yet
    assert same is ix and ix.n == 21 and ix.stale               # 21 > 2 x 10: stale from now on
    fresh = sel.for_layer(0, state, k[:, :22], None).index
    assert fresh is not ix and fresh.n == fresh.n_fit == 22 and state[(sel.describe(), 0)] is fresh
    assert sel.for_layer(1, state, k[:, :22], None).index is not fresh   # one index per layer
    assert sel.for_layer(0, state, k[:, :5], None).index.n == 5          # fewer keys: a new cache
    assert sel.for_layer(0, None, k[:, :5], None) is sel                 # no state: unbound


def test_ivf_extend_assigns_nearest_centroid_and_touches_fewer_keys():
    k = rand(0, 2, 3000, 16)
    ix = IVFIndex(k[:, :2000], seed=0)
    ix.extend(k[:, 2000:])
    c = ix.centroids.astype(np.float64)                                        # (Hkv, C, d)
    dist = ((k[:, 2000:, None, :].astype(np.float64) - c[:, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ix.assign[:, 2000:], dist.argmin(-1))       # no ties in R^16
    sel = IVF(32, nprobe=4).bind(ix)
    q = rand(1, 4, 1, 16)
    sel.select(q, k)
    # touched = C + the keys of 4 probed lists: far below the 3000 keys a dense scan reads
    assert (sel.last_touched < 3000 / 4).all() and ix.n_lists == 45 and not ix.stale


def test_spec_tokens_round_trip():
    for s in ["topk=64", "topk=2%", "topk=64/kv", "topk=8/kv/r16", "quest=16/5%", "quest=8/64",
              "lsh=K8L75/5%,seed=0", "magicpig=K8L75,seed=3", "lsh=K8L75B64/5%,seed=0",
              "magicpig=K4L20B128,seed=1", "ivf=64/p8", "ivf=2%/p16/c256",
              "hybrid=5%/0.5/K8L75", "sinks=4,window=64,magicpig=K8L75,seed=1"]:
        assert parse_attention_spec(s).describe() == s
    for bad in ["topk", "topk=abc", "topk=8/xx", "quest=16", "lsh=K8", "magicpig=8x75",
                "ivf=64/q3", "hybrid=5%"]:
        with pytest.raises(ValueError, match="attention spec"):
            parse_attention_spec(bad)


# ---- Quest's running page bounds ----------------------------------------------------------------
@given(seeds, st.integers(1, 40), st.lists(st.integers(1, 9), min_size=1, max_size=6),
       st.integers(1, 5))
def test_quest_running_page_bounds_equal_recomputed_bounds(seed, n0, steps, page):
    # min and max are exact, so bounds grown page by page as keys arrive (any step sizes) must
    # equal the bounds of all keys at once, bit for bit
    k = rand(seed, 2, n0 + sum(steps), 8)
    pb, n = PageBounds(k[:, :n0], page), n0
    for t in steps:
        pb.extend(k[:, n:n + t])
        n += t
        mn, mx = page_bounds_all(k[:, :n], page)
        assert pb.n == n and pb.pages == n // page
        np.testing.assert_array_equal(pb.mn[:, :pb.pages], mn)
        np.testing.assert_array_equal(pb.mx[:, :pb.pages], mx)


@given(seeds, st.integers(8, 60))
def test_quest_decode_with_running_bounds_equals_prefill_row(seed, tk):
    q, k, v = qkv(seed, 4, 2, tk, tk)
    sel, state = Quest(page=4, k=8), {}
    # the reference kernel reads each row alone: the same key set gives the same bits (the fast
    # path's decode kernel sums in its own float32 order)
    pre = attend(q, k, v, sel, kernel=reference_kernel)
    for i in range(tk):
        step = sel.for_layer(0, state, k[:, :i + 1], None)       # bounds kept and extended
        assert step._bounds is state[(sel.describe(), 0)] and step._bounds.n == i + 1
        dec = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], step, q_pos=[i],
                     kernel=reference_kernel)
        np.testing.assert_array_equal(dec[:, 0], pre[:, i])


@given(st.integers(0, 2**31 - 1), st.sampled_from([4, 16]), st.integers(1, 9))
def test_quest_rows_on_threads_equal_quest_rows_serial(seed, page, budget_pages):
    # a prefill chunk's rows run in parallel; each row writes its own slice, so the CSR is the
    # same, bit for bit, as the serial loop a decode step runs
    from minisparse.attention.quest import page_bounds_all, quest_rows, quest_rows_parallel
    r = np.random.default_rng(seed)
    q = r.standard_normal((4, 40, 8)).astype(np.float32)
    k = r.standard_normal((2, 100, 8)).astype(np.float32)
    hi = np.arange(61, 101)                                   # causal keys of the 40 queries
    mn, mx = page_bounds_all(k, page)
    n_pages = np.full(4 * 40, budget_pages)
    k0 = (61 // page) * page                                  # the tail from the first partial page
    for a, b, c in zip(quest_rows(q, k, 0, hi, page, n_pages, mn, mx),
                       quest_rows_parallel(q, k, 0, hi, page, n_pages, mn, mx),
                       quest_rows(q, np.ascontiguousarray(k[:, k0:]), k0, hi, page, n_pages, mn, mx)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)                   # the tail alone reads the same keys


@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 60), st.booleans())
def test_top_rows_threshold_path_takes_the_keys_of_the_general_path(seed, tq, tk, ties):
    # without recent keys or exclusions top_rows takes its thresholds from NumPy's partition;
    # the general compiled path (take_top per row) must pick exactly the same keys, ties included
    from minisparse.attention.topk import _top_rows, top_rows
    r = np.random.default_rng(seed)
    R = tq * int(r.integers(1, 4))
    S = (r.integers(-3, 4, (R, tk)) if ties else r.standard_normal((R, tk))).astype(np.float64)
    S[r.random((R, tk)) < 0.2] = -np.inf                      # keys no score made eligible
    k_pos = np.cumsum(r.integers(1, 3, tk))
    q_pos = np.sort(r.integers(0, k_pos.max() + 2, tq))         # finite scores past q_pos too
    b = r.integers(0, tk + 2, R)
    none = np.zeros((0, 0), np.bool_)
    a, e = top_rows(S, b, q_pos, k_pos, 0, none), _top_rows(S, b, q_pos, k_pos, 0, none)
    np.testing.assert_array_equal(a[0], e[0])
    np.testing.assert_array_equal(a[1], e[1])


@given(st.integers(0, 2**31 - 1), st.integers(1, 300), st.integers(1, 20))
def test_ivf_list_sums_are_the_bits_of_add_at(seed, n, C):
    # k-means' per-list sums, compiled: the same float64 additions in the same (row) order
    from minisparse.attention.ivf import _list_sums
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 8)).astype(np.float32)
    a = r.integers(0, C, n)
    s = np.zeros((C, 8))
    np.add.at(s, a, x)
    np.testing.assert_array_equal(_list_sums(x, a, C), s)
