"""TidalDecode: full attention at a few token-selection layers, which also pick each query's top-k
key positions; every other layer reads only the positions the last selecting layer picked.

Follows Yang et al. 2024, "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent
Sparse Attention": layers 0 and 1 dense, layer 2 and one middle layer (the re-selection layer)
dense with token selection, all other layers position-persistent sparse attention. Leaves out the
KV cache correction (periodic dense re-computation of sparsely decoded tokens) and the fused GPU
kernels. Where the paper prefills densely, minisparse runs the same rule in prefill (the
`@prefill=sparse` of the lab, else the model's dense prefill), so prefill row i equals decode
step i through the model.
"""
from __future__ import annotations

import numpy as np

from .patterns import Dense
from .selection import Q, Selection
from .selector import Budget, Selector
from .topk import TopK, budget_text, check_budget, parse_budget

DENSE_LAYERS = 2            # the paper's full-attention layers before the first selecting layer


class Tidal(Selector):
    """Tidal(k, reselect, fraction=None): in a model, layers 0 and 1 read every key; layers 2 and
    `reselect` read every key and store, in the forward call's `shared` dict, the key positions
    each query head picks: its own key and the k - 1 older keys of highest q.k (`topk()`, per
    query head); every other layer reads the causal keys at the positions the last selecting
    layer stored (those its own cache holds).

    Outside a model (a bare `select`, no layer) it is that top-k rule alone. A reusing layer that
    finds nothing stored (layer 2 forced dense by the model's dense_layers) picks its own.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 8, 4)).astype(np.float32)
    >>> shared = {}
    >>> Tidal(2, 5).at_layer(2, shared).select(x, x).rows(0, 7)[0]     # selecting: every key
    [(0, 8)]
    >>> len(Tidal(2, 5).at_layer(3, shared).select(x, x).rows(0, 7)[1])   # reusing: the 2 stored
    2
    """

    def __init__(self, k=None, reselect=None, fraction=None, role="topk", shared=None):
        self.k, self.fraction = check_budget("Tidal", k, fraction)
        if reselect is None or int(reselect) < DENSE_LAYERS:
            raise ValueError(f"Tidal: reselect (the re-selection layer) must be >= {DENSE_LAYERS}, "
                             f"got {reselect}")
        self.reselect = int(reselect)
        self.role, self.shared = role, shared           # set by at_layer: topk | select | reuse

    @property
    def key(self):
        """Where the selecting layer leaves its positions in `shared`."""
        return ("tidal", self.describe())

    def at_layer(self, layer, shared):
        if layer < DENSE_LAYERS:
            return Dense()
        role = "select" if layer in (DENSE_LAYERS, self.reselect) else "reuse"
        return Tidal(self.k, self.reselect, self.fraction, role, shared)

    def topk(self):
        """The selection rule: the query's own key and the k - 1 older keys of highest q.k (the
        authors' code keeps the newest key beside top-(k-1)); with a fraction, ceil(f * n) older
        keys and its own."""
        if self.k is not None:
            return TopK(max(self.k - 1, 0), recent=min(self.k, 1))
        return TopK(fraction=self.fraction, recent=1)

    def _select(self, q, k, q_pos, k_pos):
        if self.role == "topk":
            return self.topk()._select(q, k, q_pos, k_pos)
        if self.role == "select":
            sel = self.topk()._select(q, k, q_pos, k_pos)
            # positions, not indices: a later layer's cache may hold other keys (a bounded cache)
            self.shared[self.key] = (sel.n_heads, q_pos.copy(), sel.idx_ptr.copy(), k_pos[sel.idx])
            return Dense()._select(q, k, q_pos, k_pos)
        stored = self.shared.get(self.key)
        if stored is None or not np.array_equal(stored[1], q_pos):
            return self.topk()._select(q, k, q_pos, k_pos)
        n_heads, _, ptr, pos = stored
        tk = k.shape[1]
        j = np.searchsorted(k_pos, pos)                                              # (n,)
        jc = np.minimum(j, max(tk - 1, 0))
        held = (j < tk) & (k_pos[jc] == pos) if tk else np.zeros(pos.size, bool)     # (n,)
        row = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))[held]
        new_ptr = np.zeros(ptr.size, np.int64)
        np.cumsum(np.bincount(row, minlength=ptr.size - 1), out=new_ptr[1:])
        return Selection.from_lists(new_ptr, jc[held], tk, head_kind=Q, n_heads=n_heads,
                                    tq=q_pos.size, normalized=True)

    @property
    def budget(self):
        """The sparse layers' budget (the selecting and dense layers read every key)."""
        return self.topk().budget

    def describe(self):
        return f"tidal={budget_text(self.k, self.fraction)}/{self.reselect}"

    @staticmethod
    def from_spec(val):
        """`tidal=k/L`: k keys (the query's own and the top k - 1; or `2%` of the causal keys and
        its own) chosen at layer 2 and re-chosen at layer L, reused by the other layers from
        layer 3 on; layers 0, 1 dense."""
        parts = (val or "").split("/")
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"'tidal={val}': expected k/L (top-k keys / re-selection layer), "
                             f"e.g. tidal=64/13")
        k, f = parse_budget(parts[0], f"tidal={val}")
        return Tidal(k, int(parts[1]), f)
