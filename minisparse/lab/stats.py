"""Intervals for the lab's figures: Wilson score intervals for accuracies, seeded (block) bootstrap
intervals for ratios such as perplexity sparse / dense over the same tokens.

Leaves out hypothesis tests and multiple-comparison corrections: the tables report intervals and
sample counts and let the reader compare. Wilson follows Wilson (1927) / Brown, Cai & DasGupta
(2001), who recommend it over the normal interval for small n; the bootstrap is Efron's percentile
bootstrap, over blocks of consecutive tokens when the values are correlated (Kunsch 1989).
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054   # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for k successes in n trials; (0, 1) when n = 0 (no data).

    >>> [round(x, 3) for x in wilson(8, 10)]
    [0.49, 0.943]
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(correct) -> dict:
    """{n, k, acc, lo, hi} for a sequence of booleans: the accuracy with its Wilson 95% interval.

    >>> accuracy([True, True, False, True])["k"]
    3
    """
    c = np.asarray(list(correct), dtype=bool)
    n, k = int(c.size), int(c.sum())
    lo, hi = wilson(k, n)
    return {"n": n, "k": k, "acc": k / n if n else float("nan"), "lo": lo, "hi": hi}


def _block_indices(rng, n: int, block: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) indices: each row is ceil(n / block) blocks of `block` consecutive indices with
    random starts (the moving-block bootstrap), cut to n."""
    if block <= 1:
        return rng.integers(0, n, size=(n_boot, n))
    n_blocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=(n_boot, n_blocks))            # (B, nb)
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(n_boot, -1)
    return idx[:, :n]


def bootstrap_ratio(num, den, n_boot: int = 2000, seed: int = 0, block: int = 1,
                    level: float = 0.95) -> dict:
    """The ratio of means mean(num) / mean(den) of paired samples, with a seeded percentile
    bootstrap interval: pairs are resampled together (block > 1: blocks of consecutive pairs).

    Returns {ratio, lo, hi, n, n_boot, n_undefined, seed, block}.

    >>> r = bootstrap_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], n_boot=100)
    >>> (r["ratio"], r["lo"], r["hi"])
    (2.0, 2.0, 2.0)
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError(f"bootstrap_ratio: need two 1-D arrays of the same non-zero length, got "
                         f"{num.shape} and {den.shape}")
    if block > num.size:
        raise ValueError(f"bootstrap_ratio: block={block} is longer than the {num.size} samples")
    rng = np.random.default_rng(seed)
    idx = _block_indices(rng, num.size, block, n_boot)                        # (B, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = num[idx].mean(axis=1) / den[idx].mean(axis=1)                # (B,)
        ratio = num.mean() / den.mean()
    # a resample whose denominator is 0 has no ratio: it is left out and counted, so a reader
    # sees how often (a dense baseline that is rarely right makes the ratio unstable)
    ok = np.isfinite(boots)
    a = (1 - level) / 2
    lo, hi = np.quantile(boots[ok], [a, 1 - a]) if ok.any() else (float("nan"), float("nan"))
    return {"ratio": float(ratio), "lo": float(lo), "hi": float(hi), "n": int(num.size),
            "n_boot": int(n_boot), "n_undefined": int((~ok).sum()), "seed": int(seed), "block": int(block)}


def bootstrap_diff(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The paired difference of means mean(a - b) (e.g. two variants' correctness on the same
    examples), with a seeded percentile bootstrap interval over the pairs. Unlike a ratio it is
    defined when b is never right.

    Returns {diff, lo, hi, n, n_boot, seed}.

    >>> r = bootstrap_diff([1, 1, 0, 1], [0, 1, 0, 1], n_boot=200)
    >>> r["diff"], r["lo"] >= 0.0, r["hi"] <= 0.75
    (0.25, True, True)
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"bootstrap_diff: need two 1-D arrays of the same non-zero length, got "
                         f"{a.shape} and {b.shape}")
    d = a - b                                                                 # (n,)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))   # (B, n)
    boots = d[idx].mean(axis=1)                                               # (B,)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size),
            "n_boot": int(n_boot), "seed": int(seed)}


def perplexity_ratio(nll_sparse, nll_dense, n_boot: int = 2000, seed: int = 0, block: int = 64,
                     level: float = 0.95) -> dict:
    """Perplexity of a variant over perplexity of dense on the same tokens, exp(mean(nll_s - nll_d)),
    with a moving-block bootstrap interval (neighbouring tokens' losses are correlated, so single
    tokens would give too narrow an interval). nll_*: (N,) negative log-likelihoods in nats.

    Returns {ratio, lo, hi, ppl_sparse, ppl_dense, n, n_boot, seed, block}.
    """
    s, d = np.asarray(nll_sparse, dtype=np.float64), np.asarray(nll_dense, dtype=np.float64)
    if s.shape != d.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"perplexity_ratio: need two 1-D arrays of the same non-zero length, got "
                         f"{s.shape} and {d.shape}")
    block = min(block, s.size)
    rng = np.random.default_rng(seed)
    idx = _block_indices(rng, s.size, block, n_boot)                          # (B, N)
    diff = s - d                                                              # (N,)
    boots = np.exp(diff[idx].mean(axis=1))                                    # (B,)
    a = (1 - level) / 2
    lo, hi = np.quantile(boots, [a, 1 - a])
    return {"ratio": float(np.exp(diff.mean())), "lo": float(lo), "hi": float(hi),
            "ppl_sparse": float(np.exp(s.mean())), "ppl_dense": float(np.exp(d.mean())),
            "n": int(s.size), "n_boot": int(n_boot), "seed": int(seed), "block": int(block)}


def wilson_coverage(n: int, p: float, z: float = Z95) -> float:
    """The exact coverage of the Wilson interval at (n, p): the binomial probability of the k
    whose interval holds p (a check of the interval, and the tests' reference)."""
    return float(sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k)
                     for k in range(n + 1) if wilson(k, n, z)[0] <= p <= wilson(k, n, z)[1]))
