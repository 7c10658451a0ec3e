"""The invariants every selector is held to, one function each: fn(selector, problem, ...) asserts
one property on one drawn problem and always reaches its assertion. check_selector runs them
under Hypothesis; the shared suite (tests/test_attention_properties.py) calls the same functions.

Ground truth is the float64 dense reference; each tolerance comes from bounds.py, with the extra
step it adds derived beside the assertion. Leaves out pseudo-keys in the mask-based checks
(a landmark has no mask form: its closed form is tested in test_attention_patterns.py).
"""
from __future__ import annotations

import numpy as np

from ..attention.kernel import attend
from ..attention.reference import dense_reference
from ..attention.selection import KV
from .bounds import KERNEL_REL, kernel_tol, lse_tol


def _selection(sel, prob):
    """The normalised Selection attend reads: it hands selectors float32 keys."""
    q, k, v, q_pos, k_pos = prob
    return sel.select(q, k.astype(np.float32), q_pos, k_pos).normalize()


def kernel_equals_reference(sel, prob):
    """attend over sel's keys equals the float64 reference restricted to the same mask and
    log-weights (the kernel reads what the selection says, and each key once)."""
    q, k, v, q_pos, k_pos = prob
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    mask, logw = _selection(sel, prob).to_mask(q.shape[0], q.shape[1], k.shape[1])
    ref = dense_reference(q, k, v, q_pos, k_pos, mask=mask, logw=logw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v, logw=logw),
                               err_msg=f"{sel}: kernel differs from the reference on its own mask")


def covering_equals_dense(sel, prob):
    """A selector reading every causal key (sel must cover) gives dense attention."""
    q, k, v, q_pos, k_pos = prob
    out, st = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_stats=True)
    ref = dense_reference(q, k, v, q_pos, k_pos)
    assert (st.n_attended == st.n_causal).all(), \
        f"{sel} does not read every causal key: read {st.n_attended.tolist()}, causal {st.n_causal.tolist()}"
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v),
                               err_msg=f"{sel}: covering every causal key differs from dense")


def later_keys_change_nothing(sel, prob, i):
    """Rows 0..i (a prefill problem: query t at key t's position) are bit-identical when the keys
    and values after key i change: neither the choice nor the arithmetic of row t reads them.
    A selector that is not `row_local` (its rows depend on the call's later queries, which see
    later keys) is held to the call of queries 0..i: keys after its last query change nothing."""
    q, k, v, q_pos, k_pos = prob
    if not sel.row_local:
        q, q_pos = q[:, :i + 1], q_pos[:i + 1]
    k2, v2 = k.copy(), v.copy()
    k2[:, i + 1:] = (100.0 * np.random.default_rng(i).standard_normal(k2[:, i + 1:].shape)).astype(k.dtype)
    v2[:, i + 1:] = -7.0
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, k2, v2, sel, q_pos=q_pos, k_pos=k_pos)
    # exact: row t's selection and arithmetic read nothing after its own position
    np.testing.assert_array_equal(a[:, :i + 1], b[:, :i + 1],
                                  err_msg=f"{sel}: rows <= {i} change when keys after {i} change")


def decode_equals_prefill(sel, prob):
    """Decode step i (one query against keys 0..i) equals prefill row i. For a selector that is
    not `row_local` (a row's keys depend on the other rows of its call) the rule allows less:
    decode step i equals the call that holds query i alone, against every key (the later keys,
    not causal to it, must change nothing)."""
    q, k, v, q_pos, k_pos = prob
    if sel.row_local:
        pre, lse = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    else:
        rows = [attend(q[:, i:i + 1], k, v, sel, q_pos=q_pos[i:i + 1], k_pos=k_pos, return_lse=True)
                for i in range(k.shape[1])]
        pre = np.concatenate([o for o, _ in rows], axis=1)
        lse = np.concatenate([x for _, x in rows], axis=1)
    for i in range(k.shape[1]):
        dec, dl = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], sel, q_pos=q_pos[i:i + 1],
                         k_pos=k_pos[:i + 1], return_lse=True)
        # the same row selection read in the same order gives the same float operations; allow
        # the kernel's freedom against the exact value twice (each side within kernel_tol /
        # lse_tol of the float64 reference, so within twice of each other), 0 in practice
        np.testing.assert_allclose(dec[:, 0], pre[:, i], rtol=0, atol=2 * kernel_tol(q, k, v),
                                   err_msg=f"{sel}: decode step {i} differs from prefill row {i}")
        np.testing.assert_allclose(dl[:, 0], lse[:, i], rtol=0, atol=2 * lse_tol(q, k),
                                   err_msg=f"{sel}: decode step {i}'s lse differs from prefill row {i}")


def gqa_equals_repeated_kv(sel, prob):
    """Grouped-query attention equals multi-head attention on K/V repeated per query head."""
    q, k, v, q_pos, k_pos = prob
    g = q.shape[0] // k.shape[0]
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, np.repeat(k, g, axis=0), np.repeat(v, g, axis=0), sel, q_pos=q_pos, k_pos=k_pos)
    np.testing.assert_array_equal(a, b, err_msg=f"{sel}: GQA differs from repeated K/V")


def error_bounded_by_missing_mass(sel, prob):
    """For an exact subset S: |o - o_S| <= 2 (1 - P_S) max|v| per row, P_S the dense softmax
    probability mass on S."""
    q, k, v, q_pos, k_pos = prob
    hq, tq, d = q.shape
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    mask, _ = _selection(sel, prob).to_mask(hq, tq, k.shape[1])
    kk = np.repeat(k, hq // k.shape[0], 0).astype(np.float64)          # (Hq, Tk, d)
    s = np.einsum("htd,hsd->hts", q.astype(np.float64), kk) / np.sqrt(d)  # (Hq, Tq, Tk)
    causal = k_pos[None, None, :] <= q_pos[None, :, None]
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mass = (p * (mask & causal)).sum(-1)                                # (Hq, Tq) P_S
    err = np.linalg.norm(out - dense_reference(q, k, v, q_pos, k_pos), axis=-1)   # (Hq, Tq)
    vmax = np.linalg.norm(v.astype(np.float64), axis=-1).max()
    # o_S = sum_S p_j v_j / P_S, so o - o_S = (1 - 1/P_S) sum_S p_j v_j + sum_notS p_j v_j and
    # |o - o_S| <= (1 - P_S) vmax + (1 - P_S) vmax. Slack: the kernel's per-element float32 error
    # (kernel_tol) over d elements, |.|_2 <= sqrt(d) * max. A row that reads no key (P_S = 0)
    # outputs 0, and |0 - o| <= vmax <= the bound's 2 vmax: no row is left out.
    bound = 2 * (1 - mass) * vmax + np.sqrt(d) * kernel_tol(q, k, v)
    assert (err <= bound).all(), (f"{sel}: |o - o_S| {err.max():.3g} exceeds 2(1 - mass) max|v| "
                                  f"at rows {np.argwhere(err > bound).tolist()}")


def extreme_logits_finite(sel, prob, big):
    """Logits of size |big| (1e4) give finite outputs inside the values' hull, no NaN lse."""
    q, k, v, q_pos, k_pos = prob
    q = q / np.maximum(np.abs(q).max(), 1e-6) * np.float32(np.sqrt(abs(big)))
    k = (k / np.maximum(np.abs(k).max(), 1e-6) * np.float32(np.sqrt(abs(big)) * np.sign(big))).astype(np.float32)
    out, lse = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    assert np.isfinite(out).all() and not np.isnan(lse).any(), f"{sel}: NaN or inf at logits {big:g}"
    # outputs are convex combinations of values, up to the kernel's relative float32 error
    # KERNEL_REL (bounds.py; the logit term does not apply: any weights give a convex combination)
    assert (np.abs(out) <= np.abs(v).max() * (1 + KERNEL_REL)).all(), \
        f"{sel}: output outside the values' range at logits {big:g}"


def _arrays(s):
    return [s.head_kind, s.n_heads, s.range_ptr, s.range_lo, s.range_hi, s.idx_ptr, s.idx,
            s.logw, s.exact, s.extra_pos, s.extra_lo, s.extra_hi]


def same_seed_same_selection(make, prob):
    """Two selectors built alike (the same seed) select the same sets, and selecting twice
    with one of them does too (no hidden state)."""
    a, b = make(), make()
    sa, sb, sa2 = _selection(a, prob), _selection(b, prob), _selection(a, prob)
    for x, y, z in zip(_arrays(sa), _arrays(sb), _arrays(sa2)):
        assert np.array_equal(x, y) and np.array_equal(x, z), \
            f"{a}: two selections with the same seed differ"


def keys_read(selection, hq, q_pos, k_pos):
    """(Hq, Tq) distinct keys and pseudo-keys a normalised selection makes a row read, after
    causality by position: the density a selector should report."""
    s = selection.normalize()
    tq, tk = len(q_pos), len(k_pos)
    n = np.zeros((hq, tq), np.int64)
    hkv = s.n_heads if s.head_kind == KV else hq           # only KV rows depend on the group
    for h in range(hq):
        for t in range(tq):
            ranges, idx = s.rows(s.row_head(h, hq, hkv), t)
            real = {j for lo, hi in ranges for j in range(lo, hi)} | {j for j, _ in idx if j < tk}
            pseudo = {j - tk for j, _ in idx if j >= tk}
            n[h, t] = sum(k_pos[j] <= q_pos[t] for j in real) + \
                sum(s.extra_pos[e] <= q_pos[t] for e in pseudo)
    return n


def density_equals_keys_read(sel, prob):
    """AttentionStats.n_attended, the density the kernel reports, equals the distinct keys the
    selection reads after causality: no key counted twice, none dropped."""
    q, k, v, q_pos, k_pos = prob
    _, st = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_stats=True)
    want = keys_read(_selection(sel, prob), q.shape[0], q_pos, k_pos)
    assert np.array_equal(st.n_attended, want), \
        f"{sel}: reported keys read {st.n_attended.tolist()} != distinct keys selected {want.tolist()}"
