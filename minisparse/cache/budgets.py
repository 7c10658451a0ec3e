"""Budget allocation on the SnapKV scorer: PyramidKV (more keys in lower layers) and Ada-KV (one
budget per layer, shared across KV heads by score), as bounded caches.

Leaves out the scores (scorers.SnapKV with its observation window protected) and any kernel
change: heads that hold different counts are served through `Cache.held`, a per-head range the
model intersects with its selector. Follows Cai et al. 2024 ("PyramidKV: Dynamic KV Cache
Compression based on Pyramidal Information Funneling") and Feng et al. 2024 ("Ada-KV: Optimizing
KV Cache Eviction by Adaptive Budget Allocation"), with the arithmetic of NVIDIA kvpress's
PyramidKVPress and AdaKVPress (the oracle in tests/test_methods_budgets.py).

Budget B: the average number of keys one KV head of one layer holds, in keys (as users state
budgets: "2048 keys"). PyramidKV gives layer l its own B_l with mean B over the layers; Ada-KV
gives layer l B * Hkv keys split among its heads by score. Compression runs at the end of every
call in which a layer exceeds its budget (the prompt, or each chunk of it, then every decode step
once full), so the cache is bounded; the papers compress the prompt once and let decoding append.

Storage per layer: k, v (Hkv, S, d) with each head's held keys right-aligned in position order,
the slots before them padding (valid False, position PAD): a head holding n_h < S keys owns slots
[S - n_h, S), so every head's keys are one contiguous range and the newest keys, appended at the
end, are the last slots of every head.

Shape legend: Hkv KV heads, Hq query heads, T tokens in this call, S slots per head (held + new),
d head width, L layers.
"""
from __future__ import annotations

import numpy as np

from ..attention.selection import KV, Selection
from ..attention.selector import Selector
from .base import Cache
from .scorers import ScoreContext, SnapKV, top_k

PAD = np.iinfo(np.int64).max     # position of a padding slot: after every query, so never read


def pyramid_budgets(budget, n_layers, window, beta=20):
    """PyramidKV's arithmetic schedule, (L,) ints: layer 0 holds max_num keys, the last min_num,
    evenly spaced, mean `budget` (up to rounding):

        min_num = B / beta,  max_num = 2B - min_num,  B_l = round(max_num - l (max_num - min_num) / (L - 1))

    kvpress's PyramidKVPress.get_layer_budget with q_len * (1 - ratio) = B; when min_num < window
    (the last layer could not keep its observation window) it falls back to B in every layer
    (SnapKV), as kvpress does. Differs from kvpress on short prompts only: kvpress caps max_num at
    q_len - window and moves the rest to the upper layers; here a layer holding fewer keys than
    B_l simply is not compressed; and a single layer gets B (kvpress gives it max_num = 2B - B/beta).

    >>> pyramid_budgets(100, 4, window=8, beta=10).tolist()
    [190, 130, 70, 10]
    >>> pyramid_budgets(100, 4, window=16, beta=10).tolist()     # 100 / 10 < 16: SnapKV
    [100, 100, 100, 100]
    """
    if beta < 1:
        raise ValueError(f"pyramid: beta must be >= 1, got {beta}")
    min_num = budget / beta
    max_num = 2 * budget - min_num
    if min_num < window or n_layers == 1:     # one layer: kvpress would give it max_num
        return np.full(n_layers, int(budget), np.int64)
    steps = (max_num - min_num) / (n_layers - 1)
    return np.array([round(max_num - l * steps) for l in range(n_layers)], np.int64)


def adakv_keep(scores, n_kept, alpha=0.2):
    """Ada-KV's allocation on one layer's scores (Hkv, S), -inf = not a key: keep (Hkv, S) bool.

    Each head first keeps its n_safe = max(1, int(alpha * n_kept)) best keys (the safeguard), then
    the Hkv * n_kept best scores of the whole layer are kept, wherever they fall: a head whose
    keys score higher keeps more. kvpress's AdaKVPress.compress.

    >>> s = np.array([[9., 8., 7., 6.], [1., 2., 3., 0.]])
    >>> adakv_keep(s, 2, alpha=0.5).astype(int).tolist()
    [[1, 1, 1, 0], [0, 0, 1, 0]]
    """
    Hkv, S = scores.shape
    sc = np.array(scores, np.float64)                                      # (Hkv, S)
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    if n_safe:
        safe = top_k(sc, n_safe)                                           # (Hkv, n_safe)
        np.put_along_axis(sc, safe, np.inf, axis=1)
    flat = top_k(sc.reshape(1, -1), Hkv * n_kept)[0]                       # (Hkv * n_kept,)
    keep = np.zeros(Hkv * S, bool)
    keep[flat] = True
    return keep.reshape(Hkv, S) & (scores > -np.inf)                        # never a padding slot


class HeldSlots(Selector):
    """The slots [first[h], Tk) of KV head h: what a cache whose heads hold different counts
    lets attention read (causality is applied by the kernel). Not a spec: made by the cache."""

    def __init__(self, first):
        self.first = np.asarray(first, np.int64)                           # (Hkv,)

    def _select(self, q, k, q_pos, k_pos):
        Hkv, tk, tq = k.shape[0], k.shape[1], len(q_pos)
        lo = np.repeat(self.first, tq)                                     # (Hkv * Tq,)
        return Selection.from_ranges(lo, np.full(Hkv * tq, tk, np.int64), tk, head_kind=KV,
                                     n_heads=Hkv, tq=tq)

    def describe(self):
        return "held(" + "/".join(map(str, self.first.tolist())) + ")"


class BudgetCache(Cache):
    """Storage and compression shared by PyramidKV and AdaKV; subclasses define
    `_keep(layer, scores, valid) -> (Hkv, S) bool | None` (None: nothing to evict)."""

    def __init__(self, budget, window=16, kernel=5, dtype=np.float32):
        if int(budget) <= int(window):
            raise ValueError(f"{type(self).__name__}: budget must exceed the observation window "
                             f"(its keys are always kept), got budget={budget}, window={window}")
        if int(window) < 1 or int(kernel) < 1:
            raise ValueError(f"{type(self).__name__}: window and kernel must be >= 1, got "
                             f"window={window}, kernel={kernel}")
        self.budget, self.window, self.kernel = int(budget), int(window), int(kernel)
        self.scorer = SnapKV(self.window, self.kernel, protect=True)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype}")
        self.k, self.v, self.pos, self.valid, self._read = {}, {}, {}, {}, {}
        self.next_pos = 0
        self.n = 0

    def __len__(self):
        return self.n

    def positions(self, layer):
        """Held positions of each KV head: a list of Hkv ascending int64 arrays (lengths differ
        between heads under Ada-KV)."""
        return [p[m] for p, m in zip(self.pos[layer], self.valid[layer])]

    def counts(self, layer):
        """(Hkv,) keys held per KV head at `layer`."""
        return self.valid[layer].sum(axis=1)

    def nbytes(self):
        """Bytes of the keys and values held (padding slots not counted)."""
        return sum(int(self.valid[l].sum()) * 2 * self.k[l].shape[2] * self.dtype.itemsize
                   for l in self.k)

    def held(self, layer):
        first = self._read.get(layer)
        return None if first is None else HeldSlots(first)

    def _keep(self, layer, scores, valid):
        raise NotImplementedError

    def update(self, layer, k_new, v_new, pos, q=None):
        """Append k_new, v_new (Hkv, T, d) at positions pos (T,); return k, v (Hkv, S, d) and k_pos
        (S,) for attention over held + new (with `held(layer)` naming each head's slots when the
        counts differ), then evict down to the budget by SnapKV scores of this call's queries."""
        if q is None:
            raise ValueError(f"{type(self).__name__} scores keys by attention: update() needs q")
        Hkv, T, d = k_new.shape
        if layer not in self.k:
            self.k[layer] = np.zeros((Hkv, 0, d), self.dtype)
            self.v[layer] = np.zeros((Hkv, 0, d), self.dtype)
            self.pos[layer] = np.zeros((Hkv, 0), np.int64)
            self.valid[layer] = np.zeros((Hkv, 0), bool)
        k = np.concatenate([self.k[layer], np.asarray(k_new, self.dtype)], axis=1)   # (Hkv, S, d)
        v = np.concatenate([self.v[layer], np.asarray(v_new, self.dtype)], axis=1)   # (Hkv, S, d)
        P = np.concatenate([self.pos[layer], np.broadcast_to(pos, (Hkv, T))], axis=1)  # (Hkv, S)
        valid = np.concatenate([self.valid[layer], np.ones((Hkv, T), bool)], axis=1)  # (Hkv, S)
        # attention reads slot s at the largest held position up to s: exact for causality, as
        # every held key precedes every query of the call (compression ends each call)
        k_pos = np.maximum.accumulate(np.where(valid, P, -1).max(axis=0))            # (S,)
        first = (~valid).sum(axis=1)                                                 # (Hkv,)
        self._read[layer] = first if first.any() else None
        ctx = ScoreContext(layer, q, k, v, P, np.asarray(pos))
        scores = np.where(valid, self.scorer.scores(ctx), -np.inf)                   # (Hkv, S)
        keep = self._keep(layer, scores, valid)
        if keep is None:
            self.k[layer], self.v[layer], self.pos[layer], self.valid[layer] = k, v, P, valid
        else:
            self._repack(layer, keep, k, v, P)
        return k, v, k_pos

    def _repack(self, layer, keep, k, v, P):
        """Store the kept slots (Hkv, S) bool right-aligned per head, padding before them."""
        Hkv, S, d = k.shape
        n = keep.sum(axis=1)                                                         # (Hkv,)
        W = int(n.max())
        kk, vv = np.zeros((Hkv, W, d), self.dtype), np.zeros((Hkv, W, d), self.dtype)
        pp, ok = np.full((Hkv, W), PAD, np.int64), np.zeros((Hkv, W), bool)
        for h in range(Hkv):
            idx = np.flatnonzero(keep[h])                                            # (n_h,) ascending
            kk[h, W - n[h]:], vv[h, W - n[h]:] = k[h, idx], v[h, idx]
            pp[h, W - n[h]:], ok[h, W - n[h]:] = P[h, idx], True
        self.k[layer], self.v[layer], self.pos[layer], self.valid[layer] = kk, vv, pp, ok

    def advance(self, T):
        self.n = self.pos[0].shape[1] if 0 in self.pos else 0
        self.next_pos += T

    # ---- saving: layers padded on the left to one width ------------------------------------
    def _meta(self):
        return {}

    def state(self):
        """(meta, arrays): k, v (L, Hkv, W, d), pos (L, Hkv, W), valid (L, Hkv, W), every layer
        left-padded to the widest W; meta: kind, constructor scalars, n, next_pos."""
        L = sorted(self.k)
        W = max(self.k[l].shape[1] for l in L)
        lp = lambda a, fill: np.concatenate([np.full(a.shape[:1] + (W - a.shape[1],) + a.shape[2:],  # noqa: E731
                                                     fill, a.dtype), a], axis=1)
        arrays = {"k": np.stack([lp(self.k[l], 0) for l in L]), "v": np.stack([lp(self.v[l], 0) for l in L]),
                  "pos": np.stack([lp(self.pos[l], PAD) for l in L]),
                  "valid": np.stack([lp(self.valid[l], False) for l in L])}
        meta = {"kind": type(self).__name__, "n": self.n, "next_pos": self.next_pos,
                "budget": self.budget, "window": self.window, "kernel": self.kernel,
                "dtype": self.dtype.name, **self._meta()}
        return meta, arrays

    @classmethod
    def from_state(cls, meta, arrays, **kw):
        if meta.get("kind") != cls.__name__:
            raise ValueError(f"state is a {meta.get('kind')!r}, not a {cls.__name__}")
        c = cls._from_meta(meta)
        L, Hkv, W, d = arrays["k"].shape
        if arrays["v"].shape != (L, Hkv, W, d) or arrays["pos"].shape != (L, Hkv, W) \
                or arrays["valid"].shape != (L, Hkv, W):
            raise ValueError(f"state arrays: k {arrays['k'].shape}, v {arrays['v'].shape}, pos "
                             f"{arrays['pos'].shape}, valid {arrays['valid'].shape} do not match "
                             f"(L, Hkv, W, d) / (L, Hkv, W)")
        for l in range(L):
            ok = np.asarray(arrays["valid"][l], bool)
            lo = int(np.argmax(ok.any(axis=0))) if ok.any() else W                   # left padding
            c.k[l] = np.asarray(arrays["k"][l][:, lo:], c.dtype)
            c.v[l] = np.asarray(arrays["v"][l][:, lo:], c.dtype)
            c.pos[l], c.valid[l] = np.asarray(arrays["pos"][l][:, lo:], np.int64), ok[:, lo:].copy()
        c.n, c.next_pos = int(meta["n"]), int(meta["next_pos"])
        return c


class PyramidKV(BudgetCache):
    """PyramidKV (Cai et al. 2024): layer l keeps B_l = pyramid_budgets(B, L, window, beta)[l]
    keys per KV head, chosen per head by SnapKV (observation window `window`, pooling `kernel`,
    the window's own keys always kept). beta=1 gives B in every layer: SnapKV at budget B.

    >>> c = PyramidKV(budget=100, n_layers=4, window=8, beta=10)
    >>> c.budgets.tolist(), c.max_keys
    ([190, 130, 70, 10], 190)
    """

    def __init__(self, budget, n_layers, window=16, kernel=5, beta=20, dtype=np.float32):
        super().__init__(budget, window, kernel, dtype)
        if int(n_layers) < 1:
            raise ValueError(f"PyramidKV: n_layers must be >= 1, got {n_layers}")
        self.n_layers, self.beta = int(n_layers), float(beta)
        self.budgets = pyramid_budgets(self.budget, self.n_layers, self.window, self.beta)

    @property
    def max_keys(self):
        return int(self.budgets.max())

    def _keep(self, layer, scores, valid):
        b = int(self.budgets[layer])
        if valid.sum(axis=1).max() <= b:
            return None
        keep = np.zeros(scores.shape, bool)
        np.put_along_axis(keep, top_k(scores, b), True, axis=1)                      # (Hkv, S)
        return keep

    def describe(self):
        """Its cache spec: parse_cache_spec(c.describe(), model) builds the same cache."""
        return f"pyramid={self.budget}/w{self.window}/k{self.kernel}/beta{self.beta:g}"

    def _meta(self):
        return {"n_layers": self.n_layers, "beta": self.beta}

    @classmethod
    def _from_meta(cls, meta):
        return cls(meta["budget"], meta["n_layers"], meta["window"], meta["kernel"], meta["beta"],
                   meta["dtype"])


class AdaKV(BudgetCache):
    """Ada-KV (Feng et al. 2024) on SnapKV scores: every layer holds at most B * Hkv keys, split
    among its KV heads by score (`adakv_keep`, safeguard `alpha`: each head keeps at least
    max(1, int(alpha * B)) keys, and always its observation window). alpha=1 gives every head B
    keys: SnapKV per head at budget B.

    >>> c = AdaKV(budget=32, n_kv_heads=3, window=8)
    >>> c.max_keys                                   # one head may take what the others give up
    80
    """

    def __init__(self, budget, n_kv_heads, window=16, kernel=5, alpha=0.2, dtype=np.float32):
        super().__init__(budget, window, kernel, dtype)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"AdaKV: alpha must be in [0, 1], got {alpha}")
        if int(n_kv_heads) < 1:
            raise ValueError(f"AdaKV: n_kv_heads must be >= 1, got {n_kv_heads}")
        self.n_kv_heads, self.alpha = int(n_kv_heads), float(alpha)

    @property
    def max_keys(self):
        """B * Hkv minus what the other heads keep at least (their window or safeguard)."""
        floor = max(self.window, max(1, int(self.alpha * self.budget)) if self.alpha > 0 else 0)
        return self.budget * self.n_kv_heads - (self.n_kv_heads - 1) * floor

    def _keep(self, layer, scores, valid):
        if valid.sum() <= self.budget * scores.shape[0]:
            return None
        return adakv_keep(scores, self.budget, self.alpha)

    def describe(self):
        """Its cache spec: parse_cache_spec(c.describe(), model) builds the same cache."""
        return f"adakv={self.budget}/w{self.window}/k{self.kernel}/a{self.alpha:g}"

    def _meta(self):
        return {"n_kv_heads": self.n_kv_heads, "alpha": self.alpha}

    @classmethod
    def _from_meta(cls, meta):
        return cls(meta["budget"], meta["n_kv_heads"], meta["window"], meta["kernel"], meta["alpha"],
                   meta["dtype"])
