"""The dense engine end to end: golden text, cached decode, qwen2 biases, GQA, Q8_0 models."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import minisparse
from minisparse.gguf_io import load_gguf
from minisparse.model import Model, apply_rope, rope_tables

from conftest import shared_fixture
from gguf_factory import tiny_weights, write_model


def test_stories260k_greedy_200_positions_equals_llama2c_golden_text(stories_path):
    # llama2.c `run.c -t 0.0 -n 200`: BOS as the only prompt token, 200 positions in all, so 200
    # forward calls each emit one token; run.c strips the leading space of the first piece, as
    # the SentencePiece decoder does.
    golden = shared_fixture("stories260K.greedy200.txt").read_text(encoding="utf-8")
    model = minisparse.load_model(stories_path)
    bos = model.tokenizer.bos_id
    text = "".join(model.generate([bos], max_new_tokens=200, temperature=0.0))
    assert text == golden


def test_cached_decode_equals_uncached_recomputation_at_every_step(stories_path):
    model = minisparse.load_model(stories_path)
    ids = [1] + list(np.random.default_rng(0).integers(3, 512, size=47))
    full = model.forward(ids)                                   # (48, V) in one prefill
    cache = model.new_cache()
    worst = 0.0
    for i, t in enumerate(ids):
        step = model.forward([t], cache)[-1]                    # (V,) one decode step
        worst = max(worst, float(np.abs(step - full[i]).max()))
    # Issue 2 asks for <= 1e-4. Both paths do the same float32 math in a different order
    # (matrix-matrix vs matrix-vector BLAS kernels, a softmax over 1 vs many rows), so they differ
    # only by float32 rounding: ~L * sqrt(D) * 2^-24 * |logit| ~ 1e-5 here.
    assert worst <= 1e-4


def test_prefill_in_chunks_equals_one_prefill(stories_path):
    model = minisparse.load_model(stories_path)
    ids = [1] + list(np.random.default_rng(1).integers(3, 512, size=63))
    full = model.forward(ids)
    cache = model.new_cache()
    parts = [model.forward(ids[a:b], cache) for a, b in [(0, 10), (10, 37), (37, 64)]]
    assert np.abs(np.concatenate(parts) - full).max() <= 1e-4   # same float32 bound as above


def _logits(path, ids):
    cfg, w, _ = load_gguf(path)
    return Model(cfg, w).forward(ids)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (6, 2)])
def test_gqa_equals_multi_head_attention_on_repeated_kv(tmp_path, n_heads, n_kv_heads):
    # GQA with group G is multi-head attention whose K/V projections repeat each KV head G times.
    G = n_heads // n_kv_heads
    ws = tiny_weights(n_heads=n_heads, n_kv_heads=n_kv_heads, dim=48, seed=3)
    mha = dict(ws)
    for l in range(2):
        for name in ("attn_k", "attn_v"):
            w = ws[f"blk.{l}.{name}.weight"].reshape(n_kv_heads, -1, 48)       # (Hkv, d, D)
            mha[f"blk.{l}.{name}.weight"] = np.repeat(w, G, axis=0).reshape(-1, 48)  # (Hq*d, D)
    ids = np.arange(20) % 64
    a = _logits(write_model(tmp_path / "gqa.gguf", ws, n_heads=n_heads, n_kv_heads=n_kv_heads), ids)
    b = _logits(write_model(tmp_path / "mha.gguf", mha, n_heads=n_heads, n_kv_heads=n_heads), ids)
    # Same math up to summation order in float32: relative 1e-5 is ~100 ulps.
    assert np.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_qwen2_biases_run_and_change_logits(tmp_path):
    ws = tiny_weights(arch="qwen2", seed=4)
    ids = np.arange(16) % 64
    with_bias = _logits(write_model(tmp_path / "q.gguf", ws, arch="qwen2"), ids)
    no_bias = {k: (np.zeros_like(v) if k.endswith(".bias") else v) for k, v in ws.items()}
    without = _logits(write_model(tmp_path / "q0.gguf", no_bias, arch="qwen2"), ids)
    assert np.all(np.isfinite(with_bias))
    assert np.abs(with_bias - without).max() > 1e-2             # biases of scale 0.3 move logits


def test_rope_rotation_preserves_norms_and_relative_positions():
    # RoPE is a rotation: norms are kept, and q(m)·k(n) depends only on m - n.
    from minisparse.gguf_io import Config
    cfg = Config("llama", 10, 16, 1, 1, 1, 16, 16, 64, 1e-5, 10000.0, 16, "interleaved", 1.0, False, False)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 16)).astype(np.float32)
    for style in ("interleaved", "neox"):
        def rot(x, p):
            c, s = rope_tables(np.array([p]), cfg)
            return apply_rope(x, c, s, style, 16)
        assert np.isclose(np.linalg.norm(rot(q, 7)), np.linalg.norm(q), rtol=1e-5)
        a = float((rot(q, 9) * rot(k, 4)).sum())
        b = float((rot(q, 25) * rot(k, 20)).sum())
        assert abs(a - b) <= 1e-4 * (1 + abs(a))                 # float32 angle rounding at pos 25


def test_q8_0_model_logits_within_2_percent_of_f32(tmp_path, stories_path):
    # Q8_0 keeps 8 bits per weight with one fp16 scale per 32: a per-weight error of at most half a
    # step (amax/254), far below 2% of the logits' norm, which is what issue 2 asks.
    cfg, w, reader = load_gguf(stories_path)
    ws = {t.name: w[t.name[:-7] if t.name.endswith(".weight") else t.name] for t in reader.tensors}
    f32 = write_model(tmp_path / "f32.gguf", ws, n_heads=8, n_kv_heads=4, eps=cfg.norm_eps)
    q8 = write_model(tmp_path / "q8.gguf", ws, n_heads=8, n_kv_heads=4, eps=cfg.norm_eps, qtype=QT.Q8_0)
    ids = [1] + list(range(300, 340))
    a, b = _logits(f32, ids), _logits(q8, ids)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel <= 0.02, rel
    assert rel > 0                                              # the file really is quantised


def test_prompt_longer_than_context_is_refused(stories_path):
    model = minisparse.load_model(stories_path)
    with pytest.raises(ValueError, match="context"):
        next(model.generate([1] * (model.config.context_length + 1), max_new_tokens=1))


def test_sampling_is_reproducible_with_a_seed(stories_path):
    model = minisparse.load_model(stories_path)
    a = "".join(model.generate([1], max_new_tokens=30, temperature=1.0, seed=123))
    b = "".join(model.generate([1], max_new_tokens=30, temperature=1.0, seed=123))
    c = "".join(model.generate([1], max_new_tokens=30, temperature=1.0, seed=124))
    assert a == b and model.last_seed == 124 and a != c


@pytest.mark.parametrize("dequant", [True, False], ids=["float32", "in-place"])
def test_prefill_split_over_threads_equals_one_thread(stories_path, monkeypatch, dequant):
    # A long prompt runs with BLAS on one thread and its products and attention tiles split
    # over a thread pool (minisparse.threads); lowered thresholds make a 64-token prompt take
    # that path here. Splitting only moves row blocks and tiles between threads, the same
    # float32 math per element, so the two agree within the float32 bound of the tests above.
    from minisparse import threads
    model = minisparse.load_model(stories_path, dequant=dequant)
    ids = [1] + list(np.random.default_rng(2).integers(3, 512, size=63))
    one = model.forward(ids)
    monkeypatch.setattr(threads, "PREFILL_MIN_T", 8)
    monkeypatch.setattr(threads, "MIN_MACS", 1)
    monkeypatch.setattr(threads, "MIN_ROW_ELEMS", 1)
    monkeypatch.setattr(threads.numba, "get_num_threads", lambda: 2)
    pools = []                                                  # every split asks for the pool
    real = threads._pool
    monkeypatch.setattr(threads, "_pool", lambda n: pools.append(n) or real(n))
    split = model.forward(ids)
    assert pools and set(pools) == {2}                          # the split path really ran
    assert np.abs(split - one).max() <= 1e-4
    assert not threads.active()                                 # the mode ends with the call


class FakeLibc:
    """Records mallopt / malloc_trim calls in place of glibc."""
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_prefill_heap_keeps_freed_memory_only_during_a_long_forward_then_trims(stories_path,
                                                                               monkeypatch):
    from minisparse import threads
    libc = FakeLibc()
    monkeypatch.setattr(threads, "_glibc", lambda: libc)
    model = minisparse.load_model(stories_path)
    model.forward(list(range(1, threads.KEEP_HEAP_MIN_T)))          # one token short: untouched
    assert libc.calls == []
    model.forward(list(range(1, threads.KEEP_HEAP_MIN_T + 1)))
    assert libc.calls == [("mallopt", threads._M_MMAP_THRESHOLD, threads._GLIBC_MMAP_MAX),
                          ("mallopt", threads._M_TRIM_THRESHOLD, 1 << 30),
                          ("mallopt", threads._M_TRIM_THRESHOLD, threads._GLIBC_TRIM),
                          ("malloc_trim", 0)]
    libc.calls.clear()
    with pytest.raises(RuntimeError):                   # an error inside still restores and trims
        with threads.prefill_heap(threads.KEEP_HEAP_MIN_T):
            with threads.prefill_heap(10**6):           # nested: the outer call owns the heap
                raise RuntimeError
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "mallopt", "malloc_trim"]
    assert libc.calls[2] == ("mallopt", threads._M_TRIM_THRESHOLD, threads._GLIBC_TRIM)
    assert not threads._HEAP_KEPT[0]


def test_prefill_heap_with_the_real_allocator_gives_the_same_logits(stories_path):
    # where glibc is present this really changes its thresholds: the numbers must not move
    import platform
    from minisparse import threads
    assert (threads._glibc() is not None) == (platform.libc_ver()[0] == "glibc")
    model = minisparse.load_model(stories_path)
    ids = [1] + list(np.random.default_rng(4).integers(3, 512, size=threads.KEEP_HEAP_MIN_T))
    a = model.forward(ids)
    threads.KEEP_HEAP_MIN_T, keep = 10**9, threads.KEEP_HEAP_MIN_T
    try:
        b = model.forward(ids)
    finally:
        threads.KEEP_HEAP_MIN_T = keep
    np.testing.assert_array_equal(a, b)


def test_row_wise_steps_split_over_threads_give_the_same_bits(monkeypatch):
    # RMSNorm, SwiGLU's gate and RoPE read one row (position) per output row, so running row
    # blocks side by side (threads.by_rows) must return exactly the one-thread result
    from minisparse import threads
    from minisparse.model import apply_rope, glu, rms_norm, rope_tables
    monkeypatch.setattr(threads, "MIN_ROW_ELEMS", 1)
    monkeypatch.setattr(threads.numba, "get_num_threads", lambda: 3)
    r = np.random.default_rng(0)
    x, u = r.standard_normal((2, 37, 24)).astype(np.float32)
    w = r.standard_normal(24).astype(np.float32)
    h = r.standard_normal((4, 37, 16)).astype(np.float32)
    cfg = type("C", (), {"rope_dim": 16, "rope_base": 10000.0, "rope_scale": 1.0})
    cos, sin = rope_tables(np.arange(5, 42), cfg)
    one = rms_norm(x, w, 1e-5), glu(x, u), apply_rope(h, cos, sin, "neox", 16)
    pools = []
    real = threads._pool
    with threads.prefill_threads(threads.PREFILL_MIN_T):
        monkeypatch.setattr(threads, "_pool", lambda n: pools.append(n) or real(n))
        split = rms_norm(x, w, 1e-5), glu(x, u), apply_rope(h, cos, sin, "neox", 16)
    assert pools == [3, 3, 3]                                   # each call really split
    for a, b in zip(one, split):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
