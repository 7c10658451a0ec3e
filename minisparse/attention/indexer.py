"""A DeepSeek-style lightning indexer: a cheap low-precision dot-product score over every causal
key, shared by the query heads of a KV head, then exact attention on the top k.

Follows DeepSeek-AI 2025, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek
Sparse Attention": I(t, s) = sum_h w_{t,h} ReLU(q^I_{t,h} . k^I_s) in FP8, top-k keys per query
token shared by all heads. minisparse has no trained indexer heads, so the model's own query
heads of a group and its KV head stand in for them, with w = 1 and no ReLU (on the attention
heads themselves a ReLU would clip exactly the negative logits the ranking should keep apart):
I(t, s) = sum_{h in group} q~_{t,h} . k~_s, with q~, k~ quantised per vector to int8 (symmetric,
scale max|x| / 127) or float16; "f32" is full precision (= TopK(per="kv") exactly). Leaves out the
indexer's own small heads and their training, FP8 (int8 is the low-precision format here), and
the indexer's speed (its scores are computed in float64 from the quantised integers).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .selection import KV, Q
from .topk import ApproxTopK, budget_text, check_budget, dot, parse_budget, score_rows

PRECISIONS = ("i8", "f16", "f32")


def quantise_int8(x):
    """x (..., d) float -> (integers (..., d) float32 in [-127, 127], scale (...,) float64):
    symmetric per vector, x ~ scale * integers. An all-zero vector gets scale 1."""
    x = np.asarray(x, np.float32)
    m = np.abs(x).max(axis=-1).astype(np.float64)                              # (...,)
    scale = np.where(m > 0, m / 127.0, 1.0)
    return np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.float32), scale


@njit(cache=True)
def int8_rows(qi, sq, ki, sk, q_pos, k_pos, per_kv):
    """Scores S (R, Tk) float64, -inf where not causal. per_kv: R = Hkv * Tq, row (s, t) is
    sk[s, j] * sum_{h in group s} sq[h, t] * (qi[h, t] . ki[s, j]); else R = Hq * Tq, row (h, t)
    is sk[h // G, j] * sq[h, t] * (qi[h, t] . ki[h // G, j]). Each integer dot is exact in
    float32 (|terms| <= 127^2 and d * 127^2 < 2^24), so the order of summation cannot matter."""
    Hq, Tq, d = qi.shape
    Hkv, Tk, _ = ki.shape
    G = Hq // Hkv
    nh = Hkv if per_kv else Hq
    out = np.empty((nh * Tq, Tk), np.float64)
    for r in range(nh * Tq):
        s = r // Tq
        t = r % Tq
        kv = s if per_kv else s // G
        h0, h1 = (s * G, (s + 1) * G) if per_kv else (s, s + 1)
        for j in range(Tk):
            if k_pos[j] > q_pos[t]:
                out[r, j] = -np.inf
                continue
            acc = 0.0
            for h in range(h0, h1):
                acc += sq[h, t] * np.float64(dot(qi[h, t], ki[kv, j]))
            out[r, j] = sk[kv, j] * acc
    return out


class Indexer(ApproxTopK):
    """Indexer(k, precision="i8", per="kv"): per KV head, rank the causal keys by the group's
    summed dots in low precision and read the top k (or ceil(fraction * n_causal)) exactly, one
    set shared by the group's query heads (DeepSeek's indexer shares one set across all heads).
    per="q": one ranking per query head instead (the same low-precision dots, no sharing).

    >>> x = np.random.default_rng(0).standard_normal((2, 8, 4)).astype(np.float32)
    >>> float(Indexer(3, precision="f32").recall(x, x[:1]).min())   # full precision: exact top-k
    1.0
    """
    def __init__(self, k=None, fraction=None, precision="i8", per="kv"):
        if precision not in PRECISIONS:
            raise ValueError(f"Indexer: precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
        if per not in ("kv", "q"):
            raise ValueError(f"Indexer: per must be 'kv' (shared per KV head) or 'q' (per query "
                             f"head), got {per!r}")
        self.precision, self.per = precision, per
        self.k, self.fraction = check_budget("Indexer", k, fraction)

    def row_scores(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("Indexer: needs the queries (content-based), got q=None")
        q = np.ascontiguousarray(q, np.float32)
        k = np.ascontiguousarray(k, np.float32)
        per_kv = self.per == "kv"
        if self.precision == "i8":
            (qi, sq), (ki, sk) = quantise_int8(q), quantise_int8(k)
            S = int8_rows(qi, sq, ki, sk, q_pos, k_pos, per_kv)                 # (R, Tk)
        elif self.precision == "f16":
            S = score_rows(q.astype(np.float16).astype(np.float32),
                           k.astype(np.float16).astype(np.float32), q_pos, k_pos, per_kv)
        else:
            S = score_rows(q, k, q_pos, k_pos, per_kv)
        return (KV, k.shape[0], S) if per_kv else (Q, q.shape[0], S)

    def describe(self):
        s = "indexer=" + budget_text(self.k, self.fraction)
        s += f"/{self.precision}" if self.precision != "i8" else ""
        return s + ("/q" if self.per == "q" else "")

    @staticmethod
    def from_spec(val):
        """`indexer=64` (int8, shared per KV head), `indexer=64/f16`, `indexer=64/f32` (full
        precision), `indexer=2%`, `indexer=64/q` (one ranking per query head)."""
        parts = (val or "").split("/")
        if not parts[0]:
            raise ValueError(f"'indexer={val}': expected k[/i8|f16|f32][/q], e.g. indexer=64")
        k, f = parse_budget(parts[0], f"indexer={val}")
        kw = {}
        for p in parts[1:]:
            if p in PRECISIONS and "precision" not in kw:
                kw["precision"] = p
            elif p == "q" and "per" not in kw:
                kw["per"] = "q"
            else:
                raise ValueError(f"'indexer={val}': unknown or repeated part {p!r} "
                                 f"({', '.join(PRECISIONS)}, q)")
        return Indexer(k, f, **kw)
