"""A selector from a plain mask function: how a mask written as a predicate (like a FlexAttention
`mask_mod`, but free to read q and k, so content-aware masks fit too) enters the kit and the kernel.

Leaves out log-weights (a mask picks keys with weight 1) and pseudo-keys. The mask is built dense,
(Hq, Tq, Tk) booleans, so it suits tests and prototypes, not long contexts.
"""
from __future__ import annotations

import numpy as np

from ..attention.selection import Q, SHARED, Selection
from ..attention.selector import Selector


class MaskSelector(Selector):
    """fn(q, k, q_pos, k_pos) -> bool array (Hq, Tq, Tk), (1, Tq, Tk) or (Tq, Tk): True where
    query row t of head h reads key j. q (Hq, Tq, d) may be None for position-only rules;
    causality is the kernel's (a True on a later key is not read), so a mask need not repeat it.

    >>> import numpy as np
    >>> even = MaskSelector(lambda q, k, qp, kp: (kp[None, :] % 2 == 0) & (kp[None, :] <= qp[:, None]))
    >>> pos = np.arange(4)
    >>> even.select(None, np.zeros((1, 4, 2), np.float32), pos, pos).rows(0, 3)
    ([], [(0, 0.0), (2, 0.0)])
    """

    def __init__(self, fn, name=None):
        if not callable(fn):
            raise ValueError(f"MaskSelector: expected a function fn(q, k, q_pos, k_pos) -> bool "
                             f"array, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "mask")

    def _select(self, q, k, q_pos, k_pos):
        hq = k.shape[0] if q is None else q.shape[0]
        tq, tk = len(q_pos), k.shape[1]
        m = np.asarray(self.fn(q, k, q_pos, k_pos))
        if m.ndim == 2:
            m = m[None]                                          # (1, Tq, Tk): every head alike
        if m.dtype != bool or m.ndim != 3 or m.shape[0] not in (1, hq) or m.shape[1:] != (tq, tk):
            raise ValueError(f"mask {self.name!r}: expected a bool array (Hq={hq} or 1, Tq={tq}, "
                             f"Tk={tk}), got {m.dtype} {m.shape}")
        rows = m.reshape(-1, tk)                                 # (heads * Tq, Tk)
        ptr = np.concatenate([[0], np.cumsum(rows.sum(1))])     # (R+1,)
        idx = np.nonzero(rows)[1]                                # row-major: sorted per row
        kind = SHARED if m.shape[0] == 1 else Q
        return Selection.from_lists(ptr, idx, tk, head_kind=kind, n_heads=m.shape[0], tq=tq,
                                    normalized=True)

    def describe(self):
        return f"mask:{self.name}"


def from_mask_fn(fn, name=None) -> MaskSelector:
    """A selector reading the keys fn(q, k, q_pos, k_pos) marks True (see MaskSelector)."""
    return MaskSelector(fn, name)
