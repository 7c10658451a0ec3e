"""Lab speed: the wall time of `minisparse eval` (minisparse.lab.runner.run_text) per variant of
the SmolLM2 suite in docs/lab.md, at a given length, one variant at a time so each figure is that
variant's own (teacher-forced forward with its sparse prefill, the per-layer trace and analysis),
beside the dense forward every run starts with. Prints a table, writes JSON next to the script.

Targets (issue 19): every variant at 4,096 tokens in <= 2 min wall on the 2-core machine; LSH,
MagicPIG and Quest no slower than 2x top-k at the same budget; the whole suite <= 30 min.

    python3 benchmarks/bench_lab_speed.py                   # the suite at 4,096 tokens
    python3 benchmarks/bench_lab_speed.py --quick           # 1,024 tokens, four variants
    python3 benchmarks/bench_lab_speed.py --tokens 8192 --variants "topk=5%;quest=16/5%"
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                       # run from a checkout

# docs/lab.md's SmolLM2 suite (the 1,024-token run there), in its order
SUITE = ("topk=5%;topk=10%;topk=20%;topk=5%,sinks=4,window=16;window=63;sinks=4,window=59;"
         "quest=16/5%;quest=16/10%;sinks=4,window=41;sinks=4,window=85;random=1%x3;random=1%x8;"
         "random=1%x70;magicpig=K8L75;uncorrected:magicpig=K8L75;lsh=K8L75/10%;recursive=B128;"
         "streaming=4+124")
QUICK = "topk=5%;sinks=4,window=59;quest=16/5%;recursive=B128"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--builtin", default="pydoc", help="the text (minisparse.lab.texts)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--analysis", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--variants", default=SUITE, help="';'-separated, as minisparse eval takes")
    ap.add_argument("--quick", action="store_true", help="1,024 tokens, four variants")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.variants = 1024, QUICK

    import minisparse
    from minisparse.lab.runner import budget_text, parse_variants, run_text
    from minisparse.lab.texts import builtin_text
    model = minisparse.load_model(a.model)
    ids = model.tokenizer.encode(builtin_text(a.builtin))[:a.tokens]
    if len(ids) < a.tokens:
        raise SystemExit(f"--tokens {a.tokens}: --builtin {a.builtin} has only {len(ids)} tokens")
    model.forward(ids[:300])                                         # compile the kernels once
    rows, t_all = [], time.perf_counter()
    for var in parse_variants(a.variants, model, seed=0):
        t0 = time.perf_counter()
        res = run_text(model, ids, [var], a.analysis, (), a.chunk, "B", seed=0)
        wall = time.perf_counter() - t0
        v = res["variants"][0]
        row = {"variant": var.spec, "wall_seconds": wall, "dense_seconds": res["dense"]["seconds"],
               "variant_seconds": v.get("seconds"), "error": v.get("error"),
               "ppl_ratio": v.get("lm", {}).get("ppl_ratio"),
               "budget": budget_text(v.get("budget", {}).get("nominal", {})),
               "keys_read": v.get("budget", {}).get("keys_read_mean")}
        rows.append(row)
        print(f"{var.spec}: {wall:.1f} s (dense {row['dense_seconds']:.1f} s, variant "
              f"{row['variant_seconds']} s)", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    top = {r["variant"].split("=")[1]: r["variant_seconds"] for r in rows
           if r["variant"].startswith("topk=") and "," not in r["variant"] and r["variant_seconds"]}
    print(f"\n{a.model}, {a.tokens} tokens of --builtin {a.builtin}, analysis {a.analysis} rows, "
          f"chunk {a.chunk}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(a shared machine: figures are upper bounds)\n")
    print("| variant | budget | wall s (dense + variant) | variant s | ppl ratio | keys read |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        vs = "error: " + r["error"] if r["error"] else f"{r['variant_seconds']:.1f}"
        ppl = "—" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.3f}"
        keys = "—" if r["keys_read"] is None else f"{r['keys_read']:.0f}"
        print(f"| `{r['variant']}` | {r['budget']} | {r['wall_seconds']:.1f} | {vs} | {ppl} | {keys} |")
    print(f"\nwhole run: {total / 60:.1f} min; a suite run (one dense forward, then every variant) "
          f"takes about the dense forward once plus the variant column's sum: "
          f"{(rows[0]['dense_seconds'] + sum(r['variant_seconds'] or 0 for r in rows)) / 60:.1f} min"
          if rows else "")
    result = {"model": a.model, "builtin": a.builtin, "tokens": a.tokens, "analysis": a.analysis,
              "chunk": a.chunk, "rows": rows, "topk_seconds": top, "total_seconds": total,
              "machine": platform.machine(), "cores": os.cpu_count(),
              "load_average": os.getloadavg(), "python": platform.python_version(),
              "command": "python3 benchmarks/bench_lab_speed.py " + " ".join(argv or sys.argv[1:])}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
