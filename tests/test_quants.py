"""Every supported tensor type loads through minisparse's loader and dequantises correctly.

Simple quants (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, F16) are made with gguf.quants.quantize and must
come back within the format's rounding error. K-quants are written as raw blocks built here from
chosen integers and scales, and must come back equal to the value the format defines
(ggml-quants.c's dequantize_row_*), computed independently below.
"""
import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

from minisparse.gguf_io import open_gguf, tensor_to_float32

ROWS, COLS = 4, 256


def _roundtrip(tmp_path, name, raw, qtype, shape):
    w = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
    w.add_tensor(name, raw, raw_shape=None, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    reader = open_gguf(tmp_path / f"{name}.gguf")
    t = reader.tensors[0]
    out = tensor_to_float32(t, tmp_path)
    assert out.shape == shape and out.dtype == np.float32
    return out


# per block: the step s of the grid the format rounds to, from the block's own values, and the
# worst rounding in steps. Q4_0/Q5_0 put the largest magnitude at code -8 (-16) of the asymmetric
# grid [-8, 7] ([-16, 15]), so a value of the other sign near +amax clips by up to one whole step;
# every other case rounds to the nearest grid point (half a step).
STEP = {
    QT.Q8_0: (32, lambda b: np.abs(b).max() / 127, 0.5),
    QT.Q4_0: (32, lambda b: np.abs(b).max() / 8, 1.0),
    QT.Q5_0: (32, lambda b: np.abs(b).max() / 16, 1.0),
    QT.Q4_1: (32, lambda b: (b.max() - b.min()) / 15, 0.5),
    QT.Q5_1: (32, lambda b: (b.max() - b.min()) / 31, 0.5),
}


@pytest.mark.parametrize("qtype", list(STEP), ids=lambda q: q.name)
def test_block_quant_dequantises_within_its_rounding_step(tmp_path, qtype):
    x = np.random.default_rng(int(qtype)).standard_normal((ROWS, COLS)).astype(np.float32)
    y = _roundtrip(tmp_path, "w", quantize(x, qtype), qtype, x.shape)
    block, step, worst = STEP[qtype]
    for xb, yb in zip(x.reshape(-1, block), y.reshape(-1, block)):
        s = step(xb)
        # Rounding to the grid costs <= worst * s. The scale (and Q4_1/Q5_1's minimum) is stored as fp16,
        # a relative error <= 2^-11 that the largest code (<= 2^5 steps from zero, or |min|) magnifies:
        # bound = worst s + (32 s + |min|) 2^-11, plus float32 slack.
        bound = worst * s + (32 * s + np.abs(xb).max()) * 2.0 ** -11 + 1e-6
        assert np.abs(xb - yb).max() <= bound


def test_bf16_and_f16_keep_their_mantissas(tmp_path):
    x = np.random.default_rng(7).standard_normal((ROWS, COLS)).astype(np.float32)
    y = _roundtrip(tmp_path, "b", quantize(x, QT.BF16), QT.BF16, x.shape)
    assert np.all(np.abs(x - y) <= np.abs(x) * 2.0 ** -8)       # bf16: 8-bit mantissa, round to nearest
    h = _roundtrip(tmp_path, "h", x.astype(np.float16), QT.F16, x.shape)
    assert np.all(np.abs(x - h) <= np.abs(x) * 2.0 ** -11 + 2.0 ** -25)   # fp16: 11-bit mantissa


# ------------------------------------------------------------------ K-quants from chosen integers

def _f16(x):
    return np.float16(x).tobytes()


def _pack_scales_k4(sc, mn):
    """ggml's 12-byte packing of eight 6-bit scales and eight 6-bit mins (get_scale_min_k4)."""
    q = np.zeros(12, np.uint8)
    for j in range(8):
        if j < 4:
            q[j] |= sc[j] & 63
            q[j + 4] |= mn[j] & 63
        else:
            q[j + 4] |= (sc[j] & 15) | ((mn[j] & 15) << 4)
            q[j - 4] |= (sc[j] >> 4) << 6
            q[j] |= (mn[j] >> 4) << 6
    return q.tobytes()


def _block_q4_k(rng):
    d, dmin = np.float16(rng.uniform(0.01, 0.1)), np.float16(rng.uniform(0.01, 0.1))
    sc, mn = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
    q = rng.integers(0, 16, 256)                              # 4-bit codes, 8 sub-blocks of 32
    qs = np.zeros(128, np.uint8)
    for c in range(4):                                        # 64 values per 32 bytes
        qs[32 * c:32 * c + 32] = q[64 * c:64 * c + 32] | (q[64 * c + 32:64 * c + 64] << 4)
    want = np.concatenate([np.float32(d) * sc[j] * q[32 * j:32 * j + 32] - np.float32(dmin) * mn[j]
                           for j in range(8)])
    return _f16(d) + _f16(dmin) + _pack_scales_k4(sc, mn) + qs.tobytes(), want


def _block_q5_k(rng):
    d, dmin = np.float16(rng.uniform(0.01, 0.1)), np.float16(rng.uniform(0.01, 0.1))
    sc, mn = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
    q = rng.integers(0, 32, 256)                              # 5-bit codes
    qs, qh = np.zeros(128, np.uint8), np.zeros(32, np.uint8)
    for c in range(4):
        lo, hi = q[64 * c:64 * c + 32], q[64 * c + 32:64 * c + 64]
        qs[32 * c:32 * c + 32] = (lo & 15) | ((hi & 15) << 4)
        qh |= ((lo >> 4) << (2 * c)).astype(np.uint8) | ((hi >> 4) << (2 * c + 1)).astype(np.uint8)
    want = np.concatenate([np.float32(d) * sc[j] * q[32 * j:32 * j + 32] - np.float32(dmin) * mn[j]
                           for j in range(8)])
    return _f16(d) + _f16(dmin) + _pack_scales_k4(sc, mn) + qh.tobytes() + qs.tobytes(), want


def _block_q6_k(rng):
    d = np.float16(rng.uniform(0.01, 0.1))
    sc = rng.integers(-128, 128, 16).astype(np.int8)          # 16 sub-blocks of 16
    q = rng.integers(0, 64, 256)                              # 6-bit codes, value = code - 32
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for n in range(2):                                        # two halves of 128
        b = q[128 * n:128 * n + 128]
        for l in range(32):
            q1, q2, q3, q4 = b[l], b[l + 32], b[l + 64], b[l + 96]
            ql[64 * n + l] = (q1 & 15) | ((q3 & 15) << 4)
            ql[64 * n + l + 32] = (q2 & 15) | ((q4 & 15) << 4)
            qh[32 * n + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    want = np.float32(d) * np.repeat(sc.astype(np.float32), 16) * (q - 32)
    return ql.tobytes() + qh.tobytes() + sc.tobytes() + _f16(d), want


@pytest.mark.parametrize("qtype,make", [(QT.Q4_K, _block_q4_k), (QT.Q5_K, _block_q5_k),
                                        (QT.Q6_K, _block_q6_k)], ids=["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_raw_blocks_dequantise_to_the_format_definition(tmp_path, qtype, make):
    rng = np.random.default_rng(int(qtype))
    blocks = [make(rng) for _ in range(ROWS * COLS // 256)]
    raw = np.frombuffer(b"".join(b for b, _ in blocks), np.uint8).reshape(ROWS, -1)
    want = np.concatenate([w for _, w in blocks]).reshape(ROWS, COLS).astype(np.float32)
    got = _roundtrip(tmp_path, "k", raw, qtype, (ROWS, COLS))
    # The values are exact products of fp16 scales and small integers; only float32 rounding of
    # d*sc*q - dmin*m differs with evaluation order: <= 2 ulp of the largest magnitude.
    assert np.abs(got - want).max() <= 2 * np.finfo(np.float32).eps * np.abs(want).max()


def test_unsupported_tensor_type_is_named(tmp_path):
    from minisparse import GGUFError
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "q2k.gguf"), "llama")
    w.add_tensor("w", np.zeros((2, 84), np.uint8), raw_dtype=QT.Q2_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    reader = open_gguf(tmp_path / "q2k.gguf")
    with pytest.raises(GGUFError, match="Q2_K"):
        tensor_to_float32(reader.tensors[0], tmp_path / "q2k.gguf")
    del x
