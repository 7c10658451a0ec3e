"""Bounded KV caches that evict by score: `RecursiveCompressor` (BMRT / LASER-KV: anchors + scored
middle + local window, recursive or accumulate) and `PressCache` (kvpress: one prefill compression
by a ratio); `SlotCache` is their shared storage, also under streaming.py.

Leaves out the scores themselves (scorers.py) and any kernel change: a per-KV-head keep set is
served to the unchanged attention core (see SlotCache). Follows BMRT (zer0-data/LASER-KV README:
budget B = B/n anchors + B/n window + B - 2B/n selected, State_N = Compress(State_{N-1} + Chunk_N)).

Shape legend: Hkv KV heads, T tokens in this call, S slots held (per layer, same for every head),
d head width, L layers, H' = 1 (shared keep set) or Hkv (per head).
"""
from __future__ import annotations

import numpy as np

from ..attention import store_kv
from .base import Cache
from .scorers import ExactAttention, ScoreContext, Scorer, scorer_from_config


class SlotCache(Cache):
    """Storage shared by the bounded caches: per layer k, v (Hkv, S, d), pos (Hkv, S) original
    positions, acc (Hkv, S) accumulated attention (only for scorers that need history).

    Slots are kept in position order in every head. Keys are stored after RoPE at their original
    positions and never moved: RoPE was applied before caching, so a kept key keeps its rotation.
    Per-head keep sets have the same size in every head, so one (Hkv, S, d) array holds them; the
    positions then differ by head, but attention only uses positions for causality, and every
    held key precedes every query of the call that reads it (compression runs at the end of a
    call, and Model.forward feeds at most `block` tokens per call). So `update` hands attention
    k_pos = the slot-wise max over heads, exact for causality and equal to the true positions
    in shared mode; `positions(layer)` gives the per-head truth.

    Subclasses define `_plan(S, T) -> (lo, hi, k) | None`: keep k of the slots [lo, hi), every
    slot outside, after this call's S slots (held + T new).
    """
    def __init__(self, scorer=None, per_head=False, dtype=np.float32):
        self.scorer = ExactAttention() if scorer is None else scorer
        if not isinstance(self.scorer, Scorer):
            raise ValueError(f"scorer must be a minisparse.cache Scorer, got {type(scorer).__name__}")
        self.per_head, self.dtype = bool(per_head), np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype}")
        self.k, self.v, self.pos, self.acc, self.steps = {}, {}, {}, {}, {}
        self.n = 0            # slots held per layer (after the last call)
        self.next_pos = 0     # position of the next token
        self.calls = 0        # forward calls seen (PressCache compresses the first)

    def __len__(self):
        return self.n

    def positions(self, layer):
        """(Hkv, S) original position of every held slot, per KV head."""
        return self.pos[layer]

    def nbytes(self):
        return sum(self.k[l].nbytes + self.v[l].nbytes for l in self.k)

    def _plan(self, S, T):
        raise NotImplementedError

    def _view(self, layer, k, pos, T):
        """(k, k_pos) as attention reads them; StreamingCache re-rotates here."""
        return k, pos.max(axis=0)                                         # (Hkv, S, d), (S,)

    def update(self, layer, k_new, v_new, pos, q=None):
        """Append k_new, v_new (Hkv, T, d) at positions pos (T,); return k, v (Hkv, S, d) and k_pos
        (S,) for attention over held + new, then evict down to the plan. q (Hq, T, d): this
        call's queries, read by attention-based scorers."""
        Hkv, T, d = k_new.shape
        if layer not in self.k:
            self.k[layer] = np.zeros((Hkv, 0, d), self.dtype)
            self.v[layer] = np.zeros((Hkv, 0, d), self.dtype)
            self.pos[layer] = np.zeros((Hkv, 0), np.int64)
            self.acc[layer] = np.zeros((Hkv, 0))
            self.steps[layer] = 0
        store = (lambda x: store_kv(x, self.dtype)) if self.dtype == np.float16 else \
            (lambda x: np.asarray(x, np.float32))
        k = np.concatenate([self.k[layer], store(k_new)], axis=1)           # (Hkv, S, d)
        v = np.concatenate([self.v[layer], store(v_new)], axis=1)           # (Hkv, S, d)
        P = np.concatenate([self.pos[layer], np.broadcast_to(pos, (Hkv, T))], axis=1)  # (Hkv, S)
        S = P.shape[1]
        ctx = ScoreContext(layer, q, k, v, P, np.asarray(pos), None, self.steps[layer])
        acc = self.acc[layer]
        if self.scorer.needs_history:   # H2O: every query's attention adds to its keys' sums
            acc = np.concatenate([acc, np.zeros((Hkv, T))], axis=1) + ctx.mass()  # (Hkv, S)
            ctx.acc = acc
        k_read, k_pos = self._view(layer, k, P, T)
        plan = self._plan(S, T)
        if plan is not None and plan[2] < plan[1] - plan[0]:
            lo, hi, kk = plan
            picked = self.scorer.pick(ctx, np.arange(lo, hi), kk, not self.per_head) if kk else \
                np.zeros((1, 0), np.int64)                                    # (H', kk)
            picked = np.broadcast_to(np.sort(picked, axis=1), (Hkv, kk))      # position order
            keep = np.concatenate([np.broadcast_to(np.arange(lo), (Hkv, lo)), picked,
                                   np.broadcast_to(np.arange(hi, S), (Hkv, S - hi))], axis=1)
            self.k[layer] = np.take_along_axis(k, keep[..., None], axis=1)   # (Hkv, S', d)
            self.v[layer] = np.take_along_axis(v, keep[..., None], axis=1)
            self.pos[layer] = np.take_along_axis(P, keep, axis=1)            # (Hkv, S')
            self.acc[layer] = np.take_along_axis(acc, keep, axis=1) if acc.shape[1] else acc
            self.steps[layer] += 1
        else:
            self.k[layer], self.v[layer], self.pos[layer], self.acc[layer] = k, v, P, acc
        return k_read, v, k_pos

    def advance(self, T):
        """Called once all layers have seen the T new tokens."""
        self.n = self.pos[0].shape[1] if 0 in self.pos else 0
        self.next_pos += T
        self.calls += 1

    # ---- saving: plain NumPy arrays plus a small dict of scalars --------------------------
    def _meta(self):
        return {}

    def state(self):
        """(meta, arrays): arrays k, v (L, Hkv, S, d), pos (L, Hkv, S) int64, acc (L, Hkv, S)
        float64 (S = 0 columns unless the scorer keeps history); meta: the class name, its
        constructor scalars, n, next_pos, calls, per-layer compression steps, scorer config."""
        L = sorted(self.k)
        arrays = {"k": np.stack([self.k[l] for l in L]), "v": np.stack([self.v[l] for l in L]),
                  "pos": np.stack([self.pos[l] for l in L]), "acc": np.stack([self.acc[l] for l in L])}
        meta = {"kind": type(self).__name__, "n": self.n, "next_pos": self.next_pos,
                "calls": self.calls, "steps": [self.steps[l] for l in L], "per_head": self.per_head,
                "dtype": self.dtype.name, "scorer": self.scorer.config(), **self._meta()}
        return meta, arrays

    @classmethod
    def from_state(cls, meta, arrays, scorer=None, **kw):
        """Rebuild from `state()`; the scorer is rebuilt from meta["scorer"] unless given; kw go
        to the constructor (StreamingCache with re-assigned positions needs model=)."""
        if meta.get("kind") != cls.__name__:
            raise ValueError(f"state is a {meta.get('kind')!r}, not a {cls.__name__}")
        c = cls._from_meta(meta, scorer if scorer is not None else scorer_from_config(meta["scorer"]), **kw)
        L, Hkv, S, d = arrays["k"].shape
        if arrays["v"].shape != (L, Hkv, S, d) or arrays["pos"].shape != (L, Hkv, S):
            raise ValueError(f"state arrays: k {arrays['k'].shape}, v {arrays['v'].shape}, pos "
                             f"{arrays['pos'].shape} do not match (L, Hkv, S, d) / (L, Hkv, S)")
        for l in range(L):
            c.k[l], c.v[l] = arrays["k"][l].astype(c.dtype), arrays["v"][l].astype(c.dtype)
            c.pos[l], c.acc[l] = arrays["pos"][l].astype(np.int64), arrays["acc"][l]
            c.steps[l] = int(meta["steps"][l])
        c.n, c.next_pos, c.calls = int(meta["n"]), int(meta["next_pos"]), int(meta["calls"])
        return c


class RecursiveCompressor(SlotCache):
    """BMRT's bounded cache: budget B = A anchors (the first B // n tokens) + W local window (the
    last B // n) + K = B - 2(B // n) slots chosen by `scorer` from the rest.

    mode="recursive": State_N = Compress(State_{N-1} + Chunk_N): after every call (a block of
        `block` prefill tokens, or one decode step) more than B slots are cut back to B, all
        non-anchor, non-window slots competing again. len(cache) <= B always.
    mode="accumulate" (LASER-KV): only the tokens that left the window since the last call
        compete; min(K, their count) of them join a memory that is never rescored, so the cache
        grows: after calls ending at t_1 < t_2 < ... < t_N tokens,
            len = min(t_N, A + W) + sum_i min(K, c_i),
            c_i = max(0, t_i - A - W) - max(0, t_{i-1} - A - W)   (t_0 = 0).
    per_head=False (default, as BMRT): one keep set per layer from scores summed over KV heads;
    per_head=True: each KV head keeps its own K slots (see SlotCache for how attention reads them).

    >>> from minisparse.cache import RecursiveCompressor
    >>> c = RecursiveCompressor(budget=8, protection_divisor=4, block=4)
    >>> k = np.zeros((1, 12, 2), np.float32)
    >>> _ = c.update(0, k, k, np.arange(12), q=np.zeros((1, 12, 2), np.float32)); c.advance(12)
    >>> len(c), c.positions(0)[0, :2].tolist(), c.positions(0)[0, -2:].tolist()
    (8, [0, 1], [10, 11])
    """

    def __init__(self, budget, protection_divisor=4, block=64, mode="recursive", scorer=None,
                 per_head=False, dtype=np.float32):
        super().__init__(scorer, per_head, dtype)
        if int(budget) < 1:
            raise ValueError(f"RecursiveCompressor: budget must be >= 1, got {budget}")
        if int(protection_divisor) < 2:
            raise ValueError(f"RecursiveCompressor: protection_divisor must be >= 2 (anchors + window "
                             f"= 2B/n <= B), got {protection_divisor}")
        if int(block) < 1:
            raise ValueError(f"RecursiveCompressor: block must be >= 1, got {block}")
        if mode not in ("recursive", "accumulate"):
            raise ValueError(f"RecursiveCompressor: mode must be 'recursive' or 'accumulate', got {mode!r}")
        self.budget, self.protection_divisor = int(budget), int(protection_divisor)
        self.block, self.mode = int(block), mode
        self.anchors = self.window = self.budget // self.protection_divisor
        self.selected = self.budget - 2 * self.anchors
        self.memory = 0          # accumulate mode: slots in the never-rescored memory

    @property
    def max_keys(self):
        """The budget in recursive mode; accumulate mode grows past it (see accumulate_size)."""
        return self.budget if self.mode == "recursive" else None

    def _plan(self, S, T):
        A, W, K = self.anchors, self.window, self.selected
        if self.mode == "recursive":
            return (A, S - W, K) if S > self.budget else None
        lo = min(A, S) + self.memory
        c = max(0, S - W - lo)                   # tokens that left the window since last call
        self._grown = min(K, c)
        return (lo, lo + c, min(K, c)) if c else None

    def advance(self, T):
        super().advance(T)
        if self.mode == "accumulate" and T:
            self.memory += self._grown

    def _meta(self):
        return {"budget": self.budget, "protection_divisor": self.protection_divisor,
                "block": self.block, "mode": self.mode, "memory": self.memory}

    @classmethod
    def _from_meta(cls, meta, scorer):
        c = cls(meta["budget"], meta["protection_divisor"], meta["block"], meta["mode"], scorer,
                meta["per_head"], meta["dtype"])
        c.memory = int(meta["memory"])
        return c


def accumulate_size(ends, budget, protection_divisor=4):
    """len(cache) of accumulate mode after calls ending at token counts ends (t_1 < ... < t_N)."""
    A = budget // protection_divisor
    W, K = A, budget - 2 * A
    c = np.diff(np.maximum(0, np.concatenate([[0], ends]) - A - W))       # (N,) left the window
    return int(min(ends[-1], A + W) + np.minimum(K, c).sum())


class PressCache(SlotCache):
    """kvpress's press: the first call (the prompt) is cut by `compression_ratio` = the fraction of
    its tokens removed (floor(ratio * S), lowest scores first, no protected slots), then decoding
    appends densely. compression_ratio=0 removes nothing: the dense cache, bit for bit.

    >>> PressCache(compression_ratio=0.5)._plan(10, 10)
    (0, 10, 5)
    """

    def __init__(self, compression_ratio=0.5, scorer=None, per_head=False, dtype=np.float32):
        super().__init__(scorer, per_head, dtype)
        if not 0.0 <= compression_ratio < 1.0:
            raise ValueError(f"PressCache: compression_ratio must be in [0, 1), got {compression_ratio}")
        self.compression_ratio = float(compression_ratio)

    def _plan(self, S, T):
        if self.calls:
            return None
        return (0, S, S - int(np.floor(self.compression_ratio * S)))

    def _meta(self):
        return {"compression_ratio": self.compression_ratio}

    @classmethod
    def _from_meta(cls, meta, scorer):
        return cls(meta["compression_ratio"], scorer, meta["per_head"], meta["dtype"])
