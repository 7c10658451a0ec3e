"""The shared suite's invariants as plain functions, for the issue-22 selectors' own test files
(tests/test_methods_*.py): the shared file (test_attention_properties.py) picks the families up
through minisparse.spec.suite_selectors(); these run the same checks on them here too."""
import numpy as np
from hypothesis import strategies as st

from minisparse.attention import attend, dense_reference
from minisparse.testing import KERNEL_REL, kernel_tol


@st.composite
def problems(draw, full_queries=False):
    """(q, k, v, q_pos, k_pos): up to 24 keys, GQA groups 1/2, d 4 or 8, positions offset."""
    seed = draw(st.integers(0, 2**31 - 1))
    tk = draw(st.integers(1, 24))
    tq = tk if full_queries else draw(st.integers(1, tk))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (2, 2)]))
    d = draw(st.sampled_from([4, 8]))
    offset = draw(st.integers(0, 5))
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)          # noqa: E731
    k_pos = np.arange(tk, dtype=np.int64) + offset
    return f(hq, tq, d), f(hkv, tk, d), f(hkv, tk, d), k_pos[tk - tq:].copy(), k_pos



def check_kernel_equals_reference_on_the_selected_set(sel, prob):
    q, k, v, q_pos, k_pos = prob
    assert sel.exact_subset
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    mask, logw = sel.select(q, k, q_pos, k_pos).to_mask(q.shape[0], q.shape[1], k.shape[1])
    ref = dense_reference(q, k, v, q_pos, k_pos, mask=mask, logw=logw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v))


def check_output_at_i_unchanged_when_later_keys_change(sel, prob, i):
    q, k, v, q_pos, k_pos = prob
    k2, v2 = k.copy(), v.copy()
    k2[:, i + 1:] = 100.0 * np.random.default_rng(i).standard_normal(k2[:, i + 1:].shape)
    v2[:, i + 1:] = -7.0
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, k2, v2, sel, q_pos=q_pos, k_pos=k_pos)
    # exact: row i's selection and arithmetic read nothing after position i
    np.testing.assert_array_equal(a[:, :i + 1], b[:, :i + 1])


def check_decode_step_equals_prefill_row(sel, prob):
    q, k, v, q_pos, k_pos = prob
    pre, lse = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    for i in range(k.shape[1]):
        dec, dl = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], sel, q_pos=q_pos[i:i + 1],
                         k_pos=k_pos[:i + 1], return_lse=True)
        # the same row selection read in the same order; only the vectorised dot's
        # reassociation freedom (kernel_tol) is allowed, 0 in practice
        np.testing.assert_allclose(dec[:, 0], pre[:, i], rtol=0, atol=kernel_tol(q, k, v))
        np.testing.assert_allclose(dl[:, 0], lse[:, i], rtol=0, atol=1e-5)


def check_gqa_equals_multihead_on_repeated_kv(sel, prob):
    q, k, v, q_pos, k_pos = prob
    g = q.shape[0] // k.shape[0]
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, np.repeat(k, g, axis=0), np.repeat(v, g, axis=0), sel, q_pos=q_pos, k_pos=k_pos)
    np.testing.assert_array_equal(a, b)                   # same rows, same numbers, same order


def dense_probabilities(q, k, q_pos, k_pos):
    """(Hq, Tq, Tk) float64 causal softmax and the causal mask."""
    hq, tq, d = q.shape
    kk = np.repeat(k, hq // k.shape[0], 0).astype(np.float64)
    s = np.einsum("htd,hsd->hts", q.astype(np.float64), kk) / np.sqrt(d)
    causal = k_pos[None, None, :] <= q_pos[None, :, None]
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True), causal


def check_error_bounded_by_missing_probability_mass(sel, prob):
    q, k, v, q_pos, k_pos = prob
    assert sel.exact_subset
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    hq, tq, d = q.shape
    mask, _ = sel.select(q, k, q_pos, k_pos).to_mask(hq, tq, k.shape[1])
    p, causal = dense_probabilities(q, k, q_pos, k_pos)
    mass = (p * (mask & causal)).sum(-1)                                  # (Hq, Tq) P_S
    err = np.linalg.norm(out - dense_reference(q, k, v, q_pos, k_pos), axis=-1)
    vmax = np.linalg.norm(v, axis=-1).max()
    # |o - o_S| <= (1 - P_S) vmax + (1 - P_S) vmax (o_S renormalises the kept mass); slack: the
    # kernel's per-element error over d elements, |.|_2 <= sqrt(d) * max
    bound = 2 * (1 - mass) * vmax + np.sqrt(d) * kernel_tol(q, k, v)
    assert (mass > 0).all()                                               # every row reads a key
    assert (err <= bound).all()


def check_covering_all_causal_keys_equals_dense(sel, prob):
    """For a selector built to read every causal key (a budget >= the keys): dense attention."""
    q, k, v, q_pos, k_pos = prob
    out, st_ = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_stats=True)
    assert (st_.n_attended == st_.n_causal).all()
    np.testing.assert_allclose(out, dense_reference(q, k, v, q_pos, k_pos), rtol=0,
                               atol=kernel_tol(q, k, v))


def check_extreme_logits_give_no_nan(sel, prob, big):
    q, k, v, q_pos, k_pos = prob
    q = q / np.maximum(np.abs(q).max(), 1e-6) * np.float32(np.sqrt(abs(big)))
    k = k / np.maximum(np.abs(k).max(), 1e-6) * np.float32(np.sqrt(abs(big)) * np.sign(big))
    out, lse = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    # a convex combination of values, up to the kernel's relative float32 error (kernel_tol's
    # KERNEL_REL, minisparse.testing; the logit term does not apply: any weights give a convex combination)
    assert (np.abs(out) <= np.abs(v).max() * (1 + KERNEL_REL)).all()
