"""Turn logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order follows llama.cpp's default chain: penalties -> top-k -> top-p -> min-p -> temperature
-> draw. Every draw comes from one seeded NumPy Generator whose seed is recorded, so a run is
reproducible. Left out on purpose: mirostat, typical-p, DRY, grammars.
"""
from __future__ import annotations

import numpy as np


def apply_repeat_penalty(logits, history, penalty):
    """CTRL-style penalty on tokens already seen: divide positive logits, multiply negative ones."""
    if penalty == 1.0 or not len(history):
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(history, np.int64))
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def filter_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Probabilities (V,) after top-k, top-p (nucleus) and min-p truncation, at temperature.

    >>> p = filter_probs(np.array([2.0, 1.0, 0.0, -1.0]), 1.0, top_k=2)
    >>> bool(p[2] == 0 and p[3] == 0 and abs(p.sum() - 1) < 1e-12)
    True
    """
    z = np.asarray(logits, np.float64)
    keep = np.ones(z.shape, bool)
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        keep &= z >= kth
    p = np.exp(z - z[keep].max()) * keep
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = np.searchsorted(cum, top_p) + 1                 # smallest prefix with mass >= top_p
        drop = np.ones(z.shape, bool)
        drop[order[:cut]] = False
        keep &= ~drop
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
    z = np.where(keep, z / temperature, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()


class Sampler:
    """Callable (logits (V,), history) -> token id. temperature <= 0 means greedy (argmax)."""

    def __init__(self, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, seed=None):
        checks = [("temperature", temperature, temperature >= 0, ">= 0"),
                  ("top_k", top_k, top_k >= 0, ">= 0 (0 = off)"),
                  ("top_p", top_p, 0.0 < top_p <= 1.0, "in (0, 1]"),
                  ("min_p", min_p, 0.0 <= min_p <= 1.0, "in [0, 1]"),
                  ("repeat_penalty", repeat_penalty, repeat_penalty > 0, "> 0 (1 = off)"),
                  ("seed", seed, seed is None or 0 <= seed < 2**63, "in [0, 2^63)")]
        for name, value, ok, expected in checks:   # NaN fails every comparison, so it is refused too
            if not ok:
                raise ValueError(f"invalid sampling value {name}={value}: expected {expected}")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repeat_penalty = repeat_penalty
        self.seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits, history=()):
        z = apply_repeat_penalty(np.asarray(logits, np.float32), history, self.repeat_penalty)
        if self.temperature <= 0:
            return int(np.argmax(z))
        p = filter_probs(z, self.temperature, self.top_k, self.top_p, self.min_p)
        return int(self.rng.choice(p.size, p=p))
