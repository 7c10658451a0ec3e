"""Where a model's resident memory goes: bench_engine.py's RSS measurement, step by step.

Each worker is a fresh subprocess that imports minisparse from one source tree (`--roots`; the
first is this checkout), takes the runtime floor as bench_engine.py does (`warm_minisparse_kernels`:
Python, NumPy, Numba/LLVM and the compiled kernels, no model), then loads the model and records
RSS after each step: the GGUF walk and weights, the tokenizer, encoding a prompt, a 128-token
prefill and 32 decode steps (bench_engine.py's decode run, which uses random ids: here the prompt
also goes through the tokenizer, so its working memory counts). `model part` is the peak RSS
(VmHWM) minus the floor, over the GGUF file's size: issue 23's memory figure. Roots alternate run
by run, so a loaded machine weighs on both alike.

    python3 benchmarks/bench_rss.py --roots . ../main --runs 3     # this checkout vs main
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" * 8


def worker(root, model, steps):
    sys.path.insert(0, str(Path(root).resolve()))
    import numpy as np
    import minisparse
    import minisparse.registry
    from minisparse.gguf_io import load_gguf
    from minisparse.model import Model
    from minisparse import fast as fast_path
    sys.path.insert(1, str(HERE))
    from bench_engine import peak_rss_mb, rss_mb, rss_parts_mb, warm_minisparse_kernels
    path = minisparse.registry.resolve(model) if not Path(model).is_file() else model
    out = {"root": str(root), "runtime": rss_mb()}
    warm_minisparse_kernels()
    out["floor"] = rss_mb()
    out["floor_parts"] = rss_parts_mb()
    cfg, weights, f = load_gguf(path, dequant=False)
    out["gguf+weights"] = rss_mb()
    from minisparse.tokenizer import load_tokenizer
    tok = load_tokenizer(f)
    del f
    out["tokenizer"] = rss_mb()
    m = Model(cfg, weights, tok, path, ops=fast_path.FAST)
    ids = tok.encode(PROMPT)
    out["encode"] = rss_mb()
    rng = np.random.default_rng(0)
    m.forward([1] + rng.integers(3, cfg.n_vocab, 15).tolist(), m.new_cache(), last_only=True)  # warm-up
    out["warm-up"] = rss_mb()
    ids = (ids + rng.integers(3, cfg.n_vocab, 128).tolist())[:128]
    cache = m.new_cache()
    t = int(np.argmax(m.forward(ids, cache, last_only=True)[-1]))
    out["prefill128"] = rss_mb()
    text = []
    for _ in range(steps):
        t = int(np.argmax(m.forward([t], cache)[-1]))
        text.append(tok.decode_piece(t))
    out["decode"] = rss_mb()
    out["peak"] = peak_rss_mb()
    out["parts"] = rss_parts_mb(path)
    out["gguf_mb"] = Path(path).stat().st_size / 2**20
    out["model_part_x"] = (out["peak"] - out["floor"]) / out["gguf_mb"]
    print(json.dumps(out))


STEPS = ("runtime", "floor", "gguf+weights", "tokenizer", "encode", "warm-up", "prefill128", "decode", "peak")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roots", nargs="+", default=["."], help="source trees to import minisparse from")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "bench_rss.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.model, a.steps)
    rows = {r: [] for r in a.roots}
    env = {**os.environ, "PYTHONPATH": ""}
    for i in range(a.runs):
        for r in a.roots:
            p = subprocess.run([sys.executable, __file__, "--worker", r, "--model", a.model,
                                "--steps", str(a.steps)], capture_output=True, text=True, env=env, cwd=r)
            if p.returncode:
                sys.exit(f"worker {r} failed:\n{p.stderr[-3000:]}")
            rows[r].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"{'root':<12}" + "".join(f"{s:>13}" for s in STEPS) + f"{'model part':>12}")
    for r, runs in rows.items():
        med = {s: statistics.median(x[s] for x in runs) for s in STEPS}
        part = statistics.median(x["model_part_x"] for x in runs)
        print(f"{r:<12}" + "".join(f"{med[s]:13.1f}" for s in STEPS) + f"{part:11.2f}x")
    print("\nthe model part at the end of decode (MB, medians), by kind of page (/proc/self/status, smaps):")
    print(f"{'root':<12}{'GGUF pages':>12}{'other file pages':>18}{'anonymous':>11}")
    for r, runs in rows.items():
        gg = statistics.median(x["parts"]["gguf_mapped"] for x in runs)
        fi = statistics.median(x["parts"]["RssFile"] - x["floor_parts"]["RssFile"] for x in runs) - gg
        an = statistics.median(x["parts"]["RssAnon"] - x["floor_parts"]["RssAnon"] for x in runs)
        print(f"{r:<12}{gg:12.1f}{fi:18.1f}{an:11.1f}")
    Path(a.out).write_text(json.dumps({"model": a.model, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
