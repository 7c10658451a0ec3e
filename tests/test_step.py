"""fast/step.py: a decode step in one compiled call a layer gives model.forward's bits on FAST
(logits and the cache it leaves), and declines every step it does not cover."""
import dataclasses

import numpy as np
import pytest

from minisparse import load_model
from minisparse.attention import Sinks, Window
from minisparse.fast import decode, quant, step
from minisparse.errors import MinisparseError
from minisparse.registry import resolve
from minisparse.spec import parse_attention_spec

ORACLE = "tests/fixtures/oracle/llama_g2_hd64_q8_0.gguf"      # 2 layers, Q8_0, GQA 2, d = 64


def _pair(model):
    """The model with the fused step, and the same model without it (FAST otherwise)."""
    if not quant.INT8_DECODE:
        pytest.skip("the fused step runs the 8-bit products (q8.py), which need AVX2 and F16C")
    unfused = type(model)(model.config, model.weights, model.tokenizer, model.path,
                          ops=dataclasses.replace(model.ops, decode_step=None))
    return model, unfused


@pytest.mark.parametrize("name,prompt,attention,dense_layers", [
    ("default", 40, None, ()), (ORACLE, 40, None, ()), (ORACLE, 600, None, ()),
    (ORACLE, 600, "sinks=4,window=64", (1,)), ("default", 40, Sinks(2) | Window(8), ()),
    ("smollm2", 40, None, ())])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_step_gives_the_forwards_bits(monkeypatch, name, prompt, attention,
                                                   dense_layers, threads):
    # the step calls the kernels the forward's Ops call, on the same values in the same order
    # (only the calls are fewer), so equality is exact, not within a bound: logits, and the keys,
    # values and positions the cache holds after each step. 600 keys take the parallel attention
    # kernel on two threads (DECODE_PARALLEL_MIN_KEYS), 40 the serial one; sinks + window reads
    # its ranges (decode.py), a layer in dense_layers every key. The embedded model's and
    # SmolLM2's matrices are large enough to take the products side by side
    # (PARALLEL_MIN_WEIGHTS), the oracle's (128 x 128) are not.
    for mod in (step, decode, quant):
        monkeypatch.setattr(mod, "workers", lambda: threads)
    if name == "smollm2":
        try:
            name = resolve("smollm2")
        except MinisparseError as e:
            pytest.skip(str(e))
    fused, plain = _pair(load_model(name))
    ids = list(np.random.default_rng(prompt).integers(0, fused.config.n_vocab, prompt))
    ca, cb = fused.new_cache(), plain.new_cache()
    np.testing.assert_array_equal(fused.forward(ids, ca, last_only=True),
                                  plain.forward(ids, cb, last_only=True))
    calls = []
    for fn in ("_layer", "_layer_parallel"):
        real = getattr(step, fn)
        monkeypatch.setattr(step, fn, lambda *a, real=real, fn=fn: calls.append(fn) or real(*a))
    tok = ids[-1]
    for _ in range(5):
        a = fused.forward([tok], ca, attention, dense_layers)
        b = plain.forward([tok], cb, attention, dense_layers)
        assert a.shape == b.shape == (1, fused.config.n_vocab)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        assert (ca.n, ca.next_pos) == (cb.n, cb.next_pos)
        for x, y in ((ca.k, cb.k), (ca.v, cb.v)):
            assert np.array_equal(x[:, :, :ca.n].view(np.uint32), y[:, :, :cb.n].view(np.uint32))
        np.testing.assert_array_equal(ca.pos[:ca.n], cb.pos[:cb.n])
        tok = int(np.argmax(a))
    assert len(calls) == 5 * fused.config.n_layers                # the fused step really ran
    # two threads take the parallel layer for a model with large matrices or for enough keys
    big = step._plan(fused)[3]
    want = "_layer_parallel" if threads == 2 and (big or prompt >= decode.DECODE_PARALLEL_MIN_KEYS) else "_layer"
    assert set(calls) == {want}


def test_fused_step_declines_what_it_does_not_cover(monkeypatch):
    model, _ = _pair(load_model(ORACLE))
    cache = model.new_cache()
    model.forward([1, 2, 3], cache)
    S = cache.n
    assert step.decode_step(model, np.array([4]), cache, selector=parse_attention_spec("topk=2")) is None

    class Moving(Window):                  # a selector that may differ by layer: not a pattern
        def at_layer(self, layer, shared):
            return Window(self.w + layer)
    assert step.decode_step(model, np.array([4]), cache, selector=Moving(2) | Sinks(1)) is None
    assert step.decode_step(model, np.array([4]), cache, stats=[]) is None
    assert step.decode_step(model, np.array([4]), cache, trace={}) is None
    assert step.decode_step(model, np.array([4, 5]), cache) is None
    half = model.new_cache(dtype=np.float16)
    assert step.decode_step(model, np.array([4]), half) is None
    monkeypatch.setattr(quant, "INT8_DECODE", False)
    assert step.decode_step(model, np.array([4]), cache) is None
    assert cache.n == S                                           # nothing was appended
    # and those forwards still run, without it
    stats = []
    model.forward([4], cache, stats=stats)
    assert len(stats) == model.config.n_layers and cache.n == S + 1


def test_a_model_with_biases_or_float_matrices_takes_the_forward():
    for name in ("tests/fixtures/oracle/qwen2_g2_hd32_bias_tied_f32.gguf",
                 "tests/fixtures/oracle/llama_g2_hd64_wide_f32.gguf"):
        model = load_model(name)
        cache = model.new_cache()
        model.forward([1, 2], cache)
        assert step.decode_step(model, np.array([3]), cache) is None
