"""Eviction scorers for the bounded caches: each gives every held key a score, shaped (Hkv, S),
higher = keep (kvpress's convention), and `pick` turns scores into the kept slots.

Leaves out when and how much to evict (recursive.py, streaming.py decide). Follows kvpress
(NVIDIA, `ScorerPress.score`), SnapKV (Li et al. 2024: last-w queries, pooled), H2O (Zhang et al.
2023: accumulated attention over all past queries), BMRT/LASER-KV (exact, LSH frequency rank,
hybrid with a ratio). Every random choice (LSH hyperplanes, random keep) comes from a recorded seed.

Shape legend: Hq / Hkv query / KV heads, G = Hq // Hkv, T queries in this call, S held keys
(old + new), d head width, C candidate slots, H' = 1 (shared keep set) or Hkv (per head).
"""
from __future__ import annotations

import numpy as np


def attention_mass(q, k, k_pos, q_pos):
    """Attention probability each key receives, summed over the queries and the G query heads
    of its KV head: softmax(q k^T / sqrt(d)) under causality by position, in float64.

    q (Hq, T, d), k (Hkv, S, d), k_pos (Hkv, S) per-head positions, q_pos (T,) -> (Hkv, S).
    Each query contributes 1 in all (its row sums to 1), so the result sums to G * T per head.

    >>> q = np.zeros((2, 3, 4)); k = np.zeros((1, 3, 4))
    >>> attention_mass(q, k, np.arange(3)[None], np.arange(3)).round(3).tolist()
    [[3.667, 1.667, 0.667]]
    """
    Hq, T, d = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv
    qg = np.asarray(q, np.float64).reshape(Hkv, G * T, d)                    # (Hkv, G*T, d)
    s = np.einsum("hid,hsd->his", qg, np.asarray(k, np.float64)) / np.sqrt(d)  # (Hkv, G*T, S)
    qp = np.tile(np.asarray(q_pos), G)                                       # (G*T,) head-major
    visible = np.asarray(k_pos)[:, None, :] <= qp[None, :, None]              # (Hkv, G*T, S)
    s = np.where(visible, s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)                 # every query sees at least itself
    p = np.exp(s)                                                            # (Hkv, G*T, S)
    p /= p.sum(axis=-1, keepdims=True)
    return p.sum(axis=1)                                                     # (Hkv, S)


class ScoreContext:
    """What a scorer may read for one layer's compression step.

    layer; q (Hq, T, d) this call's queries after RoPE; k, v (Hkv, S, d) held + new keys/values;
    pos (Hkv, S) original positions; q_pos (T,); acc (Hkv, S) attention accumulated over every
    past query (kept by the cache when a scorer sets `needs_history`), else None; step: how many
    compression steps this layer has had (seeds per-step randomness).
    """

    def __init__(self, layer, q, k, v, pos, q_pos, acc=None, step=0):
        self.layer, self.q, self.k, self.v, self.pos, self.q_pos = layer, q, k, v, pos, q_pos
        self.acc, self.step = acc, step
        self._mass = {}

    def mass(self, last=None):
        """attention_mass of this call's last `last` queries (all when None), computed once."""
        if last not in self._mass:
            if self.q is None:
                raise ValueError("this scorer reads the queries: the cache got q=None in update()")
            sl = slice(None) if last is None else slice(-last, None)
            self._mass[last] = attention_mass(self.q[:, sl], self.k, self.pos, self.q_pos[sl])
        return self._mass[last]


def top_k(scores, k):
    """Indices of the k best of each row of scores (H', C); ties go to the earlier slot."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]                 # (H', k)


class Scorer:
    """Base: subclasses define `scores(ctx) -> (Hkv, S)`; `pick` keeps the k best candidates.

    needs_history: the cache must keep `ctx.acc` (H2O). config(): a plain dict that
    `scorer_from_config` rebuilds the scorer from (saved with a cache's state)."""
    needs_history = False
    name = "base"

    def scores(self, ctx: ScoreContext):
        raise NotImplementedError

    def rank(self, ctx, cand, shared):
        """Scores of the candidate slots cand (C,): (1, C) summed over heads if shared, else (Hkv, C)."""
        sc = np.asarray(self.scores(ctx), np.float64)[:, cand]               # (Hkv, C)
        return sc.sum(axis=0, keepdims=True) if shared else sc

    def pick(self, ctx, cand, k, shared):
        """The k kept slots among cand (C,): (H', k) slot indices."""
        return cand[top_k(self.rank(ctx, cand, shared), k)]                 # (H', k)

    def config(self):
        return {"name": self.name, **{a: getattr(self, a) for a in self._params}}

    _params = ()


class ExactAttention(Scorer):
    """Accumulated attention from this call's queries (the current block; the last `last` of them
    when given): BMRT's exact strategy, kvpress's observed attention."""
    name, _params = "exact", ("last",)

    def __init__(self, last=None):
        self.last = None if last is None else int(last)

    def scores(self, ctx):
        return ctx.mass(self.last)


class QuestionAware(Scorer):
    """Attention mass from a question's queries (query-aware compression, as kvpress with a
    question): queries {layer: (Hq, Tn, d) after RoPE}, placed after every key (all visible).
    Build them with `question_queries`."""
    name = "question"

    def __init__(self, queries):
        self.queries = queries

    def scores(self, ctx):
        qn = self.queries[ctx.layer]                                         # (Hq, Tn, d)
        q_pos = np.full(qn.shape[1], np.iinfo(np.int64).max)                 # after every key
        return attention_mass(qn, ctx.k, ctx.pos, q_pos)

    def config(self):
        raise ValueError("QuestionAware holds query arrays, not a config: pass scorer= when loading")


def question_queries(model, context_ids, question_ids):
    """{layer: (Hq, Tn, d)} queries of question_ids read after context_ids, from one dense pass."""
    steps = {}
    model.forward(list(context_ids) + list(question_ids), trace=steps)
    Tn = len(question_ids)
    return {l: steps[f"blk.{l}.q"][:, -Tn:] for l in range(model.config.n_layers)}


class SnapKV(Scorer):
    """SnapKV: attention of the last `window` queries (the observation window), smoothed along
    the keys by average pooling of width `kernel` (SnapKV's default avgpool, kernel 5) so a kept
    token brings its neighbours' evidence.

    protect=True is the paper's (and kvpress's SnapKVPress's) rule: the last `window` keys (the
    observation window itself) are always kept (score +inf) and the pooling runs over the keys
    before them only, zero-padded at both ends. protect=False (the default here) scores every key,
    the window's by their own attention, pooling across the boundary. PyramidKV and Ada-KV
    (budgets.py) use protect=True.

    >>> q = np.zeros((1, 4, 2)); k = np.zeros((1, 4, 2))
    >>> SnapKV(window=2, kernel=1, protect=True).scores(ScoreContext(0, q, k, k, np.arange(4)[None], np.arange(4))).tolist()
    [[0.5833333333333333, 0.5833333333333333, inf, inf]]
    """
    name, _params = "snapkv", ("window", "kernel", "protect")

    def __init__(self, window=16, kernel=5, protect=False):
        self.window, self.kernel, self.protect = int(window), int(kernel), bool(protect)

    def scores(self, ctx):
        m = ctx.mass(min(self.window, ctx.q.shape[1]))                      # (Hkv, S)
        S = m.shape[1]
        w = min(self.window, S) if self.protect else 0      # keys always kept, not pooled
        m = m[:, :S - w]                                                     # (Hkv, S - w)
        if self.kernel > 1 and m.shape[1]:
            box = np.ones(self.kernel) / self.kernel
            c = self.kernel // 2            # centred box, zeros outside (avg_pool1d's padding)
            m = np.stack([np.convolve(row, box)[c:c + len(row)] for row in m])  # (Hkv, S - w)
        return np.concatenate([m, np.full((m.shape[0], w), np.inf)], axis=1)  # (Hkv, S)


class H2O(Scorer):
    """Heavy hitters: attention accumulated over all past queries (the cache keeps the sum per held
    key in ctx.acc, added to at every call). Old keys have had more queries: H2O's known bias,
    which is why its budget keeps a recent window too."""
    name, needs_history = "h2o", True

    def scores(self, ctx):
        return ctx.acc


class TOVA(Scorer):
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): a key's score is the attention
    the newest query gives it, averaged over every query head of the layer (one keep set per
    layer, as TOVA and kvpress's TOVAPress); the newest key itself is always kept.

    >>> q = np.zeros((2, 3, 4)); k = np.zeros((1, 3, 4))
    >>> TOVA().scores(ScoreContext(0, q, k, k, np.arange(3)[None], np.arange(3))).tolist()
    [[0.6666666666666666, 0.6666666666666666, inf]]
    """
    name = "tova"

    def scores(self, ctx):
        Hkv, S = ctx.k.shape[:2]
        m = ctx.mass(1)                                                      # (Hkv, S)
        # every KV head gets the all-heads total: TOVA averages the heads, so per-head keep sets
        # coincide with the shared one (the average's 1/Hq does not change the ranking)
        out = np.broadcast_to(m.sum(axis=0), (Hkv, S)).copy()                # (Hkv, S)
        out[:, -1] = np.inf                                                  # the newest token
        return out


class KNorm(Scorer):
    """KNorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): keys of LOW L2 norm draw high attention, so the score is -||k|| (kvpress's
    KnormPress). Reads no query: the cheapest scorer.

    >>> k = np.array([[[3.0, 4.0], [0.0, 1.0]]])
    >>> KNorm().scores(ScoreContext(0, None, k, k, np.arange(2)[None], np.arange(2))).tolist()
    [[-5.0, -1.0]]
    """
    name = "knorm"

    def scores(self, ctx):
        return -np.linalg.norm(np.asarray(ctx.k, np.float64), axis=-1)      # (Hkv, S)


class KeyDiff(Scorer):
    """KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction"): keep the keys
    least like the others: score = -cos(k_j, a), a the mean of the unit-normalised keys of its
    head (kvpress's KeyDiffPress). Reads no query.

    >>> k = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    >>> KeyDiff().scores(ScoreContext(0, None, k, k, np.arange(3)[None], np.arange(3))).round(3).tolist()
    [[-0.894, -0.894, -0.447]]
    """
    name = "keydiff"

    def scores(self, ctx):
        k = np.asarray(ctx.k, np.float64)                                    # (Hkv, S, d)
        unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
        anchor = unit.mean(axis=1, keepdims=True)                            # (Hkv, 1, d)
        anchor /= np.maximum(np.linalg.norm(anchor, axis=-1, keepdims=True), 1e-12)
        return -(unit * anchor).sum(axis=-1)                                 # (Hkv, S)


class ExpectedAttention(Scorer):
    """Expected Attention (Devoto et al. 2025; kvpress's ExpectedAttentionPress): future queries
    q ~ N(mu, Sigma), so a key's expected unnormalised weight is E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) +
    k^T Sigma k / (2d)); the score is its softmax over the keys, averaged over the G query heads,
    times ||v|| (the value's contribution); the first `sinks` keys are always kept and left out
    of the softmax.

    mu, Sigma (per query head) are the mean and covariance of this call's queries after the first
    `sinks` (as kvpress), but AFTER RoPE at their own positions: kvpress takes them before RoPE and
    rotates them by the mean RoPE rotation of the next 512 positions, which needs the model's
    rotary table; a scorer here reads only the cache's post-RoPE queries.
    """
    name, _params = "expected", ("sinks",)

    def __init__(self, sinks=4):
        self.sinks = int(sinks)

    def scores(self, ctx):
        if ctx.q is None:
            raise ValueError("ExpectedAttention reads the queries: the cache got q=None in update()")
        q = np.asarray(ctx.q, np.float64)                                    # (Hq, T, d)
        k = np.asarray(ctx.k, np.float64)                                    # (Hkv, S, d)
        Hq, T, d = q.shape
        Hkv, S, _ = k.shape
        qs = q[:, self.sinks:] if T > self.sinks else q                      # (Hq, T', d)
        mu = qs.mean(axis=1)                                                 # (Hq, d)
        c = qs - mu[:, None]
        cov = np.einsum("hti,htj->hij", c, c) / qs.shape[1]                  # (Hq, d, d)
        n0 = min(self.sinks, S)                    # sinks are kept, not scored (as kvpress)
        out = np.full((Hkv, S), np.inf)
        if n0 == S:
            return out
        kh = np.repeat(k[:, n0:], Hq // Hkv, axis=0)                         # (Hq, S', d)
        logit = (np.einsum("hd,hsd->hs", mu, kh) / np.sqrt(d)
                 + np.einsum("hsi,hij,hsj->hs", kh, cov, kh) / (2 * d))    # (Hq, S')
        p = np.exp(logit - logit.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)                                    # softmax over keys
        out[:, n0:] = p.reshape(Hkv, Hq // Hkv, S - n0).mean(axis=1)          # (Hkv, S')
        out[:, n0:] *= np.linalg.norm(np.asarray(ctx.v, np.float64)[:, n0:], axis=-1)   # ||v_j||
        return out


class LSHFrequency(Scorer):
    """BMRT's LSH frequency rank: a key's score is how many (query of this call, table) pairs
    collide with it under SimHash (n_bits seeded planes per table, n_tables tables), causally.
    Uses minisparse.attention.lsh (centred keys, planes from `seed`)."""
    name, _params = "lsh", ("n_bits", "n_tables", "seed")

    def __init__(self, n_bits=8, n_tables=32, seed=0):
        self.n_bits, self.n_tables, self.seed = int(n_bits), int(n_tables), int(seed)

    def scores(self, ctx):
        from ..attention.lsh import LSH
        Hq, T, _ = ctx.q.shape
        Hkv, S, _ = ctx.k.shape
        q = np.ascontiguousarray(ctx.q, np.float32)
        k = np.ascontiguousarray(ctx.k, np.float32)
        # slot-wise max position: exact for causality (see SlotCache)
        counts, _ = LSH(self.n_bits, self.n_tables, self.seed, k=1).collisions(   # k: unused here
            q, k, np.asarray(ctx.q_pos, np.int64), ctx.pos.max(axis=0))     # (Hq*T, S)
        counts = np.where(np.isfinite(counts), counts, 0.0)                 # -inf: not causal
        return counts.reshape(Hkv, -1, S).sum(axis=1)                        # (Hkv, S)


class RandomKeep(Scorer):
    """Uniform random scores: the baseline every scorer must beat. Seeded by (seed, layer, step)."""
    name, _params = "random", ("seed",)

    def __init__(self, seed=0):
        self.seed = int(seed)

    def scores(self, ctx):
        rng = np.random.default_rng([self.seed, ctx.layer, ctx.step])
        return rng.random(ctx.k.shape[:2])                                   # (Hkv, S)


class Hybrid(Scorer):
    """round(ratio * k) slots by `primary`, the rest by `secondary` among those not yet picked
    (LASER-KV: exact + LSH at ratio 0.75). The two sets are disjoint by construction."""
    name = "hybrid"

    def __init__(self, primary, secondary, ratio=0.75):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"Hybrid: ratio must be in [0, 1], got {ratio}")
        self.primary, self.secondary, self.ratio = primary, secondary, float(ratio)
        self.needs_history = primary.needs_history or secondary.needs_history

    def split(self, ctx, cand, k, shared):
        """(first (H', k1), second (H', k - k1)) slot indices, k1 = round(ratio * k)."""
        k1 = int(round(self.ratio * k))
        r1 = self.primary.rank(ctx, cand, shared)                            # (H', C)
        a = top_k(r1, k1)                                                    # (H', k1) into cand
        r2 = self.secondary.rank(ctx, cand, shared).copy()
        np.put_along_axis(r2, a, -np.inf, axis=1)                           # taken by primary
        b = top_k(r2, k - k1)                                                # (H', k - k1)
        return cand[a], cand[b]

    def pick(self, ctx, cand, k, shared):
        a, b = self.split(ctx, cand, k, shared)
        return np.concatenate([a, b], axis=1)                                # (H', k)

    def config(self):
        return {"name": "hybrid", "primary": self.primary.config(),
                "secondary": self.secondary.config(), "ratio": self.ratio}


SCORERS = {"exact": ExactAttention, "snapkv": SnapKV, "h2o": H2O, "lsh": LSHFrequency,
           "random": RandomKeep, "tova": TOVA, "knorm": KNorm, "keydiff": KeyDiff,
           "expected": ExpectedAttention}
"""Scorer names as the cache spec writes them (`press=0.5/tova`, `recursive=B512/knorm`), each
built with its defaults; also the names `scorer_from_config` reads back."""


def scorer_from_config(cfg: dict) -> Scorer:
    """Rebuild a scorer from `Scorer.config()` (how a saved cache records its scorer)."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name == "hybrid":
        return Hybrid(scorer_from_config(cfg["primary"]), scorer_from_config(cfg["secondary"]),
                      cfg["ratio"])
    if name not in SCORERS:
        raise ValueError(f"scorer config: name {name!r} is not one of {sorted(SCORERS) + ['hybrid']}")
    return SCORERS[name](**cfg)
