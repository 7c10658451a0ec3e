"""Kernel vs float64 reference on the core selectors, merge_lse, the spec parser, bad input."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import (Dense, Sinks, Window, attend, dense_reference,
                                  merge_lse)
from minisparse.spec import known_names, parse_attention_spec
from minisparse.testing import kernel_tol


def qkv(seed, hq=4, hkv=2, tq=7, tk=7, d=8):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    return f(hq, tq, d), f(hkv, tk, d), f(hkv, tk, d)


@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(0, 5), st.sampled_from([(4, 2), (2, 2), (4, 1)]))
def test_kernel_equals_reference_on_same_sets(seed, tk, w, heads):
    hq, hkv = heads
    tq = 1 + seed % tk
    q, k, v = qkv(seed, hq, hkv, tq, tk)
    for sel in (Dense(), Window(w), Sinks(2) | Window(w)):
        o, lse = attend(q, k, v, sel, return_lse=True)
        mask, _ = sel.select(q, k).to_mask(hq, tq, tk)
        r, rl = dense_reference(q, k, v, mask=mask, return_lse=True)
        np.testing.assert_allclose(o, r, rtol=0, atol=kernel_tol(q, k, v))
        np.testing.assert_allclose(lse, rl, rtol=0, atol=1e-5)   # lse error <= max logit error e


def test_merge_lse_equals_joint_softmax():
    q, k, v = qkv(1, tq=5, tk=9)
    lo_mask = np.zeros((1, 5, 9), bool); lo_mask[..., :4] = True
    o1, l1 = dense_reference(q, k, v, mask=lo_mask, return_lse=True)
    o2, l2 = dense_reference(q, k, v, mask=~lo_mask, return_lse=True)
    o, l = merge_lse(o1, l1, o2, l2)
    r, rl = dense_reference(q, k, v, return_lse=True)
    # float64 inputs, merged in float64, then cast to float32: 2^-24 relative to max|v|
    np.testing.assert_allclose(o, r, rtol=0, atol=2.0**-24 * np.abs(v).max() * 2)
    np.testing.assert_allclose(l, rl, rtol=1e-12, atol=1e-12)


def test_merge_lse_empty_parts_give_no_nan():
    o, l = merge_lse(np.ones((2, 3)), np.full(2, -np.inf), np.zeros((2, 3)), np.full(2, -np.inf))
    assert not np.isnan(o).any() and np.all(o == 0) and np.all(l == -np.inf)


def test_spec_parser_builds_unions_and_round_trips():
    s = parse_attention_spec("sinks=4, window=128")
    assert s.describe() == "sinks=4,window=128"
    assert parse_attention_spec(s.describe()).describe() == s.describe()
    assert parse_attention_spec("dense").covers_all_causal


@pytest.mark.parametrize("bad", ["windw=3", "window=x", "window", "", "dense,bogus"])
def test_spec_parser_names_bad_token_and_known_ones(bad):
    with pytest.raises(ValueError) as e:
        parse_attention_spec(bad)
    msg = str(e.value)
    if bad not in ("", "window=x", "window"):
        assert bad.split(",")[-1] in msg and "window" in msg and "dense" in msg
    assert "dense" in known_names()


def test_attend_rejects_bad_shapes_and_selection():
    q, k, v = qkv(0)
    with pytest.raises(ValueError, match="Hq=3"):
        attend(q[:3], k, v)
    with pytest.raises(ValueError, match="k_pos"):
        attend(q, k, v, k_pos=np.arange(3))
    sel = Window(2).select(q[:, :3], k)
    with pytest.raises(ValueError, match="Tq=3"):
        attend(q, k, v, sel)
    with pytest.raises(ValueError, match="dtype"):
        attend(q, k.astype(np.int32), v)


def test_stats_count_keys_read_after_causality():
    q, k, v = qkv(2, tq=6, tk=6)
    _, st_ = attend(q, k, v, parse_attention_spec("sinks=1,window=2"), return_stats=True)
    # row t (position t) reads key 0 plus positions t-2..t, deduplicated
    assert st_.n_attended[0].tolist() == [1, 2, 3, 4, 4, 4]
    assert st_.n_causal[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert np.allclose(st_.attended_fraction[0], [1, 1, 1, 1, .8, 4 / 6])


def test_float16_kv_is_accepted():
    q, k, v = qkv(3)
    o16 = attend(q, k.astype(np.float16), v.astype(np.float16))
    o32 = attend(q, k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(o16, o32)   # same float32 values after the one cast
