"""Float64 dense attention in plain NumPy: the ground truth every kernel path is tested against.

Leaves out speed (it materialises the (Hq, Tq, Tk) score tensor) and pseudo-keys (landmarks are
tested through their own closed form). Causal by position, GQA by repeating K/V heads.
"""
import numpy as np


def dense_reference(q, k, v, q_pos=None, k_pos=None, mask=None, logw=None, scale=None,
                    return_lse=False):
    """softmax(q k^T * scale + logw) v over keys allowed by causality and `mask`, in float64.

    q (Hq, Tq, d), k, v (Hkv, Tk, d); mask (Hq or 1, Tq, Tk) bool of selected keys (None = all);
    logw (Hq or 1, Tq, Tk) additive log-weights. Returns out (Hq, Tq, d) float64
    [, lse (Hq, Tq) float64]; a row with no allowed key gives out 0, lse -inf.

    >>> import numpy as np
    >>> x = np.ones((1, 2, 2))
    >>> dense_reference(x, x, x).tolist()
    [[[1.0, 1.0], [1.0, 1.0]]]
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    Hq, Tq, d = q.shape
    Hkv, Tk, _ = k.shape
    k_pos = np.arange(Tk) if k_pos is None else np.asarray(k_pos, np.int64)
    q_pos = np.arange(Tk - Tq, Tk) if q_pos is None else np.asarray(q_pos, np.int64)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kk = np.repeat(k, Hq // Hkv, axis=0)                         # (Hq, Tk, d)
    vv = np.repeat(v, Hq // Hkv, axis=0)                         # (Hq, Tk, d)
    s = np.einsum("htd,hsd->hts", q, kk) * scale                 # (Hq, Tq, Tk)
    if logw is not None:
        s = s + np.asarray(logw, np.float64)
    allowed = k_pos[None, None, :] <= q_pos[None, :, None]       # (1, Tq, Tk)
    if mask is not None:
        allowed = allowed & np.asarray(mask, bool)
    allowed = np.broadcast_to(allowed, s.shape)
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)                            # (Hq, Tq, 1)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(allowed, np.exp(s - m), 0.0)                    # (Hq, Tq, Tk)
    tot = p.sum(-1, keepdims=True)                               # (Hq, Tq, 1)
    out = np.einsum("hts,hsd->htd", p, vv) / np.where(tot > 0, tot, 1.0)
    if not return_lse:
        return out
    lse = np.where(tot[..., 0] > 0, m[..., 0] + np.log(np.where(tot[..., 0] > 0, tot[..., 0], 1)),
                   -np.inf)
    return out, lse
