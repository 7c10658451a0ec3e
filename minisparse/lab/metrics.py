"""Quality metrics of a sparse variant against dense attention: per layer (realised density,
attention-mass recall, relative output error) and at the output (perplexity ratio, KL, greedy
agreement), all over the same analysis positions.

Leaves out running the model (runner.py) and choosing positions. Definitions follow the usual
ones in the sparse-attention literature (mass recall as in Quest / MagicPIG's analyses; the
output error ||o_S - o|| / ||o|| per query row as in Loki/HashAttention); every value is computed
in float64 from float32 inputs.

Shape legend: Hq / Hkv query / KV heads, A analysis rows (queries), Tk keys, d head width, V vocab.
"""
from __future__ import annotations

import numpy as np


def summary(x) -> dict:
    """{"mean", "std", "min", "max"} of a float array (empty -> NaNs), as plain floats."""
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def realised_density(n_attended, q_pos):
    """Keys read / keys in the causal past: n_attended (Hq, T) over (q_pos + 1) (T,) -> (Hq, T).

    The denominator is the full causal context (positions start at 0), not what a bounded cache
    still holds, so a cache that evicted keys is charged for it.

    >>> realised_density(np.array([[1, 2, 2]]), np.arange(3)).tolist()
    [[1.0, 1.0, 0.6666666666666666]]
    """
    return np.asarray(n_attended, np.float64) / (np.asarray(q_pos, np.float64) + 1.0)[None, :]


def dense_probs(q, k, q_pos, k_pos):
    """Dense causal softmax probabilities, float64: q (Hq, A, d), k (Hkv, Tk, d) -> (Hq, A, Tk).

    >>> p = dense_probs(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.arange(2), np.arange(2))
    >>> p.tolist()
    [[[1.0, 0.0], [0.5, 0.5]]]
    """
    Hq, A, d = q.shape
    Hkv = k.shape[0]
    # one float64 matrix product per KV head for its G query heads (BLAS, where einsum loops),
    # then the softmax in place: at 4k keys the (Hq, A, Tk) array is 75 MB, each pass counts
    qg = np.asarray(q, np.float64).reshape(Hkv, (Hq // Hkv) * A, d)          # (Hkv, G*A, d)
    kk = np.asarray(k, np.float64)                                            # (Hkv, Tk, d)
    s = (qg @ kk.transpose(0, 2, 1)).reshape(Hq, A, -1)                      # (Hq, A, Tk)
    s *= 1 / np.sqrt(d)
    hidden = np.asarray(k_pos)[None, None, :] > np.asarray(q_pos)[None, :, None]  # (1, A, Tk)
    np.copyto(s, -np.inf, where=hidden)
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)                                                          # (Hq, A, Tk)
    s /= s.sum(-1, keepdims=True)
    return s


def mass_recall(p, mask):
    """Share of the dense mass p (Hq, A, Tk) on the selected keys mask (Hq or 1, A, Tk) -> (Hq, A).

    >>> mass_recall(np.array([[[0.25, 0.75]]]), np.array([[[False, True]]])).tolist()
    [[0.75]]
    """
    return (p * mask).sum(-1)


def rel_error(o_s, o):
    """||o_S - o|| / ||o|| per row: o_s, o (Hq, A, d) -> (Hq, A); a zero dense row gives 0 / 0 -> 0
    when o_S is zero too, inf otherwise.

    >>> rel_error(np.array([[[3.0, 4.0]]]), np.array([[[3.0, 0.0]]])).tolist()
    [[1.3333333333333333]]
    """
    o_s, o = np.asarray(o_s, np.float64), np.asarray(o, np.float64)
    num = np.linalg.norm(o_s - o, axis=-1)                                    # (Hq, A)
    den = np.linalg.norm(o, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def log_softmax(logits):
    """logits (A, V) -> log-probabilities (A, V) float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def lm_metrics(logp_dense, logp, targets) -> dict:
    """Output-level comparison over A positions: logp_dense, logp (A, V) log-probabilities of the
    next token, targets (A,) the true next tokens.

    Returns nll / perplexity of the variant, ppl_ratio = ppl / ppl_dense, kl = mean over positions
    of KL(p_dense || p_variant) in nats, agreement = share of positions whose greedy (argmax)
    token equals dense's, nll_dense. Identical inputs give ratio 1, KL 0, agreement 1 exactly.

    >>> lp = log_softmax(np.array([[0.0, 1.0], [2.0, 0.0]]))
    >>> m = lm_metrics(lp, lp, np.array([1, 0]))
    >>> (m["ppl_ratio"], m["kl"], m["agreement"])
    (1.0, 0.0, 1.0)
    """
    t = np.asarray(targets, np.int64)
    rows = np.arange(t.size)
    nll_d = float(-logp_dense[rows, t].mean())
    nll = float(-logp[rows, t].mean())
    pd = np.exp(logp_dense)                                                   # (A, V)
    kl = (pd * (logp_dense - logp)).sum(-1)                                   # (A,)
    agree = np.argmax(logp_dense, -1) == np.argmax(logp, -1)                 # (A,)
    return {"nll": nll, "nll_dense": nll_d, "ppl": float(np.exp(nll)), "ppl_dense": float(np.exp(nll_d)),
            "ppl_ratio": float(np.exp(nll - nll_d)), "kl": float(kl.mean()), "kl_max": float(kl.max()),
            "agreement": float(agree.mean())}
