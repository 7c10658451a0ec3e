"""Gated: sinks + local window + log-stride, plus for each query the `budget` earlier keys of
highest FastGRNN salience (minisparse/gate/fastgrnn.py), chosen per KV head.

Leaves out training (models/train_gate.py) and eviction: the gate only ADDS keys to the base set.
Follows ruvllm_sparse_attention's forward_gated, changed in three ways (docs/gate.md): the keep
decision for query i ranks only keys at positions <= i (ruvllm ranks the whole sequence), kept
keys are added to the candidates (ruvllm only thins its log-stride set), and decode has a gated
path that equals prefill (`bind(GateCache)`: O(1) recurrence and O(log budget) ranking per key).

Which keys the gate ranks for a query at position p: keys with sinks <= k_pos < p - window, the
ones the base does not already hold for sure. Salience is fixed once a key is read, so the top
`budget` over a growing prefix is kept in a min-heap: O(Tk log budget) per call, never O(Tq Tk).
Ties break toward the later position, so the set is a function of the keys, not of call order.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..attention.patterns import LogStride, Sinks, Window
from ..attention.selection import KV, Selection, sorted_positions, union
from ..attention.selector import Budget, Selector
from .fastgrnn import FastGRNNGate


# ----------------------------------------------------------------------------- the heap
@njit(cache=True)
def _less(s1, j1, s2, j2):
    # total order on (salience, key index): the smaller salience, or the earlier key on a tie
    return s1 < s2 or (s1 == s2 and j1 < j2)


@njit(cache=True)
def _push(hs, hj, n, budget, s, j):
    """Offer key j of salience s to a min-heap (hs, hj) of n <= budget entries; returns new n."""
    if budget == 0 or s != s:                                  # s != s: NaN never ranks
        return n
    if n < budget:
        a = n
        n += 1
    elif _less(hs[0], hj[0], s, j):
        a = 0                                                  # replace the root, sift down
        while True:
            c = 2 * a + 1
            if c >= n:
                break
            if c + 1 < n and _less(hs[c + 1], hj[c + 1], hs[c], hj[c]):
                c += 1
            if not _less(hs[c], hj[c], s, j):
                break
            hs[a], hj[a] = hs[c], hj[c]
            a = c
        hs[a], hj[a] = s, j
        return n
    else:
        return n
    while a > 0:                                               # sift up the new leaf
        p = (a - 1) // 2
        if not _less(s, j, hs[p], hj[p]):
            break
        hs[a], hj[a] = hs[p], hj[p]
        a = p
    hs[a], hj[a] = s, j
    return n


@njit(cache=True)
def gate_rows(sal, k_pos, q_pos, window, sinks, budget, hs, hj, hn, nxt):
    """Top-`budget` salience picks for queries q_pos (Tq,) sorted ascending.

    sal (Hkv, Tk) f64 salience of the keys (held in position order k_pos (Tk,));
    hs, hj (Hkv, max(budget, 1)), hn (Hkv,): heaps carried over (empty for a fresh ranking),
    nxt: the first key not yet offered to them. Heaps are updated in place.
    Returns picks (Hkv, Tq, budget) int64 (sorted, -1 padded), counts (Hkv, Tq), new nxt.
    """
    Hkv, Tk = sal.shape
    Tq = q_pos.size
    picks = np.full((Hkv, Tq, budget), -1, np.int64)
    cnt = np.zeros((Hkv, Tq), np.int64)
    for t in range(Tq):
        lim = q_pos[t] - window                                # eligible: sinks <= pos < lim
        while nxt < Tk and k_pos[nxt] < lim:
            if k_pos[nxt] >= sinks:
                for g in range(Hkv):
                    hn[g] = _push(hs[g], hj[g], hn[g], budget, sal[g, nxt], nxt)
            nxt += 1
        for g in range(Hkv):
            m = hn[g]
            picks[g, t, :m] = np.sort(hj[g, :m])
            cnt[g, t] = m
    return picks, cnt, nxt


def _as_rows(picks, cnt, order, tk):
    """(Hkv, Tq, B) picks in sorted-query order -> a KV-kind Selection in the caller's order."""
    hkv, tq, _ = picks.shape
    inv = np.empty(tq, np.int64)
    inv[order] = np.arange(tq)
    picks, cnt = picks[:, inv], cnt[:, inv]                       # back to the caller's order
    ptr = np.zeros(hkv * tq + 1, np.int64)
    np.cumsum(cnt.ravel(), out=ptr[1:])
    keep = picks.reshape(hkv * tq, -1) >= 0                       # (R, B)
    return Selection.from_lists(ptr, picks.reshape(hkv * tq, -1)[keep], tk,
                                head_kind=KV, n_heads=hkv, tq=tq, normalized=True)


def _same_weights(a, b):
    pa, pb = getattr(a, "params", None), getattr(b, "params", None)
    return (pa is not None and pb is not None and a.cell == b.cell and pa.keys() == pb.keys()
            and all(np.array_equal(pa[n], pb[n]) for n in pa))


# ----------------------------------------------------------------------------- the selector
class Gated(Selector):
    """Base (sinks, window, log-stride) plus the `budget` most salient earlier keys per KV head.

    gate: a FastGRNNGate, or "trained" (models/fastgrnn_gate.npz, the gate for the head width
    met at run time) or "untrained" (random init from `seed`, `cell` = "fastgrnn" | "ruvllm").

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> k = v = np.random.default_rng(0).standard_normal((1, 40, 4)).astype(np.float32)
    >>> sel = Gated(budget=3, window=4, sinks=1, gate="untrained")
    >>> _, st = attend(k, k, v, sel, return_stats=True)
    >>> int(st.n_attended[0, -1]) <= 1 + 5 + 7 + 3        # sinks + window + log-stride + budget
    True
    """

    def __init__(self, budget: int = 32, window: int = 64, sinks: int = 4, logstride: bool = True,
                 gate="trained", seed: int = 0, cell: str = "fastgrnn", hidden: int = 16,
                 state=None):
        for nm, val in (("budget", budget), ("window", window), ("sinks", sinks)):
            if int(val) < 0:
                raise ValueError(f"Gated: {nm} must be >= 0, got {val}")
        if isinstance(gate, str) and gate not in ("trained", "untrained"):
            raise ValueError(f"Gated: gate must be a FastGRNNGate, 'trained' or 'untrained'; "
                             f"got {gate!r}")
        self.top, self.window, self.sinks = int(budget), int(window), int(sinks)
        self.logstride, self.gate, self.seed, self.cell = bool(logstride), gate, int(seed), cell
        self.hidden, self.state = int(hidden), state
        self._gates = {}                                            # head width -> gate
        members = [Sinks(self.sinks), Window(self.window)] + ([LogStride()] if logstride else [])
        self.base = members

    # ---- configuration -----------------------------------------------------------------
    def gate_for(self, d: int):
        """The FastGRNNGate used for keys of head width d."""
        if not isinstance(self.gate, str):
            return self.gate
        if d not in self._gates:
            self._gates[d] = (FastGRNNGate.load(d=d, cell=self.cell) if self.gate == "trained" else
                              FastGRNNGate.random(d, self.hidden, self.seed, self.cell))
        return self._gates[d]

    MODES = {"trained": ("trained", "fastgrnn"), "untrained": ("untrained", "fastgrnn"),
             "ruvllm": ("trained", "ruvllm"), "ruvllm-untrained": ("untrained", "ruvllm")}

    options = ("seed", "mode")

    def _with_options(self, seed=None, mode=None):
        """Spec modifiers: mode=trained|untrained|ruvllm|ruvllm-untrained, seed=N (init seed)."""
        kw = dict(budget=self.top, window=self.window, sinks=self.sinks,
                  logstride=self.logstride, gate=self.gate, seed=self.seed, cell=self.cell,
                  hidden=self.hidden)
        if seed is not None:
            kw["seed"] = int(seed)
        if mode is not None:
            if mode not in self.MODES:
                raise ValueError(f"gate: mode must be one of {', '.join(self.MODES)}; got {mode!r}")
            kw["gate"], kw["cell"] = self.MODES[mode]
        return Gated(**kw)

    @staticmethod
    def from_spec(val):
        """`gate=B[/W[/S]]`: budget, window (64), sinks (4); log-stride on."""
        if val is None:
            raise ValueError("attention spec: 'gate' needs a value, e.g. gate=32 or gate=32/64/4")
        try:
            nums = [int(x) for x in val.split("/")]
        except ValueError:
            raise ValueError(f"attention spec: 'gate={val}': expected B[/W[/S]] integers") from None
        if len(nums) > 3:
            raise ValueError(f"attention spec: 'gate={val}': expected at most budget/window/sinks")
        return Gated(*nums)

    @property
    def budget(self):
        """sinks + window + the gate's picks (`top`); the log-stride keys are not counted."""
        return Budget(self.sinks + self.window + self.top)

    def describe(self):
        s = f"gate={self.top}/{self.window}/{self.sinks}"
        if isinstance(self.gate, str):
            mode = {v: k for k, v in self.MODES.items()}[(self.gate, self.cell)]
            s += "" if mode == "trained" else f",mode={mode}"
            s += f",seed={self.seed}" if self.gate == "untrained" else ""
        return s

    def bind(self, state):
        """A Gated reading salience from a GateCache (the layer it updated last) or a GateState,
        so decode runs the recurrence once per key instead of over the whole prefix."""
        g = Gated(self.top, self.window, self.sinks, self.logstride, self.gate, self.seed,
                  self.cell, self.hidden, state)
        g._gates = self._gates
        return g

    # ---- selection ---------------------------------------------------------------------
    def _salience(self, k, k_pos):
        """(sal (Hkv, Tk), heap state or None) from the bound state when it matches, else fresh."""
        st = self.state
        st = None if st is None else st.current          # a GateCache: the layer it updated last
        tk = k.shape[1]
        if st is None:
            s, _ = self.gate_for(k.shape[2]).salience(k)
            return s, None
        mine = self.gate_for(k.shape[2])
        if st.gate is not mine and not _same_weights(st.gate, mine):
            raise ValueError(f"Gated.bind: the cache runs gate {st.gate.label}, this selector "
                             f"{mine.label}; build the cache with sel.gate_for(head_dim)")
        if st.n != tk or (tk and st.pos[tk - 1] != k_pos[-1]):
            raise ValueError(f"Gated: bound gate state has read {st.n} keys (last position "
                             f"{st.pos[st.n - 1] if st.n else None}); attention got Tk={tk} "
                             f"(last position {k_pos[-1] if tk else None})")
        return st.sal[:, :tk], st

    def _gate_selection(self, k, q_pos, k_pos):
        hkv, tk = k.shape[0], k.shape[1]
        sal, st = self._salience(k, k_pos)
        order = np.argsort(q_pos, kind="stable")
        qs = q_pos[order]
        B = self.top
        key = (self.window, self.sinks, B)
        heap = st.heaps.get(key) if st is not None else None
        # a carried heap is valid only when every key it has seen is eligible for the first query
        if heap is not None and (heap[3] == 0 or k_pos[heap[3] - 1] < qs[0] - self.window):
            hs, hj, hn, nxt = heap
        else:
            hs, hj = np.zeros((hkv, max(B, 1))), np.zeros((hkv, max(B, 1)), np.int64)
            hn, nxt = np.zeros(hkv, np.int64), 0
        picks, cnt, nxt = gate_rows(sal, k_pos, qs, self.window, self.sinks, B, hs, hj, hn, nxt)
        if st is not None:
            st.heaps[key] = (hs, hj, hn, nxt)
        return _as_rows(picks, cnt, order, tk)

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("Gated", k_pos)
        hq = k.shape[0] if q is None else q.shape[0]
        sels = [m._select(q, k, q_pos, k_pos) for m in self.base]
        sels.append(self._gate_selection(k, q_pos, k_pos))
        return union(sels, hq, k.shape[0])
