"""Notebook 03's exercise: top-k of the last window. Each query reads the `top` keys with the
highest score q·k among the `window` keys ending at its own position.

The starter measured the window as d < window only, so future keys (d < 0) competed for the top
slots and the kernel's causality then dropped them: a later key could take a slot from an earlier
one (`later_keys_change_nothing` fails). The fix keeps the future out of the ranking: d >= 0.
"""
import numpy as np

NAME = "topk_in_window"


def topk_in_window(q, k, q_pos, k_pos, top=2, window=6):
    g = q.shape[0] // k.shape[0]                                     # query heads per KV head
    kk = np.repeat(k, g, axis=0).astype(np.float64)                  # (Hq, Tk, d)
    # elementwise product and sum, not a matmul: a row's scores must not depend on Tq
    s = (q.astype(np.float64)[:, :, None, :] * kk[:, None, :, :]).sum(-1)   # (Hq, Tq, Tk)
    d = q_pos[:, None] - k_pos[None, :]                              # (Tq, Tk) distance back
    ok = (d >= 0) & (d < window)
    s = np.where(ok[None], s, -np.inf)
    best = np.argsort(-s, axis=-1, kind="stable")[..., :top]        # ties: the older key
    mask = np.zeros(s.shape, bool)
    np.put_along_axis(mask, best, True, axis=-1)
    return mask & ok[None]


SOLUTION = topk_in_window
