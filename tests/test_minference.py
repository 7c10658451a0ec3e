"""MInference's vertical-slash and A-shape: the selection equals a brute-force reading of the rule,
the budget bounds the keys read, the decode exception is the one documented, specs round-trip."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import AShape, Sinks, VerticalSlash, Window, attend
from minisparse.spec import REGISTRY, parse_attention_spec
from minisparse.testing import check_selector, problems


def rule_mask(sel, q, k, q_pos, k_pos):
    """(Hq, Tq, Tk) bool: the vertical-slash rule read literally, loop by loop, in float64."""
    Hq, Tq, d = q.shape
    Hkv, Tk, _ = k.shape
    L = min(sel.last, Tq)
    last = q_pos.max()
    n = int((k_pos <= last).sum())
    nv = sel.v if sel.v is not None else int(np.ceil(sel.v_fraction * n - 1e-9))
    ns = sel.s if sel.s is not None else int(np.ceil(sel.s_fraction * n - 1e-9))
    mask = np.zeros((Hq, Tq, Tk), bool)
    for h in range(Hq):
        col, diag = np.zeros(Tk), {}
        for t in range(Tq - L, Tq):
            vis = [j for j in range(Tk) if k_pos[j] <= q_pos[t]]
            if not vis:
                continue
            s = np.array([q[h, t].astype(np.float64) @ k[h // (Hq // Hkv), j].astype(np.float64)
                          for j in vis]) / np.sqrt(d)
            p = np.exp(s - s.max())
            p /= p.sum()
            for j, pj in zip(vis, p):
                col[j] += pj
                o = int(q_pos[t] - k_pos[j])
                diag[o] = diag.get(o, 0.0) + pj
        # ties go to the later key / the larger offset (the ranking's rule)
        cands = [j for j in range(Tk) if k_pos[j] <= last and k_pos[j] >= sel.sinks]
        cols = {j for j in range(Tk) if k_pos[j] <= last and k_pos[j] < sel.sinks}
        cols |= set(sorted(cands, key=lambda j: (col[j], j), reverse=True)[:nv])
        offs = [o for o in diag if o >= sel.band]
        chosen = set(sorted(offs, key=lambda o: (diag[o], o), reverse=True)[:ns])
        for t in range(Tq):
            for j in range(Tk):
                o = q_pos[t] - k_pos[j]
                mask[h, t, j] = o >= 0 and (j in cols or o in chosen or k_pos[j] < sel.sinks
                                            or o < sel.band)
    return mask


SPECS = ["vslash=2/2/s1/b2/q4", "vslash=3/1/s0/b1/q64", "vslash=0/0/s2/b3", "vslash=25%/10%/s1/b1/q3",
         "vslash=1/4/s0/b0/q1"]


@pytest.mark.parametrize("spec", SPECS)
@given(problems(max_tk=16, full_queries=True, float16=False))
def test_vertical_slash_selection_equals_the_rule_read_literally(spec, prob):
    sel = parse_attention_spec(spec)
    q, k, v, q_pos, k_pos = prob
    mask, _ = sel.select(q, k, q_pos, k_pos).to_mask(q.shape[0], q.shape[1], k.shape[1])
    causal = k_pos[None, None, :] <= q_pos[None, :, None]
    # exact: the same sums in float64 choose the same sets, unless two sums tie within rounding
    # (measure zero for continuous draws; the rule breaks exact ties the same way)
    np.testing.assert_array_equal(mask & causal, rule_mask(sel, q, k, q_pos, k_pos))


@given(problems(max_tk=20, full_queries=True))
def test_keys_read_within_the_budget(prob):
    sel = VerticalSlash(2, 3, sinks=1, band=2, last=5)
    q, k, v, q_pos, k_pos = prob
    _, st_ = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_stats=True)
    assert st_.n_attended.max() <= sel.budget.keys == 2 + 3 + 1 + 2


def test_a_strong_column_and_a_strong_diagonal_are_found():
    # keys are orthogonal directions; the last queries all point at key 5 (a column), and query t
    # also at key t - 7 (a diagonal, offset 7): both must be chosen, and read by the FIRST rows too
    Tk, d = 32, 64
    k = np.eye(d, dtype=np.float32)[None, :Tk] * 8
    q = np.zeros((1, Tk, d), np.float32)
    q[0, :, 5] = 8
    for t in range(7, Tk):
        q[0, t, t - 7] = 8
    sel = VerticalSlash(1, 1, sinks=0, band=1, last=8)
    cols, offs = sel.choose(q, k, np.arange(Tk), np.arange(Tk))
    assert cols[0].tolist() == [5] and offs[0].tolist() == [7, 0]
    mask, _ = sel.select(q, k).to_mask(1, Tk, Tk)
    assert mask[0, 9, 5] and mask[0, 9, 2] and mask[0, 9, 9] and mask[0, 9].sum() == 3


def test_decode_equals_prefill_only_where_the_estimate_is_the_same_query():
    # the documented exception: a prefill row's pattern comes from the call's last queries, a
    # decode step's from its own query. With last=1 the prefill's LAST row is estimated from
    # itself, so it equals the decode step at that position; an earlier row need not.
    r = np.random.default_rng(3)
    q = r.standard_normal((2, 24, 8)).astype(np.float32)
    k = r.standard_normal((1, 24, 8)).astype(np.float32)
    v = r.standard_normal((1, 24, 8)).astype(np.float32)
    sel = VerticalSlash(2, 2, sinks=1, band=1, last=1)
    pre = attend(q, k, v, sel)
    dec = attend(q[:, -1:], k, v, sel)
    np.testing.assert_array_equal(dec[:, 0], pre[:, -1])   # the same selection, the same arithmetic
    differ = [i for i in range(24) if not np.array_equal(
        attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], sel, q_pos=[i], k_pos=np.arange(i + 1))[:, 0],
        pre[:, i])]
    assert differ, "no prefill row differs from its decode step: the exception would be void"


def test_a_shape_is_sinks_and_a_window_of_w_keys():
    r = np.random.default_rng(0)
    x = r.standard_normal((1, 30, 4)).astype(np.float32)
    a = AShape(3, 5).select(x, x).to_mask(1, 30, 30)[0]
    b = (Sinks(3) | Window(4)).select(x, x).to_mask(1, 30, 30)[0]
    np.testing.assert_array_equal(a, b)
    _, st_ = attend(x, x, x, AShape(3, 5), return_stats=True)
    assert st_.n_attended[0, -1] == 8 == AShape(3, 5).budget.keys


def test_check_selector_passes_vertical_slash():
    # the public kit runs the same weakened invariants on a selector that is not row_local
    names = check_selector(VerticalSlash(2, 2, sinks=1, band=1, last=3), max_examples=10)
    assert "decode_equals_prefill" in names and "later_keys_change_nothing" in names


@pytest.mark.parametrize("name", ["vslash", "ashape"])
def test_spec_round_trips(name):
    for spec in (REGISTRY[name].example, REGISTRY[name].small):
        sel = parse_attention_spec(spec)
        assert str(sel) == spec and parse_attention_spec(str(sel)) == sel
        assert sel.exact_subset and sel.deterministic and sel.budget is not None


@pytest.mark.parametrize("spec,token", [("vslash=4", "V/S"), ("vslash=4/x", "x"),
                                        ("vslash=4/4/z3", "z3"), ("vslash=4/4/s1/s2", "s2"),
                                        ("vslash=4/4/q0", "last"), ("ashape=4", "SINKS/WINDOW"),
                                        ("ashape=4/0", "window"), ("vslash=4/4,seed=1", "seed")])
def test_bad_specs_are_errors_naming_the_token(spec, token):
    with pytest.raises(ValueError, match=token):
        parse_attention_spec(spec)


def test_vertical_slash_needs_the_queries():
    with pytest.raises(ValueError, match="needs the queries"):
        VerticalSlash(1, 1).select(None, np.zeros((1, 4, 2), np.float32), np.arange(4))
