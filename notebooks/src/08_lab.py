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
# # 8 · The lab: quality vs density, every variant measured the same way
#
# Notebooks 3–7 each measured one family with its own yardstick. The **lab** (`minisparse eval`,
# package `minisparse.lab`) runs any list of variants — attention selectors *and* bounded caches —
# through the real model on the same text and compares each with dense attention at the same
# positions:
#
# | metric | what it says |
# |---|---|
# | realised density | keys read / causal keys, from the kernel's own counts (a cache is charged for what it evicted) |
# | mass recall | share of the dense attention mass on the keys read, per layer, head and query |
# | relative output error | $\lVert o_S - o\rVert / \lVert o\rVert$ of each attention output |
# | perplexity ratio, KL, agreement | at the model's output: next-token loss vs dense, $\mathrm{KL}(p_{dense}\,\Vert\,p_S)$, same greedy token |
#
# The same run from the command line (it writes `results.json`, `results.md` and plots):
#
# ```bash
# minisparse eval --builtin copy -c 256 --analysis 128 --out lab_out \
#     --variants "sinks=4,window=16;topk=5%;..."
# ```
#
# Here we use its Python API with a tiny configuration (256 tokens, the last 128 analysed), so the
# notebook runs in well under a minute.

# %%
import sys
import tempfile
from pathlib import Path

import numpy as np
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "models" / "minisparse-pydoc.gguf").is_file()), None)
if ROOT is None:
    raise FileNotFoundError("run this notebook from the minisparse checkout (notebooks/ beside models/)")
try:
    import minisparse
except ImportError:                                  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    import minisparse
from minisparse.lab import builtin_text, markdown_table, parse_variants, run_needle, run_text
from minisparse.lab.plots import needle_heatmaps, quality_vs_density

model = minisparse.load_model(ROOT / "models" / "minisparse-pydoc.gguf")
ids = model.tokenizer.encode(builtin_text("copy"))[:256]      # the copy module: held out from training
out_dir = Path(tempfile.mkdtemp(prefix="minisparse_lab_"))
print(len(ids), "tokens; plots go to", out_dir)

# %% [markdown]
# ## 1. The variants
#
# A variant is a spec string; `;` separates variants. Attention specs are the `--attention` syntax
# of the CLI (`,` is a union). A spec starting with a cache name (`recursive=`, `streaming=`,
# `press=`) is a bounded cache instead. One family per line here: patterns, top-k, MagicPIG,
# Quest, random masks, the gate, and two caches (64 slots).

# %%
spec = ";".join([
    "sinks=4,window=16", "sinks=4,window=64",                 # patterns (notebook 5)
    "topk=5%", "topk=15%",                                    # exact top-k (notebook 3)
    "sinks=4,window=16,magicpig=K8L75",                       # LSH sampler (notebook 4)
    "quest=16/10%",                           # page bounds (Quest)
    "random=10%x2",                                           # random masks (notebook 5)
    "gate=32",                                                # FastGRNN gate (notebook 7)
    "recursive=B64", "streaming=4+60",                      # bounded caches (notebook 6)
])
variants = parse_variants(spec, model, seed=0)
for v in variants:
    print(f"{v.kind:9s} {v.spec:34s} {v.error or v.nominal.get('describe', '')}")

# %% [markdown]
# ## 2. Run them
#
# `run_text` runs dense once, then every variant, teacher forced over the same tokens (protocol B:
# every position attends sparsely, so errors can compound through the layers). It returns plain
# dictionaries; `markdown_table` prints the same table as the CLI's `results.md`.

# %%
txt = run_text(model, ids, variants, analysis=128, protocol="B", seed=0)
res = {"model": "default", "model_name": "minisparse-pydoc", "text_name": "copy", "text": txt,
       "dense_layers": [], "seed": 0}
display(Markdown(markdown_table(res)))

# %% [markdown]
# ## 3. Quality vs density
#
# The lab's own figure: one curve per variant family (same member names), quality against realised
# density on a log axis. The ideal variant sits bottom-left for error and top-left for recall.

# %%
quality_vs_density(res, out_dir / "quality_vs_density.png")
display(Image(filename=str(out_dir / "quality_vs_density.png")))
# lab.plots selects matplotlib's file-only Agg backend; switch back so plt.show() draws inline
# %matplotlib inline

# %% [markdown]
# Where do the losses happen? Each result also holds per-layer numbers. Notice which layers each
# family struggles with, and compare with notebook 2: layers with diffuse attention (0–2) are hard
# for every budget-limited method, layer 3 (peaked, mostly local) is easy for everyone, and in
# layers 4–5 the content-based methods keep much more than a window of the same size.

# %%
ok = [r for r in txt["variants"] if r["kind"] != "error"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for r in ok:
    layers = r["layers"]
    axes[0].plot([x["layer"] for x in layers], [x["recall"]["mean"] for x in layers], "o-", ms=3, label=r["spec"])
    axes[1].plot([x["layer"] for x in layers], [x["rel_error"]["mean"] for x in layers], "o-", ms=3)
axes[0].set_ylabel("mass recall"); axes[1].set_ylabel("relative output error"); axes[1].set_yscale("log")
for ax in axes:
    ax.set_xlabel("layer")
axes[0].legend(fontsize=6, ncol=2); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. A needle in the haystack
#
# Perplexity averages over all tokens; long-range retrieval can fail while perplexity barely moves.
# The lab's second task is **pass-key retrieval** on the second embedded model
# (`minisparse-passkey.gguf`, trained for it): a 5-digit key hidden at some depth in filler text,
# asked for at the end. Dense attention answers it; does a sparse variant still find the needle?
# A tiny grid: 512 tokens, two depths, one seed, protocol B.

# %%
pk = minisparse.load_model(ROOT / "models" / "minisparse-passkey.gguf")
pk_variants = parse_variants("dense;sinks=4,window=64;topk=2%;topk=10%", pk, seed=0)
nd = run_needle(pk, pk_variants, lengths=[512], depths=[0.25, 0.75], seeds=[0], protocols=("B",))
for v, by in nd["accuracy"].items():
    print(f"{v:20s} exact match per depth {nd['depths']}: {by['B'][0]}")
needle_heatmaps({"needle": nd}, out_dir / "needle.png")
display(Image(filename=str(out_dir / "needle.png")))
# %matplotlib inline

# %% [markdown]
# A window of 64 keys cannot see a key more than a hundred tokens back, and 2 % of the keys is too few for top-k
# to carry the needle through all layers; 10 % is enough on this example. The CLI's `--needle` runs
# the full depth × length grid (and protocol A, dense prefill then sparse answer).
#
# ## Exercises
#
# 1. **Fair budgets.** Pick budgets so that `topk`, `quest`, `magicpig` and `sinks,window` all land
#    near a realised density of 0.1 (use the table to adjust), then rank them by perplexity ratio
#    and by KL. Do the two rankings agree?
# 2. **Protocol A.** Rerun section 2 with `protocol="A"` (dense up to the analysis rows, sparse
#    after). Which families gain most, and why does compounding matter for them?
# 3. **Dense layers.** Quest keeps its first layers dense. Rerun with `dense_layers=(0, 1)`
#    (`run_text(..., dense_layers=(0, 1))`) and compare the per-layer plot: how much of the total
#    loss came from layers 0 and 1?
