"""The shipped models in models/: minisparse's logits equal PyTorch's (the training framework's),
the files stay small, their GGUF tokenizers round-trip text, the pass-key model retrieves, and
greedy continuations equal the goldens in tests/fixtures/shipped_greedy.json (which need nothing
outside this repository; tests/fixtures/make_shipped_goldens.py wrote and cross-checked them).

The fixtures were written by models/export.py from the *dequantised* exported weights, so both
sides compute the same float32 function and the tolerance is float32 rounding, not quantisation.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minisparse

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(MODELS))
sys.path.insert(0, str(Path(__file__).resolve().parent / "oracle"))
import needle  # noqa: E402
import np_reference  # noqa: E402

NAMES = ["minisparse-pydoc", "minisparse-passkey"]
MAX_BYTES = 16 * 2**20  # issue 6: each shipped GGUF <= 16 MiB


@pytest.fixture(scope="module", params=NAMES)
def shipped(request):
    name = request.param
    fx = dict(np.load(FIXTURES / f"{name.replace('-', '_')}_torch_logits.npz"))
    return name, minisparse.load_model(MODELS / f"{name}.gguf"), fx


@pytest.fixture(scope="module")
def passkey():
    m = minisparse.load_model(MODELS / "minisparse-passkey.gguf")
    return m, needle.build_kit(m.tokenizer)


def test_shipped_gguf_is_small_and_is_the_file_the_fixture_was_made_from(shipped):
    name, _, fx = shipped
    path = MODELS / f"{name}.gguf"
    assert path.stat().st_size <= MAX_BYTES
    assert hashlib.sha256(path.read_bytes()).hexdigest() == str(fx["gguf_sha256"])


def test_logits_equal_torch_fixture(shipped, float_decode):
    # float_decode: float32 activations (MINISPARSE_INT8=0), the function torch computes; the
    # default 8-bit ones round x as llama.cpp does (bounds in test_q8_kernels / test_q8mm)
    _, model, fx = shipped
    tokens = fx["tokens"]
    T = len(tokens)
    logits = model.forward(tokens)                                            # (T, V)
    # Both sides are float32 forwards of the same weights; export.py measured torch's own float32
    # error against a float64 forward of those weights (`torch_f32_vs_f64`, ~1.4e-5 for logits up
    # to ~33). minisparse's error is the same kind (float32, other summation order), so
    # |ms - torch32| <= |ms - f64| + |torch32 - f64| ~ 2x that spread; 4x leaves room for BLAS order.
    tol = 4 * float(fx["torch_f32_vs_f64"])
    np.testing.assert_allclose(logits[-len(fx["logits_last"]):], fx["logits_last"], rtol=0, atol=tol)
    np.testing.assert_allclose(logits[np.arange(T - 1), tokens[1:]], fx["next_logit"], rtol=0, atol=tol)


def test_gguf_tokenizer_encodes_fixture_text_to_training_ids(shipped):
    # the fixture's ids came from the HF tokenizer.json the model was trained with
    _, model, fx = shipped
    text, tokens = str(fx["text"]), [int(t) for t in fx["tokens"]]
    if tokens[0] == model.tokenizer.bos_id:
        tokens = tokens[1:]
    if "pass key" in text:  # pass-key examples are built from pieces; the text re-tokenises the same
        text = text[text.index("There is"):]
    assert model.tokenizer.encode(text, add_bos=False) == tokens
    assert model.tokenizer.decode(tokens) == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_gguf_tokenizer_round_trips_any_text(text):
    # byte-level BPE maps every UTF-8 byte to a token, so decode(encode(x)) == x for all x
    tok = _pydoc_tokenizer()
    assert tok.decode(tok.encode(text, add_bos=False)) == text


_TOK = []


def _pydoc_tokenizer():
    if not _TOK:
        _TOK.append(minisparse.load_tokenizer(MODELS / "minisparse-pydoc.gguf"))
    return _TOK[0]


def test_encode_adds_bos_as_in_training():
    # training documents start with <|endoftext|>; the GGUF's add_bos_token makes prompts do too
    tok = _pydoc_tokenizer()
    assert tok.bos_id == 0 and tok.encode("def ")[0] == 0


@given(st.integers(200, 700), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_passkey_example_has_exact_length_and_retokenises_identically(passkey, n, depth, seed):
    model, kit = passkey
    ex = needle.make_passkey_example(kit, n, depth, seed)
    toks = ex["tokens"]
    assert toks.shape == (n,) and toks[0] == model.tokenizer.bos_id
    assert list(toks[ex["answer_start"]:]) == list(ex["answer"])
    # the pieces join on pre-token boundaries, so the text of an example tokenises back to its ids
    text = model.tokenizer.decode(list(toks[1:]))
    assert model.tokenizer.encode(text, add_bos=False) == list(toks[1:])
    assert f"{ex['key']}" in text


def test_passkey_kit_from_gguf_tokenizer_rebuilds_the_training_fixture(passkey):
    # export.py built this example from the HF tokenizer used in training (n=1024, depth 0.3, seed 2026)
    _, kit = passkey
    fx = np.load(FIXTURES / "minisparse_passkey_torch_logits.npz")
    assert np.array_equal(needle.make_passkey_example(kit, 1024, 0.3, seed=2026)["tokens"], fx["tokens"])


@pytest.mark.parametrize("depth,seed", [(0.1, 11), (0.9, 12)])
def test_passkey_model_retrieves_the_key_at_2048_tokens(passkey, depth, seed):
    model, kit = passkey
    ex = needle.make_passkey_example(kit, 2048, depth, seed)
    logits = model.forward(ex["tokens"][:-1])                                # (T-1, V)
    pred = logits[ex["answer_start"] - 1:].argmax(-1)                        # teacher-forced key tokens
    assert list(pred) == list(ex["answer"])


def test_llamacpp_tokenizes_fixture_text_to_the_same_ids(shipped):
    # the GGUF tokenizer is standard: llama.cpp (tokenizer.ggml.pre "gpt-2") gives the training ids
    llama_cpp = pytest.importorskip("llama_cpp")
    name, _, fx = shipped
    llm = llama_cpp.Llama(str(MODELS / f"{name}.gguf"), vocab_only=True, verbose=False)
    assert llm.tokenize(str(fx["text"]).encode(), add_bos=True, special=False) == [int(t) for t in fx["tokens"]]


# ----------------------------------------------------------------------------- goldens of our own
GOLDEN = json.loads((FIXTURES / "shipped_greedy.json").read_text(encoding="utf-8"))["cases"]
_MODELS = {}


def shipped_model(file):
    if file not in _MODELS:
        _MODELS[file] = minisparse.load_model(MODELS / file)
    return _MODELS[file]


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_greedy_continuation_equals_golden(case):
    model = shipped_model(case["model"])
    prompt = case["prompt"] if case["prompt"] is not None else case["prompt_ids"]
    if case["prompt"] is not None:
        assert model.tokenizer.encode(case["prompt"]) == case["prompt_ids"]
    text = "".join(model.generate(prompt, max_new_tokens=case["max_new_tokens"], temperature=0,
                                  stop_at_eos=False))
    # Exact equality is sound: on this path the top-2 logit margin is >= case["min_top2_margin"]
    # (>= 0.03), over 1000x the float32 gap to a float64 forward (<= 1.5e-5, cross_check), so
    # only a change of the computed function can flip a token.
    assert text == case["text"]
    assert model.tokenizer.decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_golden_ids_are_the_argmax_of_an_independent_float64_forward(case):
    # tests/oracle/np_reference.py: float64 NumPy over gguf-py's dequantisation, no minisparse
    # code, so the golden is not merely the engine's own say-so
    ids = case["prompt_ids"] + case["ids"]
    ref = np_reference.forward(MODELS / case["model"], ids[:-1])[len(case["prompt_ids"]) - 1:]   # (n, V)
    assert [int(i) for i in ref.argmax(-1)] == case["ids"]
    top = np.sort(ref, axis=-1)[:, -2:]
    # the path's margin holds in float64 too, up to the float32-vs-float64 gap recorded
    gap = case["cross_check"]["max_abs_logit_diff_vs_np_reference"]
    assert (top[:, 1] - top[:, 0]).min() >= case["min_top2_margin"] - 2 * gap


# ----------------------------------------------------------------------------- the KV cache, on a model every clone has
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


def cache_tol(model, logits):
    # Both paths do the same float32 operations on the same numbers; only the matmul shapes
    # differ (matrix-matrix vs matrix-vector), so the sums run in another order. Per dot product
    # of length n <= F that moves the result by ~sqrt(n) u relative (u = 2^-24); L layers x 7
    # matmuls add such independent errors to the residual stream: sqrt(7 L) sqrt(F) u relative,
    # against the largest logit. A cache bug (wrong position, stale key) moves logits by O(1).
    cfg = model.config
    return np.sqrt(7 * cfg.n_layers) * np.sqrt(cfg.ffn_dim) * 2.0**-24 * np.abs(logits).max()


def test_shipped_model_cached_decode_equals_uncached_recomputation_at_every_step(float_decode):
    model = shipped_model("minisparse-pydoc.gguf")
    ids = model.tokenizer.encode(CODE)
    full = model.forward(ids)                                  # (T, V) one prefill
    cache = model.new_cache()
    steps = np.stack([model.forward([t], cache)[-1] for t in ids])   # (T, V) one decode step each
    np.testing.assert_allclose(steps, full, rtol=0, atol=cache_tol(model, full))


def test_shipped_model_prefill_in_chunks_equals_one_prefill(float_decode):
    # float_decode: cache_tol bounds float32 noise, and 8-bit activations are not continuous in
    # it (the other summation order of a chunked prefill can move an element of x across a
    # rounding step of its block, one step dx = max|x_block| / 127 at once)
    model = shipped_model("minisparse-pydoc.gguf")
    ids = model.tokenizer.encode(CODE)
    full = model.forward(ids)                                  # (T, V)
    cache = model.new_cache()
    parts = [model.forward(ids[a:b], cache) for a, b in [(0, 10), (10, 27), (27, len(ids))]]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=cache_tol(model, full))
