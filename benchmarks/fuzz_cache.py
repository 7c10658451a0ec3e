"""Long fuzz of the saved-cache loader: N seeded mutants of saved caches; each must load a cache
equal to the original or raise CacheError naming its folder.

Runs the mutators of tests/test_ask_cache_fuzz.py (the CI test runs 360 of them) over a dense,
a streaming and a recursive cache of the embedded model, and records what happened: loaded /
rejected by which check, per mutation kind, and time per mutant. Leaves out speed targets.

    python3 benchmarks/fuzz_cache.py --n 10000 --seed 1 --out fuzz_cache.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))          # the mutators live with the CI test
sys.path.insert(0, str(ROOT))

from test_ask_cache_fuzz import MODEL, SPECS, fuzz, make_original, state_bytes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="number of mutants in all")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("fuzz_cache.json"))
    args = ap.parse_args(argv)
    import minisparse
    from minisparse.persist import load_cache
    model = minisparse.load_model(MODEL)
    rng = random.Random(args.seed)
    outcomes, by_kind, times = Counter(), defaultdict(Counter), []
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        originals = {}
        for spec in SPECS:
            folder = make_original(model, spec, tmp / f"orig-{spec.replace('=', '_').replace('+', '_')}")
            originals[spec] = (folder, state_bytes(load_cache(folder, model, key="k")))
        for i in range(args.n):
            spec = SPECS[i % len(SPECS)]
            folder, expected = originals[spec]
            state = rng.getstate()
            t0 = time.perf_counter()
            try:
                outcome = fuzz(model, folder, expected, rng, tmp, i)
            except AssertionError as e:           # a crash or a differing load: the finding
                failures.append({"i": i, "spec": spec, "error": str(e)})
                outcome = "FAILED"
            times.append(time.perf_counter() - t0)
            probe = random.Random()
            probe.setstate(state)                  # replay the draw to name the mutation kind
            from test_ask_cache_fuzz import mutate
            files = {f.name: f.read_bytes() for f in folder.iterdir()}
            kind = mutate(files, probe)[0].split(":")[0].split(" ")[0]
            outcomes[outcome] += 1
            by_kind[kind][outcome.split(":")[0]] += 1
            if (i + 1) % 1000 == 0:
                print(f"{i + 1}/{args.n} mutants, {len(failures)} failures", file=sys.stderr)
    t = np.array(times) * 1e3
    res = {"n": args.n, "seed": args.seed, "failures": failures, "outcomes": dict(outcomes.most_common()),
           "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
           "ms_per_mutant": {"p50": round(float(np.percentile(t, 50)), 2),
                             "p99": round(float(np.percentile(t, 99)), 2), "max": round(float(t.max()), 2)},
           "python": platform.python_version(), "numpy": np.__version__}
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("n", "outcomes", "by_kind", "ms_per_mutant")}, indent=1))
    print(f"{len(failures)} failures", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
