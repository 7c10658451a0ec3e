"""The fast path's decode-step shortcuts give what the general calls give, bit for bit: they call
the same kernels on the same inputs and skip only Python bookkeeping."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import Dense, Window
from minisparse.attention.kernel import attend
from minisparse.fast import FAST, attend_step, attention


@given(hkv=st.sampled_from([1, 2, 3]), g=st.sampled_from([1, 3]), S=st.integers(1, 300),
       spare=st.integers(0, 40), shuffled=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_decode_attend_step_equals_attend_on_the_same_kernel(hkv, g, S, spare, shuffled, seed):
    rng = np.random.default_rng(seed)
    d = 16
    q = rng.standard_normal((hkv * g, 1, d)).astype(np.float32)              # (Hq, 1, d)
    k = rng.standard_normal((hkv, S + spare, d)).astype(np.float32)          # a cache's buffers
    v = rng.standard_normal((hkv, S + spare, d)).astype(np.float32)
    k_pos = np.arange(S, dtype=np.int64)
    if shuffled:                     # an evicting cache may hold keys out of order
        k_pos = rng.permutation(S + 5)[:S].astype(np.int64)
    q_pos = np.array([int(k_pos.max()) - int(rng.integers(0, 3))])          # some keys may lie ahead
    got, st_got = FAST.attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, return_stats=True, buffer=True)
    want, st_want = attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, return_stats=True, buffer=True,
                           kernel=attention.kernel)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(st_got.n_attended, st_want.n_attended)
    assert np.array_equal(st_got.n_causal, st_want.n_causal)
    assert np.array_equal(FAST.attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, buffer=True), want)
    # without kernel=, the default kernel, as attend
    assert np.array_equal(attend_step(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, buffer=True),
                          attend(q, k, v, Dense(), q_pos=q_pos, k_pos=k_pos, buffer=True))


def test_attend_step_hands_other_calls_to_attend_unchanged():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 8)).astype(np.float32)                    # a prefill of 3
    k = v = rng.standard_normal((1, 10, 8)).astype(np.float32)
    for sel in (Dense(), Window(2), None):
        np.testing.assert_array_equal(FAST.attend(q, k, v, sel), attend(q, k, v, sel, kernel=attention.kernel))
    q1 = q[:, :1]
    np.testing.assert_array_equal(FAST.attend(q1, k, v, Window(2)), attend(q1, k, v, Window(2), kernel=attention.kernel))
    with pytest.raises(ValueError, match="spec string"):
        FAST.attend(q1, k, v, "window=2")
