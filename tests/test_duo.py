"""DuoAttention head roles (`duo=F/sS/wW`): the grammar, the per-head rule (a retrieval KV head
reads what Dense reads, a streaming one what sinks|window reads), the calibration file (save,
load, a tampered or mismatched file refused) and, on the embedded model, the keys every head
actually reads in prefill and decode."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, strategies as st

import methods_props as M
from minisparse import load_model
from minisparse.attention import Dense, Sinks, Window, attend
from minisparse.attention.duo import Calibration, Duo, calibration_path, n_retrieval
from minisparse.cli import main as cli_main
from minisparse.registry import resolve, shipped_file
from minisparse.spec import REGISTRY, parse_attention_spec
from minisparse.testing import problems


# ----------------------------------------------------------------------------- the grammar

@pytest.mark.parametrize("spec,canonical", [
    ("duo=0.5/s4/w256", "duo=0.5/s4/w256"), ("duo=50%", "duo=0.5/s4/w256"),
    ("duo=0.25/w64", "duo=0.25/s4/w64"), ("duo=1/s0/w0", "duo=1/s0/w0"),
    (REGISTRY["duo"].example, REGISTRY["duo"].example)])
def test_spec_round_trips(spec, canonical):
    sel = parse_attention_spec(spec)
    assert str(sel) == canonical
    assert parse_attention_spec(str(sel)) == sel


@pytest.mark.parametrize("spec,match", [
    ("duo", "needs a fraction"), ("duo=half", "expected a fraction"), ("duo=1.5", r"in \[0, 1\]"),
    ("duo=0.5/q3", "unknown or repeated part 'q3'"), ("duo=0.5/s1/s2", "repeated part 's2'"),
    ("duo=0.5/w-1", "unknown or repeated part 'w-1'"), ("duo=0.5,seed=1", "takes no options")])
def test_bad_spec_is_refused_by_name(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_attention_spec(spec)


def test_retrieval_count_rounds_half_up():
    assert [n_retrieval(0.5, n) for n in (1, 2, 3, 90)] == [1, 1, 2, 45]
    assert n_retrieval(0.0, 5) == 0 and n_retrieval(1.0, 5) == 5


# ----------------------------------------------------------------------------- the rule per head

@given(problems(max_tk=24), st.data())
def test_each_kv_head_reads_dense_or_sinks_and_window(prob, data):
    q, k, v, q_pos, k_pos = prob
    hq, hkv = q.shape[0], k.shape[0]
    heads = np.array(data.draw(st.lists(st.booleans(), min_size=hkv, max_size=hkv)))
    s, w = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 6))
    out, st_duo = attend(q, k, v, Duo(0.5, s, w, heads), q_pos, k_pos, return_stats=True)
    full, st_full = attend(q, k, v, Dense(), q_pos, k_pos, return_stats=True)
    part, st_part = attend(q, k, v, Sinks(s) | Window(w), q_pos, k_pos, return_stats=True)
    role = np.repeat(heads, hq // hkv)                                   # (Hq,) per query head
    # the same keys in the same order through the same kernel: equal bit for bit
    np.testing.assert_array_equal(out, np.where(role[:, None, None], full, part))
    np.testing.assert_array_equal(st_duo.n_attended,
                                  np.where(role[:, None], st_full.n_attended, st_part.n_attended))


@given(M.problems(full_queries=True), st.data())
def test_decode_step_equals_prefill_row_with_mixed_heads(prob, data):
    hkv = prob[1].shape[0]
    heads = data.draw(st.lists(st.booleans(), min_size=hkv, max_size=hkv))
    M.check_decode_step_equals_prefill_row(Duo(0.5, 1, 2, heads), prob)
    M.check_kernel_equals_reference_on_the_selected_set(Duo(0.5, 1, 2, heads), prob)


def test_unbound_duo_streams_every_head_except_at_fraction_one():
    k = np.zeros((3, 12, 4), np.float32)
    assert not Duo(0.9).retrieval_heads(3).any()
    assert Duo(1.0).retrieval_heads(3).all()
    with pytest.raises(ValueError, match="2 KV heads, the keys 3"):
        Duo(0.5, heads=[True, False]).select(None, k, np.arange(12))


def test_at_layer_without_a_calibration_or_a_model_file_is_an_error():
    with pytest.raises(ValueError, match="needs a calibration"):
        Duo(0.5).at_layer(0, {})


# ----------------------------------------------------------------------------- on the embedded model

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A copy of the embedded model (the calibration is written beside it) and its calibration,
    written by the CLI: 1 pass-key example of 200 tokens, sinks 2, window 16."""
    d = tmp_path_factory.mktemp("duo")
    path = d / "model.gguf"
    shutil.copy(resolve("default"), path)
    rc = cli_main(["duo", "calibrate", "-m", str(path), "--n", "1", "--length", "200",
                   "--sinks", "2", "--window", "16", "--seed", "3"])
    assert rc == 0
    return path, Calibration.load(calibration_path(path), path)


def test_calibration_round_trips_and_records_its_data(calibrated):
    path, cal = calibrated
    model = load_model(path)
    L, Hkv, Hq = model.config.n_layers, model.config.n_kv_heads, model.config.n_heads
    assert cal.scores.shape == (L, Hkv) and cal.q_scores.shape == (L, Hq)
    assert cal.data["seeds"] == [3] and cal.data["task"] == "passkey"
    assert cal.data["lengths"][0] <= 200 + 8 and (cal.sinks, cal.window) == (2, 16)
    # a KV head scores the max of its query heads
    np.testing.assert_array_equal(cal.scores, cal.q_scores.reshape(L, Hkv, -1).max(2))
    again = Calibration.load(cal.save(path.parent / "copy.json"), path)
    np.testing.assert_array_equal(again.scores, cal.scores)
    assert again.to_dict() == cal.to_dict()
    assert cal.retrieval(0.5).sum() == n_retrieval(0.5, L * Hkv)
    # the retrieval heads are the highest scores
    assert cal.scores[cal.retrieval(0.5)].min() >= cal.scores[~cal.retrieval(0.5)].max()


def test_an_edited_calibration_is_refused(calibrated, tmp_path):
    path, cal = calibrated
    d = cal.to_dict()
    d["scores"][0][0] += 1.0
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="checksum mismatch: the calibration was edited"):
        Calibration.load(bad, path)


def test_a_calibration_of_another_model_file_is_refused(calibrated, tmp_path):
    path, cal = calibrated
    other = tmp_path / "other.gguf"                   # another real model: the pass-key one
    shutil.copy(shipped_file("minisparse-passkey.gguf"), other)
    shutil.copy(calibration_path(path), calibration_path(other))
    with pytest.raises(ValueError, match="written for another model file"):
        load_model(other).forward([1, 2, 3], attention="duo=0.5/s2/w16")


def test_no_calibration_beside_the_model_is_an_error_naming_the_command(tmp_path):
    path = tmp_path / "bare.gguf"
    shutil.copy(resolve("default"), path)
    with pytest.raises(ValueError, match="minisparse duo calibrate"):
        load_model(path).forward([1, 2, 3], attention="duo=0.5")


def _expected_reads(q_pos, n_sinks, window):
    """Keys a streaming head reads at query positions q_pos (all keys 0 .. q_pos cached)."""
    return np.array([len(set(range(min(n_sinks, t + 1))) | set(range(max(0, t - window), t + 1)))
                     for t in q_pos])


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_model_retrieval_heads_read_every_key_streaming_heads_sinks_and_window(calibrated, fraction):
    path, cal = calibrated
    model = load_model(path)
    cfg = model.config
    g = cfg.n_heads // cfg.n_kv_heads
    ids = list(np.random.default_rng(0).integers(3, cfg.n_vocab, 60))
    cache, stats = model.new_cache(), []
    spec = f"duo={fraction}/s2/w16"
    model.forward(ids[:50], cache, attention=spec, stats=stats)           # prefill
    for t in ids[50:]:                                                    # decode
        model.forward([t], cache, attention=spec, stats=stats)
    roles = cal.retrieval(fraction)                                       # (L, Hkv)
    assert roles.any() and not roles.all()
    for rec in stats:
        ret = np.repeat(roles[rec["layer"]], g)                           # (Hq,)
        n = rec["n_attended"]                                             # (Hq, T)
        np.testing.assert_array_equal(n[ret], np.broadcast_to(rec["q_pos"] + 1, n[ret].shape))
        np.testing.assert_array_equal(
            n[~ret], np.broadcast_to(_expected_reads(rec["q_pos"], 2, 16), n[~ret].shape))
