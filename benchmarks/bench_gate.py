"""Cost of the FastGRNN gate vs context length n: time per token of the recurrence, of the
causal top-budget ranking, and of one gated decode step (gate + attention) against dense decode.

Leaves out model matmuls (they do not depend on the gate). Keys are random (the gate's cost does
not depend on their values); Hkv=4, d=8 (stories260K's shape), H=16. O(n) total = a flat
time-per-token column; dense decode per step grows with n for comparison.

    python3 benchmarks/bench_gate.py --out bench_gate.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")   # one core: timings comparable on a loaded box
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minisparse.attention import Dense, attend  # noqa: E402
from minisparse.gate.gated import Gated, gate_rows  # noqa: E402
from minisparse.gate.fastgrnn import DEFAULT_WEIGHTS, FastGRNNGate, GateState  # noqa: E402
from minisparse.registry import shipped_file  # noqa: E402


# CPU time of this process, not wall time: on a shared, loaded machine a run longer than a time
# slice is preempted and its wall time inflates with the load; single-threaded compute is not.
def best(f, repeat=3):
    """Fastest of `repeat` runs of f(), in CPU seconds."""
    ts = []
    for _ in range(repeat):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per n")
    ap.add_argument("--out", type=Path, default=Path("bench_gate.json"))
    args = ap.parse_args()
    hkv, hq, d = 4, 8, 8
    gate = FastGRNNGate.load(d=d) if shipped_file(DEFAULT_WEIGHTS) else FastGRNNGate.random(d)
    sel = Gated(args.budget, args.window, 4, gate=gate)
    r = np.random.default_rng(0)
    ns = [int(x) for x in args.ns.split(",")]
    nmax = max(ns) + args.steps
    K = r.standard_normal((hkv, nmax, d)).astype(np.float32)                      # (Hkv, n, d)
    V = r.standard_normal((hkv, nmax, d)).astype(np.float32)
    Q = r.standard_normal((hq, nmax, d)).astype(np.float32)                       # (Hq, n, d)
    gate.salience(K[:, :16])                                                      # compile
    attend(Q[:, :1], K[:, :16], V[:, :16], sel, q_pos=np.array([15]))
    rows = []
    print(f"{'n':>6} {'recur us/tok':>12} {'rank us/tok':>10} {'gate us/step':>12} "
          f"{'gated attend':>14} {'dense attend':>14}   (decode: us per step)")
    for n in ns:
        pos = np.arange(n, dtype=np.int64)
        t_rec = best(lambda: gate.salience(K[:, :n]))
        sal, _ = gate.salience(K[:, :n])

        def rank():
            B = args.budget
            gate_rows(sal, pos, pos, args.window, 4, B, np.zeros((hkv, B)),
                      np.zeros((hkv, B), np.int64), np.zeros(hkv, np.int64), 0)
        t_rank = best(rank)

        def gate_steps():
            # the gate alone per decode step: read one key (O(1) recurrence), rank, pick
            st = GateState(gate, hkv, capacity=nmax)
            st.append(K[:, :n], pos)
            b = sel.bind(st)
            b._gate_selection(K[:, :n], pos[-1:], pos)                           # warm heap
            kp = np.arange(nmax)
            t = time.process_time()
            for i in range(n, n + args.steps):
                st.append(K[:, i:i + 1], kp[i:i + 1])
                b._gate_selection(K[:, :i + 1], kp[i:i + 1], kp[:i + 1])
            return (time.process_time() - t) / args.steps

        def decode(selector, gated):
            # whole decode steps through attend (gate step + selection + kernel). K, V are handed
            # over contiguous, copied outside the timer: attend would copy a strided slice, an
            # O(n) memcpy of the caller's layout, not a cost of the gate or of the selection
            st = None
            if gated:
                st = GateState(gate, hkv, capacity=nmax)
                st.append(K[:, :n], pos)
                selector = selector.bind(st)
            spent = 0.0
            for i in range(n, n + args.steps):
                kc, vc = np.ascontiguousarray(K[:, :i + 1]), np.ascontiguousarray(V[:, :i + 1])
                kp, qp = np.arange(i + 1), np.array([i])
                t = time.process_time()
                if st is not None:
                    st.append(kc[:, i:i + 1], qp)
                attend(Q[:, i:i + 1], kc, vc, selector, q_pos=qp, k_pos=kp)
                spent += time.process_time() - t
            return spent / args.steps
        t_gate = min(gate_steps() for _ in range(3))
        t_gdec = min(decode(sel, True) for _ in range(3))
        t_ddec = min(decode(Dense(), False) for _ in range(3))
        row = {"n": n, "recurrence_us_per_token": 1e6 * t_rec / n,
               "ranking_us_per_token": 1e6 * t_rank / n, "gate_decode_us_per_step": 1e6 * t_gate,
               "gated_attend_us_per_step": 1e6 * t_gdec, "dense_attend_us_per_step": 1e6 * t_ddec}
        rows.append(row)
        print(f"{n:6d} {row['recurrence_us_per_token']:12.2f} {row['ranking_us_per_token']:10.2f} "
              f"{row['gate_decode_us_per_step']:12.1f} {row['gated_attend_us_per_step']:14.1f} "
              f"{row['dense_attend_us_per_step']:14.1f}", flush=True)
    result = {"gate": gate.label, "budget": args.budget, "window": args.window, "sinks": 4,
              "shape": {"Hq": hq, "Hkv": hkv, "d": d, "H": gate.hidden}, "rows": rows,
              "clock": "time.process_time (CPU s)", "machine": platform.platform(),
              "numba_threads": os.environ["NUMBA_NUM_THREADS"]}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
