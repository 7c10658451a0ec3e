"""The FastGRNN salience gate: the cells against a direct transcription of their equations, the
gated selector's causality and decode == prefill, and on stories260K the trained gate against
an untrained one and random keep (held-out text, attention-mass recall)."""
import importlib.util
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minisparse
from minisparse.attention import attend, reference_kernel
from minisparse.gate import Gated
from minisparse.spec import parse_attention_spec
from minisparse.registry import shipped_file
from minisparse.cache import GateCache
from minisparse.gate.fastgrnn import (DEFAULT_WEIGHTS, FastGRNNGate, GateState, RandomGate,
                                      attention_maps, mass_recall)

ROOT = Path(__file__).resolve().parent.parent
U = 2.0**-53                                             # float64 unit roundoff


def _train_gate_module():
    spec = importlib.util.spec_from_file_location("train_gate", ROOT / "models" / "train_gate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_gate"] = mod
    spec.loader.exec_module(mod)
    return mod


def _random_params(cell, d, H, seed):
    r = np.random.default_rng(seed)
    g = FastGRNNGate.random(d, H, seed, cell)
    p = {k: np.array(v) for k, v in g.params.items()}
    for k in p:                                          # non-zero biases and gate constants too
        if k.startswith("b_"):
            p[k] = 0.5 * r.standard_normal(H)
    p["zeta"], p["nu"] = np.float64(r.normal()), np.float64(r.normal() * 0.3)
    return FastGRNNGate(p, cell)


def _paper_step(gate, x, h):
    """One step of the cell as its paper writes it, float64: (h', slack), slack (Hkv, H) a bound
    on |scan - transcription| from rounding. Each pre-activation a_i sums n = d + H + 1 terms:
    off by <= gamma_n * S_i in either implementation (S_i = sum of |terms|), plus (d + 4) U S_i
    from the key normalisation (a d-term sum, sqrt, divide); |dh'_i / da_i| <= D_i; sigmoid,
    tanh and the final products add <= 10 U (|h_i| + 3)."""
    p, sig = gate.params, lambda a: 1 / (1 + np.exp(-a))
    d, n = x.shape[-1], x.shape[-1] + h.shape[-1] + 1
    gam = (2 * n + d + 4) * U / (1 - n * U)
    if gate.cell == "fastgrnn":      # Kusupati et al. 2018 eq. 3-5: one W, one U
        a = x @ p["W"].T + h @ p["U"].T
        z = sig(a + p["b_z"])
        h_tilde = np.tanh(a + p["b_h"])
        h_new = z * h + (sig(p["zeta"]) * (1 - z) + sig(p["nu"])) * h_tilde
        S = (np.abs(x) @ np.abs(p["W"]).T + np.abs(h) @ np.abs(p["U"]).T
             + np.abs(p["b_z"]) + np.abs(p["b_h"]))
        D = (np.abs(h) + 1) / 4 + 2                      # |h - sig(zeta) c| z(1-z) + g (1 - c^2)
    else:                            # ruvllm: separate matrices, clamp(zeta g + nu)
        g = sig(x @ p["W_g"].T + h @ p["U_g"].T + p["b_g"])
        c = np.tanh(x @ p["W_u"].T + h @ p["U_u"].T + p["b_u"])
        f = np.clip(p["zeta"] * g + p["nu"], 0, 1)
        h_new = f * h + (1 - f) * c
        S = (np.abs(x) @ (np.abs(p["W_g"]) + np.abs(p["W_u"])).T
             + np.abs(h) @ (np.abs(p["U_g"]) + np.abs(p["U_u"])).T
             + np.abs(p["b_g"]) + np.abs(p["b_u"]))
        D = abs(p["zeta"]) * (np.abs(h) + 1) / 4 + 1     # via g (|df/dg| <= |zeta|) and via c
    return h_new, gam * S * D + 10 * U * (np.abs(h) + 3)


@pytest.mark.parametrize("cell", ["fastgrnn", "ruvllm"])
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), d=st.sampled_from([4, 8]))
def test_cell_equals_direct_transcription_of_its_equations(cell, seed, T, d):
    H = 6
    gate = _random_params(cell, d, H, seed)
    k = np.random.default_rng(seed).standard_normal((2, T, d)).astype(np.float32)
    h = np.zeros((2, H))
    for t in range(T):                   # step by step from the same state: errors do not compound
        s, h_scan = gate.salience(k[:, t:t + 1], h)
        x = k[:, t].astype(np.float64)
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)            # RMS-normalised key
        h_ref, slack = _paper_step(gate, x, h)
        assert (np.abs(h_scan - h_ref) <= slack).all()
        # salience = ||h||: moves by <= ||h error||_2 <= ||slack||_2, plus H U s for the norm
        s_ref = np.linalg.norm(h_ref, axis=-1)
        assert (np.abs(s[:, 0] - s_ref) <= np.linalg.norm(slack, axis=-1) + H * U * s_ref).all()
        h = h_ref


def test_salience_in_chunks_equals_one_pass():
    # the decode path: state carried across calls gives the same bits as one scan
    gate = _random_params("fastgrnn", 8, 16, 3)
    k = np.random.default_rng(3).standard_normal((4, 30, 8)).astype(np.float32)
    full, h_full = gate.salience(k)
    st_ = GateState(gate, 4, capacity=2)                   # forces the arrays to grow
    for a, b in [(0, 1), (1, 13), (13, 14), (14, 30)]:
        st_.append(k[:, a:b], np.arange(a, b))
    np.testing.assert_array_equal(st_.sal[:, :30], full)
    np.testing.assert_array_equal(st_.h, h_full)
    # the random-keep baseline is causal and prefix-stable the same way
    rnd = RandomGate(5)
    one, _ = rnd.salience(k)
    h = rnd.init_state(4)
    parts = []
    for a, b in [(0, 7), (7, 8), (8, 30)]:
        s_, h = rnd.salience(k[:, a:b], h)
        parts.append(s_)
    np.testing.assert_array_equal(np.concatenate(parts, 1), one)


@pytest.mark.parametrize("cell", ["fastgrnn", "ruvllm"])
def test_training_gradient_equals_finite_differences(cell):
    tg = _train_gate_module()
    r = np.random.default_rng(0)
    N, T, d, H = 3, 7, 4, 5
    X = r.standard_normal((N, T, d))
    M = r.random((N, T)) > 0.3
    Y = np.where(M, r.random((N, T)), 0)
    Y /= Y.sum(1, keepdims=True)
    P = {k: np.array(v) for k, v in _random_params(cell, d, H, 1).params.items()}
    P["alpha"] = np.float64(0.7)
    _, G = tg.loss_and_grad(P, X, Y, M, cell)
    e = 1e-6
    for name in P:
        for i in range(max(P[name].size, 1)):
            Pp = {k: np.array(v) for k, v in P.items()}
            Pm = {k: np.array(v) for k, v in P.items()}
            Pp[name].reshape(-1)[i] += e
            Pm[name].reshape(-1)[i] -= e
            num = (tg.loss_and_grad(Pp, X, Y, M, cell)[0]
                   - tg.loss_and_grad(Pm, X, Y, M, cell)[0]) / (2 * e)
            # central difference: truncation e^2/6 * |third derivative| ~ 1e-12, plus the loss's
            # own rounding (~1e3 float64 ops on values ~2: < 1e-12) over e: < 1e-6 in all
            assert abs(num - np.array(G[name]).reshape(-1)[i]) <= 1e-6, (name, i)


# ----------------------------------------------------------------------------- the selector
@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    tk = draw(st.integers(1, 40))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    d = draw(st.sampled_from([4, 8]))
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    k_pos = np.arange(tk, dtype=np.int64) + draw(st.integers(0, 5))
    sel = Gated(budget=draw(st.integers(0, 5)), window=draw(st.integers(0, 4)),
                sinks=draw(st.integers(0, 2)), gate="untrained", seed=seed % 7,
                cell=draw(st.sampled_from(["fastgrnn", "ruvllm"])))
    return f(hq, tk, d), f(hkv, tk, d), f(hkv, tk, d), k_pos, sel


@given(problems(), st.data())
def test_gated_output_at_i_unchanged_when_later_tokens_change(prob, data):
    q, k, v, k_pos, sel = prob
    i = data.draw(st.integers(0, k.shape[1] - 1))
    k2, v2 = k.copy(), v.copy()
    k2[:, i + 1:] = 50 * np.random.default_rng(i).standard_normal(k2[:, i + 1:].shape)
    v2[:, i + 1:] = 3.0
    a = attend(q, k, v, sel, q_pos=k_pos, k_pos=k_pos)
    b = attend(q, k2, v2, sel, q_pos=k_pos, k_pos=k_pos)
    # exact: the salience of keys <= i and the ranking over them read nothing after i
    np.testing.assert_array_equal(a[:, :i + 1], b[:, :i + 1])
    ra = sel.select(q, k, k_pos, k_pos)
    rb = sel.select(q, k2, k_pos, k_pos)
    for h in range(ra.n_heads):
        for t in range(i + 1):
            assert ra.rows(h, t) == rb.rows(h, t)


def causal_reads(sel, h, t, qp, k_pos):
    """{key index: log-weight} that row head h, query t of `sel` reads among keys at positions <= qp."""
    ranges, picks = sel.rows(h, t)
    out = {j: 0.0 for lo, hi in ranges for j in range(lo, hi) if k_pos[j] <= qp}
    out.update({j: w for j, w in picks if k_pos[j] <= qp})
    return out


@given(problems())
def test_gated_decode_with_state_equals_prefill(prob):
    q, k, v, k_pos, sel = prob
    tk = k.shape[1]
    pre_sel = sel.select(q, k, k_pos, k_pos)
    # the reference kernel reads each row alone: the same key set gives the same bits (the fast
    # path's decode kernel sums in its own float32 order)
    pre = attend(q, k, v, sel, q_pos=k_pos, k_pos=k_pos, kernel=reference_kernel)
    state = GateState(sel.gate_for(k.shape[2]), k.shape[0])
    bound = sel.bind(state)
    for i in range(tk):
        state.append(k[:, i:i + 1], k_pos[i:i + 1])         # one key read: O(1) recurrence
        one = bound.select(q[:, i:i + 1], k[:, :i + 1], k_pos[i:i + 1], k_pos[:i + 1])
        for h in range(one.n_heads):
            # the same causal keys with the same log-weights, exactly. `rows` is before
            # causality: a prefill row may name keys past its query (sinks=2 at row 0 names
            # [0, 2)), which a decode step over the keys so far cannot hold; the kernel reads
            # neither
            assert causal_reads(one, h, 0, k_pos[i], k_pos) == causal_reads(pre_sel, h, i, k_pos[i], k_pos)
        dec = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], bound, q_pos=k_pos[i:i + 1],
                     k_pos=k_pos[:i + 1], kernel=reference_kernel)
        # the same row read in the same order by the same kernel: identical floats
        np.testing.assert_array_equal(dec[:, 0], pre[:, i])


def test_gate_keys_are_added_to_the_base_and_counted():
    # the gate adds up to `budget` keys outside sinks + window + log-stride, never removes one
    r = np.random.default_rng(0)
    k = r.standard_normal((2, 200, 8)).astype(np.float32)
    pos = np.arange(200)
    base = parse_attention_spec("sinks=4,window=16,logstride").select(None, k, pos, pos)
    sel = Gated(budget=10, window=16, sinks=4, gate="untrained").select(None, k, pos, pos)
    mb, _ = base.to_mask(2, 200, 200)
    mg, _ = sel.to_mask(2, 200, 200)
    assert (mg >= mb).all()                                   # a superset of the base
    extra = (mg & ~mb).sum(-1)                                # (Hkv, T)
    assert extra.max() <= 10 and extra[:, 100:].min() >= 1    # added keys, at most the budget
    i, j = np.arange(200)[:, None], np.arange(200)[None, :]
    assert not ((mg & ~mb) & ((j >= i - 16) | (j < 4))).any()   # only 4 <= j < i - window


def test_spec_round_trip_and_labels():
    sel = parse_attention_spec("gate=8/16/2,mode=untrained,seed=5")
    assert (sel.top, sel.window, sel.sinks, sel.seed) == (8, 16, 2, 5)
    assert parse_attention_spec(sel.describe()).describe() == sel.describe()
    assert "untrained" in sel.gate_for(4).label
    un = parse_attention_spec("gate=8,mode=ruvllm-untrained")
    assert un.gate_for(4).cell == "ruvllm" and not un.gate_for(4).trained
    assert parse_attention_spec(un.describe()).describe() == un.describe()
    with pytest.raises(ValueError, match="budget/window/sinks"):
        parse_attention_spec("gate=1/2/3/4")


# ----------------------------------------------------------------------------- on a real model
@pytest.fixture
def one_thread():
    # the parallel attention kernel thrashes on a loaded 2-core box; these tests decode token by
    # token, so run it on one thread (results do not depend on the thread count)
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(n)


def test_model_gated_decode_equals_stateless_recomputation_and_prefill(stories_path, one_thread):
    model = minisparse.load_model(stories_path)
    ids = [1] + list(np.random.default_rng(0).integers(3, 512, size=95))
    sel = Gated(budget=4, window=8, sinks=2, gate="untrained", seed=1)
    gate = sel.gate_for(model.config.head_dim)
    plain = model.new_cache()                                 # unbound: recomputes every call
    step_p = [model.forward(ids[:32], plain, sel)] + [model.forward([t], plain, sel)
                                                     for t in ids[32:]]
    calls = []                                                # keys per salience call, bound path
    real = gate.salience
    gate.salience = lambda k, h=None: (calls.append(k.shape[1]), real(k, h))[1]
    cache = GateCache(model.new_cache(), gate)
    bound = sel.bind(cache)
    step_b = [model.forward(ids[:32], cache, bound)] + [model.forward([t], cache, bound)
                                                        for t in ids[32:]]
    gate.salience = real
    a, b = np.concatenate(step_b), np.concatenate(step_p)
    # the bound path reads the same keys from the same cache and picks the same rows: identical
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="the cache runs gate"):
        other = GateCache(model.new_cache(), FastGRNNGate.random(8, 16, seed=2))
        model.forward(ids[:4], other, sel.bind(other))
    # O(1) recurrence per decode step: each layer's state read every key exactly once
    assert sorted(set(calls)) == [1, 32] and sum(calls) == len(ids) * model.config.n_layers
    full = model.forward(ids, attention=sel)
    # prefill vs decode: keys differ by float32 rounding only (matrix-matrix vs matrix-vector,
    # see test_engine's 1e-4 bound); salience moves by ~1e-7, no pick flips on this text
    assert np.abs(full - a).max() <= 1e-4


def test_shipped_gates_are_labelled_and_match_their_model_files():
    import hashlib
    import zipfile
    from conftest import FIXTURES
    names = {n.split("/")[0] for n in zipfile.ZipFile(shipped_file(DEFAULT_WEIGHTS)).namelist()}
    assert {"stories260K", "stories260K-ruvllm", "minisparse-pydoc"} <= names
    for name in names:
        g = FastGRNNGate.load(name=name)
        assert g.trained and g.label.startswith("trained") and g.record["train_seeds"]
        path = next((p for p in (ROOT / "models" / g.record["model"], FIXTURES / g.record["model"])
                     if p.is_file()), None)
        if path is None:
            continue                                  # the shared fixtures are not beside us
        # a re-exported model makes its gate stale: retrain with models/train_gate.py
        assert hashlib.sha256(path.read_bytes()).hexdigest() == g.record["model_sha256"], name
        assert g.d == minisparse.load_model(path).config.head_dim


def test_trained_gate_beats_untrained_and_random_keep(stories_path, one_thread):
    if not shipped_file(DEFAULT_WEIGHTS) is not None:
        pytest.fail(f"{DEFAULT_WEIGHTS} is missing: run python3 models/train_gate.py")
    trained = FastGRNNGate.load(d=8)
    rec = trained.record
    assert trained.trained and rec["model"] == "stories260K.gguf"
    tg = _train_gate_module()
    model = minisparse.load_model(stories_path)
    seed = 1000 + len(rec["heldout_seeds"]) + 7              # a text neither trained nor tuned on
    assert seed not in rec["train_seeds"] + rec["heldout_seeds"]
    maps = attention_maps(model, tg.sample_ids(model, seed, 384))
    kw = dict(budget=16, window=16, sinks=4)
    r_base = mass_recall(maps, Gated(0, 16, 4, gate=RandomGate(0)), start=64)
    r_tr = mass_recall(maps, Gated(**kw, gate=trained), start=64)
    r_un = mass_recall(maps, Gated(**kw, gate="untrained", seed=0), start=64)
    r_rand = mass_recall(maps, Gated(**kw, gate=RandomGate(0)), start=64)
    print(f"recall: base {r_base:.4f} trained {r_tr:.4f} untrained {r_un:.4f} random {r_rand:.4f}")
    assert r_base < r_rand and r_base < r_un                  # any added key adds mass
    assert r_tr > r_un and r_tr > r_rand
