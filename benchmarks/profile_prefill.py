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

    python3 benchmarks/profile_prefill.py                                  # this tree, 1 thread
    python3 benchmarks/profile_prefill.py --threads 2
    python3 benchmarks/profile_prefill.py --roots /work/main . --threads 2 --rounds 3
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
STEPS = ('embed', 'rms_norm', 'linear', 'rope', 'glu', 'attend')
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
    m.ops = dataclasses.replace(FAST, **{f: timed(f, getattr(FAST, f)) for f in STEPS})
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--roots", nargs="+", help="checkouts to profile side by side (alternating)")
    ap.add_argument("--rounds", type=int, default=2, help="with --roots: processes per root")
    ap.add_argument("--root", help=argparse.SUPPRESS)        # one worker process of --roots
    ap.add_argument("--out", type=Path, default=HERE.with_suffix(".json"))
    a = ap.parse_args()
    if a.threads < 1 or a.tokens < 256 or a.repeats < 1 or a.rounds < 1:
        ap.error("--threads, --repeats and --rounds must be >= 1, --tokens >= 256 (the compiling "
                 "forward's length)")
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
    keys = ["forward"] + sorted(runs[a.roots[0]][0]["steps_cpu_s"], key=lambda k: -runs[a.roots[0]][0]["steps_cpu_s"][k])

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
