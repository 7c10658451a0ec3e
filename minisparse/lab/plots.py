"""PNG plots of lab results (matplotlib, Agg backend, no display): quality against realised
density with one curve per variant family, and pass-key accuracy heat maps (depth x length).

Leaves out computing anything (runner.py) and interactive figures. Small files on purpose
(~80 dpi, few colours) so committed plots stay well under 100 KB.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .runner import sparse_density


def unavailable():
    """Why plots cannot be drawn in this environment (matplotlib is an optional dependency), or
    None: asked before a run, so a missing package costs a note, not the run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'minisparse[lab]')"
    return None


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def quality_vs_density(res: dict, path) -> None:
    """Three panels (perplexity ratio, relative output error, mass recall) against realised
    density at the analysis rows; variants of one family (same member names) form one curve."""
    plt = _plt()
    fam = defaultdict(list)
    for r in res["text"]["variants"]:
        if r["kind"] != "error":
            fam[r["family"]].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=80)
    panels = [("ppl ratio", lambda r: r["lm"]["ppl_ratio"]),
              ("rel. output error", lambda r: r["rel_error"]["mean"]),
              ("attention-mass recall", lambda r: r["recall"]["mean"])]
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator
    colours = plt.get_cmap("tab20").colors
    ticks = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    for ax, (name, get) in zip(axes, panels):
        for i, (f, rows) in enumerate(sorted(fam.items())):
            rows = sorted(rows, key=sparse_density)
            ax.plot([sparse_density(r) for r in rows], [get(r) for r in rows], "-",
                    marker="osD^v<>p*h"[i % 10], color=colours[(2 * i) % 20 + (i // 10) % 2],
                    label=f, ms=4)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_xlabel("realised density (sparse layers)")
        ax.set_title(name, fontsize=10)
        if name == "ppl ratio":
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(FixedLocator([0.8, 1, 1.2, 1.5, 2, 3, 5, 10, 20, 50, 100]))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{res['model_name']}: {res['text_name']}, {res['text']['n_tokens']} tokens, "
                 f"protocol {res['text']['protocol']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def needle_heatmaps(res: dict, path) -> None:
    """One heat map per (variant, protocol): exact-match accuracy, rows = lengths, cols = depths."""
    plt = _plt()
    nd = res["needle"]
    cells = [(v, p, g) for v, by in nd["accuracy"].items() for p, g in sorted(by.items())]
    if not cells:
        return
    cols = min(4, len(cells))
    rows = int(np.ceil(len(cells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), dpi=72, squeeze=False)
    for ax in axes.ravel()[len(cells):]:
        ax.axis("off")
    for ax, (v, p, g) in zip(axes.ravel(), cells):
        a = np.asarray(g, float)
        ax.imshow(a, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                ax.text(j, i, "–" if np.isnan(a[i, j]) else f"{a[i, j]:.2f}", ha="center",
                        va="center", fontsize=7)
        ax.set_xticks(range(len(nd["depths"])), [f"{d:g}" for d in nd["depths"]], fontsize=7)
        ax.set_yticks(range(len(nd["lengths"])), [str(n) for n in nd["lengths"]], fontsize=7)
        ax.set_title(f"{v} ({p})", fontsize=8)
        ax.set_xlabel("depth", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
