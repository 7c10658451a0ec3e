"""Scorers: attention mass against a loop reference, H2O's running sum, SnapKV's window, LSH and
random seeding, hybrid disjointness, query-aware picks, config round trips."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisparse.cache import (H2O, ExactAttention, Hybrid, LSHFrequency, QuestionAware, RandomKeep,
                              RecursiveCompressor, ScoreContext, SnapKV, attention_mass,
                              scorer_from_config)


def _ctx(seed=0, Hq=4, Hkv=2, T=5, S=12, d=8, layer=0, step=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((Hq, T, d)).astype(np.float32)
    k = rng.standard_normal((Hkv, S, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(S), (Hkv, S)).copy()
    return ScoreContext(layer, q, k, k, pos, np.arange(S - T, S), step=step)


@given(seed=st.integers(0, 50), T=st.integers(1, 6), S_extra=st.integers(0, 6))
def test_attention_mass_equals_a_loop_over_softmax_rows(seed, T, S_extra):
    c = _ctx(seed, T=T, S=T + S_extra)
    got = attention_mass(c.q, c.k, c.pos, c.q_pos)                          # (Hkv, S)
    want = np.zeros_like(got)
    for h in range(4):
        for t in range(T):
            vis = c.pos[h // 2] <= c.q_pos[t]
            s = c.k[h // 2].astype(np.float64) @ c.q[h, t].astype(np.float64) / np.sqrt(8)
            p = np.where(vis, np.exp(s - s[vis].max()), 0.0)
            want[h // 2] += p / p.sum()
    # both float64 from the same float32 inputs, different summation order: a few ulps of G*T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * 2 * T)
    np.testing.assert_allclose(got.sum(axis=1), 2 * T, rtol=1e-12)         # each row sums to 1


def test_h2o_sum_equals_attention_of_all_past_queries_at_once():
    # Without eviction the running sum over calls equals one mass over every query: a later key
    # gets exactly 0 from an earlier query (exp(-inf) = 0), so splitting the calls changes nothing
    # but summation order (float64, tolerance a few ulps of the sums <= G * T = 2 * 13).
    rng = np.random.default_rng(0)
    c = RecursiveCompressor(100, 4, block=8, scorer=H2O())
    qs, ks = [], []
    for T in (5, 1, 7):
        pos = c.next_pos + np.arange(T)
        k = rng.standard_normal((2, T, 8)).astype(np.float32)
        q = rng.standard_normal((4, T, 8)).astype(np.float32)
        c.update(0, k, k, pos, q=q)
        c.advance(T)
        qs.append(q), ks.append(k)
    q, k = np.concatenate(qs, axis=1), np.concatenate(ks, axis=1)
    want = attention_mass(q, k, np.broadcast_to(np.arange(13), (2, 13)), np.arange(13))
    np.testing.assert_allclose(c.acc[0], want, rtol=0, atol=1e-13 * 26)


def test_snapkv_reads_only_its_last_window_of_queries():
    a, b, c = _ctx(1, T=6), _ctx(1, T=6), _ctx(1, T=6)   # a context caches its mass: fresh ones
    b.q = b.q.copy()
    b.q[:, :3] = 0.0                                  # change queries outside the last-3 window
    c.q = c.q.copy()
    c.q[:, -1] = 0.0                                  # and one inside it
    s = SnapKV(window=3, kernel=5)
    assert np.array_equal(s.scores(a), s.scores(b))
    assert not np.array_equal(s.scores(a), s.scores(c))


def test_exact_scorer_keeps_a_key_every_query_attends_to():
    rng = np.random.default_rng(4)
    c = RecursiveCompressor(8, 4, block=32, scorer=ExactAttention())
    k = rng.standard_normal((1, 32, 8)).astype(np.float32) * 0.1
    q = np.tile(rng.standard_normal(8).astype(np.float32), (2, 32, 1))   # (Hq, T, d) one direction
    k[0, 13] = q[0, 0] * 3                                              # the key they all match
    c.update(0, k, k, np.arange(32), q=q)
    c.advance(32)
    assert 13 in c.positions(0)[0]
    kept = []                                                           # control: random drops it

    for seed in range(8):
        r = RecursiveCompressor(8, 4, block=32, scorer=RandomKeep(seed))
        r.update(0, k, k, np.arange(32), q=q)
        r.advance(32)
        kept.append(13 in r.positions(0)[0])
    assert not all(kept)


def test_question_aware_ranks_the_key_matching_the_question_first():
    c = _ctx(2, S=20)
    qn = np.zeros((4, 1, 8), np.float32)
    qn[:, 0, 0] = 4.0
    c.k = c.k.copy() * 0.1
    c.k[:, 7, 0] = 4.0
    s = QuestionAware({0: qn}).scores(c)                                  # (Hkv, S)
    assert s.shape == (2, 20) and np.all(s.argmax(axis=1) == 7)


@pytest.mark.parametrize("scorer", [ExactAttention(), ExactAttention(last=2), SnapKV(), H2O(),
                                    LSHFrequency(seed=3), RandomKeep(5)])
def test_scores_are_kv_heads_by_seq_and_finite(scorer):
    c = _ctx(3)
    c.acc = np.zeros((2, 12))
    s = scorer.scores(c)
    assert s.shape == (2, 12) and np.isfinite(s).all()


def test_random_choices_repeat_from_their_seed_and_change_with_it():
    c = _ctx(5, T=6, S=30)
    for make in (lambda s: LSHFrequency(n_bits=4, n_tables=8, seed=s), lambda s: RandomKeep(s)):
        assert np.array_equal(make(1).scores(c), make(1).scores(c))
        assert not np.array_equal(make(1).scores(c), make(2).scores(c))
        assert make(7).config()["seed"] == 7                              # recorded with the cache


def test_lsh_frequency_counts_collisions_of_causal_queries_only():
    c = _ctx(6, T=4, S=10)
    s = LSHFrequency(n_bits=2, n_tables=5, seed=0).scores(c)
    # key j is visible to the queries at positions >= j: at most G * (#such queries) * tables hits
    vis = np.array([(c.q_pos >= j).sum() for j in range(10)])
    assert np.all(s <= 2 * vis * 5) and np.all(s[:, 6:] <= 2 * vis[6:] * 5) and s.sum() > 0


@given(k=st.integers(0, 10), ratio=st.floats(0, 1), shared=st.booleans(), seed=st.integers(0, 20))
def test_hybrid_sets_are_disjoint_and_fill_k(k, ratio, shared, seed):
    c = _ctx(seed, S=14)
    cand = np.arange(2, 12)
    hy = Hybrid(ExactAttention(), RandomKeep(seed), ratio)
    a, b = hy.split(c, cand, k, shared)
    assert a.shape[1] == round(ratio * k) and a.shape[1] + b.shape[1] == k
    for h in range(a.shape[0]):
        assert not set(a[h]) & set(b[h]) and set(a[h]) | set(b[h]) <= set(cand)
    picked = hy.pick(c, cand, k, shared)
    assert all(len(set(row)) == k for row in picked)


@pytest.mark.parametrize("scorer", [ExactAttention(last=4), SnapKV(8, 3), H2O(), LSHFrequency(6, 9, 2),
                                    RandomKeep(3), Hybrid(ExactAttention(), LSHFrequency(seed=4), 0.75)])
def test_config_round_trip_rebuilds_the_same_picks(scorer):
    c = _ctx(7)
    c.acc = np.arange(24.0).reshape(2, 12)
    again = scorer_from_config(scorer.config())
    assert again.config() == scorer.config()
    assert np.array_equal(again.pick(c, np.arange(12), 5, False), scorer.pick(c, np.arange(12), 5, False))


def test_bad_configs_and_missing_queries_say_what_is_wrong():
    with pytest.raises(ValueError, match="name"):
        scorer_from_config({"name": "nope"})
    with pytest.raises(ValueError, match="ratio"):
        Hybrid(H2O(), H2O(), 1.5)
    c = _ctx(0)
    c.q = None
    with pytest.raises(ValueError, match="q=None"):
        ExactAttention().scores(c)
