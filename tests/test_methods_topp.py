"""Twilight's top-p (TopP, `topp=P` in a spec): the fewest candidate keys whose softmax mass reaches
p, on top of any exact candidate selector. The shared suite's invariants (methods_props), the mass
rule itself, and the grammar ("topp=0.95,quest=16/512" prunes the union of the other members)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import methods_props as M
from minisparse.attention import Quest, TopK, Union, Window, Sinks, attend
from minisparse.attention.topk import score_rows
from minisparse.attention.topp import TopP
from minisparse.spec import REGISTRY, parse_attention_spec

SPECS = [REGISTRY["topp"].small, "topp=0.9", "topp=0.7,sinks=1,window=3", "topp=0.95,quest=4/6"]


@pytest.mark.parametrize("spec", SPECS)
@given(M.problems())
def test_kernel_equals_reference_on_the_selected_set(spec, prob):
    M.check_kernel_equals_reference_on_the_selected_set(parse_attention_spec(spec), prob)


@pytest.mark.parametrize("spec", SPECS)
@given(M.problems(full_queries=True), st.data())
def test_output_at_i_unchanged_when_later_keys_change(spec, prob, data):
    i = data.draw(st.integers(0, prob[1].shape[1] - 1))
    M.check_output_at_i_unchanged_when_later_keys_change(parse_attention_spec(spec), prob, i)


@pytest.mark.parametrize("spec", SPECS)
@given(M.problems(full_queries=True))
def test_decode_step_equals_prefill_row(spec, prob):
    M.check_decode_step_equals_prefill_row(parse_attention_spec(spec), prob)


@pytest.mark.parametrize("spec", SPECS)
@given(M.problems())
def test_gqa_equals_multihead_on_repeated_kv(spec, prob):
    M.check_gqa_equals_multihead_on_repeated_kv(parse_attention_spec(spec), prob)


@pytest.mark.parametrize("spec", SPECS)
@given(M.problems())
def test_error_bounded_by_missing_probability_mass(spec, prob):
    M.check_error_bounded_by_missing_probability_mass(parse_attention_spec(spec), prob)


@given(M.problems())
def test_p_one_over_dense_equals_dense(prob):
    M.check_covering_all_causal_keys_equals_dense(parse_attention_spec("topp=1"), prob)


@pytest.mark.parametrize("spec", SPECS)
@given(M.problems(), st.sampled_from([1e4, -1e4]))
def test_extreme_logits_give_no_nan(spec, prob, big):
    M.check_extreme_logits_give_no_nan(parse_attention_spec(spec), prob, big)


# ---- the top-p rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@given(M.problems(), st.sampled_from([0.3, 0.5, 0.9, 0.99]))
def test_kept_keys_are_the_fewest_reaching_mass_p_of_the_candidates(spec, prob, p):
    q, k, v, q_pos, k_pos = prob
    base = parse_attention_spec(spec)
    sel = TopP(p, base.candidates)
    hq, tq, d = q.shape
    cands = base.candidates or parse_attention_spec("dense")
    cm, _ = cands.select(q, k, q_pos, k_pos).to_mask(hq, tq, k.shape[1])
    km, _ = sel.select(q, k, q_pos, k_pos).to_mask(hq, tq, k.shape[1])
    # the same float32 logits the selector ranks, so only float64 summation order differs:
    # n terms, each sum off by <= n * 2^-53 of the total; tol = 2 n 2^-53 covers both sums
    S = score_rows(q, k, q_pos, k_pos, False).reshape(hq, tq, -1) / np.sqrt(d)   # (Hq, Tq, Tk)
    Sc = np.where(cm, S, -np.inf)                                         # causal candidates
    assert np.isfinite(Sc).any(-1).all()                                  # every row has one
    w = np.exp(Sc - Sc.max(-1, keepdims=True))                            # 0 off the candidates
    total = w.sum(-1)
    kept = (w * km).sum(-1)
    tol = 2 * k.shape[1] * 2.0**-53 * total
    assert (km <= (cm & (w > 0))).all()                                   # a subset of the candidates
    assert (kept >= p * total - tol).all()                                # reaches p
    lightest = np.where(km, w, np.inf).min(-1)
    has = km.any(-1)
    assert (kept[has] - lightest[has] < p * total[has] + tol[has]).all()  # and no key is spare
    np.testing.assert_array_equal(sel.last_kept, km.sum(-1))               # realised keys reported


@given(M.problems())
def test_p_one_keeps_every_candidate(prob):
    q, k, v, q_pos, k_pos = prob
    cands = Sinks(1) | Window(3)
    a = attend(q, k, v, TopP(1.0, cands), q_pos=q_pos, k_pos=k_pos)
    b = attend(q, k, v, cands, q_pos=q_pos, k_pos=k_pos)
    # the same keys read in the same ascending order: the kernel's result is identical up to
    # the vectorised dot's reassociation freedom (kernel_tol), 0 in practice
    np.testing.assert_allclose(a, b, rtol=0, atol=M.kernel_tol(q, k, v))


def test_budget_adapts_peaked_rows_keep_few_keys_flat_rows_many():
    d, T = 8, 64
    k = np.random.default_rng(0).standard_normal((1, T, d)).astype(np.float32)
    q = np.zeros((1, 2, d), np.float32)
    q[0, 1] = 40 * k[0, 10]                              # row 1 points hard at key 10
    sel = TopP(0.9)
    sel.select(q, k, np.array([T - 1, T - 1]))
    flat, peaked = sel.last_kept[0]
    assert flat == int(np.ceil(0.9 * T)) and peaked <= 3  # uniform: ceil(p n); peaked: a handful


def test_spec_grammar_topp_prunes_the_union_of_the_other_members():
    a = parse_attention_spec("topp=0.95,quest=16/512")
    assert isinstance(a, TopP) and a.p == 0.95 and a.candidates == Quest(16, k=512)
    b = parse_attention_spec("sinks=4,topp=0.9,window=64")
    assert b.candidates == Union(Sinks(4), Window(64))
    assert parse_attention_spec(str(b)) == b and str(b) == "topp=0.9,sinks=4,window=64"
    assert parse_attention_spec("topp=0.9").candidates is None and a.budget is None
    assert parse_attention_spec("topp=0.8,topk=6") == TopP(0.8, TopK(6))


@pytest.mark.parametrize("spec,token", [("topp=0.9,topp=0.8", "one 'topp'"), ("topp=0", "topp"),
                                        ("topp=x", "topp=x"), ("topp=0.9,landmarks=4", "landmarks=4"),
                                        ("topp=0.9,seed=2", "seed")])
def test_bad_topp_specs_are_errors_naming_the_token(spec, token):
    with pytest.raises(ValueError, match=token):
        parse_attention_spec(spec)
