"""Teaching helpers shared by the notebooks: attention maps, mass-concentration measures, pictures
of a Selection (which keys each query reads) and its Graphviz `.dot` export.

Leaves out any attention arithmetic (minisparse.attention) and interactive widgets; matplotlib is
imported only inside the plotting functions, so `to_dot` works without it. The `.dot` text follows
the Graphviz DOT language (graphviz.org/doc/info/lang.html); `render_dot` calls the `dot` binary
only when it is installed.

Shape legend: Hq query heads, Tq queries, Tk keys.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np

EXACT, WEIGHTED, SUMMARY = 1.0, 0.6, 0.3      # cell values of selection_image


# ----------------------------------------------------------------------------- measures
def entropy(p, axis=-1):
    """Shannon entropy in nats of probability rows p (..., Tk) -> (...); 0 log 0 = 0.

    >>> round(float(entropy(np.array([0.5, 0.5]))), 4)
    0.6931
    """
    p = np.asarray(p, np.float64)
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis)


def keys_for_mass(p, level=0.9):
    """Fewest keys holding at least `level` of each row's mass: p (..., Tk) -> (...) int.

    Sort a row's probabilities in decreasing order; the answer is the first prefix whose sum
    reaches `level` (rows sum to 1). A uniform row over n keys needs ceil(level * n).

    >>> keys_for_mass(np.array([[0.7, 0.2, 0.1], [1/3, 1/3, 1/3]]), 0.9).tolist()
    [2, 3]
    """
    p = np.asarray(p, np.float64)
    c = np.cumsum(-np.sort(-p, axis=-1), axis=-1)                     # (..., Tk) sorted mass
    # 1e-12: a sum of float64 thirds lands a hair under 0.9 * 1 in exact arithmetic terms
    return (c < level * c[..., -1:] - 1e-12).sum(-1) + 1


def mass_curve(p):
    """Mean over rows of the sorted cumulative mass: p (..., Tk) -> (Tk,); entry m-1 is the mass
    the m largest keys of a row hold, averaged over rows (zeros in short causal rows count)."""
    p = np.asarray(p, np.float64)
    c = np.cumsum(-np.sort(-p, axis=-1), axis=-1)                     # (..., Tk)
    return c.reshape(-1, c.shape[-1]).mean(0)


# ----------------------------------------------------------------------------- pictures
def pattern(selector, T):
    """The Selection a content-free selector (window, sinks, strides, landmarks, random masks)
    makes for a causal prefill of T positions: keys are zeros, positions 0 .. T-1.

    >>> from minisparse.attention import Sinks
    >>> pattern(Sinks(2), 4).rows(0, 3)
    ([(0, 2)], [])
    """
    k = np.zeros((1, T, 1), np.float32)                               # (Hkv=1, T, d=1)
    pos = np.arange(T, dtype=np.int64)
    return selector.select(None, k, pos, pos)


def show_map(ax, p, title="", log=True, floor=1e-4):
    """Draw one attention map p (Tq, Tk) on a matplotlib axis (log colour scale by default)."""
    from matplotlib.colors import LogNorm
    p = np.asarray(p, np.float64)
    if log:
        im = ax.imshow(np.maximum(p, floor), norm=LogNorm(vmin=floor, vmax=1.0), cmap="magma",
                       interpolation="nearest")
    else:
        im = ax.imshow(p, vmin=0, vmax=max(float(p.max()), 1e-12), cmap="magma",
                       interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    return im


def _rows(sel, head, hq, hkv):
    """Per query t: (exact key indices, weighted (index, logw) pairs, pseudo-key ids) of one head."""
    sel = sel.normalize()
    s = sel.row_head(head, hq, hkv)
    out = []
    for t in range(sel.tq):
        ranges, idx = sel.rows(s, t)
        exact = [j for lo, hi in ranges for j in range(lo, hi)]
        exact += [j for j, w in idx if j < sel.tk and w == 0.0]
        weighted = [(j, w) for j, w in idx if j < sel.tk and w != 0.0]
        pseudo = [j - sel.tk for j, _ in idx if j >= sel.tk]
        out.append((exact, weighted, pseudo))
    return out


def _positions(sel, q_pos, k_pos):
    k_pos = np.arange(sel.tk) if k_pos is None else np.asarray(k_pos)
    q_pos = np.arange(sel.tk - sel.tq, sel.tk) if q_pos is None else np.asarray(q_pos)
    return q_pos, k_pos


def selection_image(sel, q_pos=None, k_pos=None, head=0, hq=None, hkv=None):
    """(Tq, Tk) image of what query head `head` reads, after causality: EXACT (1.0) for keys read
    as they are, WEIGHTED (0.6) for sampled keys with a log-weight, SUMMARY (0.3) for keys only
    seen through a pseudo-key (landmark block mean), 0 for keys not read.

    hq, hkv default to the Selection's own head count (shared selections: 1, 1)."""
    hq = sel.n_heads if hq is None else hq
    hkv = sel.n_heads if hkv is None else hkv
    q_pos, k_pos = _positions(sel, q_pos, k_pos)
    img = np.zeros((sel.tq, sel.tk))
    for t, (exact, weighted, pseudo) in enumerate(_rows(sel, head, hq, hkv)):
        for e in pseudo:
            if sel.extra_pos[e] <= q_pos[t]:
                lo, hi = sel.extra_lo[e], sel.extra_hi[e]
                img[t, lo:hi] = np.maximum(img[t, lo:hi], SUMMARY)
        for j, _ in weighted:
            img[t, j] = WEIGHTED
        img[t, exact] = EXACT
    img[k_pos[None, :] > q_pos[:, None]] = 0.0                        # causality by position
    return img


def to_dot(sel, q_pos=None, k_pos=None, head=0, hq=None, hkv=None, name="attention", label=None):
    """The attention topology of one head as Graphviz DOT text.

    One node per position (left to right); an edge j -> t when query t reads key j (after
    causality; information flows from the key to the query). Exact reads are solid, weighted
    (sampled) reads dashed with their weight exp(-logw) ~ 1/P as label, pseudo-keys (landmarks)
    are boxes fed by dotted edges from the keys they summarise. Self-reads (t reads t) are
    left out: every causal pattern has them.

    >>> from minisparse.attention import Window
    >>> import numpy as np
    >>> print(to_dot(pattern(Window(1), 3)).splitlines()[-2])
      p1 -> p2;
    """
    hq = sel.n_heads if hq is None else hq
    hkv = sel.n_heads if hkv is None else hkv
    q_pos, k_pos = _positions(sel, q_pos, k_pos)
    lines = [f'digraph "{name}" {{', "  rankdir=LR; splines=true; nodesep=0.15;",
             '  node [shape=circle, fontsize=10, width=0.3, fixedsize=true];']
    if label:
        lines.append(f'  label="{label}"; labelloc=t;')
    lines.append("  { rank=same; " + " ".join(f"p{int(p)};" for p in k_pos) + " }")
    lines += [f"  p{int(a)} -> p{int(b)} [style=invis, weight=100];"
              for a, b in zip(k_pos[:-1], k_pos[1:])]
    used = set()
    edges = []
    for t, (exact, weighted, pseudo) in enumerate(_rows(sel, head, hq, hkv)):
        qp = int(q_pos[t])
        for j in exact:
            if k_pos[j] <= qp and k_pos[j] != qp:
                edges.append(f"  p{int(k_pos[j])} -> p{qp};")
        for j, w in weighted:
            if k_pos[j] <= qp and k_pos[j] != qp:
                edges.append(f'  p{int(k_pos[j])} -> p{qp} [style=dashed, label="{np.exp(w):.3g}"];')
        for e in pseudo:
            if sel.extra_pos[e] <= qp:
                used.add(e)
                edges.append(f"  L{e} -> p{qp} [color=blue];")
    for e in sorted(used):
        lines.append(f'  L{e} [shape=box, color=blue, label="L{e}", width=0.4];')
        lines += [f"  p{int(k_pos[j])} -> L{e} [style=dotted, color=blue, arrowhead=none];"
                  for j in range(sel.extra_lo[e], sel.extra_hi[e])]
    return "\n".join(lines + edges + ["}"]) + "\n"


def render_dot(dot_text, path, fmt="png"):
    """Render DOT text to `path` with Graphviz's `dot` when it is installed; returns the path, or
    None when `dot` is absent (draw_topology draws the same graph with matplotlib)."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot_text.encode(), check=True)
    return path


def draw_topology(ax, sel, q_pos=None, k_pos=None, head=0, hq=None, hkv=None, title=""):
    """Arc diagram of the same graph as to_dot: positions on a line, one arc per key -> query
    read above it (solid exact, dashed weighted), landmark boxes below, fed by their blocks."""
    from matplotlib.patches import Arc
    hq = sel.n_heads if hq is None else hq
    hkv = sel.n_heads if hkv is None else hkv
    q_pos, k_pos = _positions(sel, q_pos, k_pos)
    top = 1.0
    for t, (exact, weighted, pseudo) in enumerate(_rows(sel, head, hq, hkv)):
        qp = float(q_pos[t])
        for j, style in [(j, "-") for j in exact] + [(j, "--") for j, _ in weighted]:
            kp = float(k_pos[j])
            if kp < qp:
                w = qp - kp
                ax.add_patch(Arc(((kp + qp) / 2, 0), w, w, theta1=0, theta2=180, lw=0.7,
                                 ls=style, color="C0" if style == "-" else "C1", alpha=0.7))
                top = max(top, w / 2)
        for e in pseudo:
            if sel.extra_pos[e] <= qp:
                x = (sel.extra_lo[e] + sel.extra_hi[e] - 1) / 2
                ax.plot([x, qp], [-1.5, 0], color="C2", lw=0.6, alpha=0.6)
    for e in range(sel.n_extra):
        lo, hi = sel.extra_lo[e], sel.extra_hi[e]
        ax.plot([lo, hi - 1], [-1.5, -1.5], color="C2", lw=4, solid_capstyle="butt")
        ax.text((lo + hi - 1) / 2, -2.2, f"L{e}", ha="center", va="top", fontsize=7, color="C2")
    ax.scatter(k_pos, np.zeros(len(k_pos)), s=12, color="k", zorder=3)
    ax.set_xlim(-1, float(max(k_pos.max(), q_pos.max())) + 1)
    ax.set_ylim(-3 if sel.n_extra else -1, top + 1)
    ax.set_yticks([])
    ax.set_xlabel("position")
    ax.set_title(title, fontsize=9)
    for s in ("left", "right", "top"):
        ax.spines[s].set_visible(False)
