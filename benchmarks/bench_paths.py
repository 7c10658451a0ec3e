"""Two source trees (or the plain and the fast path) side by side, in one run: decode and prefill
tokens/s of the same models, each measurement in its own subprocess, the trees interleaved
(A B A B ...) so that a drift of the machine's state falls on both alike.

It exists to check that a refactoring kept the speed: run it with the tree before the change and
the tree after it. It uses only the public API that every version has (`load_model`, `new_cache`,
`forward(..., last_only=True)`), so any two commits can be compared.

    git worktree add /tmp/before <commit>
    python3 benchmarks/bench_paths.py --tree before=/tmp/before --tree after=. --out paths.json
    python3 benchmarks/bench_paths.py --tree fast=. --tree plain=.:MINISPARSE_FAST=0 --models pydoc

A tree is NAME=PATH[:VAR=VALUE...]: extra environment variables for that tree's runs.
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from the workers' environment (as bench_engine.py
does) and recorded. Left out: llama.cpp and the other engines (bench_engine.py has them), RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
MODELS = ("pydoc", "smollm2")


def worker(model: str, decode: int, prefill: list[int]) -> dict:
    """Load `model` from the tree on sys.path, time one decode run and one prefill of each length."""
    import numpy as np
    import minisparse
    from threadpoolctl import threadpool_info
    path = {"pydoc": "models/minisparse-pydoc.gguf"}.get(model)
    if path is None:
        from minisparse.registry import resolve
        path = resolve(model)
    m = minisparse.load_model(str(path))
    rng = np.random.default_rng(0)
    prompt = lambda n: [1] + rng.integers(3, m.config.n_vocab, n - 1).tolist()  # noqa: E731
    m.forward(prompt(16), m.new_cache(), last_only=True)                 # compile / load kernels
    cache = m.new_cache()
    tok = int(np.argmax(m.forward(prompt(128), cache, last_only=True)[-1]))
    t = time.perf_counter()
    for _ in range(decode):
        tok = int(np.argmax(m.forward([tok], cache)[-1]))
    res = {"decode_tok_s": decode / (time.perf_counter() - t)}
    for n in prefill:
        ids = prompt(n)
        t = time.perf_counter()
        m.forward(ids, m.new_cache(), last_only=True)
        res[f"prefill{n}_tok_s"] = n / (time.perf_counter() - t)
    res["blas"] = [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads")}
                   for i in threadpool_info()]
    return res


def parse_tree(s: str):
    name, _, rest = s.partition("=")
    path, *env = rest.split(":")
    if not name or not path or not Path(path, "minisparse").is_dir():
        raise SystemExit(f"--tree {s!r}: expected NAME=PATH[:VAR=VALUE...] with PATH a minisparse checkout")
    return name, Path(path).resolve(), dict(e.split("=", 1) for e in env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH[:VAR=VALUE...]")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--repeats", type=int, default=5, help="runs per tree and model (median reported)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps after a 128-token prompt")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, decode, prefill = args.worker
        print(json.dumps(worker(model, int(decode), json.loads(prefill))))
        return
    trees = [parse_tree(t) for t in args.tree]
    env0 = {k: v for k, v in os.environ.items() if k not in PINS and k != "PYTHONPATH"}
    runs = {(t[0], m): [] for t in trees for m in args.models}
    for r in range(args.repeats):
        for model in args.models:
            for name, path, extra in trees:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--tree", "x=.", "--worker", model,
                       str(args.decode), json.dumps(args.prefill)]
                out = subprocess.run(cmd, cwd=path, env={**env0, **extra, "PYTHONPATH": str(path)},
                                     capture_output=True, text=True, timeout=1800)
                if out.returncode:
                    raise SystemExit(f"{name} on {model} failed:\n{out.stderr[-2000:]}")
                runs[(name, model)].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"repeat {r + 1}/{args.repeats} {model:8s} {name:8s} "
                      + " ".join(f"{k}={v:.1f}" for k, v in runs[(name, model)][-1].items()
                                 if k.endswith("tok_s")), file=sys.stderr, flush=True)
    keys = ["decode_tok_s"] + [f"prefill{n}_tok_s" for n in args.prefill]
    base = trees[0][0]
    table = []
    print(f"\nmedians of {args.repeats} runs, tokens/s (ratio to {base}); machine: "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"{'model':10s}{'tree':10s}" + "".join(f"{k:>24s}" for k in keys))
    for model in args.models:
        for name, path, extra in trees:
            med = {k: statistics.median(x[k] for x in runs[(name, model)]) for k in keys}
            ref = {k: statistics.median(x[k] for x in runs[(base, model)]) for k in keys}
            table.append({"model": model, "tree": name, "path": str(path), "env": extra,
                          **{k: med[k] for k in keys}, **{k + "_ratio": med[k] / ref[k] for k in keys},
                          "runs": runs[(name, model)]})
            print(f"{model:10s}{name:10s}" + "".join(f"{med[k]:14.1f} ({med[k] / ref[k]:5.3f})" for k in keys))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "repeats": args.repeats,
                                        "decode_steps": args.decode, "cores": os.cpu_count(),
                                        "loadavg_at_end": os.getloadavg(),
                                        "pins_removed": {k: os.environ.get(k) for k in PINS},
                                        "table": table}, indent=1))


if __name__ == "__main__":
    main()
