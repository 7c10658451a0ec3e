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
# # 1 · The forward pass, step by step
#
# A language model turns text into a probability for every possible next token. In this notebook
# we follow one prompt through a real model, **minisparse-pydoc** (6.3 M parameters, trained on the
# Python standard library, shipped in `models/`), and look at every intermediate:
#
# GGUF file → tokens → embedding → one transformer block (RMSNorm, RoPE, grouped-query attention,
# SwiGLU) → logits → sampled text.
#
# We never copy the engine's code. The engine records named intermediates when asked
# (`model.trace(tokens)` returns the logits and a dict `{"embed": ..., "blk.0.q": ..., ...}`), and
# it exposes its building blocks (`rms_norm`, `rope_tables`, `apply_rope`, `linear`, `swiglu`) as
# free functions. We recompute one block with those functions and check that we get exactly what
# the engine computed.
#
# Shape legend used in every comment: `T` tokens, `D` model width, `Hq`/`Hkv` query/KV heads,
# `d` head width, `F` FFN width, `V` vocabulary.

# %%
import sys
from pathlib import Path

import numpy as np
import matplotlib.pyplot as plt

# the repository root: the folder above notebooks/ that holds models/
ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "models" / "minisparse-pydoc.gguf").is_file()), None)
if ROOT is None:
    raise FileNotFoundError("run this notebook from the minisparse checkout (notebooks/ beside models/)")
try:
    import minisparse
except ImportError:                                  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    import minisparse
from minisparse.model import rms_norm, rope_tables, apply_rope, linear, swiglu, silu

np.set_printoptions(precision=4, suppress=True, linewidth=110)
MODEL = ROOT / "models" / "minisparse-pydoc.gguf"
# dequant=True: every weight as a float32 array, the readable reference path, so the cells below
# can multiply them with NumPy (by default quantised matrices stay as their GGUF blocks)
model = minisparse.load_model(MODEL, dequant=True)
cfg, W, tok = model.config, model.weights, model.tokenizer
cfg

# %% [markdown]
# ## 1. The GGUF file
#
# A GGUF file is a small header of key/value **metadata** (architecture, sizes, the tokenizer's
# vocabulary) followed by **tensors**, each with a name, a shape and a storage type. This model's
# matrices are stored as `Q8_0`: blocks of 32 weights share one float16 scale, each weight is an
# 8-bit integer. By default the loader keeps them that way (a `QuantMatrix`: the blocks, read by
# Numba kernels); with `dequant=True`, as here, it dequantises them to float32 arrays, named after
# the GGUF tensors (without the `.weight` suffix). Notice the naming scheme `blk.N.<part>`: one set per layer.
# `open_gguf` checks every length in the file before reading anything, then reads a value when you
# ask for it (`f.get(key)`); each tensor's `data` is a view of the file, not a copy.

# %%
from minisparse.gguf_io import open_gguf

f = open_gguf(MODEL)
for key in f.metadata:
    if key.startswith("llama.") or key in ("general.architecture", "general.name", "tokenizer.ggml.model"):
        print(f"{key:42s} {f.get(key)}")
print()
for t in f.tensors[:10]:
    print(f"{t.name:28s} {t.ggml_type.name:5s} GGUF shape {list(t.shape)}  -> model.weights shape {W[t.name.removesuffix('.weight')].shape}")
n_params = sum(w.size for w in W.values())
print(f"\n{len(W)} tensors, {n_params:,} parameters, file {MODEL.stat().st_size:,} bytes")

# %% [markdown]
# GGUF lists a matrix's shape as `(in, out)` (GGML order, fastest dimension first); minisparse
# keeps the data order `(out, in)`, so a linear layer is `x @ w.T`.
#
# ## 2. Text → tokens
#
# The tokenizer is a byte-level BPE with 4096 entries. `encode` adds the BOS token
# (`<|endoftext|>`, id 0) because every training document started with it. Each id maps back to a
# piece of text; `Ġ` in GPT-2 vocabularies stands for a leading space, `Ċ` for a newline.

# %%
prompt = "import os\n\ndef read_config(path):\n    \"\"\"Return the"
ids = tok.encode(prompt)
T = len(ids)
print(T, "tokens:", ids)
print([tok.decode_piece(i) for i in ids])
print("vocabulary entries:", [tok.tokens[i] for i in ids[:8]])

# %% [markdown]
# ## 3. Run the model once, recording every step
#
# `model.trace(ids)` runs the ordinary forward pass and keeps the named intermediates. The names
# are the contract: `embed`, then per layer `blk.l.q`, `blk.l.k`, `blk.l.v` (after RoPE),
# `blk.l.attn_out` (attention output before the output projection) and `blk.l.out` (the residual
# stream after the block), finally `logits`.

# %%
logits, steps = model.trace(ids)
for name in list(steps)[:7] + ["logits"]:
    print(f"{name:16s} {steps[name].shape}")
print("...", len(steps), "arrays in all")

# %% [markdown]
# ## 4. Embedding
#
# The embedding is a table lookup: row `ids[t]` of the matrix `token_embd` (V, D). The result
# `x` (T, D) is the **residual stream**: every block reads it and adds its own contribution.

# %%
x = W["token_embd"][ids]                                  # (T, D)
print("x", x.shape, "equals the engine's 'embed':", np.array_equal(x, steps["embed"]))
fig, ax = plt.subplots(figsize=(9, 2.2))
ax.imshow(x, aspect="auto", cmap="RdBu_r", vmin=-0.1, vmax=0.1)
ax.set_yticks(range(T), [tok.decode_piece(i).replace("\n", "\\n") for i in ids], fontsize=6)
ax.set_xlabel("dimension of D"); ax.set_title("token embeddings (one row per token)")
plt.show()

# %% [markdown]
# ## 5. One block, recomputed with the engine's functions
#
# ### 5a. RMSNorm
#
# Before attention, each row is rescaled to unit root-mean-square and multiplied by a learned gain
# $g$ (D,):
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac1D\sum_i x_i^2 + \varepsilon}} \odot g$$
#
# Unlike LayerNorm there is no mean subtraction and no bias. Notice the RMS of every row after the
# division is 1 (a hair below: ε = 1e-5 is not negligible next to these small embeddings),
# whatever it was before.

# %%
eps = cfg.norm_eps
h = rms_norm(x, W["blk.0.attn_norm"], eps)                # (T, D)
rms = lambda a: np.sqrt((a * a).mean(-1))
print("RMS per token before:", rms(x)[:6])
print("RMS after dividing  :", rms(x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))[:6])
print("gain g (first 8)    :", W["blk.0.attn_norm"][:8])

# %% [markdown]
# ### 5b. Queries, keys, values and grouped-query attention (GQA)
#
# Three linear maps give queries (T, Hq·d), keys and values (T, Hkv·d). This model has
# `Hq = 8` query heads but only `Hkv = 2` key/value heads: each group of `G = Hq / Hkv = 4` query
# heads shares one KV head. That is **grouped-query attention**; it shrinks the KV cache by G.

# %%
Hq, Hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
G = Hq // Hkv
q = linear(h, W["blk.0.attn_q"]).reshape(T, Hq, d).transpose(1, 0, 2)     # (Hq, T, d)
k = linear(h, W["blk.0.attn_k"]).reshape(T, Hkv, d).transpose(1, 0, 2)    # (Hkv, T, d)
v = linear(h, W["blk.0.attn_v"]).reshape(T, Hkv, d).transpose(1, 0, 2)    # (Hkv, T, d)
print(f"Hq={Hq} Hkv={Hkv} G={G} d={d}:  q {q.shape}, k {k.shape}, v {v.shape}")
print("query head h reads KV head h // G:", [h_ // G for h_ in range(Hq)])

# %% [markdown]
# ### 5c. RoPE: positions as rotations
#
# Attention itself does not know where tokens are. RoPE rotates each pair of coordinates
# $(x_{2i}, x_{2i+1})$ of a query or key at position $m$ by the angle $m\,\theta_i$, with
# $\theta_i = 10000^{-2i/d}$: fast rotations in the first pairs, slow ones in the last. Because
# rotations compose, $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$: **the score
# depends only on the distance $n - m$**. We check that numerically, then check that our rotated
# q and k equal the engine's.

# %%
cos, sin = rope_tables(np.arange(T), cfg)                 # (T, d/2) each
q_r = apply_rope(q, cos, sin, cfg.rope_style, cfg.rope_dim)   # (Hq, T, d)
k_r = apply_rope(k, cos, sin, cfg.rope_style, cfg.rope_dim)   # (Hkv, T, d)
print("q equals the engine's blk.0.q:", np.array_equal(q_r, steps["blk.0.q"]),
      "| k:", np.array_equal(k_r, steps["blk.0.k"]), "| v:", np.array_equal(v, steps["blk.0.v"]))

rng = np.random.default_rng(0)
a, b = rng.standard_normal((2, 1, 1, d)).astype(np.float32)   # one query and one key, (1, 1, d)

def rope_at(x, n):
    """x (1, 1, d) rotated as if it sat at position n."""
    c, s_ = rope_tables(np.array([n]), cfg)
    return apply_rope(x, c, s_, cfg.rope_style, cfg.rope_dim)

for m, n in [(0, 5), (10, 15), (100, 105), (3, 100)]:
    print(f"positions ({m:3d}, {n:3d}), distance {n - m:3d}: <R_m a, R_n b> = {(rope_at(a, m) * rope_at(b, n)).sum():+.5f}")

# %%
dist = np.arange(0, 200)
fig, ax = plt.subplots(figsize=(7, 2.5))
ax.plot(dist, [(rope_at(a, 0) * rope_at(b, n)).sum() for n in dist], lw=1, label="a against b")
ax.plot(dist, [(rope_at(a, 0) * rope_at(a, n)).sum() for n in dist], lw=1, label="a against itself")
ax.set_xlabel("distance n - m"); ax.set_ylabel("score"); ax.legend(fontsize=8)
ax.set_title("RoPE: the same pair of vectors scores differently at different distances")
plt.show()

# %% [markdown]
# ### 5d. Attention
#
# For query head $h$ at position $t$ (reading KV head $g = \lfloor h/G\rfloor$):
#
# $$p_{t,j} = \operatorname{softmax}_j\!\Big(\frac{q_t\cdot k_j}{\sqrt d}\Big)\ \text{over } j \le t,
# \qquad o_t = \sum_{j\le t} p_{t,j}\, v_j$$
#
# The condition $j \le t$ is **causality**: a token may only look at the past. We compute it with
# plain NumPy (float64) and compare with the engine's `blk.0.attn_out`, which came out of the Numba
# kernel (float32). They agree to float32 rounding.

# %%
kk = np.repeat(k_r, G, axis=0).astype(np.float64)         # (Hq, T, d): GQA = repeat KV heads
vv = np.repeat(v, G, axis=0).astype(np.float64)           # (Hq, T, d)
s = q_r.astype(np.float64) @ kk.transpose(0, 2, 1) / np.sqrt(d)   # (Hq, T, T) scores
s[:, np.triu(np.ones((T, T), bool), 1)] = -np.inf        # causality: key j > query t is hidden
p = np.exp(s - s.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)                             # (Hq, T, T) each row sums to 1
o = (p @ vv).transpose(1, 0, 2).reshape(T, Hq * d)        # (T, Hq*d)
print("max |numpy - engine| =", np.abs(o - steps["blk.0.attn_out"]).max())

fig, axes = plt.subplots(1, 4, figsize=(12, 3))
for hh, ax in enumerate(axes):
    ax.imshow(p[hh], cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"layer 0, head {hh} (KV head {hh // G})", fontsize=9); ax.set_xlabel("key"); ax.set_ylabel("query")
plt.tight_layout(); plt.show()

# %% [markdown]
# ### 5e. Output projection, residual, and the SwiGLU feed-forward
#
# The heads' outputs are concatenated and projected back to width D, then **added** to the residual
# stream. A second RMSNorm feeds the feed-forward network, SwiGLU:
#
# $$\mathrm{FFN}(h) = W_\text{down}\big(\mathrm{silu}(W_\text{gate} h) \odot W_\text{up} h\big),
# \qquad \mathrm{silu}(z) = \frac{z}{1+e^{-z}}$$
#
# The gate branch decides, per hidden unit (F = 704 of them), how much of the up branch passes.
# Its output is added to the residual stream too. The result must equal the engine's `blk.0.out`.

# %%
x1 = x + linear(steps["blk.0.attn_out"], W["blk.0.attn_output"])    # (T, D)
h2 = rms_norm(x1, W["blk.0.ffn_norm"], eps)                          # (T, D)
gate = silu(linear(h2, W["blk.0.ffn_gate"]))                         # (T, F)
up = linear(h2, W["blk.0.ffn_up"])                                   # (T, F)
x2 = x1 + swiglu(h2, W["blk.0.ffn_gate"], W["blk.0.ffn_up"], W["blk.0.ffn_down"])   # (T, D)
print("block 0 output: max |ours - engine's blk.0.out| =", np.abs(x2 - steps["blk.0.out"]).max())
print(f"gate units nearly closed (|silu| < 0.05): {np.mean(np.abs(gate) < 0.05):.0%} of {gate.size}")

z = np.linspace(-6, 4, 200)
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
axes[0].plot(z, silu(z)); axes[0].axhline(0, c="k", lw=0.5); axes[0].set_title("silu(z)")
axes[1].hist(gate.ravel(), bins=80); axes[1].set_title("gate values silu(W_gate h), layer 0"); axes[1].set_yscale("log")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 6. All the blocks, then the logits
#
# The other five blocks repeat the same steps with their own weights. Watch the residual stream
# grow as each block adds to it. At the end a final RMSNorm and the output matrix (V, D) turn the
# last row into one score (logit) per vocabulary entry.

# %%
norms = [rms(steps["embed"]).mean()] + [rms(steps[f"blk.{l}.out"]).mean() for l in range(cfg.n_layers)]
print("mean RMS of the residual stream: embed, then after each block:", np.round(norms, 3))
last = logits[-1].astype(np.float64)                       # (V,) scores for the next token
probs = np.exp(last - last.max()); probs /= probs.sum()
top = np.argsort(-probs)[:8]
for i in top:
    print(f"{probs[i]:7.3f}  {tok.decode_piece(i)!r}")

# %% [markdown]
# ## 7. Sampling
#
# `minisparse.sampling.filter_probs` applies temperature and the truncations (top-k, top-p, min-p)
# to the logits; the sampler then draws from the result. Low temperature sharpens the distribution
# (greedy at 0), high temperature flattens it. Notice how the entropy (in nats) grows with $\tau$.

# %%
from minisparse.sampling import filter_probs
from minisparse.viz import entropy

fig, ax = plt.subplots(figsize=(9, 2.8))
for j, tau in enumerate([0.5, 1.0, 1.5]):
    pt = filter_probs(last, tau)
    ax.bar(np.arange(8) + 0.27 * (j - 1), pt[top], width=0.27, label=f"τ = {tau}: entropy {entropy(pt):.2f}")
ax.set_xticks(range(8), [repr(tok.decode_piece(i)) for i in top], fontsize=7)
ax.legend(fontsize=8); ax.set_title("next-token probabilities at three temperatures")
plt.show()

print(prompt + "".join(model.generate(prompt, max_new_tokens=40, temperature=0.7, seed=1)))

# %% [markdown]
# The same engine runs the other Llama-family files. If the shared fixtures folder sits beside the
# checkout (`../shared/fixtures`), the next cell also loads **stories260K** (Karpathy's tiny
# TinyStories model) and lets it continue a story; otherwise it says so and moves on.

# %%
stories = ROOT.parent / "shared" / "fixtures" / "stories260K.gguf"
if stories.is_file():
    sm = minisparse.load_model(stories)
    print(sm.config)
    print("Once upon a time" + "".join(sm.generate("Once upon a time", max_new_tokens=40, temperature=0, seed=0)))
else:
    print(f"skipped: {stories} not found (the shared fixtures are not beside this checkout)")

# %% [markdown]
# ## Exercises
#
# 1. **Causality.** Remove the line that sets the upper triangle of `s` to `-inf` and recompute `o`.
#    Which rows of `o` still match the engine, and why exactly those?
# 2. **RoPE.** Replace `np.arange(T)` by `np.arange(T) + 1000` in section 5c (both q and k shifted
#    by the same offset). Does the attention map `p` change? What does that tell you about where
#    position information enters?
# 3. **Sampling.** Generate 5 continuations with `temperature=0` and with `temperature=1.2`
#    (`seed=0..4`). Measure how many distinct first tokens you get. Then try `top_k=1` at
#    temperature 1.2 and explain the result from `filter_probs`.
