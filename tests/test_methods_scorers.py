"""The bounded caches' newer scorers (TOVA, KNorm, KeyDiff, Expected Attention): selectable in the
cache spec, saved and rebuilt by config, and checked against NVIDIA kvpress's presses as an
oracle where kvpress is installed (`pip install kvpress`; never a runtime dependency)."""
from types import SimpleNamespace

import numpy as np
import pytest

from minisparse.cache import (SCORERS, TOVA, ExpectedAttention, KeyDiff, KNorm, PressCache,
                              RecursiveCompressor, ScoreContext, SnapKV, scorer_from_config)
from minisparse.spec import parse_cache_spec

NEW = {"tova": TOVA, "knorm": KNorm, "keydiff": KeyDiff, "expected": ExpectedAttention}


def problem(seed=0, hq=4, hkv=2, s=40, d=8):
    r = np.random.default_rng(seed)
    f = lambda *sh: r.standard_normal(sh).astype(np.float32)       # noqa: E731
    q, k, v = f(hq, s, d), f(hkv, s, d), f(hkv, s, d)
    k *= r.uniform(0.2, 3.0, (hkv, s, 1)).astype(np.float32)        # varied key norms
    return q, k, v, np.broadcast_to(np.arange(s), (hkv, s)), np.arange(s)


@pytest.mark.parametrize("name", sorted(NEW))
def test_scorer_token_selects_the_scorer_in_press_and_recursive_specs(name):
    press = parse_cache_spec(f"press=0.5/{name}", model=None)
    assert isinstance(press, PressCache) and isinstance(press.scorer, NEW[name])
    rec = parse_cache_spec(f"recursive=B64/n4/{name}", model=None)
    assert isinstance(rec, RecursiveCompressor) and isinstance(rec.scorer, NEW[name])
    again = scorer_from_config(press.scorer.config())               # what a saved cache records
    assert type(again) is NEW[name] and again.config() == press.scorer.config()


@pytest.mark.parametrize("spec,token", [("press=0.5/tovaa", "tovaa"), ("recursive=B64/norm", "norm"),
                                        ("press=0.5/tova/knorm", "knorm")])
def test_unknown_or_second_scorer_is_an_error_naming_the_token(spec, token):
    with pytest.raises(ValueError, match=f"'{token}'"):
        parse_cache_spec(spec, model=None)


@pytest.mark.parametrize("name", sorted(NEW))
def test_press_cache_with_each_scorer_keeps_the_ratio_and_its_forced_keys(name):
    q, k, v, _, pos = problem(1)
    cache = PressCache(0.5, scorer=SCORERS[name]())
    cache.update(0, k, v, pos, q=q)
    cache.advance(len(pos))
    held = cache.positions(0)[0]
    assert len(cache) == 20 and np.all(np.diff(held) > 0)
    if name == "tova":
        assert held[-1] == 39                                       # the newest token always stays
    if name == "expected":
        assert held[:4].tolist() == [0, 1, 2, 3]                    # the sinks always stay


def test_expected_attention_formula_matches_monte_carlo_over_gaussian_queries():
    # E[exp(q.k/sqrt d)] for q ~ N(mu, Sigma) is exp(mu.k/sqrt d + k^T Sigma k / 2d): check the
    # closed form the scorer softmaxes against a sample mean of exp(q.k/sqrt d) over 400k queries.
    # The sample mean of a log-normal with log-variance s2 = k^T Sigma k / d has relative standard
    # error sqrt((e^s2 - 1) / n); the assertion allows 6 of those.
    r = np.random.default_rng(3)
    d, n = 4, 400_000
    mu, A = r.standard_normal(d) * 0.3, r.standard_normal((d, d)) * 0.3
    cov = A @ A.T
    k = r.standard_normal(d)
    qs = r.multivariate_normal(mu, cov, size=n)
    mc = np.exp(qs @ k / np.sqrt(d)).mean()
    closed = np.exp(mu @ k / np.sqrt(d) + k @ cov @ k / (2 * d))
    s2 = k @ cov @ k / d
    assert abs(mc / closed - 1) <= 6 * np.sqrt(np.expm1(s2) / n)


# ---- kvpress as the oracle -------------------------------------------------------------------
def _kvpress():
    kvpress = pytest.importorskip("kvpress", reason="kvpress (the oracle) is not installed")
    import torch
    return kvpress, torch


def _press_scores(press, q, k, v, torch, attentions=None):
    t = lambda x: torch.tensor(np.asarray(x, np.float32))[None]     # noqa: E731  (1, H, S, d)
    module = SimpleNamespace(config=SimpleNamespace(num_attention_heads=q.shape[0]),
                             head_dim=q.shape[-1])
    hidden = torch.zeros(1, q.shape[1], 1)
    att = None if attentions is None else t(attentions)
    return press.score(module, hidden, t(k), t(v), att, {})[0].double().numpy()   # (Hkv, S)


def _softmax_rows(q, k, pos):
    """Causal attention probabilities (Hq, T, S) in float64, the attentions a press reads."""
    hq, hkv, d = q.shape[0], k.shape[0], q.shape[-1]
    s = np.einsum("htd,hsd->hts", q.astype(np.float64), np.repeat(k, hq // hkv, 0)) / np.sqrt(d)
    s = np.where(pos[None, None, :] <= pos[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _kept(scores, ratio):
    """kvpress's rule: keep the S - floor(ratio * S) best per KV head (as sets)."""
    n = scores.shape[1] - int(np.floor(ratio * scores.shape[1]))
    return [set(np.argsort(-row, kind="stable")[:n].tolist()) for row in scores]


# Rounding: kvpress scores in float32 (unit roundoff 2^-24 ~ 6e-8), minisparse in float64; every
# score here is a norm, a cosine, a sum of <= S softmax terms or an exp of a d-term dot, each with
# relative error <= (S + d + 8) * 2^-24 < 4e-6 in float32. rtol=1e-5 covers it; the kept sets then
# agree unless two scores lie within that band of the threshold, which the test also checks.
RTOL = 1e-5


def _same_kept(ours, theirs, ratio):
    n = ours.shape[1] - int(np.floor(ratio * ours.shape[1]))
    for a, b, o in zip(_kept(ours, ratio), _kept(theirs, ratio), ours):
        srt = np.sort(o[np.isfinite(o)])[::-1]
        gap = np.abs(np.diff(srt[max(0, n - 2):n + 1])).min() if n < len(srt) else np.inf
        if gap > 2 * RTOL * np.abs(srt).max():                      # no near-tie at the cut
            assert a == b


@pytest.mark.parametrize("seed", range(3))
def test_knorm_equals_kvpress_knormpress(seed):
    kvpress, torch = _kvpress()
    q, k, v, P, pos = problem(seed)
    ours = KNorm().scores(ScoreContext(0, q, k, v, P, pos))
    theirs = _press_scores(kvpress.KnormPress(), q, k, v, torch)
    np.testing.assert_allclose(ours, theirs, rtol=RTOL)
    _same_kept(ours, theirs, 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_keydiff_equals_kvpress_keydiffpress(seed):
    kvpress, torch = _kvpress()
    q, k, v, P, pos = problem(seed)
    ours = KeyDiff().scores(ScoreContext(0, q, k, v, P, pos))
    theirs = _press_scores(kvpress.KeyDiffPress(), q, k, v, torch)
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-6)   # cosines near 0: absolute
    _same_kept(ours, theirs, 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_tova_equals_kvpress_tovapress_up_to_the_head_count(seed):
    # kvpress averages the last query's attention over the Hq heads; minisparse sums them (the
    # same ranking, a factor Hq). Both force the newest key in (kvpress: max + 1, here: inf).
    kvpress, torch = _kvpress()
    q, k, v, P, pos = problem(seed)
    ours = TOVA().scores(ScoreContext(0, q, k, v, P, pos))
    theirs = _press_scores(kvpress.TOVAPress(), q, k, v, torch, _softmax_rows(q, k, pos))
    np.testing.assert_allclose(ours[:, :-1] / q.shape[0], theirs[:, :-1], rtol=RTOL)
    assert np.isinf(ours[:, -1]).all() and (theirs[:, -1] > theirs[:, :-1].max(1)).all()
    _same_kept(ours, theirs, 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_snapkv_equals_kvpress_snapkvpress_away_from_the_window(seed):
    # Where minisparse differs on purpose: kvpress protects the last `window` keys and pools only
    # the keys before them; minisparse's SnapKV scores every key (the window keys by their own
    # attention) and pools across the boundary. Away from it (the last window + kernel // 2 keys)
    # the scores are kvpress's times window * G (minisparse sums what kvpress averages).
    kvpress, torch = _kvpress()
    q, k, v, P, pos = problem(seed)
    w, ker, G = 8, 5, q.shape[0] // k.shape[0]
    ours = SnapKV(window=w, kernel=ker).scores(ScoreContext(0, q, k, v, P, pos))
    theirs = _press_scores(kvpress.SnapKVPress(window_size=w, kernel_size=ker), q, k, v, torch,
                           _softmax_rows(q, k, pos))
    far = k.shape[1] - w - ker // 2
    np.testing.assert_allclose(ours[:, :far] / (w * G), theirs[:, :far], rtol=RTOL)


@pytest.mark.parametrize("seed", range(3))
def test_expected_attention_equals_kvpress_given_the_same_query_statistics(seed):
    # kvpress estimates mu, Sigma from pre-RoPE queries rotated by the mean RoPE of the next 512
    # positions; minisparse from the post-RoPE queries themselves (see ExpectedAttention). Given
    # the same statistics (kvpress's get_query_statistics replaced by ours) the rest agrees:
    # expected logits, softmax over the non-sink keys, mean over the group, times ||v||, sinks kept.
    kvpress, torch = _kvpress()
    q, k, v, P, pos = problem(seed)
    qs = q[:, 4:].astype(np.float64)
    mu = qs.mean(1)
    c = qs - mu[:, None]
    cov = np.einsum("hti,htj->hij", c, c) / qs.shape[1]
    press = kvpress.ExpectedAttentionPress(n_sink=4)
    press.get_query_statistics = lambda module, h: (torch.tensor(mu, dtype=torch.float32)[None],
                                                    torch.tensor(cov, dtype=torch.float32)[None])
    ours = ExpectedAttention(sinks=4).scores(ScoreContext(0, q, k, v, P, pos))
    theirs = _press_scores(press, q, k, v, torch)
    np.testing.assert_allclose(ours[:, 4:], theirs[:, 4:], rtol=RTOL)
    assert np.isinf(ours[:, :4]).all() and (theirs[:, :4] > theirs[:, 4:].max(1, keepdims=True)).all()
    _same_kept(ours, theirs, 0.5)


def test_press_cache_per_head_keeps_what_kvpress_keeps():
    # end to end: PressCache(0.5, KNorm, per_head) holds, per KV head, the positions kvpress's
    # KnormPress keeps at compression ratio 0.5 (kvpress keeps per KV head)
    kvpress, torch = _kvpress()
    q, k, v, P, pos = problem(5)
    cache = PressCache(0.5, scorer=KNorm(), per_head=True)
    cache.update(0, k, v, pos, q=q)
    cache.advance(len(pos))
    theirs = _press_scores(kvpress.KnormPress(), q, k, v, torch)
    assert [set(row.tolist()) for row in cache.positions(0)] == _kept(theirs, 0.5)
