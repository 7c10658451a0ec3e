"""SparQ, Loki and the lightning indexer: cheap approximate scores over every key, exact attention
on the top k. Each runs through the shared suite's invariants (methods_props), reports recall@k
against exact top-k, and has recall 1 at full rank / full precision."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import methods_props as M
from minisparse.attention import Indexer, Loki, SparQ, TopK, attend
from minisparse.attention.indexer import quantise_int8
from minisparse.attention.loki import pca_basis
from minisparse.attention.topk import recall_at_k, score_rows
from minisparse.spec import REGISTRY, parse_attention_spec

SMALL = {name: REGISTRY[name].small for name in ("sparq", "loki", "indexer")}
# the suite runs the indexer's small spec per query head ("indexer=4/q"); its default, one set per
# KV head, cannot meet "GQA == multi-head on repeated KV" and has its own test below


@pytest.mark.parametrize("name", sorted(SMALL))
def test_spec_round_trips_and_the_small_spec_is_registered(name):
    for spec in (REGISTRY[name].example, SMALL[name]):
        sel = parse_attention_spec(spec)
        assert parse_attention_spec(str(sel)) == sel and str(sel) == spec
        assert sel.exact_subset and sel.deterministic and sel.budget is not None


@pytest.mark.parametrize("spec,token", [("sparq=4", "sparq=4"), ("sparq=x/4", "sparq=x/4"),
                                        ("loki=2/4/q5", "q5"), ("indexer=8/f8", "f8"),
                                        ("indexer=8/q/q", "'q'"), ("indexer=4,seed=1", "seed")])
def test_bad_specs_are_errors_naming_the_token(spec, token):
    with pytest.raises(ValueError, match=token):
        parse_attention_spec(spec)


def test_r_larger_than_the_head_width_is_an_error():
    q = np.zeros((1, 3, 4), np.float32)
    for sel in (SparQ(5, 2), Loki(5, 2, calib=1)):
        with pytest.raises(ValueError, match="head width"):
            sel.select(q, q)


# ---- the shared suite's invariants ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SMALL))
@given(M.problems())
def test_kernel_equals_reference_on_the_selected_set(name, prob):
    M.check_kernel_equals_reference_on_the_selected_set(parse_attention_spec(SMALL[name]), prob)


@pytest.mark.parametrize("name", sorted(SMALL))
@given(M.problems(full_queries=True), st.data())
def test_output_at_i_unchanged_when_later_keys_change(name, prob, data):
    i = data.draw(st.integers(0, prob[1].shape[1] - 1))
    M.check_output_at_i_unchanged_when_later_keys_change(parse_attention_spec(SMALL[name]), prob, i)


@pytest.mark.parametrize("name", sorted(SMALL))
@given(M.problems(full_queries=True))
def test_decode_step_equals_prefill_row(name, prob):
    M.check_decode_step_equals_prefill_row(parse_attention_spec(SMALL[name]), prob)


@pytest.mark.parametrize("name", sorted(SMALL))
@given(M.problems())
def test_gqa_equals_multihead_on_repeated_kv(name, prob):
    M.check_gqa_equals_multihead_on_repeated_kv(parse_attention_spec(SMALL[name]), prob)


@given(M.problems())
def test_indexer_shares_one_set_per_kv_head_and_equals_per_head_without_groups(prob):
    # the shared suite's "GQA == multi-head on repeated KV" cannot hold for a set shared by a
    # group (repeating the KV heads splits the group); what holds: every query head of a group
    # reads its KV head's set, and with G = 1 the indexer is per-query-head top-k on its scores
    q, k, v, q_pos, k_pos = prob
    sel = Indexer(4, precision="f32")
    s = sel.select(q, k, q_pos, k_pos)
    mask, _ = s.to_mask(q.shape[0], q.shape[1], k.shape[1])
    G = q.shape[0] // k.shape[0]
    for h in range(q.shape[0]):
        assert (mask[h] == mask[(h // G) * G]).all()
    q1 = q[::G]                                                   # one query head per KV head
    np.testing.assert_array_equal(attend(q1, k, v, sel, q_pos=q_pos, k_pos=k_pos),
                                  attend(q1, k, v, TopK(4), q_pos=q_pos, k_pos=k_pos))
    shape = (*q1.shape[:2], k.shape[1])
    for p in ("i8", "f16"):                                       # and then "/q" changes nothing
        a = Indexer(4, precision=p).select(q1, k, q_pos, k_pos).to_mask(*shape)[0]
        b = Indexer(4, precision=p, per="q").select(q1, k, q_pos, k_pos).to_mask(*shape)[0]
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(SMALL))
@given(M.problems())
def test_error_bounded_by_missing_probability_mass(name, prob):
    M.check_error_bounded_by_missing_probability_mass(parse_attention_spec(SMALL[name]), prob)


@pytest.mark.parametrize("spec", ["sparq=2/24", "loki=2/24/c6", "indexer=24"])
@given(M.problems())
def test_a_budget_covering_every_causal_key_equals_dense(spec, prob):
    M.check_covering_all_causal_keys_equals_dense(parse_attention_spec(spec), prob)


@pytest.mark.parametrize("name", sorted(SMALL))
@given(M.problems(), st.sampled_from([1e4, -1e4]))
def test_extreme_logits_give_no_nan(name, prob, big):
    M.check_extreme_logits_give_no_nan(parse_attention_spec(SMALL[name]), prob, big)


# ---- recall@k against exact top-k -------------------------------------------------------------
@given(M.problems())
def test_sparq_with_every_component_is_exact_top_k(prob):
    # r = d: the components in ascending order are the whole vectors, and the score is the same
    # float32 dot as TopK's, so the ranking (and its tie rule) is TopK's bit for bit
    q, k, v, q_pos, k_pos = prob
    sel = SparQ(q.shape[-1], 3)
    assert (sel.recall(q, k, q_pos, k_pos) == 1.0).all()
    assert sel.exact() == TopK(3)


@given(M.problems())
def test_indexer_at_full_precision_is_exact_top_k_per_kv_head(prob):
    q, k, v, q_pos, k_pos = prob
    sel = Indexer(3, precision="f32")
    assert (sel.recall(q, k, q_pos, k_pos) == 1.0).all()
    assert sel.exact() == TopK(3, per="kv")
    per_q = Indexer(3, precision="f32", per="q")
    assert (per_q.recall(q, k, q_pos, k_pos) == 1.0).all() and per_q.exact() == TopK(3)


def rounding_safe_rows(q, k, b, tol):
    """(Hq, Tq) rows whose exact b-th and (b+1)-th scores are more than 2 tol apart: there no
    rounding of size tol can swap a key across the top-b threshold."""
    S = score_rows(q, k, np.arange(q.shape[1]), np.arange(k.shape[1]), False)   # (Hq*Tq, Tk)
    srt = -np.sort(-S, axis=1)
    with np.errstate(invalid="ignore"):                  # -inf - -inf: rows without b + 1 keys
        return (srt[:, b - 1] - srt[:, b] > 2 * tol).reshape(q.shape[:2])


@pytest.mark.parametrize("seed", range(4))
def test_loki_with_every_component_is_exact_top_k_away_from_near_ties(seed):
    # r = d: P is orthonormal, so (qP).(kP) = q.k in exact arithmetic; in float32 the projected
    # dot differs by at most ~ 3 d u |q| |k| (two projections and one dot, u = 2^-24 each, d terms).
    # Rows whose top-k margin exceeds twice that must have recall 1; with random data almost all
    # rows qualify (asserted, so the check cannot pass vacuously).
    r = np.random.default_rng(seed)
    d, T, b = 16, 96, 8
    q = r.standard_normal((2, T, d)).astype(np.float32)
    k = r.standard_normal((1, T, d)).astype(np.float32)
    tol = 3 * d * 2.0**-24 * np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max()
    rec = Loki(d, b, calib=32).recall(q, k)
    safe = rounding_safe_rows(q, k, b, tol) & (np.arange(T) >= b)[None]   # rows with a choice
    assert safe.sum() >= 0.9 * 2 * (T - b)
    assert (rec[safe] == 1.0).all()


def test_loki_finds_exact_top_k_when_keys_lie_in_an_r_dim_subspace():
    # keys of rank r: the top-r principal directions span them, so q.P_r P_r^T k = q.k and the
    # ranking is exact up to rounding (same margin argument as above); SparQ at the same r is not
    r = np.random.default_rng(7)
    d, rank, T, b = 16, 4, 128, 8
    basis = np.linalg.qr(r.standard_normal((d, rank)))[0]                  # (d, r) orthonormal
    k = (r.standard_normal((1, T, rank)) @ basis.T).astype(np.float32)
    q = r.standard_normal((2, T, d)).astype(np.float32)
    tol = 4 * d * 2.0**-24 * np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max()
    safe = rounding_safe_rows(q, k, b, tol) & (np.arange(T) >= 32)[None]  # rows after calibration
    assert safe.sum() >= 0.9 * 2 * (T - 32)
    assert (Loki(rank, b, calib=32).recall(q, k)[safe] == 1.0).all()
    assert SparQ(rank, b).recall(q, k)[safe].mean() < 1.0


def test_recall_grows_with_r_and_precision_on_random_data():
    r = np.random.default_rng(1)
    q = r.standard_normal((2, 64, 8)).astype(np.float32)
    k = r.standard_normal((1, 64, 8)).astype(np.float32)
    sp = [SparQ(x, 6).recall(q, k).mean() for x in (1, 2, 4, 8)]
    assert sp[-1] == 1.0 and sp[0] < sp[-1] and sp == sorted(sp)
    low = Indexer(6, precision="i8").recall(q, k).mean()
    assert 0.8 <= low <= 1.0                       # int8 keeps the ranking up to near-ties


def test_recall_at_k_counts_the_exact_sets_keys_found():
    q = np.ones((1, 4, 2), np.float32)
    k = np.array([[[1, 0], [2, 0], [3, 0], [4, 0]]], np.float32)
    # q.k = 1, 2, 3, 4: exact top-1 of row 3 is key 3; "window=1" reads key 3 too, "sinks=1" key 0
    assert recall_at_k(parse_attention_spec("window=1"), TopK(1), q, k)[0].tolist() == [1, 1, 1, 1]
    assert recall_at_k(parse_attention_spec("sinks=1"), TopK(1), q, k)[0].tolist() == [1, 0, 0, 0]


# ---- Loki's basis: calibrated once from the first keys, kept in the cache's state -------------
def test_loki_rows_before_calibration_are_exact_top_k():
    r = np.random.default_rng(2)
    q = r.standard_normal((2, 40, 8)).astype(np.float32)
    k = r.standard_normal((1, 40, 8)).astype(np.float32)
    rec = Loki(1, 4, calib=20).recall(q, k)
    assert (rec[:, :19] == 1.0).all()                      # rows seeing < 20 keys: exact scores
    assert rec[:, 19:].mean() < 1.0                        # r = 1 of 8 after: approximate


def test_loki_for_layer_fits_the_basis_once_and_decode_equals_prefill():
    r = np.random.default_rng(3)
    q = r.standard_normal((2, 30, 8)).astype(np.float32)
    k = r.standard_normal((1, 30, 8)).astype(np.float32)
    v = r.standard_normal((1, 30, 8)).astype(np.float32)
    sel, state = Loki(3, 5, calib=12), {}
    assert sel.for_layer(0, state, k[:, :11], v[:, :11]) is sel and not state   # too few keys yet
    bound = sel.for_layer(0, state, k[:, :12], v[:, :12])
    np.testing.assert_array_equal(state[(str(sel), 0)], pca_basis(k[:, :12]))
    assert bound == sel and bound.basis is state[(str(sel), 0)]
    assert sel.bind({"another": "state"}) is sel           # a union passes other states along
    pre = attend(q, k, v, sel)
    for i in range(12, 30):                                # decode steps read the stored basis
        step = sel.for_layer(0, state, k[:, :i + 1], v[:, :i + 1])
        dec = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], step, q_pos=np.array([i]))
        np.testing.assert_allclose(dec[:, 0], pre[:, i], rtol=0, atol=M.kernel_tol(q, k, v))


def test_int8_quantisation_error_is_at_most_half_a_step():
    x = np.random.default_rng(4).standard_normal((3, 5, 8)).astype(np.float32)
    xi, scale = quantise_int8(x)
    assert np.abs(xi).max() <= 127 and (xi == np.rint(xi)).all()
    # round-to-nearest: |x - scale * xi| <= scale / 2, plus float32 rounding of x / scale
    assert (np.abs(x - scale[..., None] * xi) <= scale[..., None] * (0.5 + 1e-6)).all()
