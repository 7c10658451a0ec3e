# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 9 · Test your own variant in 20 lines
#
# `minisparse.testing` is the property-test kit the project runs on every one of its own selectors,
# made public so that a new attention variant is held to the same rules in one call
# (`docs/testing.md` has the full list). `check_selector(obj)` draws small attention problems with
# Hypothesis (GQA ratios, head widths, positions with gaps, lengths that are no block multiple,
# float16 keys, extreme logits), runs every invariant against a float64 dense reference, and raises
# `AssertionError` with the shrunk counterexample; `report(obj)` prints the same instead of raising.
#
# In this notebook: a dilated window with a planted bug, the counterexample the kit prints for it,
# the fix, and the same check on a plain mask function.

# %% [markdown]
# ## 1. A dilated window with a planted bug
#
# Each query reads `n` keys, every `step`-th one back from the query's own key. The bug: it counts
# back from the query's *row* in this call instead of from the query's own key. A prefill cannot
# tell the two apart (row t is key t); a decode step can (its one row is row 0).

# %%
import numpy as np

from minisparse.attention import Selection, Selector
from minisparse.testing import report


class Dilated(Selector):
    """n keys, every `step`-th one back from the query's own key: a dilated window."""
    def __init__(self, n=4, step=2):
        self.n, self.step = n, step

    def _select(self, q, k, q_pos, k_pos):
        i = np.arange(len(q_pos))             # BUG: the query's row, not its key's index
        back = i[:, None] - self.step * np.arange(self.n)[None, :]     # (Tq, n) key indices
        ok = back >= 0
        ptr = np.concatenate([[0], np.cumsum(ok.sum(1))])              # CSR row offsets
        return Selection.from_lists(ptr, back[ok], k.shape[1], tq=len(q_pos))

    def describe(self):
        return f"dilated={self.n}/{self.step}"


passed = report(Dilated(), max_examples=25)

# %% [markdown]
# ## 2. Reading the counterexample
#
# The kit names the invariant that failed (`decode_equals_prefill`) and the smallest problem
# Hypothesis found: a `make_problem(...)` call that rebuilds it, ready to paste into a test. Here
# two keys suffice: as a decode step, query 1 is row 0 of its call, so it reads key 0 instead of
# key 1. Rebuild the problem and look at what each path selects:

# %%
from minisparse.testing import make_problem

p = make_problem(seed=0, hq=1, hkv=1, tq=2, k_pos=[0, 1], d=4)
prefill = Dilated().select(p.q, p.k, p.q_pos, p.k_pos)
decode = Dilated().select(p.q[:, 1:], p.k, p.q_pos[1:], p.k_pos)
print("prefill, query 1 reads", prefill.rows(0, 1)[1])
print("decode,  query 1 reads", decode.rows(0, 0)[1])

# %% [markdown]
# ## 3. The fix
#
# Count back from the query's own key: the index of the last key at or before its position.

# %%
class DilatedFixed(Dilated):
    def _select(self, q, k, q_pos, k_pos):
        i = np.searchsorted(k_pos, q_pos, side="right") - 1            # the query's own key
        back = i[:, None] - self.step * np.arange(self.n)[None, :]     # (Tq, n) key indices
        ok = back >= 0
        ptr = np.concatenate([[0], np.cumsum(ok.sum(1))])              # CSR row offsets
        return Selection.from_lists(ptr, back[ok], k.shape[1], tq=len(q_pos))


passed = report(DilatedFixed(), max_examples=25)

# %% [markdown]
# ## 4. A mask function works the same way
#
# A plain function `fn(q, k, q_pos, k_pos) -> bool (Hq, Tq, Tk)`, like a FlexAttention `mask_mod`
# that may read q and k, is wrapped for you. This one has the other classic bug: each query reads
# the causal key most like the *newest* key of the call, so a future key steers what earlier rows
# read (the kernel's causality cannot stop that); `later_keys_change_nothing` catches it.

# %%
def most_like_newest(q, k, q_pos, k_pos):
    sim = (k[0] @ k[0, -1]).astype(np.float64)                         # (Tk,) reads the newest key
    causal = k_pos[None, :] <= q_pos[:, None]                            # (Tq, Tk)
    best = np.where(causal, sim[None, :], -np.inf).argmax(-1)           # (Tq,)
    return np.arange(len(k_pos))[None, :] == best[:, None]


passed = report(most_like_newest, max_examples=25)

# %% [markdown]
# ## Exercises
#
# 1. **The third bug.** Write a selector whose `Selection` reads key 0 twice (by a range over every
#    key and again by index, with `normalized=True`). Which invariants does the kit report?
# 2. **Fix the mask.** Make `most_like_newest` compare with the query's own key instead of the
#    newest key of the call, and run the check until it passes.
# 3. **Your variant.** Notebooks 03-07 each end with an exercise checked the same way; their
#    solutions are in `notebooks/solutions/`.
