"""TidalDecode through a real model: the dense layers and the selecting layers read every causal key,
every other layer reads exactly the positions the last selecting layer chose (its own top-k
would differ), in prefill and at a decode step; outside a model it is its top-k rule alone (the
query's own key and the top k - 1 older ones)."""
import numpy as np
import pytest

from minisparse import load_model
from minisparse.attention import Selector, Tidal, TopK
from minisparse.spec import REGISTRY, parse_attention_spec

K, RESELECT = 4, 4
RULE = TopK(K - 1, recent=1)          # its own key and the top K - 1 older ones


class Recorder(Selector):
    """Runs `inner` and keeps the Selection each layer of a forward call used: log[layer]."""

    def __init__(self, inner, log, layer=None):
        self.inner, self.log, self.layer = inner, log, layer

    def at_layer(self, layer, shared):
        return Recorder(self.inner.at_layer(layer, shared), self.log, layer)

    def _select(self, q, k, q_pos, k_pos):
        sel = self.inner.select(q, k, q_pos, k_pos)
        self.log[self.layer] = sel
        return sel

    def describe(self):
        return self.inner.describe()


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def masks(sel, hq, q_pos, k_pos):
    """(Hq, Tq, Tk) bool: the causal keys the selection reads."""
    m, _ = sel.to_mask(hq, q_pos.size, k_pos.size)
    return m & (k_pos[None, None, :] <= q_pos[None, :, None])


def test_reusing_layers_read_exactly_the_positions_the_selecting_layer_chose(model):
    cfg = model.config
    assert cfg.n_layers > RESELECT + 1, "the test needs a reusing layer after the re-selection"
    ids = model.tokenizer.encode("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n")[:40]
    log, steps = {}, {}
    model.forward(ids, attention=Recorder(Tidal(K, RESELECT), log), trace=steps)
    T, hq = len(ids), cfg.n_heads
    pos = np.arange(T)
    causal = pos[None, None, :] <= pos[None, :, None]
    chooser = None
    for l in range(cfg.n_layers):
        got = masks(log[l], hq, pos, pos)
        if l < 2 or l in (2, RESELECT):
            assert np.array_equal(got, np.broadcast_to(causal, got.shape)), f"layer {l} not dense"
        if l in (2, RESELECT):
            chooser = l
            continue
        if l < 2:
            continue
        q, k = steps[f"blk.{chooser}.q"], steps[f"blk.{chooser}.k"]       # fresh cache: K = k
        want = masks(RULE.select(q, k), hq, pos, pos)
        assert np.array_equal(got, want), f"layer {l} does not read layer {chooser}'s top-{K}"
        own = masks(RULE.select(steps[f"blk.{l}.q"], steps[f"blk.{l}.k"]), hq, pos, pos)
        assert not np.array_equal(own, want), f"layer {l}'s own choice is the same: no evidence"


def test_a_decode_step_reads_what_the_prefill_row_reads(model):
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog again and again.")[:24]
    full, pre = {}, model.new_cache()
    model.forward(ids, attention=Recorder(Tidal(K, RESELECT), full))
    step = {}
    model.forward(ids[:-1], pre, attention=Tidal(K, RESELECT))
    model.forward(ids[-1:], pre, attention=Recorder(Tidal(K, RESELECT), step))
    T, hq = len(ids), model.config.n_heads
    pos = np.arange(T)
    for l in range(model.config.n_layers):
        a = masks(full[l], hq, pos, pos)[:, -1]
        b = masks(step[l], hq, pos[-1:], pos)[:, 0]
        assert np.array_equal(a, b), f"layer {l}: decode step differs from the prefill row"


def test_outside_a_model_it_is_its_own_key_and_the_top_k_minus_1():
    r = np.random.default_rng(0)
    q, k = r.standard_normal((4, 12, 8)).astype(np.float32), r.standard_normal((2, 12, 8)).astype(np.float32)
    a, _ = Tidal(3, 5).select(q, k).to_mask(4, 12, 12)
    b, _ = TopK(2, recent=1).select(q, k).to_mask(4, 12, 12)
    np.testing.assert_array_equal(a, b)
    assert a[:, np.arange(12), np.arange(12)].all() and (a.sum(-1)[:, 2:] == 3).all()


def test_a_reusing_layer_with_nothing_stored_picks_its_own_top_k():
    # layer 2 forced dense by the model's dense_layers: layer 3 has no positions to reuse
    r = np.random.default_rng(1)
    q, k = r.standard_normal((2, 10, 4)).astype(np.float32), r.standard_normal((1, 10, 4)).astype(np.float32)
    a, _ = Tidal(2, 9).at_layer(3, {}).select(q, k).to_mask(2, 10, 10)
    b, _ = TopK(1, recent=1).select(q, k).to_mask(2, 10, 10)
    np.testing.assert_array_equal(a, b)


def test_spec_round_trips_and_bad_specs_name_the_token():
    for spec in (REGISTRY["tidal"].example, REGISTRY["tidal"].small, "tidal=2%/13"):
        sel = parse_attention_spec(spec)
        assert str(sel) == spec and parse_attention_spec(str(sel)) == sel
    for spec, token in (("tidal=64", "k/L"), ("tidal=64/x", "k/L"), ("tidal=64/1", "reselect"),
                        ("tidal=x/13", "x")):
        with pytest.raises(ValueError, match=token):
            parse_attention_spec(spec)
