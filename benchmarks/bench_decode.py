"""Decode steps of minisparse beside llama.cpp, interleaved in one process (issue 23).

Each figure is the median of --repeats rounds, the configurations taking turns within every
round so that a machine busy with other work slows them alike:
- kernels (--kernels, SmolLM2 only): the 211 matrix-vector products of one step (30 layers x 7
  matrices + the output head), float32 activations (fast/quant.py) vs 8-bit ones (fast/q8.py),
  weights streamed from the file's mapping as in a real step, one thread;
- attention (--attention): the dense decode attention of one SmolLM2 step (30 layers' K and V
  buffers of --ctx keys each, 9 query heads on 3 KV heads, d = 64: 94 MB at 2048 keys) on one
  thread and on the kernel's parts side by side (fast/attention.py), beside a plain pass that
  only reads the same bytes (Numba, one thread and two): the bandwidth the kernel has;
- steps: one decode step after a prompt of --ctx tokens, for each model and thread count:
  minisparse's default (the fused step of fast/step.py, 8-bit products), the same without the
  fused step (Ops.decode_step off: a call per operation), the float32 kernels
  (MINISPARSE_INT8=0), and llama.cpp (llama-cpp-python, same GGUF, its defaults: f16 KV).
CPU time is reported beside wall time: on a loaded machine wall time counts the turns other
processes take, CPU time does not. The calling thread's CPU time is the one-thread figure (the
process's also counts worker threads that spin after a parallel region); on two threads only
wall time on a quiet machine measures the engine.

    python3 benchmarks/bench_decode.py                    # SmolLM2 and the embedded model,
                                                          # 1 and 2 threads, ctx 128 and 2048
    python3 benchmarks/bench_decode.py --models smollm2 --threads 1 --ctx 128 --kernels
    python3 benchmarks/bench_decode.py --attention --models --ctx 2048    # attention alone
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _timed(fn):
    """(wall, process CPU, this thread's CPU) seconds of fn(). The process's CPU time counts
    Numba's and llama.cpp's worker threads, which spin for a while after a parallel region, so
    also during whatever runs next; this thread's CPU time is the work of a one-thread run."""
    t, c, h = time.perf_counter(), time.process_time(), time.thread_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c, time.thread_time() - h


def _interleaved(cases, repeats, per=1):
    """Each of cases' functions once to warm up, then `repeats` rounds of all of them in turn:
    {name: [(wall, cpu, thread cpu) / per, ...]}."""
    for f in cases.values():
        f()
    runs = {k: [] for k in cases}
    for _ in range(repeats):
        for k, f in cases.items():
            runs[k].append(tuple(t / per for t in _timed(f)))
    return runs


def _medians(runs):
    return {k: {"wall_ms": 1e3 * statistics.median(r[0] for r in v), "cpu_ms": 1e3 * statistics.median(r[1] for r in v),
                "thread_cpu_ms": 1e3 * statistics.median(r[2] for r in v),
                "runs_wall_ms": [1e3 * r[0] for r in v]} for k, v in runs.items()}


def kernels(model, repeats):
    """The step's products, float kernels vs integer kernels, one thread."""
    import numpy as np
    from minisparse.fast import q8, quant
    w, L = model.weights, model.config.n_layers
    mats = [w[f"blk.{l}.{n}"] for l in range(L) for n in MATRICES] + [w["token_embd"]]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(m.shape[1]).astype(np.float32) for m in mats]
    ys = [np.empty(m.shape[0], np.float32) for m in mats]

    def floats():
        for m, x, y in zip(mats, xs, ys):
            quant._matvec_serial(int(m.qtype), m.raw, m.raw_i8, x, y)

    def ints():
        for m, x, y in zip(mats, xs, ys):
            q8.matvec_serial(int(m.qtype), m.raw, x, y)
    cases = {"float32 activations (quant.py)": floats, "8-bit activations (q8.py)": ints}
    out = _medians(_interleaved(cases, repeats))
    out["weight_mb"] = sum(m.raw.nbytes for m in mats) / 1e6
    return out


def attention(ctx, repeats, threads):
    """A SmolLM2 step's dense decode attention over ctx keys: the kernel on one thread and on
    `threads`, and a pass reading the same bytes on one and on `threads`."""
    import numba
    import numpy as np
    from numba import njit, prange
    from minisparse.attention.kernel import Rows
    from minisparse.attention.selection import SHARED
    from minisparse.fast import attention as fa
    L, Hq, Hkv, d = 30, 9, 3, 64
    rng = np.random.default_rng(0)
    cap = 2 * ctx                                        # a cache's buffers hold spare rows
    K = [rng.standard_normal((Hkv, cap, d)).astype(np.float32) for _ in range(L)]
    V = [rng.standard_normal((Hkv, cap, d)).astype(np.float32) for _ in range(L)]
    q = rng.standard_normal((Hq, 1, d)).astype(np.float32)
    rows = Rows(SHARED, np.array([0, 1]), np.array([0]), np.array([ctx]), np.zeros(2, np.int64),
                np.zeros(0, np.int64), np.zeros(0, np.float32))
    e = np.zeros((Hkv, 0, d), np.float32)
    xs = [(q, K[i], V[i], e, e, np.array([ctx - 1]), np.arange(ctx), np.zeros(0, np.int64)) for i in range(L)]

    @njit(fastmath=True)
    def read(a, n):
        s = np.zeros(64, np.float32)
        for h in range(a.shape[0]):
            for j in range(n):
                for i in range(64):
                    s[i] += a[h, j, i]
        return s.sum()

    @njit(fastmath=True, parallel=True)
    def read_par(a, n):
        P = 2 * a.shape[0]
        s = np.zeros((P, 64), np.float32)
        for t in prange(P):                              # half a head's rows a task
            h, j0 = t // 2, (t % 2) * (n // 2)
            for j in range(j0, j0 + n // 2 if t % 2 == 0 else n):
                for i in range(64):
                    s[t, i] += a[h, j, i]
        return s.sum()

    def kernel(parallel):
        def run():
            numba.set_num_threads(threads if parallel else 1)
            for x in xs:
                fa.attend_decode(x, rows, 0.125, True, parallel)
        return run

    def reads(fn, n_threads):
        def run():
            numba.set_num_threads(n_threads)
            for i in range(L):
                fn(K[i], ctx)
                fn(V[i], ctx)
        return run
    cases = {"kernel, 1 thread": kernel(False), f"kernel, parts on {threads} threads": kernel(True),
             "read the bytes, 1 thread": reads(read, 1), f"read the bytes, {threads} threads": reads(read_par, threads)}
    runs = _interleaved(cases, repeats)
    numba.set_num_threads(threads)
    out = _medians(runs)
    out["mb"] = L * 2 * Hkv * ctx * d * 4 / 1e6
    return out


def steps(model, ctx, repeats, n_steps, threads):
    """Decode steps after a ctx-token prompt on `threads` threads: minisparse fused, unfused,
    float32 kernels; llama.cpp."""
    import dataclasses
    from minisparse.fast import quant, threads as fast_threads
    fast_threads.set_threads(threads)
    cache = model.new_cache()
    ids = [1] + list(range(100, 100 + ctx - 1))
    model.forward(ids, cache, last_only=True)
    fused, unfused = model.ops, dataclasses.replace(model.ops, decode_step=None)
    engines = {}

    def mini(ops, int8):
        def run():
            model.ops, quant.INT8_DECODE = ops, int8
            for _ in range(n_steps):
                model.forward([300], cache)
        return run
    engines["minisparse (default: fused step)"] = mini(fused, True)
    engines["minisparse, a call per op"] = mini(unfused, True)
    engines["minisparse, float32 kernels"] = mini(fused, False)
    try:
        from llama_cpp import Llama
        llama = Llama(str(model.path), n_ctx=ctx + (repeats + 1) * 4 * n_steps + 8, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
        llama.eval(ids)

        def run_llama():
            for _ in range(n_steps):
                llama.eval([300])
        engines["llama.cpp"] = run_llama
    except ImportError as e:
        print(f"llama.cpp skipped: {e}", file=sys.stderr)
    saved = quant.INT8_DECODE
    runs = _interleaved(engines, repeats, per=n_steps)
    quant.INT8_DECODE, model.ops = saved, fused
    return _medians(runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["smollm2", "default"],
                    help="registered names or GGUF paths (default: SmolLM2 and the embedded model)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--ctx", type=int, nargs="*", default=[128, 2048], help="prompt lengths before decode")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="decode steps per timed run")
    ap.add_argument("--kernels", action="store_true", help="also time SmolLM2's products alone")
    ap.add_argument("--attention", action="store_true",
                    help="also time a SmolLM2 step's dense attention alone at each --ctx")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args(argv)
    if min(args.threads) < 1:
        ap.error(f"--threads {args.threads}: expected counts >= 1")
    if args.kernels and "smollm2" not in args.models:
        ap.error(f"--kernels times SmolLM2's products; --models {' '.join(args.models)} has no smollm2")
    for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = str(max(args.threads))
    sys.path.insert(0, str(ROOT))
    import numba
    from minisparse import load_model
    from minisparse.fast import q8
    if not q8.available():
        print("the integer kernels need an x86-64 CPU with AVX2", file=sys.stderr)
        return 1
    report = {"threads": args.threads, "loadavg_start": os.getloadavg(), "cpu_count": os.cpu_count(),
              "repeats": args.repeats, "steps_per_run": args.steps, "kernels_1_thread": None,
              "attention": {}, "steps": {}}
    if args.attention:
        for ctx in args.ctx:
            report["attention"][str(ctx)] = attention(ctx, args.repeats, max(args.threads))
    for name in args.models:
        model = load_model(name)
        if args.kernels and name == "smollm2":
            numba.set_num_threads(1)
            report["kernels_1_thread"] = kernels(model, args.repeats)
        for threads in args.threads:
            for ctx in args.ctx:
                key = f"{name} | {threads} thread(s) | ctx {ctx}"
                report["steps"][key] = steps(model, ctx, args.repeats, args.steps, threads)
                print(f"  done: {key} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    report["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1))
    print(f"load average {report['loadavg_start'][0]:.1f} at start, {report['loadavg_end'][0]:.1f} at end; "
          f"medians of {args.repeats} runs of {args.steps} steps")
    if report["kernels_1_thread"]:
        print(f"\nthe products of one step ({report['kernels_1_thread']['weight_mb']:.0f} MB of weights), 1 thread:")
        for k, v in report["kernels_1_thread"].items():
            if isinstance(v, dict):
                print(f"  {k:32s} thread cpu {v['thread_cpu_ms']:7.2f} ms   wall {v['wall_ms']:7.2f} ms")
    for ctx, rows in report["attention"].items():
        print(f"\na SmolLM2 step's dense attention over {ctx} keys ({rows['mb']:.0f} MB of K and V):")
        for k, v in rows.items():
            if isinstance(v, dict):
                print(f"  {k:34s} wall {v['wall_ms']:7.2f} ms   {rows['mb'] / v['wall_ms']:5.1f} GB/s   "
                      f"this thread's cpu {v['thread_cpu_ms']:7.2f} ms")
    for key, rows in report["steps"].items():
        print(f"\none decode step, {key}:")
        ref = rows.get("llama.cpp")
        for k, v in rows.items():
            ratio = (f"   x llama.cpp: wall {ref['wall_ms'] / v['wall_ms']:.2f}, "
                     f"thread cpu {ref['thread_cpu_ms'] / v['thread_cpu_ms']:.2f}" if ref else "")
            print(f"  {k:34s} wall {v['wall_ms']:7.3f} ms   cpu {v['cpu_ms']:7.3f}   "
                  f"thread cpu {v['thread_cpu_ms']:7.3f} ms{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
