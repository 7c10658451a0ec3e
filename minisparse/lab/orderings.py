"""Check the literature's orderings on lab results: `python3 -m minisparse.lab.orderings DIR/results.json ...`
prints, per results file, each claim with the measured numbers and whether it holds.

Leaves out running anything (it reads results.json) and any tolerance: a claim holds or not on the
numbers as measured. The claims are orderings the sparse-attention literature reports (oracle
top-k, StreamingLLM sinks, Quest, MagicPIG, RIS-Kernel random masks); docs/lab.md lists them.
"""
from __future__ import annotations

import json
import sys

from .runner import sparse_density


def _by_spec(res):
    return {r["spec"]: r for r in res["text"]["variants"] if r["kind"] != "error"}


def _nearest(rows, family, target):
    cands = [r for r in rows if r["family"] == family]
    return min(cands, key=lambda r: abs(sparse_density(r) - target)) if cands else None


def check(res) -> list[dict]:
    """[{claim, numbers, holds}] for one results.json (text part)."""
    v, rows, out = _by_spec(res), [r for r in res["text"]["variants"] if r["kind"] != "error"], []

    def add(claim, numbers, holds):
        out.append({"claim": claim, "numbers": numbers, "holds": holds})

    if "topk=10%" in v:
        lm = v["topk=10%"]["lm"]
        add("top-k 10%: ppl ratio <= 1.15 and agreement >= 0.85",
            f"ratio {lm['ppl_ratio']:.4f}, agreement {lm['agreement']:.3f}",
            lm["ppl_ratio"] <= 1.15 and lm["agreement"] >= 0.85)
    s = "topk=5%,sinks=4,window=16"
    if s in v:
        lm = v[s]["lm"]
        add("top-k 5% + 4 sinks + 16 window: ppl ratio <= 1.12",
            f"ratio {lm['ppl_ratio']:.4f} (density {sparse_density(v[s]):.3f})", lm["ppl_ratio"] <= 1.12)
    if "window=63" in v and "sinks=4,window=59" in v:
        w, sw = v["window=63"]["lm"]["ppl_ratio"], v["sinks=4,window=59"]["lm"]["ppl_ratio"]
        ex = (w - 1) / (sw - 1) if sw != 1 else float("inf")
        add("64 keys: sinks+window lowers the ppl ratio >= 2x vs window only",
            f"window {w:.4f}, sinks+window {sw:.4f}: quotient {w / sw:.3f}, excess (r-1) quotient {ex:.2f}",
            w / sw >= 2)
    for target in (0.05, 0.10):
        fam = [_nearest(rows, f, target) for f in ("topk", "quest", "sinks+window", "random")]
        if all(fam):
            errs = [r["rel_error"]["mean"] for r in fam]
            add(f"density ~{target:.0%}: error top-k < Quest < sinks+window < random",
                ", ".join(f"{r['spec']} {e:.4f} @ {sparse_density(r):.3f}" for r, e in zip(fam, errs)),
                all(a < b for a, b in zip(errs, errs[1:])))
    if "magicpig=K8L75" in v and "uncorrected:magicpig=K8L75" in v:
        c, u = v["magicpig=K8L75"]["rel_error"]["mean"], v["uncorrected:magicpig=K8L75"]["rel_error"]["mean"]
        add("MagicPIG's -log P correction lowers the output error >= 15%",
            f"corrected {c:.4f}, uncorrected {u:.4f}: error change {100 * (c / u - 1):+.1f}% "
            f"(density {sparse_density(v['magicpig=K8L75']):.3f}; ppl ratio "
            f"{v['magicpig=K8L75']['lm']['ppl_ratio']:.4f} vs {v['uncorrected:magicpig=K8L75']['lm']['ppl_ratio']:.4f})",
            c <= 0.85 * u)
    for r in sorted((r for r in rows if r["family"] == "random"), key=sparse_density):
        add(f"RIS {r['spec']}: coverage and quality vs nominal density",
            f"{r['budget']['nominal']['describe']}; nominal {r['budget']['nominal']['fraction']:.2f}, "
            f"realised density {sparse_density(r):.3f}, recall {r['recall']['mean']:.3f}, "
            f"error {r['rel_error']['mean']:.4f}, ppl ratio {r['lm']['ppl_ratio']:.4f}, "
            f"agreement {r['lm']['agreement']:.3f}", None)
    return out


def main(paths) -> int:
    for p in paths:
        res = json.load(open(p))
        print(f"## {res['model_name']} ({res['text_name']}, {res['text']['n_tokens']} tokens, "
              f"dense layers {res['dense_layers'] or 'none'})\n")
        print("Densities are over the layers not kept dense; errors and recall pool all layers.\n")
        print("| claim | measured | holds |\n|---|---|---|")
        for c in check(res):
            h = "—" if c["holds"] is None else ("yes" if c["holds"] else "**no**")
            print(f"| {c['claim']} | {c['numbers']} | {h} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
