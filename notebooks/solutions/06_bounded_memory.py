"""Notebook 06's exercise: TOVA's keep rule as a mask. Each query reads the keys whose attention
weight is within a factor e^margin of its heaviest key's: score >= max score - margin.

The starter took the max over every key of the call; a future key with a high score raised the
bar and removed keys from earlier rows (`later_keys_change_nothing` fails). The fix takes the max
over the query's causal keys.
"""
import numpy as np

NAME = "tova_keep"


def tova_keep(q, k, q_pos, k_pos, margin=2.0):
    g = q.shape[0] // k.shape[0]
    kk = np.repeat(k, g, axis=0).astype(np.float64)                  # (Hq, Tk, d)
    s = (q.astype(np.float64)[:, :, None, :] * kk[:, None, :, :]).sum(-1) / np.sqrt(q.shape[-1])
    causal = (k_pos[None, :] <= q_pos[:, None])[None]                # (1, Tq, Tk)
    top = np.where(causal, s, -np.inf).max(-1, keepdims=True)        # (Hq, Tq, 1)
    return causal & (s >= top - margin)


SOLUTION = tova_keep
