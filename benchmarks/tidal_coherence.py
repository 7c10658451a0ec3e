"""TidalDecode's premise measured: how much of each layer's softmax mass (the last query of a real
text, mean over query heads) lies on the positions a selecting layer chose (its own key and the
top k - 1, per query head, reused by head index as TidalDecode reuses them), beside the mass on
the layer's own choice. One table, JSON written next to this script.

    python3 benchmarks/tidal_coherence.py --model smollm2 --length 1024 --k 64 --select 2,13
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout
from minisparse import load_model
from minisparse.attention import Tidal
from minisparse.lab.tasks import long_texts
from minisparse.registry import resolve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=1024, help="tokens of the documentation's prose")
    ap.add_argument("--k", type=int, default=64, help="keys each selecting layer keeps per head")
    ap.add_argument("--select", default="2,13", help="the selecting layers (TidalDecode: 2 and L)")
    a = ap.parse_args(argv)
    model = load_model(resolve(a.model))
    sel_layers = [int(x) for x in a.select.split(",")]
    ids = model.tokenizer.encode(long_texts(tokenizer=None)["prose:pydoc"][:40 * a.length])[:a.length]
    if len(ids) < a.length:
        raise SystemExit(f"--length {a.length}: the text has {len(ids)} tokens")
    _, steps = model.trace(ids)
    T, last, pos = len(ids), np.array([len(ids) - 1]), np.arange(len(ids))
    rule = Tidal(a.k, max(sel_layers)).topk()          # the selecting layers' rule

    def probs(l):                                     # (Hq, T) the last query's softmax
        q, k = steps[f"blk.{l}.q"][:, -1], steps[f"blk.{l}.k"]
        k = np.repeat(k, q.shape[0] // k.shape[0], 0).astype(np.float64)
        s = np.einsum("hd,htd->ht", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    def chosen(l):                                    # (Hq, T) bool
        q, k = steps[f"blk.{l}.q"][:, -1:], steps[f"blk.{l}.k"]
        return rule.select(q, k, last, pos).to_mask(q.shape[0], 1, T)[0][:, 0]

    picks = {s: chosen(s) for s in sel_layers}
    rows = []
    for l in range(model.config.n_layers):
        p = probs(l)
        rows.append({"layer": l, "own": float((p * chosen(l)).sum(-1).mean()),
                     **{f"layer{s}": float((p * picks[s]).sum(-1).mean()) for s in sel_layers}})
    print(f"| layer | mass on its own choice | " + " | ".join(f"on layer {s}'s" for s in sel_layers) + " |")
    print("|---|---|" + "---|" * len(sel_layers))
    for r in rows:
        print(f"| {r['layer']} | {r['own']:.3f} | " + " | ".join(f"{r[f'layer{s}']:.3f}" for s in sel_layers) + " |")
    command = "python3 benchmarks/tidal_coherence.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(__file__).with_name(f"tidal_coherence_{a.model}_{a.length}.json")
    out.write_text(json.dumps({"command": command, "args": vars(a), "rows": rows}, indent=1))
    print(f"\nwritten {out}: {command}", file=sys.stderr)


if __name__ == "__main__":
    main()
