"""GGUF quantised weights kept as their blocks, so a model's memory stays about the file size.

`QuantMatrix` wraps a tensor's raw blocks (a zero-copy view of the reader's memory map) with its
(out, in) shape and dequantises with `gguf.quants.dequantize`, the NumPy reference for ggml's
`dequantize_row_*`. Left out on purpose: products computed from the blocks themselves; those are
the fast path's (minisparse/fast/quant.py), tested bit-equal to `dequantize` here.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

# Types a QuantMatrix may hold (the fast path has a kernel for each), and those the loader keeps in
# place with dequant=False. F16/BF16 load as float32: they are only 2x, not 4-8x, smaller, and
# a table lookup per weight is slower than a float32 product (docs/performance.md).
KERNEL_TYPES = (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K)
IN_PLACE_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K)


class QuantMatrix:
    """A weight matrix W (out, in) kept as its GGUF blocks.

    `W[rows]` dequantises only those rows (an embedding lookup); `dequantize()` gives the float32
    matrix (out, in) that the plain path multiplies by.

    >>> import numpy as np; from gguf.quants import quantize
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    >>> W = QuantMatrix(quantize(w, QT.Q8_0), (2, 32), QT.Q8_0)
    >>> bool(np.abs(W.dequantize() - w).max() < 0.01), W[[1]].shape
    (True, (1, 32))
    """

    def __init__(self, raw: np.ndarray, shape, qtype):
        qtype = QT(qtype)
        if qtype not in KERNEL_TYPES:
            raise ValueError(f"no kernel for {qtype.name}; supported: {', '.join(t.name for t in KERNEL_TYPES)}")
        block, nbytes = GGML_QUANT_SIZES[qtype]
        out, n_in = (int(s) for s in shape)
        if n_in % block:
            raise ValueError(f"{qtype.name} rows hold whole blocks of {block}; got in={n_in}")
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raw = raw.view(np.uint8)                              # F16/BF16 tensors arrive as 16-bit
        self.raw = raw.reshape(out, n_in // block * nbytes)       # (out, bytes per row), no copy
        self.raw_i8 = self.raw.view(np.int8)                      # the same bytes, signed (int8 quants)
        self.shape, self.qtype, self.dtype, self.ndim = (out, n_in), qtype, np.dtype(np.float32), 2

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def size(self) -> int:                                        # weights, as ndarray.size
        return self.shape[0] * self.shape[1]

    def __repr__(self):
        return f"QuantMatrix({self.shape[0]}x{self.shape[1]}, {self.qtype.name}, {self.nbytes} bytes)"

    def rows(self, idx) -> np.ndarray:
        """Dequantised rows idx (T,) -> (T, in) float32 (an embedding lookup)."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]})")
        out = gguf_dequantize(self.raw[idx], self.qtype)          # (T, in)
        return np.ascontiguousarray(out, np.float32).reshape(idx.size, self.shape[1])

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        return self.rows(idx).reshape(idx.shape + (self.shape[1],))

    def dequantize(self) -> np.ndarray:
        """The whole matrix (out, in) float32."""
        return self.rows(np.arange(self.shape[0]))

    def __array__(self, dtype=None, copy=None):
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype)
