"""Matrix products straight from GGUF quant blocks: the fast path's `linear` for a `QuantMatrix`.

Numba kernels dequantise rows exactly as ggml's `dequantize_row_*` (and `gguf.quants`, which the
plain path in minisparse/quant.py calls) define them, bit for bit. Decode (few rows of x) uses a
fused kernel: each thread dequantises one weight row into a small buffer and dots it with x;
prefill dequantises a tile of rows to float32 and hands it to BLAS sgemm, so memory stays bounded
by the tile. Integer dot products on 8-bit activations (llama.cpp's `vec_dot`; they change the
numbers, as llama.cpp's do) are q8.py's for decode and q8mm.py's for prefill, taken by default
(`INT8_DECODE`; prefill also needs AVX512-VNNI, `INT8_PREFILL`); MINISPARSE_INT8=0 takes the
float32 kernels and sgemm here. Block layouts: ggml-common.h / ggml-quants.c.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

import os

from ..quant import QuantMatrix
from . import q8, q8mm
from .threads import on_threads, row_blocks, side_by_side, workers

# Every float16 bit pattern -> float32 (256 KiB, stays in L2): exact, and keeps the kernels free of
# bit twiddling for the fp16 scales every block carries.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_F16 = F16_TO_F32              # a global: Numba freezes it into the compiled code as a constant

# Up to this many tokens, one fused matrix-vector pass per token beats dequantising tiles for
# sgemm (`python3 benchmarks/bench_engine.py --crossover` measures it).
FUSED_MAX_T = 8
# The float32 tile a prefill dequantises into: large enough that sgemm runs near its peak on a
# tall matrix (the output head), small enough to stay a bounded copy (docs/performance.md).
TILE_BYTES = 1 << 23
# Smaller matrices take the serial matvec: a parallel region waits for every worker thread, which
# costs more than the work on a tiny matrix. On a machine busy with other work a worker that the
# other work displaces holds up each region, so the larger ones run on the cores free now
# (threads.workers; docs/performance.md, "A busy machine").
PARALLEL_MIN_WEIGHTS = 1 << 16
ROWS_PER_TASK = 32              # rows per parallel task: a few tasks per thread on small matrices

INT8_ENV = "MINISPARSE_INT8"


def _int8_decode() -> bool:
    """MINISPARSE_INT8=1 or unset: decode products of Q4_0 / Q4_1 / Q8_0 matrices on 8-bit
    activations (q8.py: llama.cpp's arithmetic), where the CPU has the instructions; 0: the
    float32 kernels below (the exact product of the stored weights, up to float32 sums)."""
    value = os.environ.get(INT8_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{INT8_ENV}={value!r}: expected 0 (float32 activations) or 1 (8-bit ones)")
    return value == "1" and q8.available()


# read once at import; tests and benchmarks set it directly. The same switch takes prefill's
# products on 8-bit activations too where the CPU has AVX512-VNNI (q8mm.py): prefill row i and
# decode step i then multiply the same 8-bit activations (the float32 sums over blocks differ in order)
INT8_DECODE = _int8_decode()
INT8_PREFILL = q8mm.available()

# Numba may reorder the float32 sums of a dot product (vectorise them), as BLAS does; the tests
# bound the difference. Dequantisation itself has no sums and stays bit-exact.
_DOT_MATH = {"reassoc", "contract"}


# ----------------------------------------------------------------------------- one row of blocks
# Each `_row_*` writes one dequantised row; `u8`/`i8` are the same bytes seen unsigned (nibbles,
# fp16 halves) and signed (int8 quants). `n16` is always 16, passed at run time on purpose: with a
# constant trip count LLVM unrolls the block loop and its SLP vectoriser gives up on stores that
# might alias the source; a run-time count goes to the loop vectoriser, which checks aliasing once.


@njit(cache=True, inline="always")
def _f16(u8, o):
    """The float16 stored little-endian at u8[o:o+2], as float32."""
    return _F16[np.int64(u8[o]) | (np.int64(u8[o + 1]) << 8)]


@njit(cache=True)
def _row_q8_0(u8, i8, dst, n16):
    # block of 32: d (f16) | 32 x int8 q;  w = d * q
    for b in range(dst.size // 32):
        o, y, d = b * 34, b * 32, _f16(u8, b * 34)
        for j in range(2 * n16):
            dst[y + j] = d * np.float32(i8[o + 2 + j])


@njit(cache=True)
def _row_q4_0(u8, i8, dst, n16):
    # block of 32: d (f16) | 16 bytes: element j in the low nibble of byte j, j+16 in the high one;
    # w = d * (nibble - 8)
    for b in range(dst.size // 32):
        o, y, d = b * 18 + 2, b * 32, _f16(u8, b * 18)
        for j in range(n16):
            dst[y + j] = d * np.float32(np.int32(u8[o + j] & np.uint8(15)) - 8)
        for j in range(n16):
            dst[y + 16 + j] = d * np.float32(np.int32(u8[o + j] >> np.uint8(4)) - 8)


@njit(cache=True)
def _row_q4_1(u8, i8, dst, n16):
    # block of 32: d (f16) | m (f16) | 16 bytes of nibbles as Q4_0;  w = d * nibble + m
    for b in range(dst.size // 32):
        o, y = b * 20 + 4, b * 32
        d, m = _f16(u8, o - 4), _f16(u8, o - 2)
        for j in range(n16):
            dst[y + j] = d * np.float32(u8[o + j] & np.uint8(15)) + m
        for j in range(n16):
            dst[y + 16 + j] = d * np.float32(u8[o + j] >> np.uint8(4)) + m


@njit(cache=True, inline="always")
def _k4_scale_min(u8, s, j):
    """Q4_K: sub-block j's 6-bit (scale, min) from the 12 packed bytes at u8[s:s+12]."""
    if j < 4:
        return np.int32(u8[s + j]) & 63, np.int32(u8[s + j + 4]) & 63
    sc = (np.int32(u8[s + j + 4]) & 15) | ((np.int32(u8[s + j - 4]) >> 6) << 4)
    mn = (np.int32(u8[s + j + 4]) >> 4) | ((np.int32(u8[s + j]) >> 6) << 4)
    return sc, mn


@njit(cache=True)
def _row_q4_k(u8, i8, dst, n16):
    # super-block of 256: d, dmin (f16) | 12 bytes packing 8 six-bit (scale, min) pairs | 128 bytes
    # of nibbles: 32-byte group i holds sub-block 2i (low nibbles) and 2i+1 (high nibbles);
    # w = (d * scale) * nibble - dmin * min
    for b in range(dst.size // 256):
        o, y = b * 144, b * 256
        d, dmin = _f16(u8, o), _f16(u8, o + 2)
        for j in range(8):
            sc, mn = _k4_scale_min(u8, o + 4, j)
            ds, dm = d * np.float32(sc), dmin * np.float32(mn)
            qo, yo, shift = o + 16 + 32 * (j // 2), y + 32 * j, np.uint8(4 * (j % 2))
            for l in range(2 * n16):
                dst[yo + l] = ds * np.float32((u8[qo + l] >> shift) & np.uint8(15)) - dm


@njit(cache=True)
def _row_q6_k(u8, i8, dst, n16):
    # super-block of 256: 128 bytes of low nibbles | 64 bytes of 2-bit highs | 16 int8 scales |
    # d (f16). Value k (0..127) of half h: low nibble (k // 64) of ql[64h + k % 64], high bits
    # 2 (k // 32) of qh[32h + k % 32]; w = (d * scale[e // 16]) * (q - 32), e = 128h + k
    for b in range(dst.size // 256):
        o, y = b * 210, b * 256
        d = _f16(u8, o + 208)
        for e16 in range(16):                                    # 16 values share one scale
            h, k0 = e16 // 8, 16 * (e16 % 8)
            ds = d * np.float32(i8[o + 192 + e16])
            ql, qh = o + 64 * h + (k0 & 63), o + 128 + 32 * h + (k0 & 31)
            lo_shift, hi_shift = np.uint8(4 * (k0 // 64)), np.uint8(2 * (k0 // 32))
            for l in range(n16):
                q = ((u8[ql + l] >> lo_shift) & np.uint8(15)) | (((u8[qh + l] >> hi_shift) & np.uint8(3)) << np.uint8(4))
                dst[y + 16 * e16 + l] = ds * np.float32(np.int32(q) - 32)


@njit(cache=True)
def _row_f16(u8, i8, dst, n16):
    for j in range(dst.size):
        dst[j] = _f16(u8, 2 * j)


@njit(cache=True)
def _row_bf16(u8, i8, dst, n16):
    # bfloat16 is the top half of a float32: put its 16 bits there
    bits = dst.view(np.uint32)
    for j in range(dst.size):
        bits[j] = (np.uint32(u8[2 * j]) << 16) | (np.uint32(u8[2 * j + 1]) << 24)


@njit(cache=True)
def _dequant_row(code, u8, i8, dst):
    """Dispatch on the GGML type number (GGMLQuantizationType value)."""
    if code == 8:
        _row_q8_0(u8, i8, dst, 16)
    elif code == 2:
        _row_q4_0(u8, i8, dst, 16)
    elif code == 3:
        _row_q4_1(u8, i8, dst, 16)
    elif code == 12:
        _row_q4_k(u8, i8, dst, 16)
    elif code == 14:
        _row_q6_k(u8, i8, dst, 16)
    elif code == 1:
        _row_f16(u8, i8, dst, 16)
    elif code == 30:
        _row_bf16(u8, i8, dst, 16)


# ----------------------------------------------------------------------------- two rows . x, fused
# Decode: each weight is dequantised in a register and multiplied into one of 16 running lanes
# per row, summed once per row (a sum per block costs a horizontal reduction every 32 weights).
# Two rows go through together so each load of x serves both (a single-row or four-row loop of
# the same shape was not vectorised by LLVM; docs/performance.md has the figures).
# The block scale d multiplies the lane update; additive terms per block (Q4_1's minimum m,
# Q4_0's -8 d) are factored out: sum_j (d q_j + m) x_j = d sum_j q_j x_j + m xs_b, where
# xs (in/32,) holds x's block sums, computed once per input vector.


@njit(cache=True, inline="always")
def _nibbles(byte):
    """(low, high) nibble of a byte as float32. Split in float (hi = floor(q / 16), lo = q - 16 hi,
    exact for 0 <= q < 256) so the byte is converted once and the loop stays in float32 SIMD
    registers (the integer & and >> variant measured slower)."""
    qf = np.float32(byte)
    hi = np.floor(qf * np.float32(0.0625))
    return qf - np.float32(16.0) * hi, hi


@njit(cache=True, fastmath=_DOT_MATH, inline="always")
def _dot2_q8_0(u0, u1, s0, s1, x, a0, a1):
    # block of 32: d (f16) | 32 x int8 q;  w = d * q
    a0[:] = 0.0
    a1[:] = 0.0
    for b in range(x.size // 32):
        o, y = b * 34 + 2, b * 32
        d0, d1 = _f16(u0, o - 2), _f16(u1, o - 2)
        for j in range(16):
            xl, xh = x[y + j], x[y + 16 + j]
            a0[j] += d0 * (np.float32(s0[o + j]) * xl + np.float32(s0[o + 16 + j]) * xh)
            a1[j] += d1 * (np.float32(s1[o + j]) * xl + np.float32(s1[o + 16 + j]) * xh)
    return a0.sum(), a1.sum()


@njit(cache=True, fastmath=_DOT_MATH, inline="always")
def _nibble_block(u0, u1, o, x, y, d0, d1, a0, a1):
    """Lanes += d * nibbles . x for one block of two rows (Q4_0 and Q4_1 share the layout): the
    16 bytes at u0[o:], u1[o:] hold element j in the low nibble of byte j, j+16 in the high one;
    x[y:y+32] is the block's slice of x."""
    for j in range(16):
        xl, xh = x[y + j], x[y + 16 + j]
        lo, hi = _nibbles(u0[o + j])
        a0[j] += d0 * (lo * xl + hi * xh)
        lo, hi = _nibbles(u1[o + j])
        a1[j] += d1 * (lo * xl + hi * xh)


@njit(cache=True, fastmath=_DOT_MATH, inline="always")
def _dot2_q4_0(u0, u1, x, xs, a0, a1):
    # block of 32: d (f16) | 16 bytes of nibbles (_nibble_block); w = d * (nibble - 8), so
    # row . x = sum_b d_b (sum_j nibble_j x_j - 8 xs_b). Q4_0 and Q4_1 share the inner loop but
    # not the block walk: one function taking the block size and minimum as run-time arguments
    # was not vectorised by LLVM.
    a0[:] = 0.0
    a1[:] = 0.0
    m0 = m1 = np.float32(0.0)
    for b in range(x.size // 32):
        o, y = b * 18 + 2, b * 32
        d0, d1 = _f16(u0, o - 2), _f16(u1, o - 2)
        m0 -= np.float32(8.0) * d0 * xs[b]
        m1 -= np.float32(8.0) * d1 * xs[b]
        _nibble_block(u0, u1, o, x, y, d0, d1, a0, a1)
    return a0.sum() + m0, a1.sum() + m1


@njit(cache=True, fastmath=_DOT_MATH, inline="always")
def _dot2_q4_1(u0, u1, x, xs, a0, a1):
    # block of 32: d (f16) | m (f16) | 16 bytes of nibbles (_nibble_block);  w = d * nibble + m,
    # so row . x = sum_b (d_b sum_j nibble_j x_j + m_b xs_b)
    a0[:] = 0.0
    a1[:] = 0.0
    m0 = m1 = np.float32(0.0)
    for b in range(x.size // 32):
        o, y = b * 20 + 4, b * 32
        d0, d1 = _f16(u0, o - 4), _f16(u1, o - 4)
        m0 += _f16(u0, o - 2) * xs[b]
        m1 += _f16(u1, o - 2) * xs[b]
        _nibble_block(u0, u1, o, x, y, d0, d1, a0, a1)
    return a0.sum() + m0, a1.sum() + m1


@njit(cache=True, fastmath=_DOT_MATH)
def _dot_buf(code, u8, i8, x, buf):
    """One row . x for types without a fused loop (K-quants, F16, BF16): dequantise, then dot."""
    _dequant_row(code, u8, i8, buf)
    s = np.float32(0.0)
    for j in range(x.size):
        s += buf[j] * x[j]
    return s


# ----------------------------------------------------------------------------- whole matrices


@njit(cache=True, nogil=True)     # prefill workers dequantise side by side
def _dequant_rows(code, u8, i8, rows, out):
    """out[i] = dequantised row rows[i]; out (len(rows), in) float32. Releases the GIL, so a
    caller's other threads (minisparse.threads) keep working meanwhile."""
    for i in range(rows.size):
        _dequant_row(code, u8[rows[i]], i8[rows[i]], out[i])


@njit(cache=True)
def _block_sums(x):
    """xs (in/32,): the sum of x over each block of 32, which Q4_0/Q4_1's additive term multiplies."""
    xs = np.zeros(x.size // 32, np.float32)
    for b in range(xs.size):
        for j in range(32):
            xs[b] += x[32 * b + j]
    return xs


@njit(cache=True, fastmath=_DOT_MATH)
def _matvec_rows(code, u8, i8, x, xs, y, r0, r1):
    """y[r] = row r . x for r in [r0, r1); x (in,), xs = _block_sums(x); rows two at a time."""
    a0, a1 = np.empty(16, np.float32), np.empty(16, np.float32)
    if code == 2 or code == 3 or code == 8:
        for r in range(r0, r1, 2):
            s = min(r + 1, r1 - 1)                             # odd count: the last row pairs itself
            if code == 8:
                y[r], y[s] = _dot2_q8_0(u8[r], u8[s], i8[r], i8[s], x, a0, a1)
            elif code == 3:
                y[r], y[s] = _dot2_q4_1(u8[r], u8[s], x, xs, a0, a1)
            else:
                y[r], y[s] = _dot2_q4_0(u8[r], u8[s], x, xs, a0, a1)
    else:
        buf = np.empty(x.size, np.float32)
        for r in range(r0, r1):
            y[r] = _dot_buf(code, u8[r], i8[r], x, buf)


@njit(cache=True)
def _matvec_serial(code, u8, i8, x, y):
    """y (out,) = W x for x (in,) on this thread."""
    _matvec_rows(code, u8, i8, x, _block_sums(x), y, 0, u8.shape[0])


@njit(cache=True, parallel=True)
def _matvec(code, u8, i8, x, y):
    """y (out,) = W x for x (in,), ROWS_PER_TASK rows per task. The block sums are computed once
    here, not per task: on a tall matrix (the output head) per-task setup would add up."""
    xs = _block_sums(x)
    n_out, n = u8.shape[0], ROWS_PER_TASK
    for c in prange((n_out + n - 1) // n):
        _matvec_rows(code, u8, i8, x, xs, y, n * c, min(n_out, n * c + n))


# ----------------------------------------------------------------------------- the products


def rows(w: QuantMatrix, idx) -> np.ndarray:
    """Dequantised rows idx (n,) of w -> (n, in) float32 by the Numba kernels: what
    `QuantMatrix.rows` gives, bit for bit (the fast path's embedding lookup)."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= w.shape[0]):
        raise IndexError(f"row index out of range [0, {w.shape[0]})")
    out = np.empty((idx.size, w.shape[1]), np.float32)           # (n, in)
    _dequant_rows(int(w.qtype), w.raw, w.raw_i8, idx, out)
    return out


def matmul_many(x, ws) -> list:
    """[matmul(x, w) for w in ws], the same bits: x (T, in) quantised once where the products
    take 8-bit activations (q8mm.matmul_many; q, k and v, or gate and up, share their input)."""
    x = np.ascontiguousarray(x, np.float32)
    if (x.ndim == 2 and x.shape[0] > FUSED_MAX_T and INT8_DECODE and INT8_PREFILL
            and all(int(w.qtype) in q8mm.TYPES for w in ws)):
        return q8mm.matmul_many(x, ws)
    return [matmul(x, w) for w in ws]


def matmul(x, w: QuantMatrix) -> np.ndarray:
    """x (T, in) @ w.T -> (T, out) float32, from w's blocks; the fast path's linear on a
    QuantMatrix, equal to x @ w.dequantize().T up to float32 summation order."""
    x = np.ascontiguousarray(x, np.float32)
    T, (n_out, n_in) = x.shape[0], w.shape
    if x.shape[1] != n_in:
        raise ValueError(f"x has {x.shape[1]} columns; this matrix takes in={n_in}")
    code, raw, i8 = int(w.qtype), w.raw, w.raw_i8
    y = np.empty((T, n_out), np.float32)                          # (T, out)
    if T <= FUSED_MAX_T:
        n = workers() if n_out * n_in >= PARALLEL_MIN_WEIGHTS else 1
        if INT8_DECODE and code in q8.TYPES:
            for t in range(T):
                if n > 1:
                    on_threads(n, q8.matvec, code, raw, x[t], y[t])
                else:
                    q8.matvec_serial(code, raw, x[t], y[t])
            return y
        for t in range(T):
            if n > 1:
                on_threads(n, _matvec, code, raw, i8, x[t], y[t])
            else:
                _matvec_serial(code, raw, i8, x[t], y[t])
        return y
    if INT8_DECODE and INT8_PREFILL and code in q8mm.TYPES:
        return q8mm.matmul(x, w)
    # prefill: tiles of weight rows dequantised to float32 and multiplied by sgemm, inside a
    # long prefill by blocks of x's rows side by side (threads.py); the float32 copy is bounded
    # by the tile
    n_rows = max(1, min(n_out, TILE_BYTES // (4 * n_in)))
    tile = np.empty((n_rows, n_in), np.float32)                  # (rows, in)
    blocks = row_blocks(T, n_in, n_out)
    for r0 in range(0, n_out, n_rows):
        r1 = min(n_out, r0 + n_rows)
        # the workers dequantise disjoint rows of the tile, then multiply disjoint rows of x by
        # all of it; the product lands in y directly (a temporary and a copy cost a pass over y)
        parts = [p for p in np.array_split(np.arange(r0, r1), len(blocks)) if p.size]
        side_by_side(lambda idx: _dequant_rows(code, raw, i8, idx,
                                               tile[idx[0] - r0: idx[-1] + 1 - r0]), parts)

        def block(ab):
            a, b = ab
            np.matmul(x[a:b], tile[: r1 - r0].T, out=y[a:b, r0:r1])  # (b-a, in) @ (in, rows)
        side_by_side(block, blocks)
    return y
