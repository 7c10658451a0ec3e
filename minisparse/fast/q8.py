"""Decode products in integers, as llama.cpp takes them: x quantised once per product to 8-bit
blocks, each block's dot product with the 4- or 8-bit weights summed exactly in int32, then one
float multiply-add per block.

Why: a decode step reads every weight once, and the float kernels (quant.py) spend ~10 vector
instructions turning each 16 bytes of nibbles into float32 lanes; the integer kernel multiplies
32 weights by 32 activations and adds them in pairs in two instructions (x86's `pmaddubsw`:
unsigned x signed bytes -> int16 pair sums; `pmaddwd` against ones: int16 pairs -> int32).
Numba types every integer expression as int64, so LLVM's vectoriser never sees an int8 x int8
product to turn into those instructions (the same loop written in Numba compiles to 64-bit
`vpmuldq`); the block loop here is therefore written in LLVM IR (`numba.extending.intrinsic`),
calling the two instructions by their LLVM names. x86 with AVX2 only (`available()`); elsewhere,
and for the other quant types, quant.py's float kernels run.

The numbers change: x becomes x_hat = dx * qx per block of 32 (qx = round(x * 127 / max|x_block|),
dx = max|x_block| / 127 stored as float16), llama.cpp's Q8_0 / Q8_1 activations, rounded as its
AVX2 `quantize_row_q8_0` / `quantize_row_q8_1` round them: the scale dx and Q8_1's dx * sum(qx)
are kept as float16, which moves each block's scale by up to 2^-11 of itself. That rounding is
not a detail: on a two-layer Q8_0 model the float16 scales are what brings these logits to within
float32 rounding of llama.cpp's, and float32 scales leave them 0.09 apart (docs/performance.md).
The integer sums are exact (|sum| <= 32 * 128 * 127 < 2^24, also exactly representable in
float32); each block's sum is multiplied into eight lanes by d * dx, and the lanes are summed in
the order of ggml's `hsum_float_8`, then the additive term (Q4_1's). Q4_0 multiplies the signed
nibble - 8 by qx, as ggml's `vec_dot_q4_0_q8_0`. tests/test_q8_kernels.py derives and checks the
bounds, and holds the kernels to a NumPy transcription of ggml's AVX2 dot products. Block
layouts: ggml-common.h (block_q4_0, block_q4_1, block_q8_0, block_q8_1).
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# GGML type numbers with an integer kernel here: Q4_0, Q4_1, Q8_0
TYPES = (2, 3, 8)
# Ask for the weights this many bytes ahead of the block being multiplied. Without it the kernel
# waited on memory: the hardware prefetcher stops at every 4 KiB page of the file's mapping, and
# one row's loop (a chain of multiply-adds into the same lanes) leaves the out-of-order core too
# few independent loads to cover memory's latency (docs/performance.md has the measurements).
PREFETCH = 2048
ROWS_PER_TASK = 32              # as quant.py: a few tasks per thread on small matrices

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def available() -> bool:
    """True on an x86-64 CPU with AVX2 and F16C (LLVM's view of the host, which is what Numba
    compiles for): F16C's vcvtps2ph rounds the block scales to float16."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    from llvmlite import binding
    features = binding.get_host_cpu_features()
    return bool(features.get("avx2", False) and features.get("f16c", False))


# ----------------------------------------------------------------------------- x -> 8-bit blocks


@intrinsic
def _half(typingctx, v):
    """v (float32) rounded to the nearest float16 (ties to even, as F16C's vcvtps2ph and ggml's
    GGML_FP32_TO_FP16), returned as float32; v itself where float16 would overflow to inf (a block
    of |x| above 127 * 65504: llama.cpp's scale turns inf there, this one stays finite)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        h = builder.fpext(builder.fptrunc(args[0], ir.HalfType()), _F32)
        big = builder.fcmp_ordered(">", builder.call(_fn(builder.module, "llvm.fabs.f32", _F32, [_F32]), [h]),
                                   ir.Constant(_F32, 65504.0))
        return builder.select(big, args[0], h)
    return types.float32(types.float32), codegen


@njit(cache=True)
def quantize(x, qx, dx, sx):
    """x (n,) float32 -> qx (n,) int8, dx (n/32,) the block scales, sx (n/32,) per block the
    float16 rounding of d * sum(qx), d = max|x_block| / 127 in float32 (Q4_1's additive term
    multiplies it), both as llama.cpp's Q8_1 keeps them. x_hat = dx * qx; qx = round(x / d), so
    |x - d qx| <= d (1/2 + 400 u) (the roundings of d and of x / d) and dx = half(d)."""
    for b in range(x.size // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        s = 0
        for j in range(32):
            q = np.int32(np.rint(x[32 * b + j] * inv))
            qx[32 * b + j] = q
            s += q
        dx[b], sx[b] = _half(d), _half(d * np.float32(s))


# ----------------------------------------------------------------------------- one row . x_hat
# One intrinsic per weight type: a loop over the row's blocks in LLVM IR. Each block gives eight
# int32 partial sums (`_pair_sums`), converted to float32 and multiplied into eight running lanes
# by the block's scale d * dx; the additive term of Q4_1 goes through sx:
# sum_j (d q_j + m) x_hat_j = d dx sum_j q_j qx_j + m sx. The lanes are summed once per row.


def _fn(module, name, ret, args):
    """The LLVM function `name` declared in module (once)."""
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name=name)


def _pair_sums(builder, u, s):
    """<8 x i32>: sums of four products u_i * s_i of unsigned bytes u and signed bytes s
    (<32 x i8> each). pmaddubsw saturates its int16 pair sums, which never happens here:
    |u0 s0 + u1 s1| <= 2 * 255 * 127 would, but u <= 15 (nibbles) or u = |q| <= 128 (Q8_0) with
    |s| <= 127 keeps them within 2 * 128 * 127 = 32512 < 32767."""
    m = builder.module
    v32, v16 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16)
    maddubs = _fn(m, "llvm.x86.avx2.pmadd.ub.sw", v16, [v32, v32])
    maddwd = _fn(m, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8), [v16, v16])
    p16 = builder.call(maddubs, [u, s])
    return builder.call(maddwd, [p16, ir.Constant(v16, [1] * 16)])


def _nibbles(builder, base, offset, intp):
    """<32 x i8>: the 16 bytes at base + offset as 32 nibbles in element order (Q4_0 / Q4_1: the
    low nibble of byte j is element j, the high one element j + 16)."""
    v16 = ir.VectorType(_I8, 16)
    q = builder.load(builder.bitcast(builder.gep(base, [ir.Constant(intp, offset)]),
                                     ir.PointerType(v16)), align=1)
    lo = builder.and_(q, ir.Constant(v16, [15] * 16))
    hi = builder.lshr(q, ir.Constant(v16, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))


def _f16(builder, base, offset, intp):
    """The float16 at base + offset, as float32 (exact)."""
    p = builder.bitcast(builder.gep(base, [ir.Constant(intp, offset)]), ir.PointerType(ir.HalfType()))
    return builder.fpext(builder.load(p, align=1), _F32)


def _signed_pair_sums(builder, q, xv):
    """_pair_sums of signed bytes q and xv: pmaddubsw wants one unsigned operand, so |q| times
    xv with q's sign (psignb: xv negated where q < 0, zeroed where q = 0), as ggml's
    mul_sum_i8_pairs does."""
    v32 = ir.VectorType(_I8, 32)
    absq = builder.call(_fn(builder.module, "llvm.abs.v32i8", v32, [v32, ir.IntType(1)]),
                        [q, ir.Constant(ir.IntType(1), 0)])
    signed = builder.call(_fn(builder.module, "llvm.x86.avx2.psign.b", v32, [v32, v32]), [xv, q])
    return _pair_sums(builder, absq, signed)


def _block_q4_0(builder, base, xv, intp):
    # d (f16) | 16 bytes of nibbles; w = d (nibble - 8): the signed nibble - 8 times qx, as ggml
    q = builder.sub(_nibbles(builder, base, 2, intp), ir.Constant(ir.VectorType(_I8, 32), [8] * 32))
    return _signed_pair_sums(builder, q, xv), _f16(builder, base, 0, intp), None


def _block_q4_1(builder, base, xv, intp):
    # d (f16) | m (f16) | 16 bytes of nibbles; w = d nibble + m: d dx sum(nibble qx) + m sx
    return (_pair_sums(builder, _nibbles(builder, base, 4, intp), xv),
            _f16(builder, base, 0, intp), _f16(builder, base, 2, intp))


def _block_q8_0(builder, base, xv, intp):
    # d (f16) | 32 int8 q; w = d q
    v32 = ir.VectorType(_I8, 32)
    q = builder.load(builder.bitcast(builder.gep(base, [ir.Constant(intp, 2)]), ir.PointerType(v32)), align=1)
    return _signed_pair_sums(builder, q, xv), _f16(builder, base, 0, intp), None


def _hsum8(builder, lanes):
    """The eight lanes summed in ggml's hsum_float_8 order: ((l4 + l0) + (l6 + l2)) + ((l5 + l1) + (l7 + l3))."""
    e = [builder.extract_element(lanes, ir.Constant(_I32, k)) for k in range(8)]
    r = [builder.fadd(e[k + 4], e[k]) for k in range(4)]
    return builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))


def _row_dot(block_bytes, block):
    """An intrinsic dot(w_row, qx, dx, sx) -> float32: one row of GGUF blocks of `block_bytes`
    bytes (uint8 (blocks * block_bytes,)) times x_hat, `block` giving each block's int32 sums,
    scale d and the factor of sx (None: none)."""
    @intrinsic
    def dot(typingctx, w, qx, dx, sx):
        def codegen(context, builder, signature, args):
            wa, qa, da, sa = (context.make_array(t)(context, builder, v)
                              for t, v in zip(signature.args, args))
            nb = builder.extract_value(da.shape, 0)                  # blocks in the row
            intp = nb.type
            v8f = ir.VectorType(_F32, 8)
            fma = _fn(builder.module, "llvm.fma.v8f32", v8f, [v8f] * 3)
            wp, qp = builder.bitcast(wa.data, ir.PointerType(_I8)), builder.bitcast(qa.data, ir.PointerType(_I8))
            entry = builder.block
            head, body, done = (builder.append_basic_block(f"rowdot.{s}") for s in ("head", "body", "done"))
            builder.branch(head)
            builder.position_at_end(head)                           # b, lanes, sum of m sx
            b, lanes, extra = builder.phi(intp), builder.phi(v8f), builder.phi(_F32)
            b.add_incoming(ir.Constant(intp, 0), entry)
            lanes.add_incoming(ir.Constant(v8f, None), entry)
            extra.add_incoming(ir.Constant(_F32, 0.0), entry)
            builder.cbranch(builder.icmp_signed("<", b, nb), body, done)

            builder.position_at_end(body)
            base = builder.gep(wp, [builder.mul(b, ir.Constant(intp, block_bytes))])
            # (address, 0: a read, 3: keep in every cache level, 1: data); a prefetch past the
            # end of the mapping is dropped by the CPU, never a fault
            prefetch = _fn(builder.module, "llvm.prefetch.p0", ir.VoidType(), [ir.PointerType(_I8), _I32, _I32, _I32])
            builder.call(prefetch, [builder.gep(base, [ir.Constant(intp, PREFETCH)]), ir.Constant(_I32, 0),
                                    ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            xv = builder.load(builder.bitcast(builder.gep(qp, [builder.mul(b, ir.Constant(intp, 32))]),
                                              ir.PointerType(ir.VectorType(_I8, 32))), align=1)
            sums, d, m = block(builder, base, xv, intp)
            scale = builder.fmul(d, builder.load(builder.gep(da.data, [b])))          # d * dx
            splat = builder.shuffle_vector(builder.insert_element(ir.Constant(v8f, ir.Undefined), scale,
                                                                  ir.Constant(_I32, 0)),
                                           ir.Constant(v8f, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
            lanes2 = builder.call(fma, [builder.sitofp(sums, v8f), splat, lanes])
            extra2 = extra if m is None else builder.fadd(extra, builder.fmul(m, builder.load(builder.gep(sa.data, [b]))))
            b.add_incoming(builder.add(b, ir.Constant(intp, 1)), builder.block)
            lanes.add_incoming(lanes2, builder.block)
            extra.add_incoming(extra2, builder.block)
            builder.branch(head)

            builder.position_at_end(done)
            return builder.fadd(_hsum8(builder, lanes), extra)
        return types.float32(w, qx, dx, sx), codegen
    return dot


_dot_q4_0 = _row_dot(18, _block_q4_0)
_dot_q4_1 = _row_dot(20, _block_q4_1)
_dot_q8_0 = _row_dot(34, _block_q8_0)


# ----------------------------------------------------------------------------- whole matrices


@njit(cache=True)
def _rows(code, u8, qx, dx, sx, y, r0, r1):
    """y[r] = row r . x_hat for r in [r0, r1)."""
    if code == 3:
        for r in range(r0, r1):
            y[r] = _dot_q4_1(u8[r], qx, dx, sx)
    elif code == 2:
        for r in range(r0, r1):
            y[r] = _dot_q4_0(u8[r], qx, dx, sx)
    else:
        for r in range(r0, r1):
            y[r] = _dot_q8_0(u8[r], qx, dx, sx)


@njit(cache=True)
def _quantized(x):
    qx, dx, sx = np.empty(x.size, np.int8), np.empty(x.size // 32, np.float32), np.empty(x.size // 32, np.float32)
    quantize(x, qx, dx, sx)
    return qx, dx, sx


@njit(cache=True)
def matvec_serial(code, u8, x, y):
    """y (out,) = W x_hat for x (in,) on this thread; code a GGML type in TYPES."""
    qx, dx, sx = _quantized(x)
    _rows(code, u8, qx, dx, sx, y, 0, u8.shape[0])


@njit(cache=True, parallel=True)
def matvec(code, u8, x, y):
    """matvec_serial's y, ROWS_PER_TASK rows per parallel task; x quantised once, before them."""
    qx, dx, sx = _quantized(x)
    n_out, n = u8.shape[0], ROWS_PER_TASK
    for c in prange((n_out + n - 1) // n):
        _rows(code, u8, qx, dx, sx, y, n * c, min(n_out, n * c + n))
