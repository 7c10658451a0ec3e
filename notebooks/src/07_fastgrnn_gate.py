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
# # 7 · The FastGRNN gate: a tiny RNN that decides what to remember
#
# Top-k and LSH (notebooks 3, 4) choose keys **per query**, so they must look at the query. A gate
# scores each key **once, when it arrives**, from the keys alone: a tiny recurrent network reads
# the keys in order and its hidden-state norm is the key's *salience*. The `Gated` selector then
# lets every query read sinks + a local window + log-stride (notebook 5) **plus** the `budget`
# earlier keys of highest salience. Cost per new key: one RNN step, $O(H(d+H))$, whatever the
# context length.
#
# In this notebook:
#
# 1. the FastGRNN cell and one step by hand;
# 2. the salience of real keys against what the model actually attends to later;
# 3. what the `Gated` selector keeps;
# 4. training a gate (briefly, small) and comparing it with untrained and random gates.

# %%
import copy
import inspect
import sys
from pathlib import Path

import numpy as np
import matplotlib.pyplot as plt

ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "models" / "minisparse-pydoc.gguf").is_file()), None)
if ROOT is None:
    raise FileNotFoundError("run this notebook from the minisparse checkout (notebooks/ beside models/)")
try:
    import minisparse
except ImportError:                                  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    import minisparse
from minisparse.gate.gated import Gated
from minisparse.gate.fastgrnn import FastGRNNGate, RandomGate, attention_maps, future_mass, mass_recall
from minisparse.viz import selection_image

np.set_printoptions(precision=3, suppress=True, linewidth=110)
model = minisparse.load_model(ROOT / "models" / "minisparse-pydoc.gguf")
cfg, tok = model.config, model.tokenizer
d = cfg.head_dim
T = 384
ids = tok.encode(inspect.getsource(copy))[:T]
maps = attention_maps(model, ids)                    # per layer (q, k (Hkv, T, d), p (Hq, T, T))

# %% [markdown]
# ## 1. The cell
#
# The input $x_t$ is the key at position $t$ (after RoPE, as the cache holds it), RMS-normalised so
# one gate serves every layer and head whatever their scale. FastGRNN (Kusupati et al. 2018) is a
# gated RNN with **one** pair of matrices $W$ (H × d) and $U$ (H × H) shared by the gate and the
# update:
#
# $$a_t = W x_t + U h_{t-1},\qquad z_t = \sigma(a_t + b_z),\qquad \tilde h_t = \tanh(a_t + b_h)$$
# $$h_t = z_t \odot h_{t-1} + \big(\sigma(\zeta)(1-z_t) + \sigma(\nu)\big)\odot \tilde h_t,
# \qquad s_t = \lVert h_t\rVert_2$$
#
# $z_t$ near 1 keeps the old state (the key is ignored), near 0 writes the new candidate. The
# salience $s_t$ depends only on keys $\le t$, so it never changes once computed: the gate is causal
# and a decode step costs one cell step. The shipped gate for this model (`models/fastgrnn_gate.npz`)
# was trained by `models/train_gate.py`; its record says how.

# %%
gate = FastGRNNGate.load(name="minisparse-pydoc")
print(gate.label, "| hidden", gate.hidden, "| d", gate.d)
print({k: v for k, v in gate.record.items() if k in ("data", "target", "loss", "optimizer")})
P = gate.params
sig = lambda x: 1 / (1 + np.exp(-x))
print(f"sigma(zeta) = {sig(P['zeta']):.3f}, sigma(nu) = {sig(P['nu']):.3f}")

# one step by hand from h_0 = 0, on the first key of layer 3, KV head 0
k3 = maps[3][1]                                                    # (Hkv, T, d)
x = k3[0, 0].astype(np.float64)
x = x / np.sqrt((x * x).mean() + 1e-6)                             # RMS normalisation
h0 = np.zeros(gate.hidden)
a = P["W"] @ x + P["U"] @ h0
z, h_tilde = sig(a + P["b_z"]), np.tanh(a + P["b_h"])
h1 = z * h0 + (sig(P["zeta"]) * (1 - z) + sig(P["nu"])) * h_tilde
s_engine, _ = gate.salience(k3[:1, :1])                             # (1, 1)
print(f"salience by hand {np.linalg.norm(h1):.6f}, by the engine's Numba scan {s_engine[0, 0]:.6f}")


# %% [markdown]
# ## 2. Salience vs what the model attends to later
#
# The gate was trained to predict, for each key $j$, its **future attention mass**: the mean
# attention it receives from queries beyond the local window ($i > j + 16$), averaged over the
# query heads of its KV head (`future_mass`). Those are the keys the window will not cover, so they
# are exactly the ones the gate must find. Here are salience and target along the text, and their
# rank correlation (Spearman: the correlation of the ranks), for the trained gate, an untrained
# one (random weights) and random keep.

# %%
def ranks(x):
    return np.argsort(np.argsort(x)).astype(float)
def spearman(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(ranks(a[ok]), ranks(b[ok]))[0, 1])

layer = 3
q, k, p = maps[layer]
target = future_mass(p, cfg.n_kv_heads, window=16)                   # (Hkv, T); NaN at the end
gates = {"trained": gate, "untrained (random weights)": FastGRNNGate.random(d, 16, seed=0),
         "random keep": RandomGate(0)}
fig, axes = plt.subplots(len(gates) + 1, 1, figsize=(10, 6.5), sharex=True)
axes[0].plot(target[0], c="k", lw=0.8); axes[0].set_title(f"target: future attention mass, layer {layer}, KV head 0", fontsize=9)
for ax, (name, g) in zip(axes[1:], gates.items()):
    sal, _ = g.salience(k)                                             # (Hkv, T)
    rho = np.mean([spearman(sal[h][4:], target[h][4:]) for h in range(cfg.n_kv_heads)])
    ax.plot(sal[0], lw=0.8); ax.set_title(f"{name}: Spearman with the target {rho:+.2f}", fontsize=9)
axes[-1].set_xlabel("key position"); plt.tight_layout(); plt.show()

# %% [markdown]
# Read the trained gate's high correlation with care: both curves rise along the text. Late keys
# have their future queries close by (and fewer of them), so their mean future mass is larger, and
# a recurrent state can learn "how far along am I". Part of what the gate learned is position; the
# wiggles on top are content.
#
# ## 3. What the gated selector keeps
#
# `Gated(budget, window, sinks)` gives each query the base pattern (sinks, window, log-stride)
# plus, per KV head, the `budget` keys of highest salience among those older than the window.
# Since salience never changes, the top-`budget` over a growing prefix is kept in a min-heap:
# $O(T\log B)$ per call. Dark cells: keys read. The vertical segments are the gate's picks: a key
# enters the heap once it leaves the window (if salient enough) and stays read by every later query
# until `budget` more salient keys have arrived and pushed it out.

# %%
B = 16
sel = Gated(B, window=16, sinks=4, gate=gate).select(q, k, np.arange(T), np.arange(T))
base = Gated(0, window=16, sinks=4, gate=gate).select(q, k, np.arange(T), np.arange(T))
img = selection_image(sel, head=0, hq=cfg.n_heads, hkv=cfg.n_kv_heads)
img_base = selection_image(base, head=0, hq=cfg.n_heads, hkv=cfg.n_kv_heads)
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
axes[0].imshow(img, cmap="Blues", interpolation="nearest"); axes[0].set_title(f"gate={B}/16/4 (KV head 0)")
axes[1].imshow(img - img_base, cmap="Reds", interpolation="nearest"); axes[1].set_title("only the gate's picks")
for ax in axes:
    ax.set_xlabel("key"); ax.set_ylabel("query")
plt.tight_layout(); plt.show()
picked = np.flatnonzero((img - img_base)[-1] > 0)                     # the last query's gate picks
print("gate picks for the last query:", [tok.decode_piece(ids[j]) for j in picked])

# %% [markdown]
# ## 4. Training a gate (briefly)
#
# `models/train_gate.py` builds its data from texts the model samples itself: for every layer and
# KV head, the normalised keys are the inputs and the future-mass shares the targets. The loss is
# listwise (ListNet): the softmax of $s_t\,e^{\alpha}$ over a sequence's keys should match the
# target shares. Gradients come from hand-written backpropagation through time, and Adam updates
# the weights. The shipped gate used 10 texts of 512 tokens and 400 steps; here we use 2 texts of
# 160 tokens and 60 steps so the cell runs in seconds.

# %%
sys.path.insert(0, str(ROOT / "models"))
import train_gate                                                      # the training script's functions

X, Y, M, _ = train_gate.build_set(model, seeds=[0, 1], length=160, window=16, sinks=4)      # (N, T', d), (N, T'), (N, T')
Xv, Yv, Mv, _ = train_gate.build_set(model, seeds=[1000], length=160, window=16, sinks=4)
print(f"{X.shape[0]} training sequences (texts x layers x KV heads), {Xv.shape[0]} held out")
init = FastGRNNGate.random(d, hidden=16, seed=0)
params = {name: np.array(v, np.float64) for name, v in init.params.items()}
params["alpha"] = np.float64(np.log(5.0))                             # listwise temperature
params, hist = train_gate.adam(params, X, Y, M, steps=60, lr=0.02, cell="fastgrnn", log_every=10,
                               Xv=Xv, Yv=Yv, Mv=Mv)
params.pop("alpha")
mine = FastGRNNGate(params, "fastgrnn", trained=True, name="notebook (2 texts, 60 steps)")
hist = np.array(hist)
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(hist[:, 0], hist[:, 1], "o-", label="train"); ax.plot(hist[:, 0], hist[:, 2], "s-", label="held out")
ax.set_xlabel("Adam step"); ax.set_ylabel("ListNet loss"); ax.legend(); plt.show()

# %% [markdown]
# ### Does it help?
#
# The measure is **mass recall** on the `copy` text (which neither gate saw): the share of the dense
# attention mass that falls on the keys the selector reads, averaged over layers, heads and queries
# at positions ≥ 64. Every gate gets the same base (sinks 4, window 16, log-stride) and the same
# budget; "base only" has budget 0; the oracle picks, with hindsight, the budget keys of highest
# true attention.

# %%
rows = {"base only": [mass_recall(maps, Gated(0, 16, 4, gate=RandomGate(0)), 64)] * 2}
contenders = {"random keep": RandomGate(0), "untrained": FastGRNNGate.random(d, 16, seed=0),
              "trained here (60 steps)": mine, "shipped (400 steps)": gate}
for name, g in contenders.items():
    rows[name] = [mass_recall(maps, Gated(b, 16, 4, gate=g), 64) for b in (8, 32)]
rows["oracle"] = [train_gate.oracle_recall(m, 16, 4, b, 64) for b in (8, 32) for m in [maps]]
for name, r in rows.items():
    print(f"{name:24s} recall at budget 8: {r[0]:.4f}   at budget 32: {r[1]:.4f}")
fig, ax = plt.subplots(figsize=(7, 2.8))
names = list(rows)
for i, b in enumerate((8, 32)):
    ax.bar(np.arange(len(names)) + 0.4 * i - 0.2, [rows[n][i] for n in names], 0.4, label=f"budget {b}")
ax.set_xticks(range(len(names)), names, fontsize=7, rotation=15); ax.set_ylabel("mass recall")
ax.set_ylim(min(min(r) for r in rows.values()) - 0.05, 1); ax.legend(fontsize=8); plt.show()

# %% [markdown]
# The gate's gain over random keep is real but modest on this small model, and far from the
# oracle: a gate sees only the keys, never the future queries, so it can only learn which *kinds*
# of keys tend to be needed later. For decoding, `GateCache` runs the cell once per stored key and
# `Gated(...).bind(cache)` reads the stored salience, so a decode step never re-reads the prefix
# (docs/gate.md).
#
# ## Exercises
#
# 1. **Longer training.** Train with 4 texts and 200 steps. Does the held-out loss keep falling?
#    Does the recall on `copy` follow the loss?
# 2. **Which keys are salient?** Over the `copy` text, list the 20 tokens with the highest
#    salience in layer 3 (both KV heads). Are they punctuation, names, keywords? Compare with the
#    tokens of highest `future_mass`.
# 3. **ruvllm's cell.** `FastGRNNGate.random(d, 16, seed=0, cell="ruvllm")` has separate gate and
#    update matrices. Train it the same way (`cell="ruvllm"` in `adam`) and compare recall per
#    parameter count.

# %% [markdown]
# ## Exercise: a budgeted selector, checked by the kit
#
# A gate keeps a budget of salient keys; a small window of recent keys is kept besides. `Budgeted`
# below should let each query read its `keep` causal keys of highest salience (here the key's norm,
# summed over KV heads, standing in for the gate's score) and its `recent` newest causal keys. It is
# a `Selector` subclass returning a `Selection` in CSR form, which declares itself normalised
# (sorted, each key once). As shipped it has a bug: run the check cell, read the counterexample, fix
# the class, and run the check again until it prints "all invariants hold".
# A solution is in `notebooks/solutions/07_fastgrnn_gate.py`.

# %% tags=["exercise"]
import numpy as np

from minisparse.attention import Selection, Selector


class Budgeted(Selector):
    def __init__(self, keep=2, recent=2):
        self.keep, self.recent = keep, recent

    def _select(self, q, k, q_pos, k_pos):
        sal = np.sqrt((k.astype(np.float64) ** 2).sum(-1)).sum(0)    # (Tk,) one score per key
        rows = []
        for p in q_pos:
            causal = np.flatnonzero(k_pos <= p)                      # oldest first
            top = causal[np.argsort(-sal[causal], kind="stable")[:self.keep]]
            rows.append(np.concatenate([top, causal[-self.recent:]]))
        ptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return Selection.from_lists(ptr, idx, k.shape[1], tq=len(q_pos), normalized=True)

    def describe(self):
        return f"budgeted={self.keep}+{self.recent}"


# %% [markdown]
# The check: every invariant of `docs/testing.md` on small random problems (at most 12 keys,
# 25 draws each); it prints "all invariants hold" or the shrunk counterexample.

# %%
from minisparse.testing import report
passed = report(Budgeted, max_examples=25, max_tk=12)
