"""KIVI's quantisation error on a real model's keys and values: relative error of the 2-bit keys
(per channel, groups of G tokens) and values (per token, groups of G channels), and of the
attention output of the last 8 queries when every key and value is 2-bit, layer by layer.

    python3 benchmarks/kivi_error.py [--model smollm2] [--tokens 1024] [--group 32]

Prints one line per quantity (per-layer values and their median) and writes kivi_error_g<G>.json
next to this script.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minisparse                                                        # noqa: E402
from minisparse.attention import attend                                  # noqa: E402
from minisparse.cache.kivi import (dequantize_keys, dequantize_values,   # noqa: E402
                                   quantize_keys, quantize_values)
from minisparse.lab.texts import builtin_text                            # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--group", type=int, default=32)
    a = ap.parse_args(argv)
    m = minisparse.load_model(a.model)
    ids = m.tokenizer.encode(builtin_text("pydoc"))[:a.tokens]
    n = len(ids) // a.group * a.group                     # whole key groups
    ids = ids[:n]
    tr = {}
    m.forward(ids, trace=tr, last_only=True)
    G, pos = a.group, np.arange(n)
    rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))   # noqa: E731
    out = {"keys": [], "values": [], "attention_out": []}
    for l in range(m.config.n_layers):
        k, v, q = tr[f"blk.{l}.k"], tr[f"blk.{l}.v"], tr[f"blk.{l}.q"]    # (Hkv, n, d), (Hq, n, d)
        kh = dequantize_keys(*quantize_keys(k, G), G)
        vh = dequantize_values(*quantize_values(v, G), G)
        o = attend(q[:, -8:], k, v, q_pos=pos[-8:], k_pos=pos)
        oh = attend(q[:, -8:], kh, vh, q_pos=pos[-8:], k_pos=pos)
        out["keys"].append(rel(kh, k)), out["values"].append(rel(vh, v))
        out["attention_out"].append(rel(oh, o))
    for name, xs in out.items():
        print(f"{name:14s} median {np.median(xs):.2f}  by layer " + " ".join(f"{x:.2f}" for x in xs))
    res = {"command": "python3 benchmarks/kivi_error.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": a.model, "tokens": n, "group": G, "relative_error": out}
    p = Path(__file__).with_name(f"kivi_error_g{G}.json")
    p.write_text(json.dumps(res, indent=1))
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
