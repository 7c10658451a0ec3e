"""Decode steps of position patterns without a Selection: for one query (Tq = 1), a selector
made of key ranges by position (Dense, Sinks, Window and their unions: what sinks + window
decodes with) goes to the decode kernel (attend_decode) as the few ranges computed here, not
through a Selection built, broadcast, merged and normalised in NumPy at every layer.

Everything else, and any call this does not cover (several queries, float16 buffers, keys out
of position order, lse wanted), goes to minisparse.attention.attend with the fast kernel. The
result is the same to the bit as that path's: the same merged ranges, in the same order, read by
the same kernel (tests/test_fast_path.py).
"""
from __future__ import annotations

import numpy as np

from ..attention.kernel import AttentionStats, Inputs, Rows, attend as attend_any
from ..attention.patterns import Dense, Sinks, Window
from ..attention.selection import SHARED
from ..attention.selector import Union
from .attention import decode_step, kernel

_NO_EXTRA = np.zeros(0, np.int64)


def position_ranges(selector, qp: int, k_pos):
    """The key ranges [lo, hi) that `selector` reads for a query at position qp, as a sorted
    list of disjoint non-empty ranges (touching ones fused), or None when it is not made of
    ranges by position. k_pos (S,) sorted. Causality (keys after qp) is left to the kernel.

    >>> position_ranges(Sinks(2) | Window(3), 9, np.arange(10))
    [(0, 2), (6, 10)]
    """
    if selector is None or type(selector) is Dense:
        parts = [(0, k_pos.size)]
    elif type(selector) is Sinks:
        parts = [(0, int(np.searchsorted(k_pos, selector.n, side="left")))]
    elif type(selector) is Window:
        parts = [(int(np.searchsorted(k_pos, qp - selector.w, side="left")),
                  int(np.searchsorted(k_pos, qp, side="right")))]
    elif isinstance(selector, Union) and type(selector)._select is Union._select:
        parts = []
        for m in selector.members:
            p = position_ranges(m, qp, k_pos)
            if p is None:
                return None
            parts += p
    else:
        return None
    merged = []
    for lo, hi in sorted(p for p in parts if p[1] > p[0]):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def attend(q, k, v, selector=None, q_pos=None, k_pos=None, return_lse=False,
           return_stats=False, scale=None, buffer=False, kernel=kernel):
    """minisparse.attention.attend (same arguments and returns), a decode step of a position
    pattern straight to attend_decode; anything else through attend with `kernel`."""
    ranges = None
    if (q.shape[1] == 1 and not return_lse and q_pos is not None and k_pos is not None
            and q.dtype == k.dtype == v.dtype == np.float32
            and k.flags.c_contiguous and v.flags.c_contiguous and len(k_pos) <= k.shape[1]
            and (buffer or len(k_pos) == k.shape[1]) and k.shape[0]
            and q.shape[0] % k.shape[0] == 0 and q.shape[2] == k.shape[2] and k.shape == v.shape):
        k_pos = np.asarray(k_pos, np.int64)
        if k_pos.size < 2 or bool(np.all(k_pos[1:] >= k_pos[:-1])):
            ranges = position_ranges(selector, int(q_pos[0]), k_pos)
    if ranges is None:
        return attend_any(q, k, v, selector, q_pos=q_pos, k_pos=k_pos, return_lse=return_lse,
                          return_stats=return_stats, scale=scale, buffer=buffer, kernel=kernel)
    q = np.ascontiguousarray(q)
    Hq, _, d = q.shape
    Hkv = k.shape[0]
    q_pos = np.asarray(q_pos, np.int64)
    lo = np.array([a for a, _ in ranges], np.int64)
    hi = np.array([b for _, b in ranges], np.int64)
    rows = Rows(SHARED, np.array([0, lo.size], np.int64), lo, hi, np.zeros(2, np.int64),
                _NO_EXTRA, np.zeros(0, np.float32))
    empty = np.zeros((Hkv, 0, d), np.float32)
    x = Inputs(q, k, v, empty, empty, q_pos, k_pos, _NO_EXTRA)
    out, _, natt = decode_step(x, rows, 1.0 / np.sqrt(d) if scale is None else float(scale),
                               True)
    if not return_stats:
        return out
    n_causal = np.searchsorted(k_pos, q_pos, side="right")                      # (1,)
    return out, AttentionStats(natt, np.broadcast_to(n_causal, (Hq, 1)).copy())
