"""Notebook 05's exercise: a dilated window. Each query reads `n` keys, every `step`-th position
back from its own: distances 0, step, 2*step, ...

The starter counted back from the newest key of the call (right for one decode step, where the
newest key is the query; wrong for a prefill, where every row got the last row's keys:
`decode_equals_prefill` fails). The fix counts back from each query's own position.
"""
import numpy as np

NAME = "dilated_window"


def dilated_window(q, k, q_pos, k_pos, n=3, step=2):
    d = q_pos[:, None] - k_pos[None, :]                              # (Tq, Tk) distance back
    return (d >= 0) & (d % step == 0) & (d < n * step)


SOLUTION = dilated_window
