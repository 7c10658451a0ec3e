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
from test_quant_kernels import random_blocks, term_magnitudes

import gguf

U = 2.0 ** -24                       # float32 unit roundoff
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0]

pytestmark = pytest.mark.skipif(not q8.available(), reason="needs an x86-64 CPU with AVX2")


def gamma(k):
    return k * U / (1 - k * U)


def quantized(x):
    qx, dx, sx = np.empty(x.size, np.int8), np.empty(x.size // 32, np.float32), np.empty(x.size // 32, np.float32)
    q8.quantize(x, qx, dx, sx)
    return qx, dx, sx


@given(nblk=st.integers(1, 8), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
       zero_block=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_quantize_rounds_each_element_to_within_half_a_step(nblk, scale, zero_block, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(32 * nblk) * scale).astype(np.float32)
    if zero_block:
        x[:32] = 0
    qx, dx, sx = quantized(x)
    amax = np.abs(x.reshape(-1, 32)).max(1).astype(np.float64)
    # dx = fl(amax / 127): one rounding
    assert np.all(np.abs(dx - amax / 127) <= U * amax / 127)
    assert np.all(np.abs(qx.astype(np.int32)) <= 127)
    # q = rint(fl(x * fl(127 / amax))) and x * fl(127 / amax) = (x / dx)(1 + e1)(1 + e2)(1 + e3),
    # |e_i| <= u, with |x / dx| <= 127 (1 + u): |q - x / dx| <= 1/2 + 127 * 3.01 u, so
    # |x - dx q| <= dx (1/2 + 383 u); 400 u leaves room.
    xhat = np.repeat(dx.astype(np.float64), 32) * qx
    assert np.all(np.abs(x - xhat) <= np.repeat(dx, 32) * (0.5 + 400 * U))
    # sx = fl(dx * sum(qx)): the integer sum is exact, one rounding for the product
    exact_sx = dx.astype(np.float64) * qx.reshape(-1, 32).sum(1)
    assert np.all(np.abs(sx - exact_sx) <= U * np.abs(exact_sx))
    if zero_block:
        assert dx[0] == 0 and not qx[:32].any()


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
    qx, dx, _ = quantized(x)
    xhat = np.repeat(dx.astype(np.float64), 32) * qx                                   # (cols,)
    # Against W x_hat: each block's integer sum is exact (|sum| <= 32 * 128 * 127 < 2^24, so also
    # its float32 conversion); then d * dx (1 rounding), one fused multiply-add into a lane per
    # block (nblk roundings along a lane), the additive term m * sx (sx rounded once, the product
    # once, nblk additions), 8 lanes and that term summed (9). Every term reaches the result
    # through at most k = nblk + 12 roundings, and the terms are d q_j x_hat_j and m x_hat_j
    # summed apart, so (Higham, Thm 3.1) |y - W x_hat| <= gamma_k sum (|d q| + |m|) |x_hat|.
    k = nblk + 12
    mag = term_magnitudes(raw, qtype, w)                                               # (rows, cols)
    bound = gamma(k) * (mag @ np.abs(xhat))
    assert np.all(np.abs(y - w @ xhat) <= bound)
    # Against W x: |W x - W x_hat| <= sum_j |w_j| |x_j - x_hat_j| <= sum_j |w_j| dx_j (1/2 + 400 u)
    # (test_quantize_...), added to the bound above.
    step = np.repeat(dx.astype(np.float64), 32) * (0.5 + 400 * U)
    assert np.all(np.abs(y - w @ x.astype(np.float64)) <= bound + np.abs(w) @ step)


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
