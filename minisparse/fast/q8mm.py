"""Prefill products in integers, as llama.cpp takes them: x (T, in) quantised once to 8-bit blocks
(q8.quantize: llama.cpp's Q8_0 / Q8_1 rounding), each 32-element block's dot product with the 4-
or 8-bit weights summed exactly in int32, then one float multiply-add per block.

Why integers: a float32 product (BLAS sgemm) does 16 multiply-adds per AVX-512 instruction; the
8-bit one (`vpdpbusd`, AVX512-VNNI) multiplies 64 unsigned-by-signed byte pairs and adds them in
fours into 16 int32 lanes. Why this layout: each lane holds a whole block sum of one weight row
(16 rows side by side), so a block of one token costs 8 `vpdpbusd` (4 bytes of x, broadcast to
every lane, against 4 bytes of each of 16 rows) and then 3 or 4 float instructions to scale it
(int32 -> float32, d_w * d_x, one fused multiply-add; Q4_1's m * s one more), with no sums across
lanes. Why register blocking: the 8 weight vectors of a block are loaded once and used by
TOKENS tokens, whose sums stay in registers, so the loads do not bound the kernel.

Weights are repacked tile by tile (TILE_BYTES, sized for L2) into that layout: 16 rows' bytes
interleaved in fours, unsigned (Q4_1 nibbles as they are; Q4_0's nibbles and Q8_0's int8 + 128
with the offset taken back exactly in int32 through the activation block sums, c * sum(qx)), the
scales d (and Q4_1's m) as float32 vectors of 16. The kernel is written in LLVM IR through
numba.extending.intrinsic, as q8.py's decode kernel is (Numba's own loops type integers as
int64, and LLVM never forms vpdpbusd from them). Results differ from q8.matvec's only in the
order of the float32 sums over blocks (tests/test_q8mm.py derives the bound). Left out: K-quants,
CPUs without AVX512-VNNI (quant.py's float tiles and sgemm run there), AMX.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import q8
from .threads import row_blocks, side_by_side

TYPES = (2, 3, 8)               # Q4_0, Q4_1, Q8_0
ROWS = 16                       # weight rows per group: one zmm of int32 block sums
TOKENS = 8                      # tokens per kernel call: 8 int32 + 8 float32 accumulators in zmm registers
CHUNK_T = 128                   # tokens whose 8-bit x stays in L2 while every row group passes
TILE_BYTES = 1 << 20            # repacked weight bytes per tile: with a chunk of x, within L2
_OFFSET = {2: 8, 8: 128}        # what repacking added to each weight (made unsigned); Q4_1: none

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V16I, _V16F = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


def available() -> bool:
    """True where q8's kernels run and the CPU has AVX512-VNNI (LLVM's view of the host)."""
    if not q8.available():
        return False
    from llvmlite import binding
    f = binding.get_host_cpu_features()
    return all(f.get(k, False) for k in ("avx512f", "avx512bw", "avx512vnni"))


# ----------------------------------------------------------------------------- weights -> groups


# every float16 bit pattern as float32: the scales' conversion is a lookup
_F16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, inline="always")
def _f16(u8, o):
    """The float16 stored little-endian at u8[o:o+2], as float32."""
    return _F16[np.int64(u8[o]) | (np.int64(u8[o + 1]) << 8)]


@njit(cache=True, nogil=True)
def _repack(code, raw, r0, g0, g1, wq, dw, mw):
    """Groups g0..g1 of the tile starting at row r0: wq[g] (nb * 8 * 64,) uint8, bytes
    (b * 8 + k) * 64 + 4 j + i = element 4 k + i of block b of row r0 + 16 g + j, made unsigned;
    dw[g], mw[g] (nb * 16,) float32: d and m of block b of that row at b * 16 + j. Rows past the
    matrix get zero weights and scales."""
    nb = dw.shape[1] // ROWS
    v = np.empty(32, np.uint8)
    for g in range(g0, g1):
        for j in range(ROWS):
            r = r0 + ROWS * g + j
            for b in range(nb):
                if r >= raw.shape[0]:
                    v[:] = 0
                    d = m = np.float32(0.0)
                elif code == 8:                      # d | 32 int8
                    o = 34 * b
                    d, m = _f16(raw[r], o), np.float32(0.0)
                    for e in range(32):
                        v[e] = raw[r, o + 2 + e] ^ np.uint8(128)       # int8 + 128
                else:                                # d | (m |) 16 bytes: e low, e + 16 high nibble
                    o = (18 if code == 2 else 20) * b
                    d = _f16(raw[r], o)
                    m = _f16(raw[r], o + 2) if code == 3 else np.float32(0.0)
                    q = o + (2 if code == 2 else 4)
                    for e in range(16):
                        v[e] = raw[r, q + e] & np.uint8(15)
                        v[e + 16] = raw[r, q + e] >> np.uint8(4)
                for k in range(8):
                    for i in range(4):
                        wq[g, (8 * b + k) * 64 + 4 * j + i] = v[4 * k + i]
                dw[g, ROWS * b + j] = d
                mw[g, ROWS * b + j] = m


# ----------------------------------------------------------------------------- x -> 8-bit blocks


@intrinsic
def _block(typingctx, x, qx, o):
    """q8.quantize's arithmetic on the 32 elements x[o:o + 32], 32 lanes at once: qx[o:o + 32] =
    rint(x * fl(127 / amax)) (0 where amax = 0), returning (d, s): d = fl(amax / 127) before its
    float16 rounding, s = sum(qx). The same bits as q8.quantize's scalar loop (max is exact in any
    order; each lane rounds as its scalar does), which took a quarter of a prefill product here.
    NaN in x: unspecified (q8.quantize's comparisons order NaN otherwise)."""
    def codegen(context, builder, signature, args):
        xa, qa = (context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:2], args[:2]))
        m = builder.module
        v32f, v32i, v32b = ir.VectorType(_F32, 32), ir.VectorType(_I32, 32), ir.VectorType(_I8, 32)
        xv = builder.load(builder.bitcast(builder.gep(xa.data, [args[2]]), ir.PointerType(v32f)), align=4)
        absx = builder.call(_fn(m, "llvm.fabs.v32f32", v32f, [v32f]), [xv])
        # nnan: a tree of vmaxps; without it LLVM keeps maxnum's NaN rules step by step
        amax = builder.call(_fn(m, "llvm.vector.reduce.fmax.v32f32", _F32, [v32f]), [absx], fastmath=("nnan",))
        d = builder.fdiv(amax, ir.Constant(_F32, 127.0))
        pos = builder.fcmp_ordered(">", amax, ir.Constant(_F32, 0.0))
        inv = builder.select(pos, builder.fdiv(ir.Constant(_F32, 127.0), amax), ir.Constant(_F32, 0.0))
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(v32f, ir.Undefined), inv, ir.Constant(_I32, 0)),
                                       ir.Constant(v32f, ir.Undefined), ir.Constant(v32i, [0] * 32))
        q = builder.fptosi(builder.call(_fn(m, "llvm.rint.v32f32", v32f, [v32f]), [builder.fmul(xv, splat)]), v32i)
        builder.store(builder.trunc(q, v32b), builder.bitcast(builder.gep(qa.data, [args[2]]), ir.PointerType(v32b)), align=1)
        s = builder.sext(builder.call(_fn(m, "llvm.vector.reduce.add.v32i32", _I32, [v32i]), [q]), ir.IntType(64))
        return context.make_tuple(builder, signature.return_type, [d, s])
    if x.dtype != types.float32 or qx.dtype != types.int8:
        return None
    return types.Tuple((types.float32, types.int64))(x, qx, o), codegen


@njit(cache=True, nogil=True)
def _quantize_rows(x, qx, dx, sx, ss, a, b):
    """Rows a..b of x as q8.quantize makes them; ss[t, blk] = sum(qx over the block), from which
    each weight type takes the integer its repacking offset c added to a block sum (c ss)."""
    for t in range(a, b):
        xt, qt = x[t], qx[t]
        for blk in range(dx.shape[1]):
            d, s = _block(xt, qt, 32 * blk)
            dx[t, blk], sx[t, blk] = q8._half(d), q8._half(d * np.float32(s))
            ss[t, blk] = s


# ----------------------------------------------------------------------------- the kernel


def _fn(module, name, ret, args):
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name=name)


def _splat(builder, scalar, vtype):
    v = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined), ir.Constant(ir.VectorType(_I32, 16), [0] * 16))


def _kernel(tokens, with_min):
    """An intrinsic k(wg, dg, mg, qx, dx, sx, qs, t0, out, c0): out[t0 + i, c0:c0 + 16] = the 16
    rows of group wg (with scales dg, mg) times x_hat of token t0 + i, for i < tokens.
    Per block b: 16 int32 block sums by 8 vpdpbusd; minus qs[t, b] (the repacking offset);
    to float32, times d_w * dx[t, b], added to 16 float32 lanes; with_min (Q4_1): plus
    m_w * sx[t, b]."""
    @intrinsic
    def kernel(typingctx, wg, dg, mg, qx, dx, sx, qs, t0, out, c0):
        def codegen(context, builder, signature, args):
            wa, da, ma, qa, xa, sa, sqa, _, oa, _ = (
                context.make_array(t)(context, builder, v) if isinstance(t, types.Array) else None
                for t, v in zip(signature.args, args))
            t0v, c0v = args[7], args[9]
            m = builder.module
            intp = t0v.type
            n_in = builder.extract_value(qa.shape, 1)
            nb = builder.extract_value(xa.shape, 1)
            n_cols = builder.extract_value(oa.shape, 1)
            dot = _fn(m, "llvm.x86.avx512.vpdpbusd.512", _V16I, [_V16I] * 3)
            fma = _fn(m, "llvm.fma.v16f32", _V16F, [_V16F] * 3)
            wp = builder.bitcast(wa.data, ir.PointerType(_V16I))
            dp = builder.bitcast(da.data, ir.PointerType(_V16F))
            mp = builder.bitcast(ma.data, ir.PointerType(_V16F))
            qp = builder.bitcast(qa.data, ir.PointerType(_I8))
            rows = [builder.add(t0v, ir.Constant(intp, i)) for i in range(tokens)]
            xrow = [builder.gep(qp, [builder.mul(r, n_in)]) for r in rows]           # token's qx
            brow = [builder.mul(r, nb) for r in rows]                               # token's blocks

            entry = builder.block
            head, body, done = (builder.append_basic_block(f"q8mm.{s}") for s in ("head", "body", "done"))
            builder.branch(head)
            builder.position_at_end(head)
            b = builder.phi(intp)
            b.add_incoming(ir.Constant(intp, 0), entry)
            acc = [builder.phi(_V16F) for _ in range(tokens)]
            for a in acc:
                a.add_incoming(ir.Constant(_V16F, None), entry)
            builder.cbranch(builder.icmp_signed("<", b, nb), body, done)

            builder.position_at_end(body)
            isum = [ir.Constant(_V16I, None)] * tokens
            for k in range(8):
                wk = builder.load(builder.gep(wp, [builder.add(builder.mul(b, ir.Constant(intp, 8)),
                                                               ir.Constant(intp, k))]), align=1)
                off = builder.add(builder.mul(b, ir.Constant(intp, 32)), ir.Constant(intp, 4 * k))
                for i in range(tokens):
                    xk = builder.load(builder.bitcast(builder.gep(xrow[i], [off]), ir.PointerType(_I32)), align=1)
                    isum[i] = builder.call(dot, [isum[i], wk, _splat(builder, xk, _V16I)])
            dv = builder.load(builder.gep(dp, [b]), align=1)
            mv = builder.load(builder.gep(mp, [b]), align=1) if with_min else None
            new = []
            for i in range(tokens):
                tb = builder.add(brow[i], b)
                s = isum[i]
                if not with_min:
                    s = builder.sub(s, _splat(builder, builder.load(builder.gep(sqa.data, [tb])), _V16I))
                scale = builder.fmul(dv, _splat(builder, builder.load(builder.gep(xa.data, [tb])), _V16F))
                a = builder.call(fma, [builder.sitofp(s, _V16F), scale, acc[i]])
                if with_min:
                    a = builder.call(fma, [mv, _splat(builder, builder.load(builder.gep(sa.data, [tb])), _V16F), a])
                new.append(a)
            b.add_incoming(builder.add(b, ir.Constant(intp, 1)), builder.block)
            for a, v in zip(acc, new):
                a.add_incoming(v, builder.block)
            builder.branch(head)

            builder.position_at_end(done)
            op = builder.bitcast(oa.data, ir.PointerType(_F32))
            for i in range(tokens):
                dst = builder.gep(op, [builder.add(builder.mul(rows[i], n_cols), c0v)])
                builder.store(acc[i], builder.bitcast(dst, ir.PointerType(_V16F)), align=1)
            return context.get_dummy_value()

        arrays = (wg, dg, mg, qx, dx, sx, qs, out)
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
            return None
        return types.none(wg, dg, mg, qx, dx, sx, qs, t0, out, c0), codegen
    return kernel


_k_min, _k1_min = _kernel(TOKENS, True), _kernel(1, True)
_k_off, _k1_off = _kernel(TOKENS, False), _kernel(1, False)


@njit(cache=True, nogil=True)
def _group(code, wq, dw, mw, g, qx, dx, sx, qs, t0, t1, out, c0):
    """out[t, c0:c0 + 16] for t in [t0, t1): row group g times x_hat, TOKENS tokens at a time."""
    t = t0
    if code == 3:
        while t + TOKENS <= t1:
            _k_min(wq[g], dw[g], mw[g], qx, dx, sx, qs, t, out, c0)
            t += TOKENS
        while t < t1:
            _k1_min(wq[g], dw[g], mw[g], qx, dx, sx, qs, t, out, c0)
            t += 1
    else:
        while t + TOKENS <= t1:
            _k_off(wq[g], dw[g], mw[g], qx, dx, sx, qs, t, out, c0)
            t += TOKENS
        while t < t1:
            _k1_off(wq[g], dw[g], mw[g], qx, dx, sx, qs, t, out, c0)
            t += 1


@njit(cache=True, nogil=True)
def _tile(code, wq, dw, mw, n_rows, qx, dx, sx, qs, a, b, y, r0, spare):
    """y[a:b, r0:r0 + n_rows] from the tile's groups: CHUNK_T tokens at a time through every group
    (their 8-bit x stays in L2). A last group of fewer than 16 rows goes through spare (T, 16)."""
    full = n_rows // ROWS
    for c in range(a, b, CHUNK_T):
        e = min(b, c + CHUNK_T)
        for g in range(full):
            _group(code, wq, dw, mw, g, qx, dx, sx, qs, c, e, y, r0 + ROWS * g)
        if full * ROWS < n_rows:
            _group(code, wq, dw, mw, full, qx, dx, sx, qs, c, e, spare, 0)
            for t in range(c, e):
                for j in range(n_rows - full * ROWS):
                    y[t, r0 + full * ROWS + j] = spare[t, j]


# ----------------------------------------------------------------------------- the product


class Q8Rows(NamedTuple):
    """x (T, in) quantised to 8-bit blocks (`quantize`): qx (T, in) int8, dx and sx (T, in/32)
    float32 (the block scale d and d * sum(qx), float16-rounded), ss (T, in/32) int32 (the
    block sums of qx), and blocks, the row blocks of x the workers split it into."""
    qx: np.ndarray
    dx: np.ndarray
    sx: np.ndarray
    ss: np.ndarray
    blocks: list


def quantize(x, n_out: int) -> Q8Rows:
    """x (T, in) float32 as 8-bit blocks, rows split over the workers as a product with n_out
    rows of weights splits them (threads.row_blocks)."""
    T, n_in = x.shape
    nb = n_in // 32
    qx = np.empty((T, n_in), np.int8)                                      # (T, in)
    dx, sx = np.empty((T, nb), np.float32), np.empty((T, nb), np.float32)   # (T, in/32)
    ss = np.empty((T, nb), np.int32)
    blocks = row_blocks(T, n_in, n_out)
    side_by_side(lambda ab: _quantize_rows(x, qx, dx, sx, ss, ab[0], ab[1]), blocks)
    return Q8Rows(qx, dx, sx, ss, blocks)


def _check(x, w):
    code = int(w.qtype)
    if code not in TYPES:
        raise ValueError(f"q8mm.matmul: GGML type {code} has no integer kernel; expected one of {TYPES}")
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x has shape {x.shape}; this matrix takes (T, {w.shape[1]})")


def matmul(x, w) -> np.ndarray:
    """x (T, in) @ w.T -> (T, out) float32 for a Q4_0 / Q4_1 / Q8_0 QuantMatrix w, on x quantised
    to 8-bit blocks as llama.cpp quantises it: row t equals q8.matvec's product of x[t] up to
    the order of the float32 sums over blocks. Token rows split over the workers (threads.row_blocks)."""
    return matmul_many(x, [w])[0]


def matmul_many(x, ws) -> list:
    """[matmul(x, w) for w in ws], the same bits, with x quantised once: the products that share
    their input (q, k, v; gate, up) each took a quantisation of their own, 5-15% of a product."""
    x = np.ascontiguousarray(x, np.float32)
    for w in ws:
        _check(x, w)
    xq = quantize(x, max(w.shape[0] for w in ws))
    return [_product(xq, w) for w in ws]


def _product(xq: Q8Rows, w) -> np.ndarray:
    """x_hat @ w.T (T, out) for x_hat = xq, tile by tile of w's repacked rows."""
    code = int(w.qtype)
    (T, n_in), n_out = xq.qx.shape, w.shape[0]
    nb = n_in // 32
    # the integer that repacking's offset c added to each block sum (Q4_1: none, not read)
    qs = xq.ss * np.int32(_OFFSET[code]) if code in _OFFSET else xq.ss
    blocks = xq.blocks
    y = np.empty((T, n_out), np.float32)                                   # (T, out)
    spare = np.empty((T, ROWS), np.float32)
    rows_per_tile = max(ROWS, (TILE_BYTES // n_in) // ROWS * ROWS)
    groups = -(-min(n_out, rows_per_tile) // ROWS)
    wq = np.empty((groups, nb * 8 * 64), np.uint8)                         # (groups, in * 16)
    dw, mw = np.empty((groups, nb * ROWS), np.float32), np.empty((groups, nb * ROWS), np.float32)
    for r0 in range(0, n_out, rows_per_tile):
        n_rows = min(n_out, r0 + rows_per_tile) - r0
        g = -(-n_rows // ROWS)
        parts = [p for p in np.array_split(np.arange(g), len(blocks)) if p.size]
        side_by_side(lambda p: _repack(code, w.raw, r0, p[0], p[-1] + 1, wq, dw, mw), parts)
        side_by_side(lambda ab: _tile(code, wq, dw, mw, n_rows, xq.qx, xq.dx, xq.sx, qs, ab[0], ab[1],
                                      y, r0, spare), blocks)
    return y
