"""The dense KV cache's allocation: buffers from `lazy_zeros` (a private mapping per large buffer)
hold exactly what np.zeros buffers would, through appends and growth by doubling."""
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minisparse.cache.dense import LAZY_MIN_BYTES, KVCache, lazy_zeros


@given(st.sampled_from([np.float32, np.float16, np.int64]),
       st.sampled_from([(3,), (2, 5), (4, LAZY_MIN_BYTES // 4 + 1), (2, 3, LAZY_MIN_BYTES // 8)]))
def test_lazy_zeros_is_a_zeroed_writable_array(dtype, shape):
    """Below and above LAZY_MIN_BYTES: the shape and dtype asked, all zeros, writable, and two
    buffers never share memory."""
    a, b = lazy_zeros(shape, dtype), lazy_zeros(shape, dtype)
    assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.writeable and a.flags.c_contiguous
    assert not a.any()
    a.reshape(-1)[-1] = 1
    assert not b.any() and a.sum() == 1


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.integers(0, 2**32 - 1))
def test_cache_keeps_every_row_through_growth(steps, seed):
    """Appends of the given lengths, crossing the lazy-allocation size and several doublings:
    the rows read back are the rows written, in order, in every layer; unwritten slots are zero."""
    cfg = SimpleNamespace(n_layers=2, n_kv_heads=3, head_dim=64)   # 256 slots: 2*3*256*64*4 B < 1 MiB
    rng = np.random.default_rng(seed)
    c, ks, vs = KVCache(cfg), [], []
    for T in steps:
        k = rng.standard_normal((2, 3, T, 64)).astype(np.float32)
        v = rng.standard_normal((2, 3, T, 64)).astype(np.float32)
        for layer in range(2):
            K, V, k_pos = c.update(layer, k[layer], v[layer], c.next_pos + np.arange(T))
        c.advance(T)
        ks.append(k), vs.append(v)
    n = sum(steps)
    assert len(c) == n and np.array_equal(c.pos[:n], np.arange(n))
    assert np.array_equal(c.k[:, :, :n], np.concatenate(ks, axis=2))
    assert np.array_equal(c.v[:, :, :n], np.concatenate(vs, axis=2))
    assert not c.k[:, :, n:].any() and not c.v[:, :, n:].any()
