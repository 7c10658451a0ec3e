"""Error bounds of the attention kernel against the float64 reference, derived once, here.

Every test comparing `attend` with `dense_reference` uses `kernel_tol`; a test that adds a step
(a merge, a tile order, float16 storage) adds that step's own term beside its assertion.
Follows the standard floating-point model |fl(a op b) - a op b| <= u |a op b| with u = 2^-24
(float32), and |fl(sum of n terms) - sum| <= n u sum |terms| in any order (Higham, ch. 3).
"""
import numpy as np

from ..fast.attention import CHUNK

U = 2.0**-24                          # float32 unit roundoff

# Relative error of the kernel's output as a convex combination of the values, with the logits
# taken as exact: exp (<= 3u per weight: the decode kernel's float32 _expf is within 1.5 ulp;
# 6u after renormalising), the float32 sums of a chunk of CHUNK keys (numerator and normaliser,
# 2 * CHUNK * u), the final cast to float32 (u).
KERNEL_REL = (2 * CHUNK + 7) * U


def logit_err(q, k, logw=None):
    """Bound e on the float32 error of one logit s - max (derivation in kernel_tol)."""
    d = q.shape[-1]
    terms = d + 3
    e_logw = 0.0
    if logw is not None and np.size(logw):
        w = np.abs(np.asarray(logw, np.float64))
        w = w[np.isfinite(w)]
        if w.size and w.max() > 0:
            terms += 1
            e_logw = 3 * U * w.max()
    return terms * d * U * np.abs(q).max() * np.abs(k).max() / np.sqrt(d) + e_logw


def kernel_tol(q, k, v, logw=None):
    """Bound on max |attend(q, k, v, sel) - dense_reference(..., mask, logw)| per element.

    q (Hq, Tq, d), k, v (Hkv, Tk, d); logw: the selection's log-weights (any shape; None or
    all zero when the selector reads real keys with weight 1). Derivation, per element:
    - a logit s = fl(q . k) * scale [+ logw], then s - max: the d-term dot and the scale multiply
      err by <= (d + 1) u sum_i |q_i k_i| / sqrt(d), the max subtraction (|s - m| <= 2 max|s|)
      by 2u max|s|; with log-weights the add errs by u (|s| + |logw|) and the subtraction's
      2 max|s| grows by 2 max|logw|. With sum_i |q_i k_i| <= d max|q| max|k|:
          e <= (d + 3 [+ 1]) d u max|q| max|k| / sqrt(d)  [+ 3 u max|logw|];
      a logit error e scales every softmax weight by at most e^(2e) after renormalisation, so
      the output, a convex combination of the v_j, moves by <= (e^(2e) - 1) max|v|;
    - KERNEL_REL max|v| for exp, the chunk sums and the cast (chunks fold into float64: < 1e-12).

    >>> import numpy as np
    >>> x = np.ones((1, 2, 4), np.float32)
    >>> bool(0 < kernel_tol(x, x, x) < 1e-5)
    True
    """
    e = logit_err(q, k, logw)
    return (np.expm1(2 * e) + KERNEL_REL) * np.abs(v).max() + 1e-12


def lse_tol(q, k, logw=None):
    """Bound on |kernel lse - float64 reference lse| per row: lse = max + log(sum of weights);
    every logit moves by <= e (logit_err), so the lse by <= e; the normaliser's relative float32
    error (exp and chunk sums, within KERNEL_REL) moves its log by <= KERNEL_REL (log(1 + x) <= x).
    """
    return logit_err(q, k, logw) + KERNEL_REL + 1e-12
