"""What exact top-k's row selection (fast/prefill.py `top_keys`) costs per score, stage by stage,
on a synthetic tile that stays in L2: R rows of S float32 scores (a random walk plus noise: high
scores in runs, as a real document's), budget 2% of S, each stage run over every row, CPU time
on one thread, median of the rounds. A stage's figure includes the stages above it:

- lane pass (`_lane_max`), + the lane bound's selection (`kth_largest` over the lane maxima),
  + the compare masks (`fa._ge_bits16`), + the list (walking the masks' set bits), and the
  whole `top_keys` (+ the threshold's selection in the list and the kept keys);
- a plain sum over the tile, for scale (a pass Numba does not vectorise).

On a checkout without the mask helpers only the lane pass and `top_keys` are timed.

    python3 benchmarks/profile_topk_row.py [--keys 3400] [--rows 192] [--rounds 15]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                       # run from a checkout

from minisparse.fast import attention as fa, prefill as fp          # noqa: E402

STAGED = hasattr(fp, "listed")


@njit
def plain_sum(s):
    t = 0.0
    for r in range(s.shape[0]):
        for j in range(s.shape[1]):
            t += s[r, j]
    return t


@njit
def lanes(s, L, keep, cv):
    for r in range(s.shape[0]):
        fp._lane_max(s[r], s.shape[1], L, cv)


if STAGED:
    @njit
    def upto(s, L, keep, ci, cv, bits, stage):
        """The stages of top_keys up to `stage` (1: lane bound, 2: masks, 3: list) per row."""
        e = s.shape[1]
        total = 0
        for r in range(s.shape[0]):
            rank = s[r]
            fp._lane_max(rank, e, L, cv)
            floor = fp.kth_largest(cv, L, keep, cv[L:])
            if stage >= 2:
                nb = e // 16
                fa._ge_bits16(rank, nb, floor, bits)
                if stage >= 3:
                    total += fp.listed(rank, bits, nb, ci, cv)
        return total


@njit
def whole(s, keep, ci, cv, kept):
    for r in range(s.shape[0]):
        fp.top_keys(s[r], s.shape[1], keep, ci, cv, kept)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=3400, help="S, scores a row")
    ap.add_argument("--rows", type=int, default=192, help="R, rows a tile")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: next to this script)")
    a = ap.parse_args(argv)
    R, S = a.rows, a.keys
    rng = np.random.default_rng(a.seed)
    s = (np.cumsum(rng.standard_normal((R, S)), axis=1) * 0.05
         + rng.standard_normal((R, S))).astype(np.float32)
    keep = int(np.ceil(0.02 * S))
    L = min(S, (fp.LANES_PER_KEEP * keep + 15) // 16 * 16)
    ci, cv = np.empty(S + 1, np.int64), np.empty(3 * S + 3, np.float32)
    kept = np.empty(S, np.int64)
    stages = {"plain sum (scale)": lambda: plain_sum(s), "lane pass": lambda: lanes(s, L, keep, cv)}
    if STAGED:
        stages.update({f"+ {name}": (lambda k: lambda: upto(s, L, keep, ci, cv, kept, k))(k)
                       for k, name in ((1, "lane bound"), (2, "compare masks"), (3, "list"))})
    stages["top_keys (whole)"] = lambda: whole(s, keep, ci, cv, kept)
    for f in stages.values():
        f()                                                         # compile
    times = {k: [] for k in stages}
    for _ in range(a.rounds):
        for k, f in stages.items():                                 # interleaved
            t = time.thread_time()
            f()
            times[k].append(time.thread_time() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"\n{R} rows x {S} scores, keep {keep}, {L} lanes; CPU time on one thread, median of "
          f"{a.rounds} rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| stage (cumulative) | ms a tile | ns a score | us a row |\n|---|---:|---:|---:|")
    for k, x in med.items():
        print(f"| {k} | {x * 1e3:.3f} | {x / (R * S) * 1e9:.3f} | {x / R * 1e6:.2f} |")
    out = a.out or str(Path(__file__).with_name(f"profile_topk_row_{S}.json"))
    Path(out).write_text(json.dumps({
        "rows": R, "keys": S, "keep": keep, "lanes": L, "seed": a.seed, "median_s": med,
        "load_average": os.getloadavg(), "cores": os.cpu_count(),
        "command": "python3 benchmarks/profile_topk_row.py " + " ".join(argv or sys.argv[1:])},
        indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
