"""RecursiveCompressor and PressCache: budget bounds, the accumulate formula, protected slots,
original positions, per-head keep sets, exact no-op settings, saving state."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minisparse
from minisparse.attention import attend
from minisparse.cache import (H2O, ExactAttention, Hybrid, LSHFrequency, PressCache, RandomKeep,
                              RecursiveCompressor, SnapKV, accumulate_size)
from minisparse.cache import KVCache

SCORERS = {"exact": ExactAttention, "h2o": H2O, "snapkv": lambda: SnapKV(window=3),
           "lsh": lambda: LSHFrequency(n_bits=4, n_tables=4, seed=1), "random": RandomKeep,
           "hybrid": lambda: Hybrid(ExactAttention(), RandomKeep(seed=2), 0.5)}


def drive(cache, calls, Hq=4, Hkv=2, d=4, L=2, seed=0, check=None):
    """Feed `calls` (token counts per call) through update/advance like Model.forward does, with
    random q/k/v; returns {position: k row (Hkv, d)} per layer so kept rows can be checked."""
    rng = np.random.default_rng(seed)
    seen = [dict() for _ in range(L)]
    for T in calls:
        pos = cache.next_pos + np.arange(T)
        for l in range(L):
            k = rng.standard_normal((Hkv, T, d)).astype(np.float32)
            v = rng.standard_normal((Hkv, T, d)).astype(np.float32)
            q = rng.standard_normal((Hq, T, d)).astype(np.float32)
            for t in range(T):
                seen[l][int(pos[t])] = k[:, t]
            K, V, k_pos = cache.update(l, k, v, pos, q=q)
            assert K.shape[1] == V.shape[1] == k_pos.shape[0]
        cache.advance(T)
        if check is not None:
            check(cache, seen)
    return seen


calls_st = st.lists(st.integers(1, 9), min_size=1, max_size=12)


@given(budget=st.integers(1, 24), n=st.integers(2, 6), calls=calls_st, per_head=st.booleans(),
       scorer=st.sampled_from(sorted(SCORERS)))
def test_recursive_size_stays_within_budget_with_anchors_window_and_original_rows(
        budget, n, calls, per_head, scorer):
    c = RecursiveCompressor(budget, n, block=9, scorer=SCORERS[scorer](), per_head=per_head)
    A = W = budget // n

    def check(cache, seen):
        t = cache.next_pos
        assert len(cache) <= budget and len(cache) == min(t, budget)
        for l, rows in enumerate(seen):
            P = cache.positions(l)                                    # (Hkv, S)
            assert P.shape[1] == len(cache)
            assert np.all(np.diff(P, axis=1) > 0)                     # position order, no repeats
            if t > budget:
                assert np.array_equal(P[:, :A], np.broadcast_to(np.arange(A), (P.shape[0], A)))
                assert np.array_equal(P[:, P.shape[1] - W:],
                                      np.broadcast_to(np.arange(t - W, t), (P.shape[0], W)))
            if not per_head:
                assert np.all(P == P[0])                              # one shared keep set
            for h in range(P.shape[0]):                               # kept rows are untouched
                for j, p in enumerate(P[h]):
                    assert np.array_equal(cache.k[l][h, j], rows[int(p)][h])

    drive(c, calls, check=check)


@given(budget=st.integers(2, 24), n=st.integers(2, 6), calls=calls_st)
def test_accumulate_size_equals_its_formula(budget, n, calls):
    c = RecursiveCompressor(budget, n, block=9, mode="accumulate", scorer=RandomKeep(3))
    A = W = budget // n
    K = budget - 2 * A
    ends = np.cumsum(calls)

    def check(cache, seen):
        t = cache.next_pos
        e = ends[ends <= t]
        # docs/caches.md: len = min(t_N, A + W) + sum_i min(K, c_i), c_i the tokens that left the
        # window during call i (written out again here, independently of accumulate_size)
        left = [max(0, x - A - W) for x in [0, *e]]
        want = min(t, A + W) + sum(min(K, b - a) for a, b in zip(left, left[1:]))
        assert len(cache) == want == accumulate_size(e, budget, n)
        P = cache.positions(0)
        assert np.array_equal(P[0, :min(A, t)], np.arange(min(A, t)))          # anchors
        tail = min(W, max(0, t - A))
        assert np.array_equal(P[0, P.shape[1] - tail:], np.arange(t - tail, t))  # window

    drive(c, calls, check=check)


def test_accumulate_grows_by_k_per_block_once_blocks_exceed_k():
    # B = 16, n = 4: A = W = 4, K = 8; blocks of 12: the first leaves 4 of its 12 tokens behind
    # the window, every later one 12, of which 8 are kept.
    c = RecursiveCompressor(16, 4, block=12, mode="accumulate")
    drive(c, [12, 12, 12])
    assert len(c) == 4 + 4 + 4 + 8 + 8


@given(calls=calls_st, seed=st.integers(0, 3))
def test_per_head_keep_sets_attend_exactly_as_per_head_positions(calls, seed):
    # Heads keep different positions; attention gets the slot-wise max as k_pos. Every held key
    # precedes every query of the call, so each head must read the same keys, in the same order,
    # as when attended alone with its true positions: bitwise equal (same kernel row code).
    c = RecursiveCompressor(8, 4, block=9, scorer=RandomKeep(seed), per_head=True)
    drive(c, calls)
    rng = np.random.default_rng(seed)
    T = 3
    pos = c.next_pos + np.arange(T)
    k = rng.standard_normal((2, T, 4)).astype(np.float32)
    q = rng.standard_normal((4, T, 4)).astype(np.float32)
    held = c.positions(0).copy()                                      # (Hkv, S) before the call
    K, V, k_pos = c.update(0, k, k, pos, q=q)
    out = attend(q, K, V, q_pos=pos, k_pos=k_pos)                     # (Hq, T, d)
    for h in range(2):
        true_pos = np.concatenate([held[h], pos])
        alone = attend(q[2 * h:2 * h + 2], K[h:h + 1], V[h:h + 1], q_pos=pos, k_pos=true_pos)
        assert np.array_equal(out[2 * h:2 * h + 2], alone)


def test_per_head_mode_keeps_different_positions_in_different_heads():
    c = RecursiveCompressor(8, 4, block=9, scorer=RandomKeep(0), per_head=True)
    drive(c, [9, 9, 9])
    P = c.positions(0)
    assert not np.array_equal(P[0], P[1])


@pytest.fixture(scope="module")
def stories(stories_path):
    return minisparse.load_model(stories_path)


def _dense_chunked(model, ids, block, decode):
    cache = KVCache(model.config)
    out = [model.forward(ids[a:a + block], cache) for a in range(0, len(ids), block)]
    out += [model.forward([t], cache) for t in decode]
    return np.concatenate(out)


@pytest.mark.parametrize("mode", ["recursive", "accumulate"])
@pytest.mark.parametrize("per_head", [False, True])
def test_budget_at_least_the_text_reproduces_dense_logits_exactly(stories, mode, per_head):
    ids = [1] + list(np.random.default_rng(0).integers(3, 512, size=90))
    decode = [5, 17, 200]
    c = RecursiveCompressor(len(ids) + len(decode), 4, block=32, mode=mode, per_head=per_head)
    got = np.concatenate([stories.forward(ids, c)] + [stories.forward([t], c) for t in decode])
    # nothing is evicted, so attention reads the same float32 arrays in the same order as the
    # dense cache fed in the same blocks: equal bit for bit
    assert np.array_equal(got, _dense_chunked(stories, ids, 32, decode))


def test_press_ratio_zero_is_an_exact_no_op(stories):
    ids = [1] + list(np.random.default_rng(1).integers(3, 512, size=70))
    c, d = PressCache(0.0), KVCache(stories.config)
    got = np.concatenate([stories.forward(ids, c)] + [stories.forward([t], c) for t in (9, 33)])
    want = np.concatenate([stories.forward(ids, d)] + [stories.forward([t], d) for t in (9, 33)])
    assert np.array_equal(got, want) and len(c) == len(ids) + 2


def test_press_removes_its_ratio_of_the_prompt_then_appends(stories):
    ids = [1] + list(np.random.default_rng(2).integers(3, 512, size=79))
    c = PressCache(0.25, scorer=SnapKV())
    stories.forward(ids, c)
    assert len(c) == 80 - 20
    stories.forward([7], c)
    assert len(c) == 61


def test_model_decode_never_exceeds_budget(stories):
    c = RecursiveCompressor(24, 4, block=16, scorer=H2O())
    stories.forward([1] + list(range(10, 50)), c)
    assert len(c) == 24
    for t in range(60, 75):
        logits = stories.forward([t], c)
        assert len(c) <= 24 and np.isfinite(logits).all()


def test_state_round_trip_continues_identically(stories):
    ids = [1] + list(np.random.default_rng(3).integers(3, 512, size=60))
    a = RecursiveCompressor(32, 4, block=16, scorer=Hybrid(ExactAttention(), H2O(), 0.5), per_head=True)
    stories.forward(ids, a)
    meta, arrays = a.state()
    json.dumps(meta)                                        # meta is plain scalars/lists/dicts
    assert all(isinstance(x, np.ndarray) for x in arrays.values())
    b = RecursiveCompressor.from_state(json.loads(json.dumps(meta)), {k: x.copy() for k, x in arrays.items()})
    for t in (4, 99, 300):
        assert np.array_equal(stories.forward([t], a), stories.forward([t], b))
    assert len(a) == len(b) and np.array_equal(a.positions(4), b.positions(4))


def test_fp16_storage_keeps_float16_rounded_rows():
    c = RecursiveCompressor(8, 4, block=9, dtype=np.float16, scorer=RandomKeep(1))
    seen = drive(c, [9, 9])
    assert c.k[0].dtype == np.float16
    P = c.positions(1)
    for h in range(2):
        for j, p in enumerate(P[h]):        # round-to-nearest float16 of the float32 key, exactly
            assert np.array_equal(c.k[1][h, j], seen[1][int(p)][h].astype(np.float16))


@pytest.mark.parametrize("kw,msg", [({"budget": 0}, "budget"), ({"budget": 8, "protection_divisor": 1},
                                    "protection_divisor"), ({"budget": 8, "mode": "grow"}, "mode"),
                                    ({"budget": 8, "block": 0}, "block"),
                                    ({"budget": 8, "dtype": np.int8}, "dtype")])
def test_bad_arguments_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RecursiveCompressor(**kw)
