"""Structured (content-independent) selectors: Dense, Window, Sinks, Globals, BlockLocal,
Strided (Sparse Transformer strided/fixed), LogStride, Landmarks, and the ruvllm preset.

Leaves out content-based choice (top-k, LSH, ...: issue 4) and randomness (random_mask.py).
Every pattern is defined on key POSITIONS, so decode (one query against a cache) and prefill
pick the same keys; each costs O(Tq * |set|) to build, one range per contiguous run.
Papers: Child et al. 2019 (Sparse Transformer), Beltagy et al. 2020 (Longformer window/globals),
Xiao et al. 2023 (attention sinks), LogSparse (Li et al. 2019), Landmark attention (Mohtashami &
Jaggi 2023, here as block means).
"""
from __future__ import annotations

import numpy as np

from .selection import KV, SHARED, Selection, Selector, sorted_positions


def _range_rows(lo, hi, tk):
    return Selection.from_ranges(lo, hi, tk, SHARED, 1)


class Dense(Selector):
    """Every key (causality is applied by the kernel): one range [0, Tk) per row."""
    covers_all_causal = True

    def _select(self, q, k, q_pos, k_pos):
        tk = k.shape[1]
        return _range_rows(np.zeros(q_pos.size, np.int64), np.full(q_pos.size, tk, np.int64), tk)

    def describe(self):
        return "dense"


class Window(Selector):
    """Sliding window: keys with q_pos - w <= k_pos <= q_pos (w + 1 keys once the query is at w)."""

    def __init__(self, w: int):
        if int(w) < 0:
            raise ValueError(f"Window: w must be >= 0, got {w}")
        self.w = int(w)

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("Window", k_pos)
        lo = np.searchsorted(k_pos, q_pos - self.w, side="left")     # (Tq,)
        hi = np.searchsorted(k_pos, q_pos, side="right")             # (Tq,)
        return _range_rows(lo, hi, k.shape[1])

    def describe(self):
        return f"window={self.w}"


class Sinks(Selector):
    """Attention sinks: the keys at positions 0 .. n-1 (StreamingLLM)."""

    def __init__(self, n: int):
        if int(n) < 0:
            raise ValueError(f"Sinks: n must be >= 0, got {n}")
        self.n = int(n)

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("Sinks", k_pos)
        hi = np.searchsorted(k_pos, self.n, side="left")              # keys with position < n
        return _range_rows(np.zeros(q_pos.size, np.int64), np.full(q_pos.size, hi), k.shape[1])

    def describe(self):
        return f"sinks={self.n}"


class Globals(Selector):
    """Global tokens (Longformer): the keys at the given positions, read by every query.
    Only the read direction: a causal query at a global position still reads only its past."""

    def __init__(self, positions):
        self.positions = tuple(sorted(int(p) for p in positions))

    def _select(self, q, k, q_pos, k_pos):
        cols = np.flatnonzero(np.isin(k_pos, self.positions)).astype(np.int64)   # (n,)
        ptr = np.arange(q_pos.size + 1, dtype=np.int64) * cols.size
        return Selection.from_lists(ptr, np.tile(cols, q_pos.size), k.shape[1], normalized=True)

    def describe(self):
        return "globals=" + "/".join(str(p) for p in self.positions)
