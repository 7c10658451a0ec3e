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
# # 4 · LSH and MagicPIG
#
# Top-k needs every score $q\cdot k_j$ to know which keys are large. **Locality-sensitive hashing**
# (LSH) guesses instead: hash queries and keys so that vectors pointing in similar directions
# collide, and read the keys that collide with the query. In this notebook:
#
# 1. **SimHash by hand**: random hyperplanes, one bit per plane;
# 2. **collision probability vs angle**: $1 - \theta/\pi$ per bit, and what $K$ bits and $L$
#    tables do to it;
# 3. **centring** the keys, which spreads the angles without changing the softmax;
# 4. **MagicPIG**: sample keys by collision and correct with **importance weights**, so the
#    softmax estimate is unbiased;
# 5. **error vs tables and bits**.

# %%
import copy
import dataclasses
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
from minisparse.attention import LSH, LSHIndex, Dense, Sinks, TopK, Window, attend
from minisparse.attention.lsh import p_sampled, planes

np.set_printoptions(precision=3, suppress=True, linewidth=110)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. SimHash by hand
#
# Draw a random Gaussian vector $w$ (a hyperplane through the origin). The bit of a vector $x$ is
# which side of the plane it lies on: $b(x) = [\,w\cdot x > 0\,]$. With $K$ planes we get a $K$-bit
# code. minisparse draws its planes with `planes(seed, K, L, d)`: $L$ tables of $K$ planes each.
# Here is one table of 8 bits for a few vectors: similar vectors share most bits.

# %%
d, K = 32, 8
W = planes(seed=0, K=K, L=1, d=d)                     # (K*L, d) Gaussian planes, one table
x = rng.standard_normal(d)
near = x + 0.3 * rng.standard_normal(d)               # a small perturbation of x
far = rng.standard_normal(d)                          # an unrelated vector
code = lambda y: "".join("1" if b else "0" for b in (W @ y > 0))
angle = lambda a, b: np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
for name, y in [("x", x), ("near", near), ("far", far), ("-x", -x)]:
    print(f"{name:5s} code {code(y)}   angle to x {angle(x, y):5.1f}°")

# %% [markdown]
# ## 2. Collision probability vs angle
#
# For a random plane, two vectors at angle $\theta$ fall on different sides with probability
# $\theta/\pi$ (the plane must cut the angle between them). So one bit collides with probability
# $p(\theta) = 1 - \theta/\pi$ (Charikar 2002). We check it with 2,000 planes, then build up:
#
# * a **table** of $K$ bits collides only if all $K$ bits agree: $p^K$ (sharper: only near
#   vectors collide);
# * $L$ independent tables: the chance of colliding in **at least 2** of them (MagicPIG's rule) is
#   $1 - (1-p^K)^L - L\,p^K(1-p^K)^{L-1}$, computed by `p_sampled(p, K, L)`.

# %%
thetas = np.linspace(0, np.pi, 19)
many = planes(seed=1, K=2000, L=1, d=d)                # (2000, d)
emp = []
for th in thetas:                                     # a pair at exactly angle th
    u = rng.standard_normal(d); u /= np.linalg.norm(u)
    w_ = rng.standard_normal(d); w_ -= (w_ @ u) * u; w_ /= np.linalg.norm(w_)
    y = np.cos(th) * u + np.sin(th) * w_
    emp.append(np.mean((many @ u > 0) == (many @ y > 0)))
th = np.linspace(0, np.pi, 200)
p = 1 - th / np.pi
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(np.degrees(thetas), emp, "o", label="measured, one bit")
ax.plot(np.degrees(th), p, label="1 - θ/π")
ax.plot(np.degrees(th), p ** 8, label="one table, K = 8: p^8")
for K_, L_ in [(8, 75), (10, 150), (4, 10)]:
    ax.plot(np.degrees(th), [p_sampled(x_, K_, L_) for x_ in p], "--", label=f"≥ 2 of L={L_} tables, K={K_}")
ax.set_xlabel("angle between q and k (degrees)"); ax.set_ylabel("probability"); ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# $K$ sets **where** the curve drops (more bits: only small angles collide), $L$ sets **how many
# chances** a key gets (more tables: the drop moves right and steepens). Notice how steep the
# $(K, L) = (8, 75)$ curve is: keys beyond ~80° from the query are almost never sampled, and most real query-key angles sit near 90° (section 3).
#
# ## 3. Real queries and keys, and centring
#
# We take layer 4's queries and keys from the embedded model on 512 tokens of Python source. In
# trained models all keys tend to point in a common direction, so every query sees them at similar
# angles and LSH cannot tell them apart. MagicPIG **centres** the keys: $k_j - \mu$ with $\mu$ the
# mean key. That shifts every logit of a row by the same amount $q\cdot\mu$,
#
# $$q\cdot(k_j-\mu) = q\cdot k_j - q\cdot\mu,$$
#
# so the softmax is unchanged, while the angles spread out.

# %%
model = minisparse.load_model(ROOT / "models" / "minisparse-pydoc.gguf")
T = 512
ids = model.tokenizer.encode(inspect.getsource(copy))[:T]
_, steps = model.trace(ids)
layer = 4
q, k, v = steps[f"blk.{layer}.q"], steps[f"blk.{layer}.k"], steps[f"blk.{layer}.v"]   # (Hq,T,d), (Hkv,T,d)
pos = np.arange(T)
cosines = lambda a, b: (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None, :]
mu = k[0].mean(0)
ang_raw = np.degrees(np.arccos(np.clip(cosines(q[0, 256:], k[0]), -1, 1))).ravel()
ang_ctr = np.degrees(np.arccos(np.clip(cosines(q[0, 256:], k[0] - mu), -1, 1))).ravel()
fig, ax = plt.subplots(figsize=(7, 3))
ax.hist(ang_raw, bins=60, alpha=0.6, density=True, label=f"raw keys (sd {ang_raw.std():.1f}°)")
ax.hist(ang_ctr, bins=60, alpha=0.6, density=True, label=f"centred keys (sd {ang_ctr.std():.1f}°)")
ax.set_xlabel("angle between a query (head 0) and a key"); ax.legend(fontsize=8); plt.show()

# %% [markdown]
# ## 4. MagicPIG: sampling with importance weights
#
# MagicPIG (Chen et al. 2024) does not rank keys; it **samples** them. A key is read when it
# collides with the query in at least 2 of $L$ tables, which happens with a probability $P_j$ known
# in closed form from the angle (section 2). Reading key $j$ with the extra log-weight $-\log P_j$
# turns the softmax sums into importance-sampling estimates:
#
# $$\hat Z = \sum_{j \text{ sampled}} \frac{e^{s_j}}{P_j},\qquad
# \mathbb E[\hat Z] = \sum_j P_j\,\frac{e^{s_j}}{P_j} = Z ,$$
#
# and the same for the numerator $\sum_j e^{s_j} v_j$. The kernel applies log-weights natively: a
# Selection carries `logw` per explicit index. We check unbiasedness by hand for one query: over 40
# seeds (new planes each time) the mean of $\hat Z / Z$ should be 1.

# %%
h, t = 0, 400
qt = np.ascontiguousarray(q[:, t:t + 1])                               # (Hq, 1, d) one query
s = (q[h, t].astype(np.float64) @ k[0, : t + 1].T.astype(np.float64)) / np.sqrt(q.shape[2])   # (t+1,)
Z = np.exp(s).sum()
ratios, n_read = [], []
for seed in range(40):
    counts, logw = LSH(8, 75, seed, mode="sample").collisions(qt, k, np.array([t]), pos, want_logw=True)
    taken = counts[h, : t + 1] >= 2                                     # keys colliding in >= 2 tables
    ratios.append((np.exp(s + logw[h, : t + 1]) * taken).sum() / Z)     # logw = -log P for taken keys
    n_read.append(taken.sum())
ratios = np.array(ratios)
print(f"Z_hat / Z over 40 seeds: mean {ratios.mean():.3f} ± {ratios.std() / np.sqrt(40):.3f} (standard error), "
      f"spread {ratios.std():.2f}; keys read: {np.mean(n_read):.0f} of {t + 1}")
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.hist(ratios, bins=15); ax.axvline(1, c="k", ls="--"); ax.set_xlabel("Z_hat / Z  (one seed each)")
plt.show()

# %% [markdown]
# Now the whole layer through the kernel. MagicPIG keeps the sinks and a local window **exact** and
# samples the rest: `Sinks(4) | Window(16) | LSH(8, 75, mode="sample")` (a key both sampled and in
# the window is read once, with weight 1). To see what the importance weights buy, we also run the
# *same* keys with the weights dropped (every sampled key counted once, `logw = 0`).

# %%
qa, qp = np.ascontiguousarray(q[:, 256:]), pos[256:]                  # late queries only
o = attend(qa, k, v, Dense(), qp, pos)
rel = lambda x: float((np.linalg.norm(x - o, axis=-1) / np.linalg.norm(o, axis=-1)).mean())
magicpig = Sinks(4) | Window(16) | LSH(8, 75, seed=0, mode="sample")
sel = magicpig.select(qa, k, qp, pos)
o_mp, st = attend(qa, k, v, sel, qp, pos, return_stats=True)
flat = dataclasses.replace(sel, logw=np.zeros_like(sel.logw), exact=np.ones_like(sel.exact))
o_flat = attend(qa, k, v, flat, qp, pos)
dens = st.attended_fraction.mean()
kk = int(round(dens * np.arange(257, T + 1).mean()))
print(f"MagicPIG K=8 L=75 + sinks + window: density {dens:.3f}, relative error {rel(o_mp):.3f}")
print(f"same keys without importance weights:           relative error {rel(o_flat):.3f}")
print(f"exact top-{kk} (same number of keys):            relative error {rel(attend(qa, k, v, TopK(kk), qp, pos)):.3f}")

# %% [markdown]
# Sampling is not top-k: top-k is biased (it drops the tail's mass entirely) but has low variance;
# the sampler is unbiased but noisy. BMRT's **frequency rank** is the middle way: `LSH(K, L,
# mode="rank", k=...)` keeps the keys that collide in the most tables (no weights, a fixed budget).
#
# ## 5. Error vs tables and bits
#
# Each $(K, L)$ gives a different trade-off between keys read (density) and error. Decoding over a
# long cache freezes the centring mean and the key codes once (`LSHIndex`, extended per token);
# we bind one per configuration so each query only compares codes. (Sampler alone, no sinks or
# window, so the effect of $K$ and $L$ is clean.)

# %%
qb, qpb = np.ascontiguousarray(q[:, 384:]), pos[384:]                 # 128 late queries
ob = attend(qb, k, v, Dense(), qpb, pos)
grid = []
for K_ in (4, 6, 8):
    for L_ in (10, 25, 75):
        sampler = LSH(K_, L_, seed=0, mode="sample").bind(LSHIndex(k, bits=K_, tables=L_, seed=0))
        o_s, st = attend(qb, k, v, sampler, qpb, pos, return_stats=True)
        err = float((np.linalg.norm(o_s - ob, axis=-1) / np.linalg.norm(ob, axis=-1)).mean())
        grid.append((K_, L_, st.attended_fraction.mean(), err))
        print(f"K={K_:2d} L={L_:3d}: density {grid[-1][2]:.3f}, relative error {err:.3f}")
fig, ax = plt.subplots(figsize=(6.5, 3.4))
for K_ in (4, 6, 8):
    g = [r for r in grid if r[0] == K_]
    ax.plot([r[2] for r in g], [r[3] for r in g], "o-", label=f"K = {K_} (L = 10, 25, 75)")
ax.set_xscale("log"); ax.set_xlabel("realised density"); ax.set_ylabel("relative error"); ax.legend(fontsize=8)
ax.set_title(f"MagicPIG sampler on layer {layer}"); plt.show()

# %% [markdown]
# Notice: at a fixed $K$, more tables read more keys and lower the error; at a fixed $L$, more bits
# read fewer keys. Configurations that read almost nothing have errors near or above 1: with only a
# handful of samples, importance weights $1/P_j$ of rare keys make the estimate very noisy.
#
# ## Exercises
#
# 1. **Bits vs angle.** For $K = 8$, at what angle does a single table collide with probability
#    1/2? Derive it from $p^K = 1/2$, then read it off the plot of section 2.
# 2. **Centring at work.** Give every key a large common offset, `k2 = k + 5 * k.mean(1, keepdims=True)`,
#    and redo section 4 with `k2`. Does $\hat Z/Z$ or the number of keys read change? Explain why
#    (look at how `LSH` centres the keys), and what would happen to the angles of section 3 with
#    raw, uncentred `k2`.
# 3. **Frequency rank vs sampling.** At the density of `K=8, L=75`, compare
#    `LSH(8, 75, mode="rank", k=...)` (no weights) with the sampler's error. Which is better on
#    layer 4, and on layer 0 (nearly uniform attention)?

# %% [markdown]
# ## Exercise: a SimHash bucket mask, checked by the kit
#
# `same_bucket` below lets each query read the keys in its SimHash bucket (same signs on `bits`
# fixed random hyperplanes) and its own key; it centres the keys first, as MagicPIG does. As shipped it
# has a bug: run the check cell, read the counterexample, fix the function, and run the check again
# until it prints "all invariants hold". (Hint: which keys does the mean it centres by include?)
# A solution is in `notebooks/solutions/04_lsh_magicpig.py`.

# %% tags=["exercise"]
import numpy as np


def same_bucket(q, k, q_pos, k_pos, bits=2):
    planes = np.random.default_rng(0).standard_normal((q.shape[-1], bits))   # fixed hyperplanes
    g = q.shape[0] // k.shape[0]
    kk = np.repeat(k, g, axis=0).astype(np.float64)                  # (Hq, Tk, d)
    kk = kk - kk.mean(axis=1, keepdims=True)                         # centre the keys

    def code(x):                                                     # (H, T, d) -> (H, T) bucket ids
        proj = (x.astype(np.float64)[..., :, None] * planes).sum(-2)  # (H, T, bits)
        return (proj > 0) @ (1 << np.arange(bits))

    hit = code(q)[:, :, None] == code(kk)[:, None, :]                # (Hq, Tq, Tk)
    own = k_pos[None, :] == q_pos[:, None]                           # (Tq, Tk): never an empty row
    return hit | own[None]


# %% [markdown]
# The check: every invariant of `docs/testing.md` on small random problems (at most 12 keys,
# 25 draws each); it prints "all invariants hold" or the shrunk counterexample.

# %%
from minisparse.testing import report
passed = report(same_bucket, max_examples=25, max_tk=12)
