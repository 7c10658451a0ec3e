"""StreamingLLM's cache: the first `sinks` tokens (attention sinks) plus the last `window`, with
keys either at their original positions or re-assigned to their place in the cache.

Leaves out scoring (nothing is scored: what stays is fixed by position) and pre-RoPE storage.
Follows Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", sec. 3.2.
"""
from __future__ import annotations

import numpy as np

from .recursive import SlotCache


class StreamingCache(SlotCache):
    """Sinks + recent window: after every call, slots beyond the first `sinks` and the last
    `window` are dropped, so len(cache) <= sinks + window. sinks=0 is the plain sliding window.
    Model.forward feeds it `block` tokens per call (block=1 is StreamingLLM's token-by-token
    decoding: each query then sees exactly the sinks and its window; within a larger block a
    query also sees the keys of the block before it).

    positions="original": keys keep the positions they were rotated at (RoPE before caching).
    positions="reassigned" (StreamingLLM): key slot i is read as if at position i + delta, with
        delta = next_pos - len(cache) chosen so this call's new tokens sit at their true positions
        (the queries were rotated there), i.e. distances are measured inside the cache. Keys are
        stored after RoPE, so on every read the held keys are rotated once more, by
        (i + delta) - original position: RoPE is a rotation, R(a) R(b) = R(a + b), so this equals
        rotating the raw key at the new position up to float32 rounding (tested). Needs the
        model (rope settings); stored keys stay at their original positions.

    >>> c = StreamingCache(sinks=1, window=2)
    >>> k = np.zeros((1, 6, 2), np.float32)
    >>> _ = c.update(0, k, k, np.arange(6)); c.advance(6)
    >>> c.positions(0).tolist()
    [[0, 4, 5]]
    """

    def __init__(self, sinks=4, window=252, positions="original", model=None, block=64,
                 dtype=np.float32):
        super().__init__(None, False, dtype)
        self.block = None if block is None else int(block)
        if int(sinks) < 0 or int(window) < 1:
            raise ValueError(f"StreamingCache: need sinks >= 0 and window >= 1, got {sinks}, {window}")
        if positions not in ("original", "reassigned"):
            raise ValueError(f"StreamingCache: positions must be 'original' or 'reassigned', got {positions!r}")
        if positions == "reassigned" and model is None:
            raise ValueError("StreamingCache(positions='reassigned') needs model= (its RoPE settings)")
        self.sinks, self.window, self.positions_mode = int(sinks), int(window), positions
        self.model = model

    def _plan(self, S, T):
        return (self.sinks, S - self.window, 0) if S > self.sinks + self.window else None

    def _view(self, layer, k, pos, T):
        if self.positions_mode == "original":
            return k, pos[0]                                                 # (Hkv, S, d), (S,)
        from ..model import apply_rope, rope_tables   # model imports nothing from cache
        S = pos.shape[1]
        target = np.arange(S) + (int(pos[0, -1]) + 1 - S)                    # (S,) slot + delta
        cfg = self.model.config
        cos, sin = rope_tables(target - pos[0], cfg, self.model.weights.get("rope_freqs"))  # (S, r/2)
        return apply_rope(np.asarray(k, np.float32), cos, sin, cfg.rope_style, cfg.rope_dim), target

    def _meta(self):
        return {"sinks": self.sinks, "window": self.window, "positions": self.positions_mode,
                "block": self.block}

    @classmethod
    def _from_meta(cls, meta, scorer, model=None):
        return cls(meta["sinks"], meta["window"], meta["positions"], model, meta["block"], meta["dtype"])
