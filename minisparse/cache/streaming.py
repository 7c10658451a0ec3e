"""StreamingLLM's cache: the first `sinks` tokens (attention sinks) plus the last `window`, with
keys either at their original positions or re-assigned to their place in the cache.

Leaves out scoring (nothing is scored: what stays is fixed by position) and pre-RoPE storage.
Follows Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", sec. 3.2.
"""
from __future__ import annotations

import numpy as np

from .recursive import SlotCache


def rope(model, x, pos):
    """x (H, T, d) rotated by RoPE to positions pos (T,) with `model`'s settings: model.rope.

    Until Model has a `rope(x, pos)` method (the fast-path branch adds it), the rotation is
    written out here from model.config, the same formula as model.apply_rope, so this package
    never imports the model (the model imports the caches). Drop the fallback when it lands."""
    if hasattr(type(model), "rope"):
        return model.rope(x, pos)
    cfg, r = model.config, model.config.rope_dim
    inv_freq = cfg.rope_base ** (-np.arange(r // 2, dtype=np.float64) * 2.0 / r)   # (r/2,)
    factors = model.weights.get("rope_freqs")
    if factors is not None:
        inv_freq = inv_freq / factors[: r // 2]
    ang = (np.asarray(pos, np.float64) / cfg.rope_scale)[:, None] * inv_freq[None, :]  # (T, r/2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    if cfg.rope_style == "interleaved":
        a, b = x[..., 0:r:2], x[..., 1:r:2]                                   # (H, T, r/2) each
    else:
        a, b = x[..., : r // 2], x[..., r // 2: r]
    out = x.copy()
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if cfg.rope_style == "interleaved":
        out[..., 0:r:2], out[..., 1:r:2] = ra, rb
    else:
        out[..., : r // 2], out[..., r // 2: r] = ra, rb
    return out


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

    @property
    def max_keys(self):
        return self.sinks + self.window

    def _plan(self, S, T):
        return (self.sinks, S - self.window, 0) if S > self.sinks + self.window else None

    def _view(self, layer, k, pos, T):
        if self.positions_mode == "original":
            return k, pos[0]                                                 # (Hkv, S, d), (S,)
        S = pos.shape[1]
        target = np.arange(S) + (int(pos[0, -1]) + 1 - S)                    # (S,) slot + delta
        return rope(self.model, np.asarray(k, np.float32), target - pos[0]), target

    def _meta(self):
        return {"sinks": self.sinks, "window": self.window, "positions": self.positions_mode,
                "block": self.block}

    @classmethod
    def _from_meta(cls, meta, scorer, model=None):
        return cls(meta["sinks"], meta["window"], meta["positions"], model, meta["block"], meta["dtype"])
