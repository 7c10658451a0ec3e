"""KV storage: bytes of the KIVI 2-bit cache against float16 / float32 at several lengths, and the
decode-step time of dense float32 storage against kivi2 (dequantise on read) side by side.

    python3 benchmarks/bench_kv_storage.py [--model smollm2] [--context 1024] [--steps 16] [--rounds 3]

Prints two markdown tables and writes bench_kv_storage.json next to this script. The memory
table needs only the model's shapes; the timing prefills `--context` tokens once per storage,
then runs `--rounds` rounds of `--steps` decode steps, the storages interleaved within each
round, and reports the median step time of each and their ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minisparse                                   # noqa: E402
from minisparse.cache import KiviCache              # noqa: E402
from minisparse.spec import parse_cache_spec        # noqa: E402

SPECS = ("kivi2/g32/r128", "kivi2/g32/r32")


def memory_rows(cfg, lengths):
    rows = []
    for n in lengths:
        row = {"positions": n}
        for spec in SPECS:
            g, r = (int(p[1:]) for p in spec.split("/")[1:])
            c = KiviCache(cfg, g, r)
            x = np.zeros((cfg.n_kv_heads, n, cfg.head_dim), np.float32)
            for layer in range(cfg.n_layers):
                c.update(layer, x, x, np.arange(n))
            c.advance(n)
            m = c.memory()
            row["float16"], row["float32"] = m["float16"], m["float32"]
            row[spec], row[spec + " ratio"] = m["kivi2"], m["ratio_float16"]
        rows.append(row)
    return rows


def timing(model, context, steps, rounds, seed=0):
    ids = list(np.random.default_rng(seed).integers(100, model.config.n_vocab - 1, size=context + steps * rounds))
    caches = {"float32": model.new_cache(), "kivi2/g32/r128": parse_cache_spec("kivi2/g32/r128", model)}
    for c in caches.values():
        for a in range(0, context, 512):
            model.forward(ids[a:min(a + 512, context)], c, last_only=True)
    times = {k: [] for k in caches}
    for r in range(rounds):
        for name, c in caches.items():                 # interleaved: both see the same load
            for s in range(steps):
                t = ids[context + r * steps + s]
                t0 = time.perf_counter()
                model.forward([t], c, last_only=True)
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"context": context, "steps": steps, "rounds": rounds, "median_s": med,
            "ratio_kivi2_over_float32": med["kivi2/g32/r128"] / med["float32"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    model = minisparse.load_model(args.model)
    cfg = model.config
    mib = lambda b: f"{b / 2**20:.2f} MiB"          # noqa: E731
    rows = memory_rows(cfg, [int(x) for x in args.lengths.split(",")])
    print(f"Memory ({args.model}: {cfg.n_layers} layers, {cfg.n_kv_heads} KV heads, d = {cfg.head_dim})\n")
    print("| positions | float32 | float16 | " + " | ".join(f"{s} | ratio" for s in SPECS) + " |")
    print("|---" * (3 + 2 * len(SPECS)) + "|")
    for r in rows:
        print(f"| {r['positions']:,} | {mib(r['float32'])} | {mib(r['float16'])} | "
              + " | ".join(f"{mib(r[s])} | {r[s + ' ratio']:.2f}x" for s in SPECS) + " |")
    t = timing(model, args.context, args.steps, args.rounds)
    print(f"\nDecode step at {args.context} positions (median of {args.steps * args.rounds}, interleaved)\n")
    print("| storage | median step | vs float32 |\n|---|---|---|")
    for k, v in t["median_s"].items():
        print(f"| {k} | {v * 1e3:.1f} ms | {v / t['median_s']['float32']:.2f}x |")
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"command": "python3 benchmarks/bench_kv_storage.py " + " ".join(argv or sys.argv[1:]),
                               "model": args.model, "memory": rows, "timing": t,
                               "python": platform.python_version(),
                               "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
