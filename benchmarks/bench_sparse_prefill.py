"""Sparse prefill vs dense on SmolLM2: the wall time of a chunked prefill of N tokens of real text
(the pydoc topics) for dense and for each selector, on the fast path as it is (sparse prefill
as masked tiles: minisparse/fast/prefill.py) and, for comparison, with the selector's own
selection fed to the fast row kernel (what the fast path did before). Configurations run
interleaved, round after round, so a loaded machine slows them alike; the table gives medians
and the ratio to dense. Target (issue 19): no sparse prefill slower than dense.

    python3 benchmarks/bench_sparse_prefill.py [--tokens 2048] [--rounds 2] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                       # run from a checkout

SPECS = ["dense", "topk=2%", "topk=2%/kv", "topk=128/r16", "window=128", "sinks=4,window=252",
         "blocks=64", "quest=16/5%", "ivf=64/p8/c256,seed=2", "lsh=K8L75/5%,seed=1"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--specs", default=";".join(SPECS), help="';'-separated attention specs")
    ap.add_argument("--no-before", action="store_true", help="skip the select+row-kernel runs")
    ap.add_argument("--quick", action="store_true", help="1,024 tokens, one round, four specs")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.rounds = 1024, 1
        a.specs = "dense;topk=2%;sinks=4,window=252;quest=16/5%"

    import minisparse
    from minisparse.attention.kernel import attend
    from minisparse.fast import attention as fa
    from minisparse.lab.texts import builtin_text
    model = minisparse.load_model(a.model)
    ids = model.tokenizer.encode(builtin_text("pydoc"))[:a.tokens]
    if len(ids) < a.tokens:
        raise SystemExit(f"--tokens {a.tokens}: the text has only {len(ids)} tokens")
    fast_ops = model.ops
    before_ops = dataclasses.replace(fast_ops, attend=partial(attend, kernel=fa.kernel))
    specs = a.specs.split(";")
    configs = [(s, "tiles", fast_ops) for s in specs]
    configs += [(s, "select+rows", before_ops) for s in specs if s != "dense" and not a.no_before]
    for spec, _, ops in configs:                                     # compile every kernel once
        model.ops = ops
        model.forward(ids[:300], attention=None if spec == "dense" else spec)
    times = {(s, p): [] for s, p, _ in configs}
    cpu = {(s, p): [] for s, p, _ in configs}
    for r in range(a.rounds):
        for spec, path, ops in configs:
            model.ops = ops
            t0, c0 = time.perf_counter(), time.process_time()
            model.prefill(ids, chunk=a.chunk, attention=None if spec == "dense" else spec)
            times[spec, path].append(time.perf_counter() - t0)
            cpu[spec, path].append(time.process_time() - c0)
            print(f"round {r}: {spec} [{path}] {times[spec, path][-1]:.2f} s, CPU "
                  f"{cpu[spec, path][-1]:.2f} s", file=sys.stderr, flush=True)
    model.ops = fast_ops
    dense = float(np.median(times["dense", "tiles"]))
    dense_cpu = float(np.median(cpu["dense", "tiles"]))
    rows = []
    print(f"\nprefill of {a.tokens} tokens ({a.model}, chunk {a.chunk}), median of {a.rounds}; "
          f"CPU: this process's (all threads); load average at the end {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores\n")
    print(f"| attention | path | seconds | / dense | CPU s | / dense |\n|---|---|---:|---:|---:|---:|")
    for (spec, path), ts in times.items():
        med, med_cpu = float(np.median(ts)), float(np.median(cpu[spec, path]))
        rows.append({"attention": spec, "path": path, "seconds": med, "all": ts,
                     "ratio_to_dense": med / dense, "cpu_seconds": med_cpu,
                     "cpu_all": cpu[spec, path], "cpu_ratio_to_dense": med_cpu / dense_cpu})
        print(f"| {spec} | {path} | {med:.2f} | {med / dense:.2f} | {med_cpu:.2f} | "
              f"{med_cpu / dense_cpu:.2f} |")
    result = {"model": a.model, "tokens": a.tokens, "chunk": a.chunk, "rounds": a.rounds,
              "rows": rows, "machine": platform.machine(), "cores": os.cpu_count(),
              "load_average": os.getloadavg(),
              "command": "python3 benchmarks/bench_sparse_prefill.py " + " ".join(argv or sys.argv[1:])}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
