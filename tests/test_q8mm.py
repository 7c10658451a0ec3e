"""The integer prefill products (minisparse/fast/q8mm.py) against the exact product of the same
8-bit activations, the float path on them, and q8.matvec's per-row products, within bounds
derived from float32 rounding (the integer block sums are exact).

Legend: per block b of a row, isum = sum_e w_e qx_e over the block's 32 elements (w_e the
weight's integer code: Q4_1's nibble, Q4_0's nibble - 8, Q8_0's int8), d, m the weight block's
scale and minimum, dx, sx the activation block's scale and Q8_1 sum (q8.quantize). Exactly,
row . x_hat = sum_b d dx isum (+ m sx for Q4_1): `exact` below, in float64 from the stored values.
"""
import contextlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings, strategies as st

from minisparse.fast import q8, q8mm, quant
from minisparse.fast.threads import prefill_threads
from minisparse.quant import QuantMatrix
from test_quant_kernels import random_blocks

U = 2.0 ** -24                       # float32 unit roundoff
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0]

pytestmark = pytest.mark.skipif(not q8mm.available(), reason="needs an x86-64 CPU with AVX512-VNNI")


def gamma(k):
    return k * U / (1 - k * U)


def codes(raw, qtype, n_in):
    """Each weight block's (d, m, integer codes) as float64: d, m (rows, nb), codes (rows, nb, 32)."""
    rows, nb = raw.shape[0], n_in // 32
    size = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}[qtype]
    blk = raw.reshape(rows, nb, size)
    d = blk[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    if qtype == QT.Q8_0:
        return d, np.zeros_like(d), blk[:, :, 2:].copy().view(np.int8).astype(np.float64)
    m = blk[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64) if qtype == QT.Q4_1 else np.zeros_like(d)
    q = blk[:, :, (4 if qtype == QT.Q4_1 else 2):]
    n = np.concatenate([q & 15, q >> 4], axis=2).astype(np.float64)     # element e low, e + 16 high
    return d, m, (n - 8 if qtype == QT.Q4_0 else n)


def quantized_rows(x):
    T, n_in = x.shape
    qx, dx, sx = np.empty((T, n_in), np.int8), np.empty((T, n_in // 32), np.float32), np.empty((T, n_in // 32), np.float32)
    for t in range(T):
        q8.quantize(x[t], qx[t], dx[t], sx[t])
    return qx, dx, sx


def exact_and_scale(raw, qtype, x):
    """exact (T, out): sum_b d dx isum + m sx in float64 (products of float16 values and integers
    below 2^24: exact), and S (T, out): the same sum of absolute values, |isum| replaced by
    sum_e |w_e qx_e|, which bounds every float32 summation order's error below."""
    n_in = x.shape[1]
    d, m, w = codes(raw, qtype, n_in)
    qx, dx, sx = quantized_rows(x)
    q = qx.reshape(x.shape[0], -1, 32).astype(np.float64)                  # (T, nb, 32)
    isum = np.einsum("rbe,tbe->trb", w, q)                                 # (T, out, nb) exact
    iabs = np.einsum("rbe,tbe->trb", np.abs(w), np.abs(q))
    ddx = d[None] * dx.astype(np.float64)[:, None]                         # (T, out, nb)
    msx = m[None] * sx.astype(np.float64)[:, None]
    return (ddx * isum + msx).sum(2), (np.abs(ddx) * iabs + np.abs(msx)).sum(2), (qx, dx, sx)


def random_case(T, n_out, nb, qtype, seed):
    """A random (n_out, 32 nb) matrix of qtype blocks and x (T, 32 nb), drawn from seed."""
    rng = np.random.default_rng(seed)
    n_in = 32 * nb
    raw = random_blocks(qtype, n_out, n_in, rng)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    return raw, QuantMatrix(raw, (n_out, n_in), qtype), x


shapes = dict(T=st.integers(1, 41), n_out=st.integers(1, 70), nb=st.integers(1, 20),
              qtype=st.sampled_from(TYPES), seed=st.integers(0, 2**32 - 1))


@settings(deadline=None, max_examples=30)
@given(**shapes)
def test_matmul_within_float32_rounding_of_the_exact_integer_product(T, n_out, nb, qtype, seed):
    raw, W, x = random_case(T, n_out, nb, qtype, seed)
    y = q8mm.matmul(x, W)
    exact, S, _ = exact_and_scale(raw, qtype, x)
    # per block: isum exact in int32 and in float32 (|isum| <= 32 * 255 * 128 < 2^24); the scale
    # fl(d * dx) (one rounding, u); one fma into the lane (one rounding), Q4_1's m sx one more:
    # 2 nb + 1 roundings along any term's path, so |y - exact| <= gamma_(2nb+1) S (Higham 4.2)
    assert np.all(np.abs(y - exact) <= gamma(2 * nb + 1) * S)


@settings(deadline=None, max_examples=30)
@given(**shapes)
def test_matmul_rows_equal_q8_matvec_within_both_summation_bounds(T, n_out, nb, qtype, seed):
    raw, W, x = random_case(T, n_out, nb, qtype, seed)
    y = q8mm.matmul(x, W)
    ref = np.empty_like(y)
    for t in range(T):
        q8.matvec_serial(int(qtype), raw, x[t], ref[t])
    _, S, _ = exact_and_scale(raw, qtype, x)
    # both from the same 8-bit x and exact integer sums: q8.matvec's path per term is the scale
    # (1 rounding), nb fmas along a lane, 3 adds of hsum_float_8 and the final add (Q4_1's m sx:
    # a product and nb adds), at most 2 nb + 5 roundings; q8mm's 2 nb + 1 (above). Each is
    # within gamma_(2nb+5) S of the exact sum, so of each other within twice that.
    assert np.all(np.abs(y - ref) <= 2 * gamma(2 * nb + 5) * S)


@settings(deadline=None, max_examples=20)
@given(**shapes)
def test_matmul_equals_float_path_on_the_same_8_bit_activations(T, n_out, nb, qtype, seed):
    raw, W, x = random_case(T, n_out, nb, qtype, seed)
    n_in = 32 * nb
    exact, S, (qx, dx, sx) = exact_and_scale(raw, qtype, x)
    x_hat = (np.repeat(dx, 32, axis=1) * qx).astype(np.float32)        # float16 x int8: exact
    x_hat = np.concatenate([x_hat, np.zeros((max(0, quant.FUSED_MAX_T + 1 - T), n_in), np.float32)])
    saved, quant.INT8_DECODE = quant.INT8_DECODE, False       # the float32 tiles and sgemm
    try:
        y_float = quant.matmul(x_hat, W)[:T]
    finally:
        quant.INT8_DECODE = saved
    y = q8mm.matmul(x, W)
    W_deq = W.dequantize().astype(np.float64)
    A = np.abs(x_hat[:T]).astype(np.float64) @ np.abs(W_deq).T
    # The float path computes fl(W_deq x_hat): within gamma_(in) A of W_deq x_hat in any order.
    # Q4_0, Q8_0: W_deq = d * code exactly (float16 x small integer), so W_deq x_hat = exact.
    # Q4_1: W_deq = fl(d n + m) (one rounding: within u of d n + m, so u A of the product), and
    # x_hat's block sum is dx sum(qx) where the kernel multiplies m by Q8_1's stored sx: the gap
    # sum_b m (sx - dx sum(qx)), computed exactly here (float64 of float16 x float32 values)
    gap = 0.0
    tol = gamma(n_in) * A + gamma(2 * nb + 1) * S
    if qtype == QT.Q4_1:
        d, m, _ = codes(raw, qtype, n_in)
        s = qx.reshape(T, nb, 32).astype(np.float64).sum(2)
        gap = ((sx.astype(np.float64) - dx.astype(np.float64) * s)[:, None, :] * m[None]).sum(2)
        # the gap's float64 evaluation: 2 nb + 2 roundings of 2^-53 of its absolute terms
        tol = tol + U * A + (2 * nb + 2) * 2.0 ** -53 * (
            (np.abs(sx) + np.abs(dx) * np.abs(s))[:, None, :] * np.abs(m)[None]).sum(2)
    assert np.all(np.abs(y - (y_float + gap)) <= tol)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_tiles_chunks_and_threads_give_the_same_bits(qtype, monkeypatch):
    """Every output is one token's row group over all blocks in one order: how rows are tiled,
    tokens chunked or split over threads changes none of its bits."""
    rng = np.random.default_rng(int(qtype))
    T, n_out, n_in = 300, 83, 96               # T > CHUNK_T, n_out not a multiple of 16
    W = QuantMatrix(random_blocks(qtype, n_out, n_in, rng), (n_out, n_in), qtype)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    y = q8mm.matmul(x, W)
    monkeypatch.setattr(q8mm, "TILE_BYTES", 16 * n_in)     # one row group per tile
    assert np.array_equal(q8mm.matmul(x, W).view(np.uint32), y.view(np.uint32))
    with prefill_threads(T):
        assert np.array_equal(q8mm.matmul(x, W).view(np.uint32), y.view(np.uint32))


@pytest.mark.parametrize("threads", [False, True])
def test_products_sharing_x_give_each_products_bits(threads, monkeypatch):
    """matmul_many quantises x once for every matrix (q, k, v; gate, up): each product then has
    the bits of its own matmul, whose quantisation of x is the same, row for row, and whose
    sums run in the same order; quant.matmul_many and FAST.linears (biases added after) too."""
    from minisparse.fast import FAST
    rng = np.random.default_rng(5)
    T, n_in = 150, 96
    Ws = [QuantMatrix(random_blocks(qt, n, n_in, rng), (n, n_in), qt)
          for qt, n in ((QT.Q4_1, 83), (QT.Q4_0, 40), (QT.Q8_0, 16), (QT.Q4_1, 7))]
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    bs = [None, rng.standard_normal(40).astype(np.float32), None, None]
    monkeypatch.setattr(quant, "INT8_DECODE", True)
    with prefill_threads(T) if threads else contextlib.nullcontext():
        alone = [q8mm.matmul(x, W) for W in Ws]
        for got in (q8mm.matmul_many(x, Ws), quant.matmul_many(x, Ws)):
            for y, want in zip(got, alone):
                assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
        for y, W, b in zip(FAST.linears(x, Ws, bs), Ws, bs):
            assert np.array_equal(y.view(np.uint32), FAST.linear(x, W, b).view(np.uint32))
    with pytest.raises(ValueError, match=r"this matrix takes \(T, 96\)"):
        q8mm.matmul_many(x[:, :64], Ws)


def test_quant_matmul_takes_q8mm_for_prefill_when_int8_is_on(monkeypatch):
    rng = np.random.default_rng(3)
    W = QuantMatrix(random_blocks(QT.Q4_1, 40, 64, rng), (40, 64), QT.Q4_1)
    x = rng.standard_normal((quant.FUSED_MAX_T + 5, 64)).astype(np.float32)
    monkeypatch.setattr(quant, "INT8_DECODE", True)
    assert np.array_equal(quant.matmul(x, W), q8mm.matmul(x, W))
    monkeypatch.setattr(quant, "INT8_DECODE", False)            # MINISPARSE_INT8=0: float32 tiles
    assert not np.array_equal(quant.matmul(x, W), q8mm.matmul(x, W))


def test_a_type_without_kernel_is_refused():
    W = QuantMatrix(np.zeros((2, 64 * 2), np.uint8), (2, 64), QT.F16)
    with pytest.raises(ValueError, match="GGML type 1 has no integer kernel"):
        q8mm.matmul(np.zeros((9, 64), np.float32), W)


@settings(deadline=None, max_examples=40)
@given(T=st.integers(1, 5), nb=st.integers(1, 12), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
       zero_block=st.booleans(), ties=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_activations_quantised_as_q8_quantize_bit_for_bit(T, nb, scale, zero_block, ties, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, 32 * nb)) * scale).astype(np.float32)
    if ties:                                   # halves after scaling: rint's ties to even
        x = (np.round(x / scale * 4) / 4 * np.float32(127 / 4)).astype(np.float32)
    if zero_block:
        x[:, :32] = 0
    qx, dx, sx, ss = (np.empty((T, 32 * nb), np.int8), np.empty((T, nb), np.float32),
                      np.empty((T, nb), np.float32), np.empty((T, nb), np.int32))
    q8mm._quantize_rows(x, qx, dx, sx, ss, 0, T)
    want_q, want_d, want_s = quantized_rows(x)
    assert np.array_equal(qx, want_q)
    assert np.array_equal(dx.view(np.uint32), want_d.view(np.uint32))
    assert np.array_equal(sx.view(np.uint32), want_s.view(np.uint32))
    assert np.array_equal(ss, want_q.reshape(T, nb, 32).astype(np.int32).sum(2))
