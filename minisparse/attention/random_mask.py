"""RandomMask: RIS-Kernel style random sparse masks, unioned over several seeds, always with the
diagonal, attention sinks and a local window.

Leaves out any learned or content-based choice. Two families (RIS-Kernel): "stochastic" = per
row, ceil(density * n_causal) uniform draws per seed; "structural" = keys and queries hashed into
1/density random cliques per seed, a query reads the causal keys of its own clique. Draws come
from a counter-based hash of (seed, member, query position, draw), so a row does not depend on
the other rows: decode step i picks exactly what prefill row i picks, and a seed replays exactly.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .patterns import Sinks, Window
from .selection import Selection, union
from .selector import Budget, Selector
from .topk import parse_budget


@njit(cache=True)
def _mix(x):
    # splitmix64 finaliser: a bijective avalanche on 64 bits (Steele et al. 2014)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def _hash(seed, s, a, b):
    x = _mix(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(s))
    x = _mix(x ^ (np.uint64(a) * np.uint64(0xD6E8FEB86659FD93)))
    return _mix(x ^ (np.uint64(b) + np.uint64(0x632BE59BD9B4E019)))


@njit(cache=True)
def _stochastic(q_pos, hi, density, keys, n_seeds, seed):
    """Per query t: `keys` draws per seed (keys >= 0: an absolute budget), else
    ceil(density * hi[t]); each uniform over the causal keys [0, hi[t])."""
    tq = q_pos.size
    counts = np.zeros(tq, np.int64)
    for t in range(tq):
        m = keys if keys >= 0 else int(math.ceil(density * hi[t]))
        counts[t] = n_seeds * m if hi[t] > 0 else 0
    ptr = np.zeros(tq + 1, np.int64)
    ptr[1:] = np.cumsum(counts)
    idx = np.empty(ptr[-1], np.int64)
    for t in range(tq):
        if hi[t] == 0:
            continue
        m = counts[t] // n_seeds
        a = ptr[t]
        for s in range(n_seeds):
            for r in range(m):
                idx[a] = np.int64(_hash(seed, s, q_pos[t], r) % np.uint64(hi[t]))
                a += 1
    return ptr, idx


@njit(cache=True)
def _structural(q_pos, k_pos, hi, n_groups, n_seeds, seed):
    tq, tk = q_pos.size, k_pos.size
    # per seed: key indices sorted by (group, index); a query slices its group's prefix
    order = np.empty((n_seeds, tk), np.int64)
    starts = np.zeros((n_seeds, n_groups + 1), np.int64)
    kg = np.empty(tk, np.int64)
    for s in range(n_seeds):
        for j in range(tk):
            kg[j] = np.int64(_hash(seed, s, k_pos[j], -1) % np.uint64(n_groups))
        order[s] = np.argsort(kg, kind="mergesort")
        cnt = np.bincount(kg, minlength=n_groups)
        starts[s, 1:] = np.cumsum(cnt)
    counts = np.zeros(tq, np.int64)
    lo_s = np.zeros((tq, n_seeds), np.int64)
    n_s = np.zeros((tq, n_seeds), np.int64)
    for t in range(tq):
        for s in range(n_seeds):
            g = np.int64(_hash(seed, s, q_pos[t], -1) % np.uint64(n_groups))
            a, b = starts[s, g], starts[s, g + 1]
            lo_s[t, s] = a
            n_s[t, s] = np.searchsorted(order[s, a:b], hi[t])          # causal members
            counts[t] += n_s[t, s]
    ptr = np.zeros(tq + 1, np.int64)
    ptr[1:] = np.cumsum(counts)
    idx = np.empty(ptr[-1], np.int64)
    for t in range(tq):
        a = ptr[t]
        for s in range(n_seeds):
            idx[a:a + n_s[t, s]] = order[s, lo_s[t, s]:lo_s[t, s] + n_s[t, s]]
            a += n_s[t, s]
    return ptr, idx


class RandomMask(Selector):
    """Union over `seeds` random masks of nominal density `density`, plus sinks and a window
    (which includes the diagonal). Every draw is a function of `seed`, recorded in describe().

    >>> RandomMask(0.01, 70, seed=3)
    RandomMask<random=1%x70,seed=3,mode=stochastic>
    >>> round(RandomMask(0.01, 70).expected_coverage(), 3)   # 1 - e^(-0.7)
    0.503
    """

    def __init__(self, density: float | None = None, seeds: int = 1, mode: str = "stochastic",
                 seed: int = 0, sinks: int = 4, window: int = 16, keys: int | None = None):
        # keys: an absolute budget, `keys` draws per seed and row; density: ceil(density * n_causal)
        if (density is None) == (keys is None):
            raise ValueError(f"RandomMask: give exactly one of density (a fraction) or keys (a "
                             f"count); got density={density}, keys={keys}")
        if keys is not None and int(keys) < 1:
            raise ValueError(f"RandomMask: keys must be >= 1, got {keys}")
        if keys is not None and mode == "structural":
            raise ValueError("RandomMask: mode 'structural' partitions keys into 1/density "
                             "cliques, so it needs a density (e.g. random=5%), not keys")
        if density is not None and not 0.0 < float(density) <= 1.0:
            raise ValueError(f"RandomMask: density must be in (0, 1], got {density}")
        if int(seeds) < 1:
            raise ValueError(f"RandomMask: seeds must be >= 1, got {seeds}")
        if mode not in ("stochastic", "structural"):
            raise ValueError(f"RandomMask: mode must be 'stochastic' or 'structural', got {mode!r}")
        self.density = None if density is None else float(density)
        self.keys = None if keys is None else int(keys)
        self.seeds, self.mode = int(seeds), mode
        self.seed, self.sinks, self.window = int(seed), int(sinks), int(window)

    options = ("seed", "mode")

    def _with_options(self, seed=None, mode=None):
        return RandomMask(self.density, self.seeds, mode or self.mode,
                          self.seed if seed is None else int(seed), self.sinks, self.window,
                          self.keys)

    def expected_coverage(self, n_causal: int | None = None) -> float:
        """Expected fraction of a row's causal keys the random part covers: 1 - e^(-seeds*density)
        asymptotically; with n_causal, the exact finite-n value of this family."""
        if n_causal is None:
            if self.keys is not None:
                raise ValueError(f"{self.describe()}: an absolute budget's coverage depends on "
                                 f"the row; pass n_causal")
            return 1.0 - math.exp(-self.seeds * self.density)
        if self.mode == "stochastic":                                 # m draws with replacement
            m = self.keys if self.keys is not None else math.ceil(self.density * n_causal)
            return 1.0 - (1.0 - 1.0 / n_causal) ** (m * self.seeds)
        g = max(1, round(1.0 / self.density))                        # same clique as the query
        return 1.0 - (1.0 - 1.0 / g) ** self.seeds

    def coverage_report(self, stats=None) -> dict:
        """Nominal density next to the effective coverage of the seed union (and, given the
        AttentionStats of a call, the realised attended fraction including sinks and window)."""
        rep = {"nominal_density": self.density, "keys": self.keys, "seeds": self.seeds,
               "mode": self.mode, "seed": self.seed,
               "expected_coverage": None if self.keys is not None else self.expected_coverage()}
        if stats is not None:
            rep["realised_fraction"] = float(stats.n_attended.sum() / max(stats.n_causal.sum(), 1))
        return rep

    def random_part(self, k_pos, q_pos) -> Selection:
        """Only the random draws (no sinks, no window), shared by all heads."""
        hi = np.searchsorted(k_pos, q_pos, side="right")              # (Tq,) causal keys
        if self.mode == "stochastic":
            ptr, idx = _stochastic(q_pos, hi, self.density or 0.0,
                                   -1 if self.keys is None else self.keys, self.seeds, self.seed)
        else:
            g = max(1, round(1.0 / self.density))
            ptr, idx = _structural(q_pos, k_pos, hi, g, self.seeds, self.seed)
        return Selection.from_lists(ptr, idx, k_pos.size)

    def _select(self, q, k, q_pos, k_pos):
        hq = k.shape[0] if q is None else q.shape[0]
        parts = [self.random_part(k_pos, q_pos), Window(self.window)._select(q, k, q_pos, k_pos)]
        if self.sinks:
            parts.append(Sinks(self.sinks)._select(q, k, q_pos, k_pos))
        return union(parts, hq, k.shape[0])

    @property
    def budget(self):
        if self.keys is not None:
            return Budget(self.sinks + self.window + self.keys * self.seeds)
        return Budget(self.sinks + self.window, self.density * self.seeds)

    def describe(self):
        b = str(self.keys) if self.keys is not None else f"{100 * self.density:g}%"
        return f"random={b}x{self.seeds},seed={self.seed},mode={self.mode}"


def parse_random(val):
    """'1%x70' -> RandomMask(0.01, 70); '0.01x70', '1%' (one seed) also accepted; '128x2' draws
    128 keys per seed and row (an absolute budget, as topk=128 reads 128)."""
    if val is None:
        raise ValueError("attention spec: 'random' needs a value like random=1%x70")
    dens, _, n = val.partition("x")
    try:
        k, d = parse_budget(dens, f"random={val}")
        return RandomMask(d, int(n) if n else 1, keys=k)
    except ValueError as e:
        raise ValueError(f"attention spec: 'random={val}': expected BUDGETxSEEDS, BUDGET a "
                         f"density (1%, 0.01) or a key count (128) ({e})") from None
