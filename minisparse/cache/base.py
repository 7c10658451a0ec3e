"""The cache contract: what the model, persistence and the lab may ask of any KV cache.

Leaves out any policy (dense.py keeps everything; recursive.py, streaming.py evict; gated.py adds
the FastGRNN gate's running state). Callers read the attributes below directly: a cache that
lacks one does not follow the contract, and nothing probes with getattr.

    update(layer, k, v, pos, q=None) -> (K, V, k_pos)   append this call's keys, return what
        attention reads: K, V (Hkv, >=S, d) whose first S = len(k_pos) rows are the keys held
        plus the new ones, k_pos (S,) their positions (int64, ascending). q (Hq, T, d) is this
        call's queries, for caches that score keys by attention; others ignore it.
    advance(T)      once every layer has seen this call's T tokens
    len(cache)      positions held (after the last advance)
    next_pos        position of the next token
    nbytes()        bytes of keys and values held
    state() -> (meta, arrays); Class.from_state(meta, arrays, ...)   for minisparse.persist:
        meta a JSON-able dict whose "kind" is the class name, arrays plain NumPy arrays
    max_keys        the most positions it ever holds, None when nothing bounds it by count
    block           None, or the call size Model.forward splits longer calls into (the cache
                    compresses between blocks)
    selector_state  a dict in which selectors keep per-layer indexes across decode steps
                    (IVF, LSH, running landmarks), or None when the cache evicts keys (an index
                    over evicted keys would be wrong)
    held(layer)     None, or a Selector of the slots each KV head holds in what the last
                    update(layer) returned, for caches whose heads hold different counts (Ada-KV:
                    shorter heads are padded); Model.forward intersects its selector with it
"""
from __future__ import annotations


class Cache:
    """Base class of every KV cache; see the module docstring for the contract."""

    block = None
    selector_state = None
    next_pos = 0

    @property
    def max_keys(self):
        return None

    def held(self, layer):
        return None

    def update(self, layer, k_new, v_new, pos, q=None):
        raise NotImplementedError(f"{type(self).__name__}.update")

    def advance(self, T):
        raise NotImplementedError(f"{type(self).__name__}.advance")

    def __len__(self):
        raise NotImplementedError(f"{type(self).__name__}.__len__")

    def nbytes(self):
        raise NotImplementedError(f"{type(self).__name__}.nbytes")

    def state(self):
        raise NotImplementedError(f"{type(self).__name__}.state")

    @classmethod
    def from_state(cls, meta, arrays, **kw):
        raise NotImplementedError(f"{cls.__name__}.from_state")

    def __repr__(self):
        bound = "unbounded" if self.max_keys is None else f"max_keys={self.max_keys}"
        return f"{type(self).__name__}<{len(self)} held, next_pos={self.next_pos}, {bound}>"
