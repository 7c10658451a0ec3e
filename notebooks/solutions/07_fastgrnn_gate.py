"""Notebook 07's exercise: a budgeted selector in the spirit of the gate. Each query reads the
`keep` causal keys of highest salience (here the key's norm, summed over KV heads, standing in
for the gate's score) and its `recent` newest causal keys.

The starter concatenated the two lists and declared the Selection normalised, so a key both salient
and recent was read twice (`kernel_equals_reference` or `density_equals_keys_read` fails). The fix
merges them with np.union1d: sorted, each key once.
"""
import numpy as np

from minisparse.attention import Selection, Selector

NAME = "Budgeted"


class Budgeted(Selector):
    def __init__(self, keep=2, recent=2):
        self.keep, self.recent = keep, recent

    def _select(self, q, k, q_pos, k_pos):
        sal = np.sqrt((k.astype(np.float64) ** 2).sum(-1)).sum(0)    # (Tk,) one score per key
        rows = []
        for p in q_pos:
            causal = np.flatnonzero(k_pos <= p)                      # oldest first
            top = causal[np.argsort(-sal[causal], kind="stable")[:self.keep]]
            rows.append(np.union1d(top, causal[-self.recent:]))      # sorted, each key once
        ptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return Selection.from_lists(ptr, idx, k.shape[1], tq=len(q_pos), normalized=True)

    def describe(self):
        return f"budgeted={self.keep}+{self.recent}"


SOLUTION = Budgeted
