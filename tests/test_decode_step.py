"""The fast path's decode step over every key: FAST.attend's dense decode (fast/decode.py's
ranges on attend_decode) is within kernel_tol of the float64 reference, with attend's
statistics, whatever the cache's layout; and its RoPE on a few positions gives apply_rope's bits."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import Dense
from minisparse.attention.kernel import attend
from minisparse.attention.reference import dense_reference
from minisparse.fast import FAST
from minisparse.testing.bounds import kernel_tol


def decode_case(hkv, g, S, spare, shuffled, seed, d=16):
    """q (Hq, 1, d) and a cache's buffers k, v (Hkv, S + spare, d) holding S keys at k_pos; the
    query's position lets a few keys lie ahead of it (a cache that reorders may hold such)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((hkv * g, 1, d)).astype(np.float32)
    k = rng.standard_normal((hkv, S + spare, d)).astype(np.float32)
    v = rng.standard_normal((hkv, S + spare, d)).astype(np.float32)
    k_pos = np.arange(S, dtype=np.int64)
    if shuffled:
        k_pos = rng.permutation(S + 5)[:S].astype(np.int64)
    q_pos = np.array([int(k_pos.max()) - int(rng.integers(0, 3))])
    return q, k, v, q_pos, k_pos


@given(hkv=st.sampled_from([1, 2, 3]), g=st.sampled_from([1, 3]), S=st.integers(1, 300),
       spare=st.integers(0, 40), shuffled=st.booleans(), d=st.sampled_from([16, 64]),
       seed=st.integers(0, 2**32 - 1))
def test_dense_decode_kernel_equals_the_reference_within_kernel_tol(hkv, g, S, spare, shuffled,
                                                                     d, seed):
    q, k, v, q_pos, k_pos = decode_case(hkv, g, S, spare, shuffled, seed, d)
    got, st_got = FAST.attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, return_stats=True,
                              buffer=True)
    ks, vs = k[:, :S], v[:, :S]
    ref = dense_reference(q, ks, vs, q_pos, k_pos)                           # float64
    # the error model kernel_tol derives: float32 logits (any order of the d-term dot), the max
    # subtracted, expf within 2 u, float32 sums within chunks of CHUNK keys, float64 across them
    np.testing.assert_allclose(got, ref, rtol=0, atol=kernel_tol(q, ks, vs))
    _, st_want = attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, return_stats=True, buffer=True)
    assert np.array_equal(st_got.n_attended, st_want.n_attended)
    assert np.array_equal(st_got.n_causal, st_want.n_causal)


def test_dense_decode_kernel_without_a_causal_key_gives_zeros():
    q, k, v, _, k_pos = decode_case(2, 3, 20, 4, False, 0)
    out, st = FAST.attend(q, k, v, Dense(), q_pos=np.array([-1]), k_pos=k_pos, return_stats=True, buffer=True)
    assert not out.any() and not st.n_attended.any() and not st.n_causal.any()


@pytest.mark.parametrize("style", ["interleaved", "neox"])
@pytest.mark.parametrize("T,rope_dim", [(1, 16), (3, 16), (1, 8), (8, 12)])
def test_decode_rope_gives_apply_ropes_bits(style, T, rope_dim):
    from minisparse.model import apply_rope, rope_tables
    r = np.random.default_rng(T * rope_dim)
    x = r.standard_normal((4, T, 16)).astype(np.float32) * 10.0              # (H, T, d)
    cfg = type("C", (), {"rope_dim": rope_dim, "rope_base": 10000.0, "rope_scale": 1.0})
    cos, sin = rope_tables(np.arange(1000, 1000 + T), cfg)                   # (T, r/2)
    want = apply_rope(x, cos, sin, style, rope_dim)
    got = FAST.rope(x, cos, sin, style, rope_dim)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # as forward hands it over: a (T, H, d) product seen as (H, T, d), not contiguous
    view = x.transpose(1, 0, 2).copy().transpose(1, 0, 2)
    assert T == 1 or not view.flags.c_contiguous              # (T = 1: any layout is contiguous)
    assert np.array_equal(FAST.rope(view, cos, sin, style, rope_dim).view(np.uint32), want.view(np.uint32))


def test_dense_decode_does_not_depend_on_how_the_cache_lays_out_its_keys():
    # a cache may hold float16 rows, or hand over a strided view: attend converts both to
    # float32 rows, and the decode step must run the same kernel on them (a restored cache and
    # the original continue identically only then)
    q, k, v, q_pos, k_pos = decode_case(3, 3, 50, 10, False, 7)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    want = FAST.attend(q, k16.astype(np.float32), v16.astype(np.float32), Dense(), q_pos=q_pos,
                       k_pos=k_pos, buffer=True)
    got16 = FAST.attend(q, k16, v16, Dense(), q_pos=q_pos, k_pos=k_pos, buffer=True)
    wide = np.zeros((3, 60, 32), np.float32)
    wide[:, :, ::2], wide[:, :, 1::2] = k, k
    strided = wide[:, :, ::2]                                # k's values, not contiguous
    got_view = FAST.attend(q, strided, v, Dense(), q_pos=q_pos, k_pos=k_pos, buffer=True)
    assert np.array_equal(got16, want)
    assert np.array_equal(got_view, FAST.attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, buffer=True))
