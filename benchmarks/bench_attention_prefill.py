"""Prefill attention time vs sequence length: dense NumPy, the Numba row kernel with Dense(), the
tiled BLAS path for Dense (attend_tiles, what attend picks for dense prefill), and the ruvllm
preset (window 128, block 64, globals [0], log-stride, landmarks). Prints a table with the
GFLOP/s of the dense rows (4 * n(n+1)/2 * heads * d FLOPs: the causal q.k and p.v products),
fits the scaling exponent (log-log least squares), writes JSON.

Leaves out model layers (attention only). Target: ruvllm at n = 8192 (8 heads, d 64)
under 262.6 ms, the figure ruvllm_sparse_attention publishes for an x86 desktop; exponent <= 1.2.

    python3 benchmarks/bench_attention_prefill.py --quick --out bench_attention.json
"""
import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout
from minisparse.attention import Dense, RuvLLM, attend
from minisparse.fast.attention import kernel

ROWS, TILES = partial(kernel, tiles=False), partial(kernel, tiles=True)   # the fast row kernel, the tiles


def dense_numpy(q, k, v):
    """Float32 causal softmax attention, one head at a time (scores are (n, n))."""
    out = np.empty_like(q)                                       # (H, n, d)
    n, d = q.shape[1], q.shape[2]
    causal = np.tril(np.ones((n, n), bool))                      # (n, n)
    for h in range(q.shape[0]):
        s = (q[h] @ k[h].T) / np.float32(np.sqrt(d))             # (n, n)
        s = np.where(causal, s, -np.inf)
        s -= s.max(-1, keepdims=True)
        p = np.exp(s)
        out[h] = (p @ v[h]) / p.sum(-1, keepdims=True)           # (n, d)
    return out


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def fit_exponent(ns, ts):
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n up to 8192, fewer repeats")
    ap.add_argument("--ns", type=str, default=None, help="comma-separated n values")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--numpy-max", type=int, default=8192, help="largest n for dense NumPy")
    ap.add_argument("--numba-dense-max", type=int, default=16384,
                    help="largest n for the Numba dense kernel (O(n^2))")
    ap.add_argument("--tiles-max", type=int, default=32768,
                    help="largest n for the tiled dense path (O(n^2))")
    ap.add_argument("--out", type=str, default=None, help="write results as JSON here")
    a = ap.parse_args(argv)
    ns = [int(x) for x in a.ns.split(",")] if a.ns else \
        ([1024, 2048, 4096, 8192] if a.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    repeats = a.repeats or (3 if a.quick else 5)
    rng = np.random.default_rng(0)
    ruv = RuvLLM()
    # compile once outside the timings
    x = rng.standard_normal((a.heads, 256, a.d)).astype(np.float32)
    attend(x, x, x, Dense(), kernel=ROWS); attend(x, x, x, Dense(), kernel=TILES); attend(x, x, x, ruv)

    rows = []
    for n in ns:
        q, k, v = (rng.standard_normal((a.heads, n, a.d)).astype(np.float32) for _ in range(3))
        row = {"n": n}
        if n <= a.numpy_max:
            row["dense_numpy_s"], _ = timed(lambda: dense_numpy(q, k, v), repeats)
        few = max(1, repeats // 2) if n > 8192 else repeats
        if n <= a.numba_dense_max:                               # the row kernel, forced
            row["numba_dense_s"], _ = timed(lambda: attend(q, k, v, Dense(), kernel=ROWS), few)
        if n <= a.tiles_max:                                     # attend's choice for Dense
            row["dense_tiles_s"], _ = timed(lambda: attend(q, k, v, Dense(), kernel=TILES), few)
        row["ruvllm_s"], _ = timed(lambda: attend(q, k, v, ruv), repeats)
        t0 = time.perf_counter()
        ruv.select(q, k)
        row["ruvllm_select_s"] = time.perf_counter() - t0
        _, st = attend(q[:1], k[:1], v[:1], ruv, return_stats=True)
        row["ruvllm_edges_per_head"] = int(st.n_attended.sum())
        row["ruvllm_density"] = float(st.n_attended.sum() / st.n_causal.sum())
        rows.append(row)
        print(f"n={n:6d}  " + "  ".join(
            f"{key}={val * 1e3:9.1f}ms" if key.endswith("_s") else f"{key}={val:.4g}"
            for key, val in row.items() if key != "n"), flush=True)

    fits = {}
    for key in ("dense_numpy_s", "numba_dense_s", "dense_tiles_s", "ruvllm_s"):
        pts = [(r["n"], r[key]) for r in rows if key in r]
        fits[key] = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
    print("\n| n | dense NumPy ms | Numba dense ms | dense tiles ms | dense GFLOP/s NumPy / Numba / "
          "tiles | ruvllm ms | ruvllm edges/head | density |")
    print("|---|---|---|---|---|---|---|---|")
    f = lambda r, key: f"{r[key] * 1e3:.1f}" if key in r else "-"
    for r in rows:
        flops = 4 * r["n"] * (r["n"] + 1) / 2 * a.heads * a.d      # causal q.k and p.v
        gf = " / ".join(f"{flops / r[key] / 1e9:.1f}" if key in r else "-"
                        for key in ("dense_numpy_s", "numba_dense_s", "dense_tiles_s"))
        print(f"| {r['n']} | {f(r, 'dense_numpy_s')} | {f(r, 'numba_dense_s')} | "
              f"{f(r, 'dense_tiles_s')} | {gf} | {f(r, 'ruvllm_s')} | "
              f"{r['ruvllm_edges_per_head']} | {r['ruvllm_density']:.4f} |")
    print("fitted exponents (log t vs log n): " +
          ", ".join(f"{key[:-2]} {val:.3f}" for key, val in fits.items() if val is not None))
    at8k = [r for r in rows if r["n"] == 8192]
    if at8k:
        print(f"ruvllm at n=8192: {at8k[0]['ruvllm_s'] * 1e3:.1f} ms (target < 262.6 ms)")
    env = {k_: os.environ.get(k_) for k_ in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                              "OMP_NUM_THREADS")}
    import numba
    result = {"heads": a.heads, "d": a.d, "repeats": repeats, "statistic": "median",
              "rows": rows, "exponents": fits, "env": env,
              "numba_threads": numba.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "machine": platform.platform()}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
