"""Quest on SmolLM2 at long context, checked against brute force, and what its pages hold.

Dense prefill of the first N tokens of the stdlib's argparse source, one decode step; then, per
layer, for every query head: (1) Quest's chosen pages equal the pages of highest bound computed
in float64 by brute force (ties at the threshold accepted), (2) every page's bound is >= the
largest q.k in it, (3) the softmax mass Quest's pages hold, the mass the exact top-B keys hold,
and the share of those top-B keys inside Quest's pages. Means over the query heads.

    python3 benchmarks/quest_recall.py 4096          # docs/selectors.md, "Quest at 4k tokens"
"""
import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minisparse  # noqa: E402
from minisparse.attention import Quest  # noqa: E402
from minisparse.registry import resolve  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
P, B = 16, 256
m = minisparse.load_model(resolve("smollm2"))
ids = m.tokenizer.encode(inspect.getsource(argparse))[:N]
t0 = time.time()
cache, logits = m.prefill(ids)
print("prefill", len(ids), "tokens,", round(time.time() - t0, 1), "s", flush=True)
tr = {}
m.forward([int(np.argmax(logits))], cache, trace=tr)
S = len(ids) + 1
qsel = Quest(P, B)
print("| layer | pages = brute force | bounds hold | Quest mass | top-256 mass | top-256 keys in Quest's pages |")
print("|---|---|---|---|---|---|")
for l in range(m.config.n_layers):
    q = tr[f"blk.{l}.q"]                                   # (Hq, 1, d)
    K = np.ascontiguousarray(cache.k[l][:, :S])            # (Hkv, S, d)
    sel = qsel.select(q, K, np.array([S - 1]), np.arange(S))
    Hq, Hkv, d = q.shape[0], K.shape[0], q.shape[2]
    G = Hq // Hkv
    ok = bok = 0
    qm, tm, fr = [], [], []
    for h in range(Hq):
        qv = q[h, 0].astype(np.float64)
        Kp = K[h // G].astype(np.float64)                  # (S, d) the KV head h reads
        npg = (S + P - 1) // P
        ub, top_in = np.empty(npg), np.empty(npg)
        for p in range(npg):
            blk = Kp[p * P:(p + 1) * P]
            ub[p] = np.maximum(qv * blk.min(0), qv * blk.max(0)).sum()
            top_in[p] = (blk @ qv).max()
        # float64 bound vs float64 dots: equal up to rounding of d = 64 terms, 1e-4 relative
        bok += np.all(ub >= top_in - 1e-4 * np.abs(top_in))
        want = set(np.argsort(-ub, kind="stable")[:B // P].tolist())
        ranges, _ = sel.rows(h, 0)
        got = set(a // P for lo, hi in ranges for a in range(lo, hi, P))
        kth = np.sort(ub)[::-1][B // P - 1]
        ok += got == want or all(ub[p] >= kth - 1e-6 * abs(kth) for p in got)
        s = (Kp @ qv) / np.sqrt(d)
        pr = np.exp(s - s.max())
        pr /= pr.sum()
        mask = np.zeros(S, bool)
        for lo, hi in ranges:
            mask[lo:hi] = True
        top = np.argsort(-pr)[:B]
        qm.append(pr[mask].sum()), tm.append(pr[top].sum()), fr.append(mask[top].mean())
    print(f"| {l} | {ok}/{Hq} | {bok}/{Hq} | {np.mean(qm):.3f} | {np.mean(tm):.3f} | {np.mean(fr):.3f} |",
          flush=True)
