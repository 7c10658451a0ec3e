"""MagicPIG's kernel against the float64 dense reference with its log-weights.

MagicPIG (LSH(mode="sample")) reads every causal key colliding with the query in >= 2 of L
SimHash tables and weights it by 1 / P(sampled): the Selection carries logw = -log P, which the
kernel adds to the logit. The reference gets the same set as a mask and the same float32 logw, so
the two compute one function; the tolerance is minisparse.testing.kernel_tol with its log-weight
terms. Here at sizes the shared suite does not draw: several 32-key chunks, head widths up to 64,
K and L over the range the specs use, alone and under Sinks | Window.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import LSH, Sinks, Window, attend, dense_reference
from minisparse.testing import kernel_tol, lse_tol


@st.composite
def magicpig_problems(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    tk = draw(st.integers(1, 100))                        # up to 4 chunks of 32 keys
    tq = draw(st.integers(1, tk))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    d = draw(st.sampled_from([8, 16, 64]))
    bits = draw(st.integers(1, 8))
    tables = draw(st.sampled_from([2, 10, 75]))
    exact = draw(st.sampled_from([None, (1, 4), (4, 16)]))    # (sinks, window) unioned in
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    sel = LSH(bits, tables, seed=seed % 1000, mode="sample")
    if exact is not None:
        sel = Sinks(exact[0]) | Window(exact[1]) | sel
    k_pos = np.arange(tk, dtype=np.int64)
    return sel, f(hq, tq, d), f(hkv, tk, d), f(hkv, tk, d), k_pos[tk - tq:].copy(), k_pos


@given(magicpig_problems())
def test_magicpig_kernel_equals_reference_with_its_log_weights(prob):
    sel, q, k, v, q_pos, k_pos = prob
    out, lse = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    mask, logw = sel.select(q, k, q_pos, k_pos).to_mask(q.shape[0], q.shape[1], k.shape[1])
    ref, ref_lse = dense_reference(q, k, v, q_pos, k_pos, mask=mask, logw=logw, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v, logw=logw))
    # lse: max + log(sum), off by the logit error plus the normaliser's (lse_tol's derivation)
    finite = np.isfinite(ref_lse)
    assert (np.isfinite(lse) == finite).all()             # empty rows agree: no key, lse -inf
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=0, atol=lse_tol(q, k, logw))


def test_magicpig_log_weights_are_not_all_zero():
    # the test above must exercise the weights: on a typical draw they are -log P > 0
    r = np.random.default_rng(1)
    q, k = r.standard_normal((2, 8, 16)).astype(np.float32), r.standard_normal((1, 64, 16)).astype(np.float32)
    sel = LSH(4, 10, seed=3, mode="sample").select(q, k)
    assert sel.logw.size > 0 and (sel.logw > 0).mean() > 0.5


def test_magicpig_without_its_weights_differs_from_the_reference():
    # the comparison is sharp: dropping the importance weights moves the output far beyond the
    # tolerance, so a kernel that ignored logw would fail the property above
    r = np.random.default_rng(2)
    q, k, v = (r.standard_normal(s).astype(np.float32) for s in ((2, 8, 16), (1, 64, 16), (1, 64, 16)))
    sel = LSH(4, 10, seed=3, mode="sample").select(q, k)
    mask, logw = sel.to_mask(2, 8, 64)
    weighted = dense_reference(q, k, v, mask=mask, logw=logw)
    unweighted = dense_reference(q, k, v, mask=mask)
    assert np.abs(weighted - unweighted).max() > 1e3 * kernel_tol(q, k, v, logw=logw)


@given(st.integers(0, 2**31 - 1), st.integers(0, 30), st.booleans())
def test_capped_magicpig_keeps_the_most_colliding_of_its_sampled_keys_with_their_weights(seed, b, frac):
    # magicpig=K/L/B: a row's sampled keys (>= 2 tables) beyond the budget are dropped, those
    # colliding in the most tables kept (ties to the later key), each with its uncapped weight
    r = np.random.default_rng(seed)
    q, k = r.standard_normal((2, 12, 8)).astype(np.float32), r.standard_normal((1, 60, 8)).astype(np.float32)
    q_pos, k_pos = np.arange(48, 60), np.arange(60)
    cap = {"fraction": (b + 1) / 31} if frac else {"k": b}
    full = LSH(3, 12, seed=seed % 5, mode="sample").select(q, k, q_pos, k_pos)
    capped = LSH(3, 12, seed=seed % 5, mode="sample", **cap).select(q, k, q_pos, k_pos)
    counts, logw = LSH(3, 12, seed=seed % 5, mode="sample").collisions(q, k, q_pos, k_pos, True)
    budget = np.full(12, b) if not frac else np.ceil(cap["fraction"] * (q_pos + 1) - 1e-9)
    for row in range(24):
        got = capped.idx[capped.idx_ptr[row]:capped.idx_ptr[row + 1]]
        have = full.idx[full.idx_ptr[row]:full.idx_ptr[row + 1]]
        c = counts[row]
        want = sorted(sorted(have, key=lambda j: (c[j], j))[::-1][:int(budget[row % 12])])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(capped.logw[capped.idx_ptr[row]:capped.idx_ptr[row + 1]],
                                      logw[row, got])
