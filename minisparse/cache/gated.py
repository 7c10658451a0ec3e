"""GateCache: any cache, plus the FastGRNN gate run over every key it stores.

Leaves out the gate itself (minisparse.gate.fastgrnn) and the choice of keys (gate.gated.Gated,
which reads the salience kept here through `bind`). One GateState per layer, so a decode step
costs O(1) in the recurrence instead of a scan over the whole prefix.
"""
from __future__ import annotations

import numpy as np

from ..gate.fastgrnn import FastGRNNGate, GateState
from .base import Cache


class GateCache(Cache):
    """`inner` (any Cache) that also runs `gate` over every key it stores. Use with a selector
    bound to it: `sel.bind(cache)` (gate/gated.py). Everything else of the contract is the inner
    cache's.

    The gate reads keys as stored (a float16 cache rounds them first), so the bound selector
    sees the same salience as an unbound one given the cache's keys.
    """

    def __init__(self, inner: Cache, gate: FastGRNNGate):
        if not isinstance(inner, Cache):
            raise ValueError(f"GateCache: inner must be a minisparse.cache Cache, got {type(inner).__name__}")
        self.inner, self.gate = inner, gate
        self.states: dict[int, GateState] = {}
        self.current: GateState | None = None          # the layer update() saw last

    def __len__(self):
        return len(self.inner)

    @property
    def next_pos(self):
        return self.inner.next_pos

    @property
    def block(self):
        return self.inner.block

    @property
    def max_keys(self):
        return self.inner.max_keys

    @property
    def selector_state(self):
        return self.inner.selector_state

    def held(self, layer):
        return self.inner.held(layer)

    def update(self, layer, k_new, v_new, pos, q=None):
        k, v, k_pos = self.inner.update(layer, k_new, v_new, pos, q=q)
        st = self.states.get(layer)
        if st is None:
            st = self.states[layer] = GateState(self.gate, k_new.shape[0])
        T = k_new.shape[1]
        stored = np.array_equal(k_pos[len(k_pos) - T:], pos)      # appended at the end (KVCache)
        S = len(k_pos)                                                # k may be a buffer with spare rows
        k_read = k[:, S - T:S] if stored else k_new                   # (Hkv, T, d) as stored
        st.append(np.asarray(k_read, np.float32), pos)
        self.current = st
        return k, v, k_pos

    def advance(self, T):
        self.inner.advance(T)

    def nbytes(self):
        return self.inner.nbytes()

    def state(self):
        raise NotImplementedError("GateCache: save the inner cache (cache.inner.state()); the gate "
                                  "state is rebuilt by reading its keys again")
