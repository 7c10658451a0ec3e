"""The shared property suite: every selector in SELECTORS goes through the same invariants.

A new selector joins by adding one line to SELECTORS (a small instance: the tests use T <= 24).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import (BlockLocal, Dense, Globals, Landmarks, LogStride, RandomMask,
                                  RuvLLM, Sinks, Strided, Window, attend, dense_reference)
from minisparse.attention.gated import Gated
from minisparse.testing import KERNEL_REL, kernel_tol
from minisparse.attention import IVF, LSH, Hybrid, Quest, TopK   # content-based (issue 4)

SELECTORS = [
    ("dense", lambda: Dense()),
    ("window3", lambda: Window(3)),
    ("sinks2|window2", lambda: Sinks(2) | Window(2)),
    ("globals0/5|window1", lambda: Globals([0, 5]) | Window(1)),
    ("blocks4", lambda: BlockLocal(4)),
    ("strided3", lambda: Strided(3)),
    ("fixed3", lambda: Strided(3, "fixed")),
    ("logstride", lambda: LogStride()),
    ("landmarks4", lambda: Landmarks(4)),
    ("window2|landmarks4", lambda: Window(2) | Landmarks(4)),
    ("loglandmarks3", lambda: Landmarks(3, reach="log")),
    ("ruvllm(w4,b4)", lambda: RuvLLM(window=4, block=4)),
    ("random-stochastic", lambda: RandomMask(0.2, 3, seed=7, sinks=1, window=1)),
    ("random-structural", lambda: RandomMask(0.25, 2, mode="structural", seed=7, sinks=1, window=1)),
    ("gate(b3,w2,s1)", lambda: Gated(budget=3, window=2, sinks=1, gate="untrained")),
    ("topk3|r2", lambda: TopK(3, recent=2)),
    ("topk25%", lambda: TopK(fraction=0.25)),
    ("quest4/6", lambda: Quest(4, k=6)),
    ("lsh-rank-K4L8", lambda: LSH(4, 8, seed=1, k=4)),
    ("sinks1|window2|magicpig-K3L10", lambda: Sinks(1) | Window(2) | LSH(3, 10, seed=1, mode="sample")),
    ("ivf4-all-lists-probed", lambda: IVF(4, nprobe=64, n_lists=4)),
    ("hybrid6/0.5(topk+lsh)", lambda: Hybrid(TopK(0), LSH(4, 8, k=0), 0.5, k=6)),
]
IDS = [s[0] for s in SELECTORS]
MAKERS = [s[1] for s in SELECTORS]


@st.composite
def problems(draw, full_queries=False):
    seed = draw(st.integers(0, 2**31 - 1))
    tk = draw(st.integers(1, 24))
    tq = tk if full_queries else draw(st.integers(1, tk))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (2, 2)]))
    d = draw(st.sampled_from([4, 8]))
    offset = draw(st.integers(0, 5))                     # positions need not start at 0
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    k_pos = np.arange(tk, dtype=np.int64) + offset
    return f(hq, tq, d), f(hkv, tk, d), f(hkv, tk, d), k_pos[tk - tq:].copy(), k_pos


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@given(problems())
def test_kernel_equals_reference_on_the_selected_set(make, prob):
    q, k, v, q_pos, k_pos = prob
    sel = make()
    if not sel.exact_subset:
        return                                            # pseudo-keys: tested below by closed form
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    mask, logw = sel.select(q, k, q_pos, k_pos).to_mask(q.shape[0], q.shape[1], k.shape[1])
    ref = dense_reference(q, k, v, q_pos, k_pos, mask=mask, logw=logw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v))


@pytest.mark.parametrize("make", MAKERS + [lambda: Window(10**6), lambda: Sinks(10**6)],
                         ids=IDS + ["window-huge", "sinks-huge"])
@given(problems())
def test_selector_covering_all_causal_keys_equals_dense(make, prob):
    q, k, v, q_pos, k_pos = prob
    sel = make()
    out, st_ = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_stats=True)
    if not (st_.n_attended == st_.n_causal).all() or not sel.exact_subset:
        return                                            # this draw does not cover every key
    ref = dense_reference(q, k, v, q_pos, k_pos)
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v))


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@given(problems(full_queries=True), st.data())
def test_output_at_i_unchanged_when_later_keys_change(make, prob, data):
    q, k, v, q_pos, k_pos = prob
    tk = k.shape[1]
    i = data.draw(st.integers(0, tk - 1))
    k2, v2 = k.copy(), v.copy()
    k2[:, i + 1:] = 100.0 * np.random.default_rng(i).standard_normal(k2[:, i + 1:].shape)
    v2[:, i + 1:] = -7.0
    sel = make()
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, k2, v2, sel, q_pos=q_pos, k_pos=k_pos)
    # exact: row i's selection and arithmetic read nothing after position i
    np.testing.assert_array_equal(a[:, :i + 1], b[:, :i + 1])


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@given(problems(full_queries=True))
def test_decode_step_equals_prefill_row(make, prob):
    q, k, v, q_pos, k_pos = prob
    sel = make()
    pre, lse = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    for i in range(k.shape[1]):
        dec, dl = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], sel, q_pos=q_pos[i:i + 1],
                         k_pos=k_pos[:i + 1], return_lse=True)
        # the same row selection read in the same order: the same float operations. Allow only
        # the reassociation freedom of the vectorised dot (kernel_tol), which is also 0 in practice
        np.testing.assert_allclose(dec[:, 0], pre[:, i], rtol=0, atol=kernel_tol(q, k, v))
        np.testing.assert_allclose(dl[:, 0], lse[:, i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@given(problems())
def test_gqa_equals_multihead_on_repeated_kv(make, prob):
    q, k, v, q_pos, k_pos = prob
    g = q.shape[0] // k.shape[0]
    sel = make()
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, np.repeat(k, g, axis=0), np.repeat(v, g, axis=0), sel, q_pos=q_pos, k_pos=k_pos)
    np.testing.assert_array_equal(a, b)                   # same rows, same numbers, same order


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@given(problems())
def test_error_bounded_by_missing_probability_mass(make, prob):
    q, k, v, q_pos, k_pos = prob
    sel = make()
    if not sel.exact_subset:
        return
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    hq, tq, d = q.shape
    mask, _ = sel.select(q, k, q_pos, k_pos).to_mask(hq, tq, k.shape[1])
    # dense probabilities p (Hq, Tq, Tk) in float64
    kk = np.repeat(k, hq // k.shape[0], 0).astype(np.float64)
    s = np.einsum("htd,hsd->hts", q.astype(np.float64), kk) / np.sqrt(d)
    causal = k_pos[None, None, :] <= q_pos[None, :, None]
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    mass = (p * (mask & causal)).sum(-1)                  # (Hq, Tq) P_S
    ref = dense_reference(q, k, v, q_pos, k_pos)
    err = np.linalg.norm(out - ref, axis=-1)              # (Hq, Tq)
    vmax = np.linalg.norm(v, axis=-1).max()
    # o_S = sum_S p_j v_j / P_S, so o - o_S = (1 - 1/P_S) sum_S p_j v_j + sum_notS p_j v_j and
    # |o - o_S| <= (1 - P_S) vmax + (1 - P_S) vmax. Slack: the kernel's per-element float32 error
    # (kernel_tol) over d elements, |.|_2 <= sqrt(d) * max.
    bound = 2 * (1 - mass) * vmax + np.sqrt(d) * kernel_tol(q, k, v)
    nonempty = mass > 0
    assert (err[nonempty] <= bound[nonempty]).all()


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@given(problems(), st.sampled_from([1e4, -1e4]))
def test_extreme_logits_give_no_nan(make, prob, big):
    q, k, v, q_pos, k_pos = prob
    q = q / np.maximum(np.abs(q).max(), 1e-6) * np.float32(np.sqrt(abs(big)))
    k = k / np.maximum(np.abs(k).max(), 1e-6) * np.float32(np.sqrt(abs(big)) * np.sign(big))
    out, lse = attend(q, k, v, make(), q_pos=q_pos, k_pos=k_pos, return_lse=True)
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    # outputs are convex combinations of values, up to the kernel's relative float32 error
    # KERNEL_REL (minisparse/testing/bounds.py; the logit term does not apply: any weights give
    # a convex combination)
    assert (np.abs(out) <= np.abs(v).max() * (1 + KERNEL_REL)).all()
