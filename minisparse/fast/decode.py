"""Decode steps of position patterns without a Selection: for one query (Tq = 1), a selector
made of key ranges by position (Dense, Sinks, Window and their unions: what sinks + window
decodes with) goes to the decode kernel (attend_decode) as the few ranges computed here, not
through a Selection built, broadcast, merged and normalised in NumPy at every layer. The step is
one compiled call (`_position_step`: ranges, kernel, counts): at 30 layers a token, the Python
and NumPy around a kernel call cost about as much as a short window's rows.

`position_ranges` is the rule in plain Python; `position_codes` + `_step_ranges` compute the same
ranges inside the compiled step (tested equal).

Everything else, and any call this does not cover (several queries, float16 buffers, keys out
of position order, lse wanted), goes to minisparse.attention.attend with the fast kernel. The
result is the same to the bit as that path's: the same merged ranges, in the same order, read by
the same kernel (tests/test_fast_path.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..attention.kernel import AttentionStats, Rows, attend as attend_any
from ..attention.patterns import Dense, Sinks, Window
from ..attention.selection import SHARED
from ..attention.selector import Union
from .attention import (DECODE_PARALLEL_MIN_KEYS, DECODE_PART, DecodeInputs, _decode_parallel,
                        _decode_serial, kernel)
from .threads import on_threads, workers


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


# the kinds of a position pattern's members, as codes the compiled step reads
_DENSE, _SINKS, _WINDOW = 0, 1, 2


def position_codes(selector):
    """The members of a position pattern as an (m, 2) int64 array of (kind, parameter) rows
    (kind 0 dense, 1 sinks n, 2 window w), or None when `selector` is not made of ranges by
    position: what `_step_ranges` turns into position_ranges' ranges inside the compiled step.

    >>> position_codes(Sinks(4) | Window(1020)).tolist()
    [[1, 4], [2, 1020]]
    """
    if selector is None or type(selector) is Dense:
        return np.array([[_DENSE, 0]], np.int64)
    if type(selector) is Sinks:
        return np.array([[_SINKS, selector.n]], np.int64)
    if type(selector) is Window:
        return np.array([[_WINDOW, selector.w]], np.int64)
    if isinstance(selector, Union) and type(selector)._select is Union._select:
        parts = [position_codes(m) for m in selector.members]
        return None if any(p is None for p in parts) else np.concatenate(parts)
    return None


# The codes of the last few selectors seen: a decode step's 30 layers (and every later step)
# call with the same selector object, whose members do not change.
_CODES: dict = {}
_CODES_MAX = 64


def _codes(selector):
    key = id(selector)
    hit = _CODES.get(key)
    if hit is not None and hit[0] is selector:
        return hit[1]
    codes = position_codes(selector)
    if len(_CODES) >= _CODES_MAX:
        _CODES.clear()
    _CODES[key] = (selector, codes)                   # holding it keeps its id from reuse
    return codes


@njit(cache=True)
def _step_ranges(codes, qp, k_pos):
    """position_ranges for the codes: (lo, hi) int64 arrays of the sorted, disjoint, non-empty
    key ranges (touching ones fused), the same ranges in the same order."""
    m = codes.shape[0]
    lo = np.empty(m, np.int64)
    hi = np.empty(m, np.int64)
    for i in range(m):
        kind, p = codes[i, 0], codes[i, 1]
        if kind == _DENSE:
            lo[i], hi[i] = 0, k_pos.size
        elif kind == _SINKS:
            lo[i], hi[i] = 0, np.searchsorted(k_pos, p, side="left")
        else:
            lo[i] = np.searchsorted(k_pos, qp - p, side="left")
            hi[i] = np.searchsorted(k_pos, qp, side="right")
    order = np.argsort(lo, kind="mergesort")
    mlo = np.empty(m, np.int64)
    mhi = np.empty(m, np.int64)
    n = 0
    for i in order:
        if hi[i] <= lo[i]:
            continue
        if n > 0 and lo[i] <= mhi[n - 1]:
            mhi[n - 1] = max(mhi[n - 1], hi[i])
        else:
            mlo[n], mhi[n] = lo[i], hi[i]
            n += 1
    return mlo[:n], mhi[:n]


@njit(cache=True)
def _sorted(k_pos):
    for i in range(1, k_pos.size):
        if k_pos[i] < k_pos[i - 1]:
            return False
    return True


@njit(cache=True)
def _position_inputs(q, k, v, k_pos, qp, codes):
    """The ranges of a position pattern as one SHARED row, and the kernel's inputs."""
    d = q.shape[2]
    lo, hi = _step_ranges(codes, qp, k_pos)
    rows = Rows(SHARED, np.array([0, lo.size], np.int64), lo, hi, np.zeros(2, np.int64),
                np.zeros(0, np.int64), np.zeros(0, np.float32))
    empty = np.zeros((k.shape[0], 0, d), np.float32)
    qpos = np.full(1, qp, np.int64)
    return DecodeInputs(q, k, v, empty, empty, qpos, k_pos, np.zeros(0, np.int64), True), rows


@njit(inline="always")
def _position_step_body(q, k, v, k_pos, qp, codes, scale, par):
    """One decode step of a position pattern in one compiled call: its ranges, then
    attend_decode's kernel over them as one SHARED row, its parts side by side when par (a
    constant where inlined, so that a one-thread run never compiles the parallel kernel; the
    same bits either way). Returns (ok, out, natt, n_causal); ok False (keys out of position
    order) leaves the step to attend."""
    Hq, _, d = q.shape
    if not _sorted(k_pos):
        return False, np.zeros((Hq, 1, d), np.float32), np.zeros((Hq, 1), np.int64), 0
    x, rows = _position_inputs(q, k, v, k_pos, qp, codes)
    if par:
        out, _, natt = _decode_parallel(x, rows, scale, DECODE_PART)
    else:
        out, _, natt = _decode_serial(x, rows, scale, DECODE_PART)
    return True, out, natt, np.searchsorted(k_pos, qp, side="right")


@njit(cache=True)
def _position_step(q, k, v, k_pos, qp, codes, scale):
    """_position_step_body on this thread."""
    return _position_step_body(q, k, v, k_pos, qp, codes, scale, False)


@njit(cache=True)
def _position_step_parallel(q, k, v, k_pos, qp, codes, scale):
    """_position_step_body with the kernel's parts side by side."""
    return _position_step_body(q, k, v, k_pos, qp, codes, scale, True)


def attend(q, k, v, selector=None, q_pos=None, k_pos=None, return_lse=False,
           return_stats=False, scale=None, buffer=False, kernel=kernel):
    """minisparse.attention.attend (same arguments and returns), a decode step of a position
    pattern straight to attend_decode in one compiled call; anything else through attend with
    `kernel`."""
    codes = None
    if (q.shape[1] == 1 and not return_lse and q_pos is not None and k_pos is not None
            and q.dtype == k.dtype == v.dtype == np.float32
            and k.flags.c_contiguous and v.flags.c_contiguous and len(k_pos) <= k.shape[1]
            and (buffer or len(k_pos) == k.shape[1]) and k.shape[0]
            and q.shape[0] % k.shape[0] == 0 and q.shape[2] == k.shape[2] and k.shape == v.shape):
        codes = _codes(selector)
    if codes is not None:
        Hq, _, d = q.shape
        # the keys held bound the keys a step reads: a short window over a long cache may take
        # the parallel kernel for few keys, which costs little and gives the same bits
        n = workers() if len(k_pos) >= DECODE_PARALLEL_MIN_KEYS else 1
        args = (np.ascontiguousarray(q), k, v, np.asarray(k_pos, np.int64), int(q_pos[0]), codes,
                1.0 / np.sqrt(d) if scale is None else float(scale))
        if n > 1:
            ok, out, natt, n_causal = on_threads(n, _position_step_parallel, *args)
        else:
            ok, out, natt, n_causal = _position_step(*args)
        if ok:
            if not return_stats:
                return out
            return out, AttentionStats(natt, np.full((Hq, 1), n_causal, np.int64))
    return attend_any(q, k, v, selector, q_pos=q_pos, k_pos=k_pos, return_lse=return_lse,
                      return_stats=return_stats, scale=scale, buffer=buffer, kernel=kernel)
