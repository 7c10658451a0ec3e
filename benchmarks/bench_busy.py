"""A busy machine: decode and prefill tokens/s while other processes take cores.

A stress benchmark, not a test: for 0, 1 and 2 competing busy loops ("hogs", each a process
spinning `while True: pass`), minisparse prefills a prompt and decodes one token at a time, with
the default thread count and with `-t 1` (threads.set_threads, as the CLI calls it). Each
configuration runs in its own process; figures are medians over --repeats. Decode is also given
as a fraction of its idle rate (0 hogs, the same threads): the target is that with one core taken,
default-thread decode keeps at least 0.4 of it. Recorded with every row: Numba's and BLAS's thread
counts, the threading layer, what free_cores answered during the run, the load average.
--compare-fixed adds a "fixed" configuration: every core counted free whatever else runs (the
behaviour before threads.free_cores), to show what the busy-machine logic buys.
Left out: timing on machines with more cores than the hogs can matter on (run --hogs 0 4 8
there), BLAS-only float32 decode (--dequant does it), sampling cost (decode feeds the argmax).

    python3 benchmarks/bench_busy.py                       # SmolLM2 if installed, ~5-10 min
    python3 benchmarks/bench_busy.py --quick               # small sizes, 1 repeat
    python3 benchmarks/bench_busy.py --pin-hogs            # hog i on core (n-1-i), as taskset
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOG = "while True: pass"


# ----------------------------------------------------------------------------- worker side


def worker(spec):
    """One configuration in this process: returns prefill and decode tokens/s per repeat."""
    sys.path.insert(0, str(ROOT))
    import numba
    import numpy as np
    from threadpoolctl import threadpool_info

    import minisparse
    from minisparse.fast import threads
    if spec["threads"] is not None:
        threads.set_threads(spec["threads"])                   # what `minisparse -t N` does
    if spec["fixed"]:                                          # before free_cores: all cores, always
        n_all = len(os.sched_getaffinity(0))
        threads.free_cores = lambda: n_all
    looks = collections.Counter()
    look = threads._look

    def counted():
        n = look()
        looks[n] += 1
        return n
    threads._look = counted

    model = minisparse.load_model(spec["path"], dequant=spec["dequant"])
    V = model.config.n_vocab
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, V, spec["prefill"])]
    step = lambda tok, cache: int(np.argmax(model.forward([tok], cache)[-1]))    # noqa: E731
    cache = model.new_cache()                                 # warm: Numba's cache, the pools
    tok = int(np.argmax(model.forward(prompt[:16], cache, last_only=True)[-1]))
    for _ in range(2):
        tok = step(tok, cache)
    prefill, decode = [], []
    looks.clear()
    for _ in range(spec["repeats"]):
        cache = model.new_cache()
        t = time.perf_counter()
        tok = int(np.argmax(model.forward(prompt, cache, last_only=True)[-1]))
        prefill.append(len(prompt) / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(spec["decode"]):
            tok = step(tok, cache)
        decode.append(spec["decode"] / (time.perf_counter() - t))
    return {"prefill_tok_s": statistics.median(prefill), "prefill_runs": prefill,
            "decode_tok_s": statistics.median(decode), "decode_runs": decode,
            "numba_threads": numba.get_num_threads(), "threading_layer": numba.threading_layer(),
            "blas_threads": [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"],
            "free_cores_seen": {str(k): v for k, v in sorted(looks.items())}}


# ----------------------------------------------------------------------------- driver side


def start_hogs(n, pin):
    procs = []
    cores = sorted(os.sched_getaffinity(0))
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-c", HOG])
        if pin:
            os.sched_setaffinity(p.pid, {cores[-1 - i % len(cores)]})
        procs.append(p)
    time.sleep(0.5)                                           # started and spinning
    return procs


def stop(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def machine():
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cores": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "env": {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
                                                   "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                   "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}


def default_model():
    sys.path.insert(0, str(ROOT))
    from minisparse.registry import resolve
    try:
        return "smollm2", Path(resolve("smollm2"))
    except Exception:                     # noqa: BLE001 - not installed: the embedded model
        return "default", Path(resolve("default"))


def run(args):
    name, path = (args.model, Path(args.model)) if args.model else default_model()
    configs = [("default", None, False), ("-t 1", 1, False)]
    if args.compare_fixed:
        configs.insert(1, ("fixed", None, True))
    report = {"machine": machine(), "model": str(path), "pin_hogs": args.pin_hogs,
              "prefill": args.prefill, "decode": args.decode, "repeats": args.repeats,
              "dequant": args.dequant, "rows": []}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    print(f"model {name} ({path.name}), prefill {args.prefill} tokens, decode {args.decode} steps, "
          f"{args.repeats} repeats, {os.cpu_count()} cores", flush=True)
    print(f"{'hogs':>4} {'threads':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'x idle':>7} "
          f"{'numba':>5} {'blas':>6}  free cores seen            load", flush=True)
    idle = {}
    for hogs in args.hogs:
        for label, t, fixed in configs:
            spec = {"path": str(path), "threads": t, "fixed": fixed, "prefill": args.prefill,
                    "decode": args.decode, "repeats": args.repeats, "dequant": args.dequant}
            procs = start_hogs(hogs, args.pin_hogs)
            load = os.getloadavg()
            try:
                p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                   capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                p = None
            finally:
                stop(procs)
            row = {"hogs": hogs, "threads": label, "loadavg_before": load}
            lines = [] if p is None else [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                why = "timed out" if p is None else (p.stderr.strip().splitlines() or [""])[-1][-200:]
                row["failed"] = why
                print(f"{hogs:>4} {label:>8}  failed: {why}", flush=True)
            else:
                row.update(json.loads(lines[-1]))
                if hogs == 0:
                    idle[label] = row["decode_tok_s"]
                if label in idle:
                    row["decode_x_idle"] = row["decode_tok_s"] / idle[label]
                print(f"{hogs:>4} {label:>8} {row['prefill_tok_s']:>14.1f} {row['decode_tok_s']:>13.1f} "
                      f"{row.get('decode_x_idle', float('nan')):>7.2f} {row['numba_threads']:>5} "
                      f"{','.join(map(str, row['blas_threads'])):>6}  "
                      f"{json.dumps(row['free_cores_seen']):<26} {load[0]:.2f}", flush=True)
            report["rows"].append(row)
            if args.out:                                      # after every row: a cut-off run keeps it
                args.out.write_text(json.dumps(report, indent=1))
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: SmolLM2 if installed, else the embedded model)")
    ap.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2], help="competing busy processes")
    ap.add_argument("--pin-hogs", action="store_true", help="hog i on core n-1-i (else the OS places them)")
    ap.add_argument("--prefill", type=int, default=256, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=32, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dequant", action="store_true", help="float32 weights (decode on BLAS)")
    ap.add_argument("--compare-fixed", action="store_true",
                    help="also run with every core counted free (the behaviour before free_cores)")
    ap.add_argument("--quick", action="store_true", help="prefill 32, decode 8, 1 repeat")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bench_busy.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.prefill, args.decode, args.repeats = 32, 8, 1
    if args.prefill < 16 or min(args.hogs) < 0:
        ap.error("--prefill is at least 16 tokens (the warm-up prompt) and --hogs are >= 0")
    run(args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
