"""Sparse attention inside the real model: decode runs the prefill rules, indexed selectors keep
one index per layer in the cache, and the attended fraction is what the kernel read."""
import numpy as np
import pytest

import minisparse
from minisparse.spec import parse_attention_spec


@pytest.fixture(scope="module")
def model(stories_path):
    return minisparse.load_model(stories_path)


IDS = [1] + list(np.random.default_rng(7).integers(3, 512, size=120))


@pytest.mark.parametrize("spec", ["window=8", "sinks=4,window=16", "landmarks=16,window=8",
                                  "topk=12", "random=10%x3,seed=5", "quest=4/12",
                                  "topk=12/kv"])
def test_model_decode_step_equals_prefill_row(model, spec):
    full = model.forward(IDS, attention=spec)                        # (T, V) one prefill
    cache = model.new_cache()
    model.forward(IDS[:80], cache, attention=spec)
    steps = np.stack([model.forward([t], cache, attention=spec)[-1] for t in IDS[80:]])
    # the same keys at every position (the selectors' rules are positional and causal), so only
    # float32 summation order differs, as in the dense cached-vs-uncached test: <= 1e-4
    assert np.abs(steps - full[80:]).max() <= 1e-4


def test_indexed_selector_keeps_one_index_per_layer_extended_each_step(model):
    cache = model.new_cache()
    model.forward(IDS[:100], cache, attention="ivf=8/p4")
    assert cache.selector_state == {}                                # prefill: per-call rule
    for t in IDS[100:110]:
        model.forward([t], cache, attention="ivf=8/p4")
    assert len(cache.selector_state) == model.config.n_layers        # one index per layer
    assert all(ix.n == len(cache) for ix in cache.selector_state.values())   # extended per step


def test_ivf_probing_every_list_equals_exact_topk_in_decode(model):
    # with nprobe >= number of lists the index scans every key: the same set as exact top-k
    a, b = model.new_cache(), model.new_cache()
    model.forward(IDS[:100], a), model.forward(IDS[:100], b)
    for t in IDS[100:106]:
        x = model.forward([t], a, attention="ivf=8/p1000")[-1]
        y = model.forward([t], b, attention="topk=8")[-1]
        assert np.abs(x - y).max() <= 1e-5                            # same keys, same kernel


def test_stats_report_the_attended_fraction_per_layer(model):
    stats = []
    model.forward(IDS[:64], attention=parse_attention_spec("window=7"), stats=stats)
    assert [s["layer"] for s in stats] == list(range(model.config.n_layers))
    for s in stats:
        n_att, n_causal = s["n_attended"], s["n_causal"]
        assert n_att.shape == (model.config.n_heads, 64)
        assert np.all(n_att == np.minimum(np.arange(1, 65), 8))      # window 7: w + 1 keys
        assert np.all(n_causal == np.arange(1, 65))
