"""Where one 2048-token SmolLM2 forward goes on the fast path: time per Ops step, the products'
tile dequantisation apart. Median of --repeats forwards after a compiling one.

Each step's time is taken twice: CPU time of the whole process (on one thread, the default, the
work itself whatever else the machine runs; on N threads it also counts the workers' waits) and
wall-clock time (what a quiet machine's user waits for; on a loaded machine it counts other
processes' turns too).

--roots A B ...: the same profile of several checkouts (this script imports minisparse from each
root in turn), each in its own process, alternating root by root for --rounds rounds, so that
a machine's changing load falls on all of them alike; prints one table of medians with each
root's ratio to the first.

--bound: what the forward's matrix products alone cost at the BLAS's rate on their own shapes
(each thread's block of x's rows against each weight matrix; each attention tile's QK^T and PV
with the tile sizes attend_tiles uses), one thread's CPU time, and from it the best forward the
N threads could give if nothing but those products ran, split perfectly, as a fraction of the
sgemm rate (2048^3, N BLAS threads) measured in the same run, as bench_engine.py reports it.
With torch importable, the same shapes through torch.matmul (its own BLAS) too, for comparison.

    python3 benchmarks/profile_prefill.py                                  # this tree, 1 thread
    python3 benchmarks/profile_prefill.py --threads 2
    python3 benchmarks/profile_prefill.py --roots /work/main . --threads 2 --rounds 3
    python3 benchmarks/profile_prefill.py --bound --threads 2
"""
import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
STEPS = ('embed', 'rms_norm', 'linear', 'linears', 'rope', 'glu', 'attend')
DEQ = '  of which dequantise tiles'


def profile(root, threads_n, tokens, repeats):
    """{forward_s, forward_cpu_s, steps_s, runs_s} for one root, in this process."""
    sys.path.insert(0, str(Path(root).resolve()))
    from minisparse import load_model
    from minisparse.registry import resolve
    from minisparse.fast import threads, FAST, quant
    threads.set_threads(threads_n)
    m = load_model(resolve('smollm2'))
    cpu, wall = collections.Counter(), collections.Counter()

    def timed(name, fn):
        def w(*a, **k):
            p, c = time.perf_counter(), time.process_time()
            r = fn(*a, **k)
            wall[name] += time.perf_counter() - p
            cpu[name] += time.process_time() - c
            return r
        return w

    quant._dequant_rows = timed(DEQ, quant._dequant_rows)
    m.ops = dataclasses.replace(FAST, **{f: timed(f, getattr(FAST, f)) for f in STEPS
                                         if getattr(FAST, f, None) is not None})   # linears: newer trees
    rng = np.random.default_rng(0)             # the prompt's ids: seed 0, as bench_engine's
    ids = [1] + rng.integers(3, m.config.n_vocab, tokens - 1).tolist()
    m.forward(ids[:256], last_only=True)      # compile
    m.forward(ids, last_only=True)            # the heap and the caches at their working size
    res = []
    for r in range(repeats):
        cpu.clear(), wall.clear()
        p, c = time.perf_counter(), time.process_time()
        m.forward(ids, last_only=True)
        tw, tc = time.perf_counter() - p, time.process_time() - c
        rest = 'rest (forward glue, cache)'
        steps_cpu = dict(cpu, **{rest: tc - sum(v for k, v in cpu.items() if not k.startswith(' '))})
        steps_wall = dict(wall, **{rest: tw - sum(v for k, v in wall.items() if not k.startswith(' '))})
        res.append((tc, tw, steps_cpu, steps_wall))
    tc, tw, steps_cpu, steps_wall = sorted(res, key=lambda t: t[0])[len(res) // 2]   # by CPU time
    return {"forward_cpu_s": tc, "forward_wall_s": tw, "steps_cpu_s": steps_cpu,
            "steps_wall_s": steps_wall, "runs_cpu_s": [r[0] for r in res],
            "runs_wall_s": [r[1] for r in res], "threads": threads_n, "tokens": tokens,
            "root": str(Path(root).resolve()), "model": str(resolve('smollm2')),
            "load_average": os.getloadavg()[0]}


def bound(threads_n, tokens):
    """The forward's products at the BLAS's own rate on their shapes (see the module docstring)."""
    sys.path.insert(0, str(HERE.parent.parent))
    sys.path.insert(0, str(HERE.parent))
    from threadpoolctl import threadpool_limits
    from bench_engine import model_flops
    from minisparse import load_model
    from minisparse.fast import attention as fa, threads
    from minisparse.registry import resolve
    path = resolve('smollm2')
    m = load_model(path)
    cfg, w = m.config, m.weights
    L, Hq, Hkv, d = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = Hq // Hkv
    rng = np.random.default_rng(0)
    libs = {"numpy": lambda a, b, out: np.matmul(a, b, out=out)}
    try:
        import torch
        torch.set_num_threads(1)
        libs["torch"] = lambda a, b, out: torch.matmul(torch.from_numpy(a), torch.from_numpy(b),
                                                       out=torch.from_numpy(out))
    except ImportError:
        pass

    def cpu(fn, a, b):
        """CPU seconds of one a @ b (median of 5 after one), into a preallocated output."""
        out = np.empty((a.shape[0], b.shape[1]), np.float32)
        fn(a, b, out)
        ts = []
        for _ in range(5):
            c = time.process_time()
            fn(a, b, out)
            ts.append(time.process_time() - c)
        return float(np.median(ts))

    rows = -(-tokens // threads_n)                     # each thread's block of x (threads.row_blocks)
    weights = [w[f"blk.0.{n}"].shape for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                               "ffn_gate", "ffn_up", "ffn_down")]
    B = max(1, fa.TILE_ROWS // G)
    tiles = [(G * (min(t0 + B, tokens) - t0), min(t0 + B, tokens)) for t0 in range(0, tokens, B)]
    res = {"threads": threads_n, "tokens": tokens, "model": str(path), "libs": {}}
    with threadpool_limits(limits=1, user_api="blas"):
        for name, fn in libs.items():
            f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)   # noqa: E731
            lin = sum(cpu(fn, f32(rows, n_in), f32(n_in, n_out)) for n_out, n_in in weights)
            lin *= L * threads_n                                            # every block, every layer
            qk = sum(cpu(fn, f32(r, d), f32(d, S)) for r, S in tiles) * Hkv * L
            pv = sum(cpu(fn, np.abs(f32(r, S)), f32(S, d)) for r, S in tiles) * Hkv * L
            lin_flops = 2 * tokens * sum(a * b for a, b in weights) * L
            att_flops = 4 * (tokens * (tokens + 1) / 2) * d * Hq * L
            res["libs"][name] = {"weights_cpu_s": lin, "weights_gflops_1t": lin_flops / lin / 1e9,
                                 "qk_cpu_s": qk, "pv_cpu_s": pv,
                                 "attention_gflops_1t": att_flops / (qk + pv) / 1e9}
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        one = 2 * 2048 ** 3 / cpu(libs["numpy"], a, a) / 1e9          # CPU time: load-proof
    with threadpool_limits(limits=threads_n, user_api="blas"):
        g = []
        for _ in range(5):
            t = time.perf_counter()
            a @ a
            g.append(2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9)
    res["sgemm_gflops_wall"], res["sgemm_gflops_1t_cpu"] = float(np.median(g)), one
    # on a loaded machine the wall-clock rate counts other processes' turns: then N times the
    # one-thread CPU rate (what N threads give on a quiet machine, within a few percent) is the
    # reference; else the measured rate, as bench_engine.py takes it
    res["sgemm_gflops"] = sgemm = max(res["sgemm_gflops_wall"], threads_n * one)
    res["forward_flops"] = flops = model_flops(path, tokens, head_rows=1)
    print(f"{tokens}-token SmolLM2 forward: {flops / 1e9:.0f} GFLOP; sgemm (NumPy, 2048^3): "
          f"{res['sgemm_gflops_wall']:.1f} GFLOP/s wall on {threads_n} BLAS threads, {one:.1f} "
          f"GFLOP/s CPU on one; reference {sgemm:.1f}; load average {os.getloadavg()[0]:.1f}")
    print("| BLAS | weight products: 1-thread CPU s (GFLOP/s) | attention QK^T + PV: CPU s "
          "(GFLOP/s) | products alone on %d threads, perfectly split: s | = of sgemm |" % threads_n)
    print("|---|---|---|---|---|")
    for name, r in res["libs"].items():
        best = (r["weights_cpu_s"] + r["qk_cpu_s"] + r["pv_cpu_s"]) / threads_n
        r["products_alone_s"], r["products_alone_frac_of_sgemm"] = best, flops / best / 1e9 / sgemm
        print(f"| {name} | {r['weights_cpu_s']:.2f} ({r['weights_gflops_1t']:.0f}) | "
              f"{r['qk_cpu_s'] + r['pv_cpu_s']:.2f} ({r['attention_gflops_1t']:.0f}) | {best:.2f} | "
              f"{r['products_alone_frac_of_sgemm']:.0%} |")
    target = flops / (0.75 * sgemm * 1e9)
    print(f"75% of sgemm = a {target:.2f} s forward: what the products leave for everything else "
          f"(softmax, norms, RoPE, SwiGLU, glue) at NumPy's BLAS: "
          f"{target - res['libs']['numpy']['products_alone_s']:.2f} s")
    res["target_75_s"] = target
    return res


def show(p):
    tot = p["forward_cpu_s"]
    print(f"one {p['tokens']}-token forward, {p['threads']} thread(s), median of "
          f"{len(p['runs_cpu_s'])} by CPU time: {tot:.2f} s CPU, {p['forward_wall_s']:.2f} s wall "
          f"(load average {p['load_average']:.1f})")
    print(f"  {'step':28s} {'CPU s':>7s} {'share':>6s} {'wall s':>7s}")
    for k, v in sorted(p["steps_cpu_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v:7.3f} {v / tot:6.1%} {p['steps_wall_s'][k]:7.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=None, help="forwards a process (default 3; not with --bound)")
    ap.add_argument("--roots", nargs="+", help="checkouts to profile side by side (alternating)")
    ap.add_argument("--rounds", type=int, default=None, help="with --roots: processes per root (default 2)")
    ap.add_argument("--bound", action="store_true", help="the products' cost at the BLAS's rate on their shapes")
    ap.add_argument("--root", help=argparse.SUPPRESS)        # one worker process of --roots
    ap.add_argument("--out", type=Path, default=HERE.with_suffix(".json"))
    a = ap.parse_args()
    if a.bound and (a.roots or a.repeats is not None):
        ap.error("--bound times the products alone (median of 5 per shape): --roots and --repeats do not apply")
    if a.rounds is not None and not a.roots:
        ap.error("--rounds counts processes per checkout of --roots; give --roots")
    a.repeats = 3 if a.repeats is None else a.repeats
    a.rounds = 2 if a.rounds is None else a.rounds
    if a.threads < 1 or a.tokens < 256 or a.repeats < 1 or a.rounds < 1:
        ap.error("--threads, --repeats and --rounds must be >= 1, --tokens >= 256 (the compiling "
                 "forward's length)")
    if a.bound:
        p = bound(a.threads, a.tokens)
        a.out.with_name(a.out.stem + "_bound.json").write_text(json.dumps(p, indent=1) + "\n")
        return
    if a.root is not None:
        print(json.dumps(profile(a.root, a.threads, a.tokens, a.repeats)))
        return
    if not a.roots:
        p = profile(HERE.parent.parent, a.threads, a.tokens, a.repeats)
        show(p)
        a.out.write_text(json.dumps(p, indent=1) + "\n")
        return
    runs = collections.defaultdict(list)
    env = dict(os.environ, PYTHONPATH="")
    for r in range(a.rounds):
        for root in a.roots:
            out = subprocess.run([sys.executable, str(HERE), "--root", root, "--threads", str(a.threads),
                                  "--tokens", str(a.tokens), "--repeats", str(a.repeats)],
                                 capture_output=True, text=True, env=env, check=True).stdout
            p = json.loads(out.strip().splitlines()[-1])
            runs[root].append(p)
            print(f"round {r + 1}, {root}: {p['forward_cpu_s']:.3f} s CPU, {p['forward_wall_s']:.3f} s "
                  f"wall, load average {p['load_average']:.1f}", flush=True)
    first = runs[a.roots[0]][0]["steps_cpu_s"]
    steps = {k for root in a.roots for k in runs[root][0]["steps_cpu_s"]}      # the union: trees differ
    keys = ["forward"] + sorted(steps, key=lambda k: -first.get(k, 0.0))

    def med(root, k, clock):
        ps = runs[root]
        return float(np.median([p[f"forward_{clock}_s"] if k == "forward" else p[f"steps_{clock}_s"].get(k, 0.0)
                                for p in ps]))
    print(f"\n{a.tokens}-token forward, {a.threads} thread(s), seconds (CPU / wall), median of "
          f"{a.rounds} processes, each the median of {a.repeats} forwards; load average now "
          f"{os.getloadavg()[0]:.1f}")
    print("| step | " + " | ".join(a.roots) + " |")
    print("|---|" + "---|" * len(a.roots))
    for k in keys:
        cells = []
        for i, root in enumerate(a.roots):
            c, w = med(root, k, "cpu"), med(root, k, "wall")
            c0 = med(a.roots[0], k, "cpu")
            cells.append(f"{c:.3f} / {w:.3f}" + (f" ({c / c0:.2f}x CPU)" if i and c0 > 0 else ""))
        print(f"| {k.strip()} | " + " | ".join(cells) + " |")
    a.out.write_text(json.dumps({"threads": a.threads, "tokens": a.tokens, "rounds": a.rounds,
                                 "repeats": a.repeats, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
