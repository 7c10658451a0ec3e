"""Selector quality on a real model: at decode queries, per layer, the dense softmax mass each
selector's key set holds (mass recall) and the relative output error |o_S - o| / |o| at 2%, 5%
and 10% realised density; checks the ordering top-k < top-k/kv < Quest < sinks+window < random.

Leaves out end-to-end effects (perplexity, generation): the q/k/v are the dense model's, taken
from `Model.forward(..., trace=...)` (post-RoPE), and each selector runs on them as a decode
query against the cache prefix.

    python3 benchmarks/selector_quality.py --out benchmarks/selector_quality.json
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout
from minisparse import load_model
from minisparse.attention import (IVF, LSH, Hybrid, IVFIndex, Quest, Selection, Selector,
                                  Sinks, TopK, Window, attend, dense_reference)

ROOT = Path(__file__).resolve().parent.parent
DENSITIES = (0.02, 0.05, 0.10)
ORDER = ("topk", "topk/kv", "quest", "sinks+window", "random")


class SinksWindowFraction(Selector):
    """Baseline at a matched budget: sinks (up to 4) then the newest keys, ceil(f * n) in all."""

    def __init__(self, f, sinks=4):
        self.f, self.sinks = f, sinks

    def _select(self, q, k, q_pos, k_pos):
        hi = np.searchsorted(k_pos, q_pos, side="right")                       # (Tq,) causal
        b = np.maximum(1, np.ceil(self.f * hi - 1e-9).astype(np.int64))       # (Tq,)
        s = np.minimum(self.sinks, b - 1)                                      # keep >= 1 recent
        lo = np.stack([np.zeros_like(hi), hi - (b - s)], 1).ravel()          # (2 Tq,) sinks, recent
        up = np.stack([s, hi], 1).ravel()
        ptr = np.arange(q_pos.size + 1, dtype=np.int64) * 2
        return Selection.from_lists(np.zeros(q_pos.size + 1, np.int64), np.zeros(0, np.int64),
                                    k.shape[1], r_ptr=ptr, r_lo=lo, r_hi=up)

    def describe(self):
        return f"sinks+window={self.f:g}"


class UniformRandom(Selector):
    """Baseline: ceil(f * n) distinct causal keys uniformly at random (seeded), shared by heads."""

    def __init__(self, f, seed=0):
        self.f, self.seed = f, seed

    def _select(self, q, k, q_pos, k_pos):
        rng = np.random.default_rng(self.seed)
        hi = np.searchsorted(k_pos, q_pos, side="right")
        rows = [np.sort(rng.choice(n, max(1, math.ceil(self.f * n - 1e-9)), replace=False))
                for n in hi]
        ptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([r.size for r in rows], out=ptr[1:])
        return Selection.from_lists(ptr, np.concatenate(rows), k.shape[1], normalized=True)

    def describe(self):
        return f"random={self.f:g},seed={self.seed}"


def selectors(f, page, ivf_index, seed):
    return {
        "topk": TopK(fraction=f),
        "topk/kv": TopK(fraction=f, per="kv"),
        "quest": Quest(page, fraction=f),
        "quest page 4": Quest(4, fraction=f),
        "sinks+window": SinksWindowFraction(f),
        "random": UniformRandom(f, seed),
        "lsh-rank K8L75": LSH(8, 75, seed=seed, fraction=f),
        "hybrid topk+lsh 0.5": Hybrid(TopK(0), LSH(8, 75, seed=seed, k=0), 0.5, fraction=f),
        "ivf nprobe=8": IVF(fraction=f, nprobe=8).bind(ivf_index),
    }


def evaluate(q, k, v, q_pos, sel):
    """Mean realised density, mass recall and relative error over the rows (Hq x Tq)."""
    hq, tq, d = q.shape
    tk = k.shape[1]
    o, st = attend(q, k, v, sel, q_pos=q_pos, return_stats=True)
    ref = dense_reference(q, k, v, q_pos=q_pos)                                # (Hq, Tq, d)
    s = np.einsum("htd,hsd->hts", q.astype(np.float64),
                  np.repeat(k, hq // k.shape[0], 0).astype(np.float64)) / math.sqrt(d)
    causal = np.arange(tk)[None, None, :] <= q_pos[None, :, None]
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)                                              # (Hq, Tq, Tk)
    mask, _ = sel.select(q, k, q_pos, np.arange(tk)).normalize().to_mask(hq, tq, tk)
    recall = (p * (mask & causal)).sum(-1)
    err = np.linalg.norm(o - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
    return {"density": float(st.attended_fraction.mean()), "mass_recall": float(recall.mean()),
            "rel_err": float(err.mean())}


def text_tokens(model, name, n):
    """stories260K: its own greedy continuation (512-token training context); the pydoc model:
    pydoc's text for the json module (the kind of text it was trained on)."""
    tok = model.tokenizer
    if "stories" in name:
        ids = tok.encode("Once upon a time", add_bos=True)
        ids = list(ids)
        cache = model.new_cache()
        logits = model.forward(ids, cache)[-1]
        while len(ids) < n:
            ids.append(int(np.argmax(logits)))
            logits = model.forward([ids[-1]], cache)[-1]
        return ids[:n]
    import pydoc, json as _json
    text = pydoc.render_doc(_json, renderer=pydoc.plaintext)
    ids = list(tok.encode(text, add_bos=True))
    return ids[:n]


def run_model(path, n_tokens, page, n_queries, seed):
    model = load_model(path)
    name = Path(path).stem
    ids = text_tokens(model, name, n_tokens)
    T = len(ids)
    _, tr = model.trace(ids)
    # decode queries: n_queries positions spread over the second half of the text
    q_pos = np.unique(np.linspace(T // 2, T - 1, n_queries).astype(np.int64))
    import hashlib
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    res = {"model": name, "sha256": sha, "tokens": T, "query_positions": q_pos.tolist(), "page": page,
           "seed": seed, "layers": {}}
    for l in range(model.config.n_layers):
        q, k, v = (np.ascontiguousarray(tr[f"blk.{l}.{x}"]) for x in "qkv")   # (H, T, d)
        qd = np.ascontiguousarray(q[:, q_pos])                                 # (Hq, Tq, d)
        ivf_index = IVFIndex(k, seed=seed)            # built "after prefill" over the whole text
        per = {}
        for f in DENSITIES:
            for nm, sel in selectors(f, page, ivf_index, seed).items():
                per.setdefault(nm, {})[f"{f:g}"] = evaluate(qd, k, v, q_pos, sel)
        # MagicPIG's density is set by K, L (not a budget): reported at its own density
        for K in (8, 12, 16):
            mp = Sinks(4) | Window(16) | LSH(K, 75, seed=seed, mode="sample")
            per[f"magicpig K{K}L75 +sinks4 +window16"] = {"own": evaluate(qd, k, v, q_pos, mp)}
        res["layers"][l] = per
    return res


def ordering(res):
    """Per density: does rel_err follow ORDER (strictly increasing) per layer and on average?"""
    out = {}
    for f in DENSITIES:
        key = f"{f:g}"
        errs = {nm: [res["layers"][l][nm][key]["rel_err"] for l in res["layers"]] for nm in ORDER}
        mean = [float(np.mean(errs[nm])) for nm in ORDER]
        per_layer = [all(errs[a][i] < errs[b][i] for a, b in zip(ORDER, ORDER[1:]))
                     for i in range(len(res["layers"]))]
        broken = sorted({f"{a} >= {b} (layer {l})" for i, l in enumerate(res["layers"])
                         for a, b in zip(ORDER, ORDER[1:]) if errs[a][i] >= errs[b][i]})
        out[key] = {"mean_holds": all(x < y for x, y in zip(mean, mean[1:])),
                    "layers_holding": int(sum(per_layer)), "n_layers": len(per_layer),
                    "violations": broken}
    return out


def table(res):
    first = next(iter(res["layers"]))                   # 0, or "0" when read back from JSON
    names = list(res["layers"][first])
    lines = [f"## {res['model']} ({res['tokens']} tokens, {len(res['query_positions'])} decode "
             f"queries, mean over layers and heads; per-layer values in the JSON)", "",
             "| selector | " + " | ".join(f"{100 * f:g}%: density / mass recall / rel err"
                                        for f in DENSITIES) + " |",
             "|---|" + "---|" * len(DENSITIES)]
    for nm in names:
        cells = []
        for key in (["own"] if "own" in res["layers"][first][nm] else [f"{f:g}" for f in DENSITIES]):
            m = [res["layers"][l][nm][key] for l in res["layers"]]
            cells.append(f"{100 * np.mean([x['density'] for x in m]):.1f}% / "
                         f"{np.mean([x['mass_recall'] for x in m]):.3f} / "
                         f"{np.mean([x['rel_err'] for x in m]):.3f}")
        lines.append(f"| {nm} | " + " | ".join(cells) + " |")
    lines += ["", "Per-layer relative error at each density:", ""]
    for f in DENSITIES:
        key = f"{f:g}"
        lines.append(f"- {100 * f:g}%: " + "; ".join(
            f"{nm} " + "/".join(f"{res['layers'][l][nm][key]['rel_err']:.3f}" for l in res["layers"])
            for nm in ORDER))
    lines += ["", "Ordering " + " < ".join(ORDER) + " (relative error):", ""]
    for key, o in res["ordering"].items():
        lines.append(f"- {100 * float(key):g}%: mean over layers {'holds' if o['mean_holds'] else 'FAILS'}; "
                     f"{o['layers_holding']}/{o['n_layers']} layers hold"
                     + (f"; violations: {', '.join(o['violations'])}" if o["violations"] else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None,
                    help="GGUF paths (default: ../shared/fixtures/stories260K.gguf and "
                         "models/minisparse-pydoc.gguf where present)")
    ap.add_argument("--queries", type=int, default=32, help="decode query positions per model")
    ap.add_argument("--seed", type=int, default=0, help="LSH planes, IVF k-means, random baseline")
    ap.add_argument("--out", type=Path, default=Path("selector_quality.json"))
    args = ap.parse_args()
    models = args.models or [p for p in (ROOT.parent / "shared/fixtures/stories260K.gguf",
                                         ROOT / "models/minisparse-pydoc.gguf") if p.exists()]
    out = {"densities": DENSITIES, "order": ORDER, "results": []}
    for path in models:
        t0 = time.time()
        stories = "stories" in Path(path).name
        # stories260K trained on 512-token windows; the pydoc model on 2048
        res = run_model(str(path), 512 if stories else 2048, 8 if stories else 16,
                        args.queries, args.seed)
        res["ordering"] = ordering(res)
        res["seconds"] = round(time.time() - t0, 1)
        out["results"].append(res)
        print(table(res), "\n", flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
