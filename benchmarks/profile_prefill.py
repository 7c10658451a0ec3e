"""Where one 2048-token SmolLM2 forward goes on the fast path: CPU time per Ops step on one thread
(on one thread CPU time is the work itself, whatever else the machine runs), the products'
tile dequantisation apart. Median of 3 forwards after a compiling one.

    python3 benchmarks/profile_prefill.py
"""
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minisparse import load_model
from minisparse.registry import resolve
from minisparse.fast import threads, FAST, quant
threads.set_threads(1)
m = load_model(resolve('smollm2'))
acc = collections.Counter()


def timed(name, fn):
    def w(*a, **k):
        p = time.process_time()
        r = fn(*a, **k)
        acc[name] += time.process_time() - p
        return r
    return w


dq = quant._dequant_rows
quant._dequant_rows = timed('  of which dequantise tiles', dq)
steps = ('embed', 'rms_norm', 'linear', 'rope', 'glu', 'attend')
m.ops = dataclasses.replace(FAST, **{f: timed(f, getattr(FAST, f)) for f in steps})
rng = np.random.default_rng(0)                 # the prompt's ids: seed 0, as bench_engine's
ids = [1] + rng.integers(3, m.config.n_vocab, 2047).tolist()
m.forward(ids[:256], last_only=True)          # compile
res = []
for r in range(3):
    acc.clear()
    p = time.process_time()
    m.forward(ids, last_only=True)
    tot = time.process_time() - p
    res.append((tot, dict(acc)))
tot, parts = sorted(res, key=lambda t: t[0])[1]
print(f"one 2048-token forward, 1 thread, CPU time (median of 3): {tot:.2f} s")
for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
    print(f"  {k:28s} {v:6.2f} s  {v / tot:5.1%}")
print(f"  {'rest (forward glue, cache)':28s} {tot - sum(v for k, v in parts.items() if not k.startswith(' ')):6.2f} s")
out = Path(__file__).with_suffix(".json")
out.write_text(json.dumps({"forward_cpu_s": tot, "steps_cpu_s": parts, "threads": 1, "tokens": len(ids),
                           "runs_cpu_s": [r[0] for r in res], "model": str(resolve('smollm2'))}, indent=1) + "\n")
