"""Structured (content-independent) selectors: Dense, Window, Sinks, Globals, BlockLocal,
Strided (Sparse Transformer strided/fixed), LogStride, Landmarks, and the ruvllm preset.

Leaves out content-based choice (top-k, LSH, ...: their own files) and randomness (random_mask.py).
Every pattern is defined on key POSITIONS, so decode (one query against a cache) and prefill
pick the same keys; each costs O(Tq * |set|) to build, one range per contiguous run.
Papers: Child et al. 2019 (Sparse Transformer), Beltagy et al. 2020 (Longformer window/globals),
Xiao et al. 2023 (attention sinks), LogSparse (Li et al. 2019), Landmark attention (Mohtashami &
Jaggi 2023, here as block means).
"""
from __future__ import annotations

import numpy as np

from .selection import SHARED, Selection, sorted_positions, span_means
from .selector import Budget, Selector, Union


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

    @property
    def budget(self):
        return Budget(self.w)

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

    @property
    def budget(self):
        return Budget(self.n)

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

    @property
    def budget(self):
        return Budget(len(self.positions))

    def describe(self):
        return "globals=" + "/".join(str(p) for p in self.positions)


def _explicit_from_positions(row, pos, q_pos, k_pos):
    """Rows `row` (n,) want keys at positions `pos` (n,): keep those present in k_pos and
    visible (pos <= q_pos of the row); return a normalised shared Selection in CSR form.
    Rows must be sorted and, within a row, positions strictly increasing."""
    tq, tk = q_pos.size, k_pos.size
    if tk and k_pos[-1] - k_pos[0] == tk - 1:                         # contiguous positions
        j = pos - k_pos[0]                                            # (n,) index = offset
        j = np.where(j < 0, tk, j)                                    # before the cache: absent
    else:
        j = np.searchsorted(k_pos, pos)                               # (n,) first key at >= pos
    jc = np.minimum(j, max(tk - 1, 0))
    ok = (j < tk) & (k_pos[jc] == pos) & (pos <= q_pos[row]) if tk else np.zeros(pos.size, bool)
    row, j = row[ok], j[ok]
    ptr = np.zeros(tq + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=tq), out=ptr[1:])
    return ptr, j


def _ragged(counts):
    """(row id (n,), offset within row (n,)) for rows of the given counts (Tq,)."""
    counts = np.maximum(counts, 0).astype(np.int64)
    row = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    off = np.arange(row.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return row, off


class BlockLocal(Selector):
    """Block-local attention: the keys in the query's own block of b positions,
    floor(k_pos / b) == floor(q_pos / b)."""

    def __init__(self, b: int):
        if int(b) < 1:
            raise ValueError(f"BlockLocal: b must be >= 1, got {b}")
        self.b = int(b)

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("BlockLocal", k_pos)
        lo = np.searchsorted(k_pos, (q_pos // self.b) * self.b, side="left")
        hi = np.searchsorted(k_pos, q_pos, side="right")
        return _range_rows(lo, hi, k.shape[1])

    @property
    def budget(self):
        return Budget(self.b)

    def describe(self):
        return f"blocks={self.b}"


class Strided(Selector):
    """Sparse Transformer factorised patterns (Child et al. 2019), stride l.

    mode="strided": local A1 = positions [i - l, i] plus A2 = {i - m*l : m >= 2}: any j <= i is
      reached in two hops (a stride hop to i - l*floor((i-j)/l), then a local hop).
    mode="fixed": A1 = the query's own block of l positions, A2 = the last position of every
      earlier block (summary width c = 1)."""

    def __init__(self, l: int, mode: str = "strided"):
        if int(l) < 1:
            raise ValueError(f"Strided: l must be >= 1, got {l}")
        if mode not in ("strided", "fixed"):
            raise ValueError(f"Strided: mode must be 'strided' or 'fixed', got {mode!r}")
        self.l, self.mode = int(l), mode

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("Strided", k_pos)
        l = self.l
        hi = np.searchsorted(k_pos, q_pos, side="right")
        if self.mode == "strided":
            lo = np.searchsorted(k_pos, q_pos - l, side="left")
            row, off = _ragged(q_pos // l - 1)                        # m = 2 .. i // l
            pos = q_pos[row] - (off + 2) * l
            order = np.lexsort((pos, row))                             # increasing within a row
        else:
            lo = np.searchsorted(k_pos, (q_pos // l) * l, side="left")
            row, off = _ragged(q_pos // l)                             # earlier blocks' last pos
            pos = off * l + (l - 1)
            order = np.arange(row.size)
        ptr, j = _explicit_from_positions(row[order], pos[order], q_pos, k_pos)
        r_ptr = np.arange(q_pos.size + 1, dtype=np.int64)
        return Selection.from_lists(ptr, j, k.shape[1], r_ptr=r_ptr, r_lo=lo, r_hi=hi)

    def describe(self):
        return f"strided={self.l}" if self.mode == "strided" else f"fixed={self.l}"


class LogStride(Selector):
    """Log-stride lookback (LogSparse, ruvllm): positions i and i - 2^m for m = 0, 1, ...
    (about log2(i) + 2 keys per query)."""

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("LogStride", k_pos)
        top = np.floor(np.log2(np.maximum(q_pos, 1))).astype(np.int64) + 1   # m = 0 .. top-1
        top = np.where(q_pos >= 1, top, 0)
        row, off = _ragged(top + 1)                                   # slot 0 = the diagonal
        pos = q_pos[row] - np.where(off == 0, 0, 2 ** np.maximum(off - 1, 0))
        keep = pos >= 0
        row, pos = row[keep], pos[keep]
        order = np.lexsort((pos, row))
        ptr, j = _explicit_from_positions(row[order], pos[order], q_pos, k_pos)
        return Selection.from_lists(ptr, j, k.shape[1], normalized=True)

    def describe(self):
        return "logstride"


# ---- landmarks ------------------------------------------------------------------------------
class Landmarks(Selector):
    """Block landmarks: each COMPLETE block of `block` keys (by index in the key array; keys are
    held in position order) becomes one pseudo-key with the block-mean K and V, position = the
    block's last position, log-weight log(block) (it stands for `block` keys).

    A query reads its own block exactly and the landmarks of earlier blocks: all of them
    (reach="all", O(n / block) per query) or those at block distances 1, 2, 4, 8, ...
    (reach="log", O(log n) per query: the reach ruvllm's published edge counts imply). In a union,
    a landmark's multiplicity loses the keys of its block the row reads exactly (selection.py).
    With identical keys within every block this equals dense attention exactly.
    Decode: `bind(RunningLandmarks)` reuses incrementally built means (equal to the static ones).
    """
    exact_subset = False

    def __init__(self, block: int, state=None, reach: str = "all"):
        if int(block) < 1:
            raise ValueError(f"Landmarks: block must be >= 1, got {block}")
        if reach not in ("all", "log"):
            raise ValueError(f"Landmarks: reach must be 'all' or 'log', got {reach!r}")
        self.block = int(block)
        self.state = state
        self.reach = reach

    def bind(self, state):
        """A Landmarks reading its means from `state` (a RunningLandmarks of the same block)."""
        if state.block != self.block:
            raise ValueError(f"Landmarks.bind: state has block {state.block}, expected {self.block}")
        return Landmarks(self.block, state, self.reach)

    def for_layer(self, layer, state, k, v):
        """Bound to this layer's RunningLandmarks in the cache's state, fed the appended keys."""
        if state is None:
            return self
        key = (self.describe(), layer)
        run = state.get(key)
        if run is None or run.n_keys > k.shape[1]:
            run = state[key] = RunningLandmarks(self.block)
        if run.n_keys < k.shape[1]:
            run.append(k[:, run.n_keys:], v[:, run.n_keys:])
        return self.bind(run)

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("Landmarks", k_pos)
        B, tk = self.block, k.shape[1]
        nb = tk // B                                                  # complete blocks
        if self.state is not None:
            if self.state.n_keys != tk:
                raise ValueError(f"Landmarks: bound state holds {self.state.n_keys} keys, "
                                 f"attention got Tk={tk}")
            ek, ev = self.state.means()
        else:
            lo = np.arange(nb, dtype=np.int64) * B
            ek = span_means(k, lo, lo + B)                            # (Hkv, nb, d)
            ev = None                                                 # attend averages v
        hi = np.searchsorted(k_pos, q_pos, side="right")              # (Tq,) causal keys
        own = np.where(hi > 0, (hi - 1) // B, 0)                      # (Tq,) own block index
        if self.reach == "all":
            counts = own
            row, blk = _ragged(counts)                                # landmarks 0 .. own-1
        else:                                                         # blocks own - 2^m >= 0
            counts = np.where(own >= 1, np.floor(np.log2(np.maximum(own, 1))).astype(np.int64) + 1, 0)
            row, off = _ragged(counts)
            blk = own[row] - 2 ** (counts[row] - 1 - off)             # increasing within a row
        r_ptr = np.arange(q_pos.size + 1, dtype=np.int64)
        ptr = np.zeros(q_pos.size + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        sel = Selection.from_lists(ptr, tk + blk, tk, logw=np.full(blk.size, np.log(B), np.float32),
                                   r_ptr=r_ptr, r_lo=own * B, r_hi=hi, normalized=True)
        sel.extra_k, sel.extra_v = ek, ev
        sel.extra_pos = k_pos[np.arange(1, nb + 1) * B - 1] if nb else np.zeros(0, np.int64)
        sel.extra_lo = np.arange(nb, dtype=np.int64) * B
        sel.extra_hi = sel.extra_lo + B
        return sel

    def describe(self):
        return f"landmarks={self.block}" if self.reach == "all" else f"loglandmarks={self.block}"


class RunningLandmarks:
    """Incremental landmark means for decode: append keys as the cache grows; a block's mean is
    final once its `block` keys arrived. Sums are float64, key by key, in arrival order, so the
    means equal Landmarks' static ones bit for bit.

    >>> import numpy as np
    >>> st = RunningLandmarks(2); st.append(np.ones((1, 3, 4)), np.zeros((1, 3, 4)))
    >>> st.means()[0].shape
    (1, 1, 4)
    """

    def __init__(self, block: int):
        self.block = int(block)
        self.n_keys = 0
        self._ks, self._vs = [], []                                   # finished means (Hkv, d)
        self._k_acc = self._v_acc = None                              # (Hkv, d) float64

    def append(self, k_new, v_new):
        """k_new, v_new (Hkv, T, d): the keys just appended to the cache, in order."""
        k_new = np.asarray(k_new, np.float32)
        v_new = np.asarray(v_new, np.float32)
        for t in range(k_new.shape[1]):
            if self.n_keys % self.block == 0:
                self._k_acc = np.zeros((k_new.shape[0], k_new.shape[2]), np.float64)
                self._v_acc = np.zeros_like(self._k_acc)
            self._k_acc += k_new[:, t]
            self._v_acc += v_new[:, t]
            self.n_keys += 1
            if self.n_keys % self.block == 0:                          # block complete
                self._ks.append((self._k_acc / self.block).astype(np.float32))
                self._vs.append((self._v_acc / self.block).astype(np.float32))

    def means(self):
        """(ek, ev) (Hkv, n_complete_blocks, d) float32."""
        if not self._ks:
            h = 0 if self._k_acc is None else self._k_acc.shape[0]
            d = 0 if self._k_acc is None else self._k_acc.shape[1]
            z = np.zeros((h, 0, d), np.float32)
            return z, z
        return np.stack(self._ks, axis=1), np.stack(self._vs, axis=1)


# ---- the ruvllm preset ------------------------------------------------------------------------
def RuvLLM(window: int = 128, block: int = 64, globals_=(0,), reach: str = "log"):
    """ruvllm_sparse_attention's composition: local window, global tokens, log-stride lookback
    and block landmarks. Returns a Union with an `estimate_edges(n)` method.

    Landmark reach "log" (block distances 1, 2, 4, ...) is inferred from the crate's published
    edge table (about 140 edges per query at n = 8192 and 147 at 65536, i.e. O(log n) per query,
    not n / 64); reach="all" reads every earlier block's landmark instead."""
    return _RuvLLM(Globals(globals_), Window(window), LogStride(), Landmarks(block, reach=reach))


class _RuvLLM(Union):
    def describe(self):
        return "ruvllm"

    def estimate_edges(self, n: int, chunk: int = 2048) -> int:
        """Edges (keys and landmarks read, after causality) per head for a causal prefill of n
        tokens: built chunk by chunk from the real selection, so it is exact, not a formula."""
        total = 0
        k = np.zeros((1, n, 1), np.float32)
        k_pos = np.arange(n, dtype=np.int64)
        for a in range(0, n, chunk):
            q_pos = np.arange(a, min(a + chunk, n), dtype=np.int64)
            sel = self._select(np.zeros((1, q_pos.size, 1), np.float32), k, q_pos, k_pos)
            hi = np.minimum(sel.range_hi, np.repeat(q_pos + 1, np.diff(sel.range_ptr)))
            total += int(np.maximum(hi - sel.range_lo, 0).sum())
            rows = np.repeat(np.arange(q_pos.size), np.diff(sel.idx_ptr))
            j = sel.idx
            pos = np.where(j < n, k_pos[np.minimum(j, n - 1)], sel.extra_pos[np.maximum(j - n, 0)]
                           if sel.n_extra else 0)
            total += int((pos <= q_pos[rows]).sum())
        return total
