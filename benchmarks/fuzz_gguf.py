"""Long GGUF fuzz run: N seeded mutants of real GGUF files; each must pass or raise GGUFError.

Runs the mutators of tests/test_fuzz_gguf.py (the CI test runs 2,400 of them) and records what
happened: loaded / rejected by which check, time per file (p50, p99, max), peak RSS. Leaves out
speed targets for the parser; the numbers document the bound, they are not a benchmark to beat.

    python3 benchmarks/fuzz_gguf.py --n 10000 --seed 1 --out results.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))          # the mutators and corpus live with the CI test
sys.path.insert(0, str(ROOT))

from test_fuzz_gguf import MUTATORS, _model_loader, corpus, fuzz   # noqa: E402

# share of the N mutants per original; the vocab files (30k-100k strings) are the slowest to
# check, so they get fewer mutants and the run stays short
WEIGHTS = {"tiny": 0.2, "stories260K": 0.25, "ggml-vocab-llama-spm": 0.08, "ggml-vocab-phi-3": 0.08,
           "ggml-vocab-gpt-2": 0.09, "*": 0.06}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="number of mutants in all")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("fuzz_gguf.json"))
    ap.add_argument("--bound-every", type=int, default=10,
                    help="every k-th mutant also runs under tracemalloc with the memory/read bounds asserted")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        items = corpus(Path(tmp))
        names = [n for n, _, _ in items]
        n_per = {n: int(args.n * WEIGHTS.get(n, WEIGHTS["*"])) for n in names}
        n_per[names[0]] += args.n - sum(n_per.values())       # the rounding remainder
        times, check_times, by_file, by_kind = [], [], defaultdict(Counter), defaultdict(Counter)

        def on_result(name, kind, outcome, dt, dt_check, size):
            if dt_check is not None:          # tracemalloc'd mutants run ~3x slower: left out of timings
                times.append(dt)
                check_times.append(dt_check)
            by_file[name][outcome.split(":")[0]] += 1
            by_kind[kind][outcome.split(":")[0]] += 1

        t0 = time.perf_counter()
        counts = fuzz(items, n_per, args.seed, Path(tmp), loader=_model_loader(),
                      bound_every=args.bound_every, on_result=on_result)
        wall = time.perf_counter() - t0

    t, tc = np.array(times) * 1e3, np.array(check_times) * 1e3
    ms = lambda a: {"p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2),  # noqa: E731
                    "max": round(float(a.max()), 2)}
    result = {
        "command": "python3 benchmarks/fuzz_gguf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed, "n": int(sum(counts.values())), "wall_s": round(wall, 1),
        "files": {n: n_per[n] for n in names},
        "outcomes": dict(counts.most_common()),
        "by_file": {k: dict(v) for k, v in by_file.items()},
        "by_mutator": {k: dict(v) for k, v in by_kind.items()},
        "ms_per_file_check_gguf": ms(tc),
        # write + check + GGUFFile reads every value and tensor (+ GGUFReader comparison on the
        # end-to-end originals) + model checks + load_model
        "ms_per_file_end_to_end": ms(t),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "other_exceptions": 0,      # fuzz() raises on the first one, so reaching here means none
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{result['n']} mutants, seed {args.seed}, {wall:.0f} s, peak RSS {result['peak_rss_mib']} MiB")
    for k in ("ms_per_file_check_gguf", "ms_per_file_end_to_end"):
        print(f"  {k:24s} " + ", ".join(f"{q} {v} ms" for q, v in result[k].items()))
    print(f"{'count':>7}  outcome")
    for outcome, n in counts.most_common():
        print(f"{n:7d}  {outcome}")
    cols = ["rejected", "pass; model rejected", "pass; loader rejected", "pass+model", "loaded"]
    print("\n" + f"{'mutator':18s}" + "".join(f"{c:>23s}" for c in cols))
    for kind in MUTATORS:
        print(f"{kind:18s}" + "".join(f"{by_kind[kind][c]:23d}" for c in cols))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
