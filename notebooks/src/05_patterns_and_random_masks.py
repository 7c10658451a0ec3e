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
# # 5 · Patterns and random masks
#
# The cheapest sparse attention decides which keys a query reads from **positions alone**: no
# scores, no index, nothing to learn. Such a pattern costs nothing to choose, gives the same keys
# whether a position is processed in a prefill or as a decode step, and its cost per query is known
# in advance. The price: it cannot follow the content (notebook 2 showed the important keys are
# often far away).
#
# In this notebook:
#
# 1. how minisparse represents "which keys each query reads" (a `Selection`);
# 2. a gallery of patterns: window, sinks, block-local, strided / fixed (Sparse Transformer),
#    log-stride, landmarks, and unions of them;
# 3. how far information travels through several layers of a pattern (reachability);
# 4. RIS-style **random masks** and their effective coverage;
# 5. how much each pattern loses on real queries and keys;
# 6. the attention **topology** as a Graphviz `.dot` file and as a picture;
# 7. MInference's **vertical-slash** pattern on a real head.

# %%
import copy
import inspect
import sys
import tempfile
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
from minisparse.attention import (BlockLocal, Dense, Landmarks, LogStride, RandomMask, Sinks, Strided,
                                  Window, attend)
from minisparse.spec import parse_attention_spec
from minisparse.viz import draw_topology, pattern, render_dot, selection_image, to_dot

np.set_printoptions(precision=3, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. A Selection: ranges plus explicit indices
#
# A selector's `select(q, k, q_pos, k_pos)` returns a `Selection`: for every query row, a list of
# key **ranges** `[lo, hi)` (a window is one range per row) and a list of **explicit indices**
# (scattered keys, each with a log-weight, 0 for an exact pick). The kernel reads the ranges, then
# the indices, and applies causality by position ($k_{pos} \le q_{pos}$). Nothing of size
# $T_q \times T_k$ is ever built.
#
# `pattern(selector, T)` (from `minisparse.viz`) asks a position-only selector for its Selection
# over a causal prefill of `T` positions.

# %%
sel = pattern(Sinks(2) | Window(3) | LogStride(), 40)
print(sel)
for t in (5, 20, 39):
    ranges, idx = sel.rows(0, t)
    print(f"query {t:2d}: ranges {ranges}, explicit keys {[j for j, _ in idx]}")

# %% [markdown]
# Query 39 reads the sinks `[0, 2)`, its window `[36, 40)`, and the log-stride keys
# $39 - 2^m$ (38, 37, 35, 31, 23, 7): about $\log_2 t$ keys reaching ever further back. Keys picked
# by two members (37, 38 are in the window too) are read once: a union never double counts.
#
# ## 2. A gallery of patterns
#
# Each picture is one head's (query × key) read set for 64 positions: dark = read exactly,
# light = read only through a landmark (a block-mean pseudo-key, section 2b).
#
# * `window=w`: the query and the $w$ keys before it (local context, Longformer);
# * `sinks=n`: the first $n$ positions (StreamingLLM's attention sinks);
# * `blocks=b`: the query's own block of $b$ positions;
# * `strided=l`: the last $l$ keys plus every $l$-th key before them (Sparse Transformer);
# * `fixed=l`: own block plus the last key of every earlier block (Sparse Transformer "fixed");
# * `logstride`: $t - 2^m$ for $m = 0, 1, \dots$ (LogSparse);
# * `landmarks=b`: own block exactly plus one mean key per earlier block.

# %%
T = 64
gallery = {s: parse_attention_spec(s) for s in
           ["window=8", "sinks=4", "blocks=8", "strided=8", "fixed=8", "logstride", "landmarks=8", "sinks=4,window=8,logstride"]}
fig, axes = plt.subplots(2, 4, figsize=(13, 6.6))
for ax, (spec, selector) in zip(axes.ravel(), gallery.items()):
    ax.imshow(selection_image(pattern(selector, T)), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(spec, fontsize=9)
plt.tight_layout(); plt.show()

# %% [markdown]
# How many keys does each query read? `attend(..., return_stats=True)` reports, per head and
# query, `n_attended` (keys the kernel actually read) and `n_causal` (keys causality allows). Their
# ratio is the **realised density**. Patterns differ in how their cost grows with the position:
# constant (window, blocks), $O(\log t)$ (log-stride), $O(t / l)$ (strided, fixed, landmarks).

# %%
T = 512
rng = np.random.default_rng(0)
q = rng.standard_normal((1, T, 16)).astype(np.float32)       # (Hq, T, d): content does not matter here
kv = rng.standard_normal((1, T, 16)).astype(np.float32)      # (Hkv, T, d)
fig, ax = plt.subplots(figsize=(8, 3.2))
for spec, selector in gallery.items():
    _, st = attend(q, kv, kv, selector, return_stats=True)
    ax.plot(st.n_attended[0], label=f"{spec}: density {st.attended_fraction.mean():.3f}")
ax.set_xlabel("query position"); ax.set_ylabel("keys read"); ax.set_yscale("log")
ax.legend(fontsize=7, loc="upper left", ncol=2); plt.show()

# %% [markdown]
# ### 2b. Landmarks
#
# A landmark stands for a whole block of $b$ keys: its key is the block's mean key $\bar k$, its
# value the mean value $\bar v$, and it enters the softmax with log-weight $\log b$ — as if $b$
# copies of $\bar k$ were there. If every key in a block were identical, that would be exact:
#
# $$\sum_{j \in \text{block}} e^{q\cdot k_j/\sqrt d}\, v_j = b\, e^{q\cdot\bar k/\sqrt d}\, \bar v
# \quad\text{when } k_j = \bar k,\ v_j = \bar v .$$
#
# We check that identity through the kernel: blocks of identical keys, landmarks vs dense.

# %%
b, nb, d = 8, 16, 16
blocks_k = np.repeat(rng.standard_normal((1, nb, d)), b, axis=1).astype(np.float32)   # (1, nb*b, d)
blocks_v = np.repeat(rng.standard_normal((1, nb, d)), b, axis=1).astype(np.float32)
qq = rng.standard_normal((1, nb * b, d)).astype(np.float32)
o_dense = attend(qq, blocks_k, blocks_v, Dense())
o_land, st = attend(qq, blocks_k, blocks_v, Landmarks(b), return_stats=True)
print("max |landmarks - dense| with constant blocks:", np.abs(o_land - o_dense).max())
print("keys read by the last query: landmarks", st.n_attended[0, -1], "vs dense", nb * b)

# %% [markdown]
# ## 3. Reachability: what several layers can see
#
# One layer of `window=8` lets a query see 8 keys back. But a transformer stacks layers: in layer 2,
# query $t$ reads position $t-8$, which itself read $t-16$ in layer 1. If $M$ is the boolean read
# matrix (with the diagonal), key $j$ can influence query $t$ after $r$ layers iff
# $(M^r)_{t,j} > 0$. Sparse Transformer's strided pattern was designed so that **two** layers reach
# every earlier key. We measure the share of causal pairs reached after 1, 2, 3 layers.

# %%
T = 128
causal = np.tril(np.ones((T, T), bool))
hops = {}
for spec in ["window=8", "blocks=8", "strided=8", "fixed=8", "logstride", "sinks=4,window=8"]:
    M, _ = pattern(parse_attention_spec(spec), T).to_mask(1, T, T)
    M = (M[0] & causal) | np.eye(T, dtype=bool)                       # (T, T) one layer
    R, shares = M.copy(), []
    for r in range(3):
        shares.append(R.sum() / causal.sum())
        R = (R.astype(np.int32) @ M.astype(np.int32)) > 0                # one more layer
    hops[spec] = shares
    print(f"{spec:18s} reached after 1, 2, 3 layers: {np.round(shares, 3)}")

# %% [markdown]
# Notice: `strided=8` and `fixed=8` reach every pair in two layers, as designed. Log-stride
# reaches distance $\Delta$ in as many layers as $\Delta$ has 1-bits (each hop jumps by a power of
# two), so every pair within $\lceil\log_2 T\rceil = 7$ layers. A window needs $t / w$ layers, and
# `blocks=8` never leaves its block: block-local attention alone cannot carry information across
# blocks, however deep the model.
#
# ## 4. Random masks (RIS) and their effective coverage
#
# A random mask reads, per query, a random share $\rho$ of the causal keys (plus sinks and a window
# kept exactly). RIS-Kernel-style masks **union several seeds**: with $s$ independent masks of
# density $\rho$, a given key is missed by all of them with probability $(1-\rho)^s \approx
# e^{-s\rho}$, so the union covers
#
# $$\text{coverage} \approx 1 - e^{-s \rho}$$
#
# of the keys, *less* than the nominal $s\rho$ because draws collide. `RandomMask.expected_coverage`
# gives this value (and its exact finite-$n$ form). Each draw is a hash of (seed, position), so a
# decode step picks exactly what the prefill row picked.

# %%
T = 256
pos = np.arange(T)
causal = np.tril(np.ones((T, T), bool))                              # (T, T)
rows = np.arange(128, T)                                             # long enough rows
fig, ax = plt.subplots(figsize=(7, 3.2))
for dens, mode, mk in [(0.02, "stochastic", "o"), (0.05, "stochastic", "s"), (0.05, "structural", "^")]:
    seeds = [1, 2, 4, 8, 16, 32]
    measured = []
    for s in seeds:
        rm = RandomMask(dens, s, mode=mode, seed=7)
        M, _ = rm.random_part(pos, pos).to_mask(1, T, T)                 # only the random draws
        measured.append(float((M[0] & causal)[rows].sum(1).mean() / (rows + 1).mean()))
    ax.plot(seeds, measured, mk, label=f"measured, ρ={dens}, {mode}")
    s_ = np.linspace(1, 32, 100)
    ax.plot(s_, 1 - np.exp(-s_ * dens), "-", lw=0.8, color=ax.lines[-1].get_color())
ax.plot(s_, np.minimum(1, s_ * 0.05), ":", c="gray", label="nominal s·ρ (ρ=0.05)")
ax.set_xscale("log"); ax.set_xlabel("seeds s"); ax.set_ylabel("share of causal keys covered")
ax.legend(fontsize=7); ax.set_title("union of s random masks: 1 - exp(-s ρ) (lines)"); plt.show()

rm = RandomMask(0.02, 16, seed=7)
_, st = attend(rng.standard_normal((1, T, 16)).astype(np.float32),
               *[rng.standard_normal((1, T, 16)).astype(np.float32)] * 2, rm, return_stats=True)
print(rm.coverage_report(st))

# %% [markdown]
# The realised fraction is larger than the expected random coverage: it also counts the 4 sinks
# and the window of 16 that `RandomMask` always keeps (and short early rows, where those are most
# of the row).
#
# ## 5. What each pattern loses on real attention
#
# Patterns do not look at content, so their error depends on where the model's mass actually is.
# We run the embedded model over 256 tokens of Python source, take layer 4's real queries, keys and
# values from the trace, and compare each pattern's output with dense attention:
#
# $$\text{relative error} = \frac{\lVert o_S - o\rVert}{\lVert o\rVert}\quad\text{(per query, mean over heads and queries)}$$

# %%
model = minisparse.load_model(ROOT / "models" / "minisparse-pydoc.gguf")
ids = model.tokenizer.encode(inspect.getsource(copy))[:256]
_, steps = model.trace(ids)
layer = 4
q, k, v = steps[f"blk.{layer}.q"], steps[f"blk.{layer}.k"], steps[f"blk.{layer}.v"]   # (Hq, T, d), (Hkv, T, d)
o = attend(q, k, v, Dense())                                                         # (Hq, T, d)
specs = ["window=16", "window=64", "sinks=4,window=16", "blocks=32", "strided=16", "fixed=16",
         "logstride", "landmarks=16", "sinks=4,window=16,logstride", "random=5%x4", "random=5%x16"]
res = []
for spec in specs:
    o_s, st = attend(q, k, v, parse_attention_spec(spec), return_stats=True)
    err = np.linalg.norm(o_s - o, axis=-1) / np.linalg.norm(o, axis=-1)               # (Hq, T)
    res.append((spec, st.attended_fraction[:, 128:].mean(), err[:, 128:].mean()))
    print(f"{spec:28s} density {res[-1][1]:.3f}   rel. error {res[-1][2]:.3f}")
fig, ax = plt.subplots(figsize=(7, 3.5))
for spec, dens, err in res:
    ax.scatter(dens, err); ax.annotate(spec, (dens, err), fontsize=7)
ax.set_xscale("log"); ax.set_xlabel("realised density (queries 128..255)"); ax.set_ylabel("mean relative error")
ax.set_title(f"layer {layer}: patterns against dense"); plt.show()

# %% [markdown]
# ## 6. The attention topology as a graph
#
# A pattern is a graph: one node per position, an edge $j \to t$ when query $t$ reads key $j$.
# `to_dot` writes that graph in Graphviz's DOT language (solid edges: exact reads; dashed: sampled
# reads with their importance weight; blue boxes: landmarks, fed by dotted edges from the keys they
# average). If Graphviz's `dot` program is installed, `render_dot` turns it into a PNG; the same
# graph is always drawn with matplotlib by `draw_topology` (arcs above the line are reads, bars
# below are landmark blocks).

# %%
small = pattern(parse_attention_spec("sinks=1,window=2,logstride"), 16)
dot_text = to_dot(small, label="sinks=1, window=2, logstride (16 positions)")
out_dir = Path(tempfile.mkdtemp(prefix="minisparse_topology_"))
(out_dir / "topology.dot").write_text(dot_text)
print(f"wrote {out_dir / 'topology.dot'} ({dot_text.count('->')} edges); first lines:")
print("\n".join(dot_text.splitlines()[:8]), "\n...")
png = render_dot(dot_text, out_dir / "topology.png")
if png is None:
    print("Graphviz `dot` is not installed: drawing with matplotlib only "
          "(paste the .dot text into any Graphviz viewer to see its layout)")
else:
    from IPython.display import Image, display
    display(Image(filename=str(png)))

fig, axes = plt.subplots(2, 1, figsize=(10, 5.5))
draw_topology(axes[0], small, title="sinks=1, window=2, logstride")
draw_topology(axes[1], pattern(parse_attention_spec("window=1,landmarks=4"), 16), title="window=1, landmarks=4")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 7. The vertical-slash picture on a real head (MInference)
#
# MInference (Jiang et al. 2024) found that many long-context heads read a few key **columns**
# (the same keys, whatever the query: sinks, a heading, a name) and a few **diagonals** (the key
# at a fixed distance back: the local band, a repeated period). It does not guess which: the
# softmax of the last 64 queries is summed down each column and along each diagonal, and the top
# V columns and top S diagonals are read by every query (`vslash=V/S`, with sinks and a local band
# always on). The pattern is chosen from *content*, but is then as cheap as a fixed pattern.
#
# Below: one head of layer 4 on the same code as section 5, its dense attention (log scale), the
# column and diagonal sums of the last 64 queries, and the keys `vslash` reads; then the softmax
# mass it keeps beside an A-shape (`ashape`: sinks + window, MInference's static head) reading
# the same number of keys.

# %%
from minisparse.attention import AShape, VerticalSlash
Hq, T, d = q.shape                                                                  # (Hq, T, d)
G = Hq // k.shape[0]
causal = np.tril(np.ones((T, T), bool))                                           # (T, T)
logits = np.einsum("htd,hsd->hts", q.astype(np.float64), np.repeat(k, G, 0).astype(np.float64)) / np.sqrt(d)
probs = np.exp(np.where(causal, logits, -np.inf) - np.where(causal, logits, -np.inf).max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)                                             # (Hq, T, T) dense softmax
vs = VerticalSlash(8, 8, sinks=4, band=8)                                         # at most 28 keys a query
vmask = vs.select(q, k).to_mask(Hq, T, T)[0] & causal                             # (Hq, T, T)
width = int(np.ceil(vmask[:, -64:].sum(-1).mean())) - 4                           # the same keys read
amask = AShape(4, width).select(q, k).to_mask(Hq, T, T)[0] & causal
kept_v, kept_a = (probs * vmask).sum(-1)[:, -64:].mean(1), (probs * amask).sum(-1)[:, -64:].mean(1)   # (Hq,)
for h in range(Hq):
    print(f"head {h}: softmax mass kept by {vs} {kept_v[h]:.3f}, by ashape=4/{width} {kept_a[h]:.3f}")
h = int(np.argmax(kept_v - kept_a))                                               # where it matters most
cols, diags = vs.scores(q, k, np.arange(T), np.arange(T))
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
axes[0].imshow(np.log10(probs[h] + 1e-6), cmap="magma"); axes[0].set_title(f"layer {layer} head {h}: log10 softmax")
axes[1].plot(cols[h]); axes[1].set_title("column sums (last 64 queries)"); axes[1].set_xlabel("key position")
axes[2].plot(diags[h]); axes[2].set_title("diagonal sums"); axes[2].set_xlabel("offset q_pos - k_pos")
axes[3].imshow(vmask[h], cmap="Greys"); axes[3].set_title(f"{vs}: keys read")
plt.tight_layout(); plt.show()

# %% [markdown]
# Columns show as vertical lines, diagonals as slashes. On a head whose mass is local, the
# A-shape keeps as much as vertical-slash (compare the two columns of the printout); on the head
# drawn, the far columns and diagonals it found keep clearly more mass than a window of the same
# size, which sees only the band next to the diagonal.
# The pattern of a prefill *call* comes from its last queries, so a decode step (one query)
# chooses its own: `docs/selectors.md` says where that makes decode differ from prefill.

# %% [markdown]
# ## Exercises
#
# 1. **Budget parity.** Find a window size whose realised density (section 5) matches
#    `sinks=4,window=16,logstride`. Which of the two has the lower error on layer 4? Repeat on
#    layer 0 (nearly uniform attention). Explain the difference with notebook 2's entropy plot.
# 2. **Reachability.** Add `random=5%x1` (one seed) and `landmarks=8` to section 3. How many
#    layers does the random mask need to reach 99 % of the pairs? (Landmarks read pseudo-keys:
#    think about what `to_mask` can and cannot represent, and what "reach" means for a block mean.)
# 3. **Coverage.** For `RandomMask(0.01, s)`, how many seeds do you need to cover half of the keys?
#    Derive it from $1 - e^{-s\rho} = 0.5$, then check with the measurement loop of section 4.

# %% [markdown]
# ## Exercise: a dilated window, checked by the kit
#
# `dilated_window` below should let each query read `n` keys, every `step`-th position back from
# its own (distances 0, step, 2·step, …). It was written with decoding in mind, where the newest
# key is the query. As shipped it has a bug: run the check cell, read the counterexample, fix the
# function, and run the check again until it prints "all invariants hold".
# A solution is in `notebooks/solutions/05_patterns_and_random_masks.py`.

# %% tags=["exercise"]
import numpy as np


def dilated_window(q, k, q_pos, k_pos, n=3, step=2):
    newest = k_pos[-1]
    d = np.repeat((newest - k_pos)[None, :], len(q_pos), axis=0)    # (Tq, Tk) distance back
    return (d >= 0) & (d % step == 0) & (d < n * step)


# %% [markdown]
# The check: every invariant of `docs/testing.md` on small random problems (at most 12 keys,
# 25 draws each); it prints "all invariants hold" or the shrunk counterexample.

# %%
from minisparse.testing import report
passed = report(dilated_window, max_examples=25, max_tk=12)
