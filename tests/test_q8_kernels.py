"""The integer decode kernels (minisparse/fast/q8.py) against the exact product, within bounds
derived from the 8-bit rounding of x and the float32 sums over blocks.

Two errors, kept apart: x_hat = dx * qx differs from x by at most dx (1/2 + 400 u) per element
(test_quantize_...), and the kernel computes W x_hat with exact integer block sums and float32
sums over the blocks (test_matvec_...). The product against W x adds the two.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings, strategies as st

from minisparse.fast import q8, quant
from minisparse.quant import QuantMatrix
from test_quant_kernels import random_blocks

import gguf
from gguf import GGML_QUANT_SIZES

U = 2.0 ** -24                       # float32 unit roundoff
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0]

pytestmark = pytest.mark.skipif(not q8.available(), reason="needs an x86-64 CPU with AVX2")


def gamma(k):
    return k * U / (1 - k * U)


def quantized(x):
    qx, dx, sx = np.empty(x.size, np.int8), np.empty(x.size // 32, np.float32), np.empty(x.size // 32, np.float32)
    q8.quantize(x, qx, dx, sx)
    return qx, dx, sx


H = 2.0 ** -11                       # float16's unit roundoff (normal range)
H_SUB = 2.0 ** -25                   # half the spacing of float16's subnormals


def half(v):
    """What q8._half gives: v (float32) to the nearest float16, as float32; v where that overflows."""
    v = np.asarray(v, np.float32)
    with np.errstate(over="ignore"):                  # the overflow is the case handled below
        h = v.astype(np.float16).astype(np.float32)
    return np.where(np.isinf(h), v, h)


def half_error(v):
    """A bound on |half(v) - v|: half an ulp of float16, 2^-11 |v| in its normal range, 2^-25 among
    its subnormals; 0 where half keeps v."""
    return np.maximum(H * np.abs(v), H_SUB)


def block_scale(x):
    """d = fl(max|x_block| / 127) in float32 per block, before its float16 rounding."""
    return (np.abs(x.reshape(-1, 32)).max(1) / np.float32(127)).astype(np.float32)


@given(nblk=st.integers(1, 8), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
       zero_block=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_quantize_rounds_as_llama_cpp_and_within_half_a_step(nblk, scale, zero_block, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(32 * nblk) * scale).astype(np.float32)
    if zero_block:
        x[:32] = 0
    qx, dx, sx = quantized(x)
    d = block_scale(x)
    amax = np.abs(x.reshape(-1, 32)).max(1).astype(np.float64)
    # d = fl(amax / 127): one rounding
    assert np.all(np.abs(d - amax / 127) <= U * amax / 127)
    assert np.all(np.abs(qx.astype(np.int32)) <= 127)
    # q = rint(fl(x * fl(127 / amax))) and x * fl(127 / amax) = (x / d)(1 + e1)(1 + e2)(1 + e3),
    # |e_i| <= u, with |x / d| <= 127 (1 + u): |q - x / d| <= 1/2 + 127 * 3.01 u, so
    # |x - d q| <= d (1/2 + 383 u); 400 u leaves room.
    d32 = np.repeat(d.astype(np.float64), 32)
    assert np.all(np.abs(x - d32 * qx) <= d32 * (0.5 + 400 * U))
    # the stored scales are llama.cpp's Q8_1 fields: dx = half(d), sx = half(fl(d * sum(qx))),
    # the same bits (one float32 product, one rounding to float16 each)
    S = qx.reshape(-1, 32).astype(np.int32).sum(1)
    assert np.array_equal(dx, half(d)) and np.array_equal(sx, half(d * S.astype(np.float32)))
    # so x_hat = dx q moves by |q| |dx - d| <= 127 half_error(d) more
    xhat = np.repeat(dx.astype(np.float64), 32) * qx
    assert np.all(np.abs(x - xhat) <= d32 * (0.5 + 400 * U) + 127 * np.repeat(half_error(d), 32))
    if zero_block:
        assert dx[0] == 0 and not qx[:32].any()


def split_terms(raw, qtype, w):
    """(|d q| per weight, |m| per block, m per block) for Q4_1, whose kernel adds m sx per block
    apart from the integer products; Q4_0 and Q8_0: (|w|, 0, 0), all integer products."""
    if qtype != QT.Q4_1:
        z = np.zeros((w.shape[0], w.shape[1] // 32))
        return np.abs(w), z, z
    b = raw.reshape(raw.shape[0], -1, 20)                                    # (rows, blocks, bytes)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)       # (rows, blocks)
    return np.abs(w - np.repeat(m, 32, axis=1)), np.abs(m), m


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@settings(max_examples=40)
@given(rows=st.integers(1, 80), nblk=st.integers(1, 24), parallel=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_matvec_equals_the_exact_product_within_the_derived_bound(qtype, rows, nblk, parallel, seed):
    rng = np.random.default_rng(seed)
    cols = 32 * nblk
    raw = random_blocks(qtype, rows, cols, rng)
    w = gguf.quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)     # exact weights
    x = rng.standard_normal(cols).astype(np.float32)
    y = np.empty(rows, np.float32)
    (q8.matvec if parallel else q8.matvec_serial)(int(qtype), raw, x, y)
    qx, dx, sx = quantized(x)
    xhat = np.repeat(dx.astype(np.float64), 32) * qx                                   # (cols,)
    dq, am, m = split_terms(raw, qtype, w)
    S = qx.reshape(-1, 32).astype(np.float64).sum(1)                                   # (blocks,)
    # What the kernel computes exactly: W x_hat with Q4_1's m dx sum(qx) taken as m sx. Each
    # block's integer sum is exact (|sum| <= 32 * 128 * 127 < 2^24, so also its float32
    # conversion); then d * dx (1 rounding), one fused multiply-add into a lane per block (nblk
    # roundings along a lane), the 8 lanes summed (3), the additive term m * sx (the product
    # once, nblk additions) added (1). Every term reaches the result through at most
    # k = nblk + 12 roundings, so (Higham, Thm 3.1) |y - t| <= gamma_k (sum |d q| |x_hat| + sum |m sx|).
    t = w @ xhat + m @ (sx - dx.astype(np.float64) * S)
    k = nblk + 12
    bound = gamma(k) * (dq @ np.abs(xhat) + am @ np.abs(sx))
    assert np.all(np.abs(y - t) <= bound)
    # Against W x: |W x - W x_hat| <= sum_j |w_j| |x_j - x_hat_j| (test_quantize_...'s bound), and
    # |m| |sx - dx S| per block, with |sx - dx S| <= |sx - fl(d S)| + |fl(d S) - d S| + |d - dx| |S|
    # <= half_error(fl(d S)) + u |d S| + half_error(d) |S|.
    d = block_scale(x).astype(np.float64)
    step = np.repeat(d * (0.5 + 400 * U) + 127 * half_error(d), 32)
    sx_err = half_error(d * S) * (1 + U) + U * np.abs(d * S) + half_error(d) * np.abs(S)
    assert np.all(np.abs(y - w @ x.astype(np.float64)) <= bound + np.abs(w) @ step + am @ sx_err)


def ggml_dot(qtype, raw, qx, dx, sx):
    """One row per entry of raw, as ggml's AVX2 ggml_vec_dot_q4_0_q8_0 / q4_1_q8_1 / q8_0_q8_0 take
    it, transcribed in float32: acc (8 lanes) = fma(d * dx, float(isum lanes), acc) per block,
    hsum_float_8(acc) (+ the sum of m * s over the blocks for Q4_1). A fused multiply-add is
    emulated in float64, which holds d dx isum exactly (24 + 24 bits) before the one rounding of
    the sum to float32, except when that sum's float64 rounding lands on a float32 halfway point
    (odds about 2^-29 an operation)."""
    f32 = np.float32
    rows, nb = raw.shape[0], dx.size
    bb = GGML_QUANT_SIZES[qtype][1]
    b = raw.reshape(rows, nb, bb)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(f32)                      # (rows, nb)
    if qtype == QT.Q8_0:
        q = b[..., 2:].view(np.int8).astype(np.int64)
    else:
        nib = b[..., bb - 16:]
        q = np.concatenate([nib & 15, nib >> 4], -1).astype(np.int64) - (8 if qtype == QT.Q4_0 else 0)
    prod = q * qx.reshape(nb, 32).astype(np.int64)[None]                               # (rows, nb, 32)
    # pmaddubsw + pmaddwd: lane i of the eight int32 sums holds elements 4i .. 4i+3
    lanes_i = prod.reshape(rows, nb, 8, 4).sum(-1)                                     # (rows, nb, 8)
    acc = np.zeros((rows, 8), f32)
    for blk in range(nb):
        dd = (d[:, blk] * dx[blk]).astype(f32)                                         # (rows,)
        acc = (dd[:, None].astype(np.float64) * lanes_i[:, blk].astype(f32) + acc).astype(f32)
    r = [(acc[:, k + 4] + acc[:, k]).astype(f32) for k in range(4)]
    y = ((r[0] + r[2]).astype(f32) + (r[1] + r[3]).astype(f32)).astype(f32)
    summs = np.zeros(rows, f32)
    if qtype == QT.Q4_1:
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(f32)
        for blk in range(nb):
            summs = (summs + (m[:, blk] * sx[blk]).astype(f32)).astype(f32)
    return (y + summs).astype(f32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@settings(max_examples=20)
@given(rows=st.integers(1, 40), nblk=st.integers(1, 24), seed=st.integers(0, 2**32 - 1))
def test_matvec_is_ggml_avx2_dot_product_bit_for_bit(qtype, rows, nblk, seed):
    rng = np.random.default_rng(seed)
    raw = random_blocks(qtype, rows, 32 * nblk, rng)
    x = rng.standard_normal(32 * nblk).astype(np.float32)
    y = np.empty(rows, np.float32)
    q8.matvec_serial(int(qtype), raw, x, y)
    np.testing.assert_array_equal(y, ggml_dot(qtype, raw, *quantized(x)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3])
def test_decode_matmul_takes_the_integer_kernel_when_switched_on(monkeypatch, qtype, T):
    rng = np.random.default_rng(int(qtype) + T)
    raw = random_blocks(qtype, 70, 96, rng)
    W = QuantMatrix(raw, (70, 96), qtype)
    x = rng.standard_normal((T, 96)).astype(np.float32)
    monkeypatch.setattr(quant, "INT8_DECODE", True)
    got = quant.matmul(x, W)                                                           # (T, 70)
    for t in range(T):
        want = np.empty(70, np.float32)
        q8.matvec_serial(int(qtype), raw, x[t], want)
        np.testing.assert_array_equal(got[t], want)
    monkeypatch.setattr(quant, "INT8_DECODE", False)
    assert not np.array_equal(quant.matmul(x, W), got)       # the float32 kernel: other numbers


def test_minisparse_int8_accepts_only_0_or_1():
    env = dict(os.environ, MINISPARSE_INT8="yes")
    r = subprocess.run([sys.executable, "-c", "import minisparse"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "MINISPARSE_INT8='yes': expected 0" in r.stderr
