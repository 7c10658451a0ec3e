"""The dense KV cache: every position is kept, in buffers that grow by doubling.

Leaves out eviction (the bounded caches) and any arithmetic. Keys are stored after RoPE, with
their positions, as llama.cpp's KV cache holds them.
"""
from __future__ import annotations

import mmap

import numpy as np

from ..attention.selection import reserve
from .base import Cache

# below this a buffer is an ordinary np.zeros: a mapping of its own would cost more than it saves
LAZY_MIN_BYTES = 1 << 20


def lazy_zeros(shape, dtype=np.float32) -> np.ndarray:
    """A zeroed, writable array whose memory the system provides page by page as it is first
    written, and takes back when the array goes: a private anonymous mapping of its own.

    np.zeros is lazy only while glibc serves it with a fresh mapping; once large blocks have been
    freed, glibc raises its mapping threshold and serves the next ones from its heap, clearing
    (so touching) every page. A KV cache is allocated at its capacity and filled a slot at a time,
    so it would be resident in full from the first token. Small or non-Linux: np.zeros.

    >>> a = lazy_zeros((4, 1 << 18)); a[0, :3] = 1; a.shape, float(a.sum())
    ((4, 262144), 3.0)
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if nbytes < LAZY_MIN_BYTES or None in flags:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags[0] | flags[1]), dtype).reshape(shape)


class KVCache(Cache):
    """Dense KV cache: every position is kept. State lives here, math stays in free functions.

    k, v are (L, Hkv, capacity, d); capacity doubles when full (`reserve`), so decode does no
    per-step allocation proportional to the context. `dtype=np.float16` stores K/V in half
    precision (attention still computes in float32).

    >>> from types import SimpleNamespace
    >>> c = KVCache(SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=2), capacity=2)
    >>> k = np.ones((1, 3, 2), np.float32)
    >>> K, V, k_pos = c.update(0, k, k, np.arange(3)); c.advance(3)
    >>> len(c), K.shape, k_pos.tolist()
    (3, (1, 4, 2), [0, 1, 2])
    """

    def __init__(self, cfg, capacity: int = 256, dtype=np.float32):
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = lazy_zeros(shape, self.dtype)                # (L, Hkv, cap, d)
        self.v = lazy_zeros(shape, self.dtype)
        self.pos = np.zeros(capacity, np.int64)               # (cap,) original positions
        self.n = 0                                            # positions held
        self.next_pos = 0                                     # position of the next token
        self.selector_state = {}                              # per-layer indexes of selectors (IVF, ...)

    def __len__(self):
        return self.n

    def update(self, layer, k_new, v_new, pos, q=None):
        """Append k_new, v_new (Hkv, T, d) at positions pos (T,); return what attention reads:
        k_pos (S,) with S = n + T, and this layer's whole buffers k, v (Hkv, capacity, d) whose
        first S rows are the keys. Handing over the contiguous buffer rather than the strided
        view k[:, :S] lets the kernel read the cache in place: no O(S) copy per decode step.
        q is for caches that score keys by attention; this one keeps all."""
        T = k_new.shape[1]
        S = self.n + T
        self.k = reserve(self.k, self.n, S, axis=2, zeros=lazy_zeros)   # (L, Hkv, cap', d)
        self.v = reserve(self.v, self.n, S, axis=2, zeros=lazy_zeros)
        self.pos = reserve(self.pos, self.n, S, axis=0)       # (cap',)
        self.k[layer, :, self.n:S] = k_new
        self.v[layer, :, self.n:S] = v_new
        self.pos[self.n:S] = pos
        return self.k[layer], self.v[layer], self.pos[:S]

    def advance(self, T):
        self.n += T
        self.next_pos += T

    def nbytes(self):
        return self.k[:, :, : self.n].nbytes + self.v[:, :, : self.n].nbytes

    def state(self, reserve=1024):
        """(meta, arrays) for minisparse.persist: the held positions plus `reserve` free slots,
        so a cache loaded memory-mapped can take new tokens without a copy."""
        cap = self.n + reserve
        pad = lambda a: np.pad(a[:, :, : self.n], ((0, 0), (0, 0), (0, reserve), (0, 0)))  # noqa: E731
        return ({"kind": "KVCache", "n": self.n, "next_pos": self.next_pos},
                {"k": pad(self.k), "v": pad(self.v), "pos": np.pad(self.pos[: self.n], (0, cap - self.n))})

    @classmethod
    def from_state(cls, meta, arrays, cfg=None):
        """Rebuild from `state()`; the arrays are used as given (memory maps stay maps)."""
        c = cls.__new__(cls)
        c.cfg, c.k, c.v, c.pos = cfg, arrays["k"], arrays["v"], arrays["pos"]
        c.dtype = c.k.dtype
        if c.k.ndim != 4 or c.v.shape != c.k.shape or c.k.shape[2] != c.pos.shape[0]:
            raise ValueError(f"k {c.k.shape}, v {c.v.shape}, pos {c.pos.shape}: expected "
                             f"(L, Hkv, capacity, d) twice and (capacity,)")
        c.n, c.next_pos = int(meta["n"]), int(meta["next_pos"])
        c.selector_state = {}                                 # indexes are rebuilt, not saved
        if not 0 <= c.n <= c.pos.shape[0]:
            raise ValueError(f"n={c.n} outside the {c.pos.shape[0]} saved slots")
        return c
