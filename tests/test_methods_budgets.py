"""PyramidKV and Ada-KV (budget allocation across layers and heads on SnapKV scores): the spec
tokens, the bound each keeps, exact attention over each head's own keys when heads hold different
counts, saving, and NVIDIA kvpress's PyramidKVPress / AdaKVPress as the oracle where installed."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import minisparse
from minisparse.attention import attend
from minisparse.cache import AdaKV, PyramidKV, ScoreContext, SnapKV, adakv_keep, pyramid_budgets
from minisparse.spec import parse_cache_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return minisparse.load_model(str(ROOT / "models" / "minisparse-pydoc.gguf"))


def problem(seed=0, hq=4, hkv=2, s=200, d=8):
    r = np.random.default_rng(seed)
    f = lambda *sh: r.standard_normal(sh).astype(np.float32)       # noqa: E731
    q, k, v = f(hq, s, d), f(hkv, s, d), f(hkv, s, d)
    k *= r.uniform(0.2, 3.0, (hkv, s, 1)).astype(np.float32)        # some keys draw more attention
    return q, k, v, np.arange(s)


# ---- the spec tokens --------------------------------------------------------------------------
@pytest.mark.parametrize("spec,cls,attrs", [
    ("pyramid=256", PyramidKV, {"budget": 256, "window": 16, "kernel": 5, "beta": 20}),
    ("pyramid=64/w8/k3/beta4", PyramidKV, {"budget": 64, "window": 8, "kernel": 3, "beta": 4}),
    ("adakv=256", AdaKV, {"budget": 256, "window": 16, "kernel": 5, "alpha": 0.2}),
    ("adakv=64/w8/a0.5", AdaKV, {"budget": 64, "window": 8, "alpha": 0.5})])
def test_spec_builds_the_cache_and_its_description_parses_back(model, spec, cls, attrs):
    c = parse_cache_spec(spec, model)
    assert type(c) is cls and all(getattr(c, a) == x for a, x in attrs.items())
    again = parse_cache_spec(c.describe(), model)
    assert again.describe() == c.describe() and again.max_keys == c.max_keys


@pytest.mark.parametrize("spec,word", [("pyramid=1%", "'1%'"), ("pyramid=64/x3", "'x3'"),
                                       ("adakv=64/w8/w9", "'w9'"), ("adakv=64/beta3", "'beta3'"),
                                       ("pyramid=8/w8", "exceed the observation window"),
                                       ("adakv=64/a2", "alpha"), ("pyramid=64/beta0.5", "beta"),
                                       ("adakv", "needs a value")])
def test_bad_specs_are_errors_naming_the_part(model, spec, word):
    with pytest.raises(ValueError, match=word):
        parse_cache_spec(spec, model)


def test_spec_without_a_model_says_it_needs_one():
    with pytest.raises(ValueError, match="needs the model"):
        parse_cache_spec("pyramid=256", model=None)


# ---- the rules --------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L,w,beta", [(100, 4, 8, 10), (256, 30, 16, 20), (64, 6, 4, 2),
                                        (50, 1, 8, 5), (100, 7, 8, 1)])
def test_pyramid_budgets_decrease_linearly_with_mean_budget(B, L, w, beta):
    b = pyramid_budgets(B, L, w, beta)
    assert np.all(np.diff(b) <= 0) and b[-1] >= w
    # each B_l is a rounding of an exact arithmetic sequence of mean B: |mean - B| <= 1/2
    assert abs(b.mean() - B) <= 0.5


def test_adakv_keeps_the_layer_total_and_the_safeguard():
    r = np.random.default_rng(0)
    s = r.standard_normal((3, 50))
    s[0] += 5                                   # head 0 scores higher: it takes more keys
    keep = adakv_keep(s, 10, alpha=0.3)
    assert keep.sum() == 30 and keep[0].sum() > 10 and (keep.sum(1) >= 3).all()
    order = np.argsort(-s, axis=1)[:, :3]       # every head keeps its own 3 best (the safeguard)
    assert np.take_along_axis(keep, order, 1).all()


def _run(cache, q, k, v, calls):
    """Feed (q, k, v) to layer 0 in calls of the given sizes; return what each call read."""
    out, a = [], 0
    for T in calls:
        K, V, k_pos = cache.update(0, k[:, a:a + T], v[:, a:a + T], np.arange(a, a + T), q=q[:, a:a + T])
        out.append((K, V, k_pos, cache.held(0)))
        cache.advance(T)
        a += T
    return out


@pytest.mark.parametrize("seed", range(3))
def test_adakv_stays_within_its_layer_budget_and_keeps_every_window(seed):
    q, k, v, _ = problem(seed)
    c = AdaKV(budget=24, n_kv_heads=2, window=6, alpha=0.2)
    _run(c, q, k, v, [100, 40, 1, 1, 1, 30, 1])
    n = c.counts(0)
    assert n.sum() <= 48 and n.max() <= c.max_keys and len(c) == n.max()
    for held in c.positions(0):
        assert np.all(np.diff(held) > 0) and set(range(168, 174)) <= set(held.tolist())   # the window


@pytest.mark.parametrize("seed", range(3))
def test_heads_with_different_counts_attend_exactly_to_their_own_keys(seed):
    """After Ada-KV gave the heads different counts, attention through `held` equals, head by
    head, dense attention over that head's held keys plus the new ones (the padding never read)."""
    q, k, v, _ = problem(seed)
    c = AdaKV(budget=20, n_kv_heads=2, window=4, alpha=0.1)
    k[0, :150] *= 4                             # head 0's keys draw sharper attention than head 1's
    _run(c, q, k, v, [150])
    assert len(set(c.counts(0).tolist())) == 2
    before = c.positions(0)
    K, V, k_pos = c.update(0, k[:, 150:153], v[:, 150:153], np.arange(150, 153), q=q[:, 150:153])
    held = c.held(0)                            # what the call just read, before its eviction
    assert held is not None
    o = attend(q[:, 150:153], K, V, held, q_pos=np.arange(150, 153), k_pos=k_pos)   # (Hq, 3, d)
    G = 2
    for h in range(2):
        keys = np.concatenate([before[h], np.arange(150, 153)])
        kh, vh = k[h][keys], v[h][keys]
        for g in range(G):
            ref = attend(q[h * G + g][None, 150:153], kh[None], vh[None], q_pos=np.arange(150, 153),
                         k_pos=keys)
            # same keys, same float32 kernel: only the summation order of the online softmax
            # may differ (chunks start at other offsets), a few float32 ulps of values O(3)
            np.testing.assert_allclose(o[h * G + g], ref[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_pyramid_keeps_its_layer_budget_per_head_and_the_window(seed):
    q, k, v, _ = problem(seed)
    c = PyramidKV(budget=40, n_layers=3, window=6, beta=4)
    for layer in range(3):
        c.update(layer, k[:, :120], v[:, :120], np.arange(120), q=q[:, :120])
    c.advance(120)
    assert (c.budgets == [70, 40, 10]).all()
    for layer in range(3):
        assert (c.counts(layer) == c.budgets[layer]).all() and c.held(layer) is None
        for held in c.positions(layer):
            assert set(range(114, 120)) <= set(held.tolist())


def test_budget_at_least_the_text_is_the_dense_cache_exactly(model):
    ids = [1] + list(np.random.default_rng(0).integers(3, 500, size=60))
    dense = model.forward(ids)
    for spec in ("pyramid=100/w8/beta1", "adakv=100/w8"):
        assert np.array_equal(model.forward(ids, parse_cache_spec(spec, model)), dense), spec


def test_adakv_reports_the_keys_each_head_read(model):
    ids = [1] + list(np.random.default_rng(1).integers(3, 500, size=80))
    c = parse_cache_spec("adakv=20/w4/a0.1", model)
    model.forward(ids, c)
    before = {l: c.counts(l) for l in range(model.config.n_layers)}      # (Hkv,) per layer
    assert any(len(set(n.tolist())) > 1 for n in before.values())         # heads differ somewhere
    stats = []
    model.forward([7], c, stats=stats)
    G = model.config.n_heads // model.config.n_kv_heads
    for st in stats:
        read = st["n_attended"][:, 0]                    # (Hq,) keys read by each query head
        # query head h reads its KV head's held keys plus the new one, never the padding
        assert read.tolist() == np.repeat(before[st["layer"]] + 1, G).tolist()


def test_state_round_trip_continues_identically(model):
    from minisparse.cache import AdaKV as A, PyramidKV as P
    ids = [1] + list(np.random.default_rng(2).integers(3, 500, size=90))
    for spec, cls in (("pyramid=40/w4/beta4", P), ("adakv=24/w4", A)):
        c = parse_cache_spec(spec, model)
        model.forward(ids[:80], c)
        meta, arrays = c.state()
        again = cls.from_state(meta, arrays)
        a, b = model.forward(ids[80:], c), model.forward(ids[80:], again)
        assert np.array_equal(a, b), spec


# ---- kvpress as the oracle ----------------------------------------------------------------------
def _kvpress():
    kvpress = pytest.importorskip("kvpress", reason="kvpress (the oracle) is not installed")
    import torch
    return kvpress, torch


def _softmax_rows(q, k, pos):
    hq, hkv, d = q.shape[0], k.shape[0], q.shape[-1]
    s = np.einsum("htd,hsd->hts", q.astype(np.float64), np.repeat(k, hq // hkv, 0)) / np.sqrt(d)
    s = np.where(pos[None, None, :] <= pos[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _module(q, k, layer=0, n_layers=1):
    cfg = SimpleNamespace(num_attention_heads=q.shape[0], num_key_value_heads=k.shape[0],
                          num_hidden_layers=n_layers, _attn_implementation="sdpa")
    return SimpleNamespace(config=cfg, head_dim=q.shape[-1], layer_idx=layer)


@pytest.mark.parametrize("B,L,w,beta", [(100, 4, 8, 10), (256, 30, 16, 20), (64, 6, 4, 2),
                                        (100, 4, 16, 10), (40, 3, 6, 4), (30, 2, 4, 20)])
def test_pyramid_budgets_equal_kvpress_on_prompts_long_enough_for_every_layer(B, L, w, beta):
    # kvpress computes the schedule from q_len and ratio with q_len * (1 - ratio) = B; on a
    # prompt longer than max_num + window (so its short-prompt cap is off) the budgets agree
    kvpress, _ = _kvpress()
    q_len = 8 * B
    press = kvpress.PyramidKVPress(compression_ratio=1 - B / q_len, window_size=w, beta=beta)
    theirs = [press.get_layer_budget(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=L),
                                                     layer_idx=l), q_len) for l in range(L)]
    assert pyramid_budgets(B, L, w, beta).tolist() == theirs


# Rounding: kvpress scores in float32, minisparse in float64; scores are means of <= window * G
# softmax terms and a 5-wide pooling, relative error < 1e-5 in float32. Sets are compared only
# where no two scores lie within that band of the cut (checked), as in test_methods_scorers.py.
RTOL = 1e-5


def _no_near_tie(scores, n):
    srt = np.sort(scores[np.isfinite(scores)])[::-1]
    if n >= len(srt):
        return True
    gap = np.abs(np.diff(srt[max(0, n - 2):n + 1])).min()
    return gap > 2 * RTOL * np.abs(srt).max()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_pyramid_keeps_what_kvpress_pyramidkvpress_keeps(seed, layer):
    # one prompt of 200 tokens, B = 50, 4 layers: kvpress keeps per KV head its layer's budget of
    # the best SnapKV scores, the last window keys always in; so does PyramidKV
    kvpress, torch = _kvpress()
    q, k, v, pos = problem(seed)
    B, L, w, ker, beta = 50, 4, 8, 5, 5
    press = kvpress.PyramidKVPress(compression_ratio=0.75, window_size=w, kernel_size=ker, beta=beta)
    tag = np.array(k)
    tag[..., 0] = np.arange(k.shape[1])                 # gathered keys name their slots
    t = lambda x: torch.tensor(np.asarray(x, np.float32))[None]     # noqa: E731
    kept_k, _ = press.compress(_module(q, k, layer, L), torch.zeros(1, 200, 1), t(tag), t(v),
                               t(_softmax_rows(q, k, pos)), {})
    theirs = [set(row.tolist()) for row in kept_k[0, :, :, 0].round().long().numpy()]
    c = PyramidKV(B, L, window=w, kernel=ker, beta=beta)
    for l in range(layer + 1):
        c.update(l, k, v, pos, q=q)
    ours = [set(p.tolist()) for p in c.positions(layer)]
    sc = SnapKV(w, ker, protect=True).scores(ScoreContext(layer, q, k, v, np.broadcast_to(pos, k.shape[:2]), pos))
    for h in range(k.shape[0]):
        if _no_near_tie(sc[h], int(c.budgets[layer])):
            assert ours[h] == theirs[h]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.2, 0.0, 1.0])
def test_adakv_keeps_what_kvpress_adakvpress_keeps(seed, alpha):
    # kvpress's AdaKVPress(SnapKVPress) masks, across the heads of a layer, the Hkv * (S - n_kept)
    # lowest scores after the safeguard; AdaKV keeps the complement. Its SnapKV scores are
    # minisparse's divided by window * G (mean vs sum): the same for every head, so the same ranking
    kvpress, torch = _kvpress()
    q, k, v, pos = problem(seed)
    k[1] *= 2.5                                          # unequal heads: Ada-KV moves budget
    B, w, ker = 50, 8, 5
    press = kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.75, window_size=w, kernel_size=ker),
                               alpha_safeguard=alpha)
    module = _module(q, k)
    t = lambda x: torch.tensor(np.asarray(x, np.float32))[None]     # noqa: E731
    press.compress(module, torch.zeros(1, 200, 1), t(k), t(v), t(_softmax_rows(q, k, pos)), {})
    _, heads, seqs = module.masked_key_indices
    theirs = np.ones(k.shape[:2], bool)
    theirs[heads.numpy(), seqs.numpy()] = False
    c = AdaKV(B, n_kv_heads=2, window=w, kernel=ker, alpha=alpha)
    c.update(0, k, v, pos, q=q)
    ours = np.zeros(k.shape[:2], bool)
    for h, p in enumerate(c.positions(0)):
        ours[h, p] = True
    sc = SnapKV(w, ker, protect=True).scores(ScoreContext(0, q, k, v, np.broadcast_to(pos, k.shape[:2]), pos))
    assert ours.sum() == theirs.sum() == 2 * B
    if _no_near_tie(sc.ravel(), 2 * B):
        assert (ours == theirs).all()


def test_a_sparse_selector_over_adakv_reads_only_held_keys(model):
    # top-k scores every slot, padding included; the intersection with `held` drops what is not
    # the head's own, so a query reads at most k keys and never more than its head holds
    ids = [1] + list(np.random.default_rng(3).integers(3, 500, size=80))
    c = parse_cache_spec("adakv=20/w4/a0.1", model)
    model.forward(ids, c)
    before = {l: c.counts(l) for l in range(model.config.n_layers)}
    stats = []
    model.forward([7], c, attention="topk=6", stats=stats)
    G = model.config.n_heads // model.config.n_kv_heads
    for st in stats:
        read = st["n_attended"][:, 0]
        assert (read <= 6).all() and (read <= np.repeat(before[st["layer"]] + 1, G)).all()
