"""Where an exact top-k prefill tile's time goes, against the dense tile, on one core: the last
chunk of an N-token prefill of real text (the pydoc topics) on SmolLM2, as `ask` runs it, its
q, K, V captured at every layer, then each (query tile, KV head) run both ways side by side,
interleaved tile by tile, CPU time (time.thread_time) per part:

- dense (fast/attention.py `attend_tiles`, keys in position order): the score sgemm, the
  softmax pass (`_softmax_rows`: per row the causal mask, max, exp and sum), the P V sgemm and
  `_finish_rows` (the division by the sums, the log-sum-exp);
- top-k (fast/prefill.py `topk_tiles`): the same score sgemm, the selection (`topk_tile_keys`:
  each row's threshold and kept keys) and the softmax and weighted values over the kept keys
  (`topk_attend` less the selection it repeats).

One thread (BLAS held to one): the parts of a tile, not the split of tiles over the threads.
Prints a table (seconds per chunk, all layers; medians over rounds) and writes JSON.

    python3 benchmarks/profile_topk_tile.py [--tokens 3400] [--spec topk=2%] [--rounds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                       # run from a checkout

PARTS = {"dense": ["scores (sgemm)", "softmax (mask, max, exp, sum)", "P V (sgemm) + finish"],
         "topk": ["scores (sgemm)", "selection", "softmax + weighted values"]}


def capture(model, ids, chunk):
    """q, K, V, q_pos, k_pos of every layer's attention in the last chunk of a dense prefill."""
    cache, _ = model.prefill(ids[:-chunk], chunk=chunk)
    real, got = model.ops.attend, []

    def spy(q, k, v, sel, q_pos=None, k_pos=None, **kw):
        S = len(k_pos)
        got.append((np.array(q, np.float32), np.array(k[:, :S], np.float32),
                    np.array(v[:, :S], np.float32), np.array(q_pos), np.array(k_pos)))
        return real(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, **kw)
    ops = model.ops
    model.ops = dataclasses.replace(ops, attend=spy)
    try:
        model.forward(ids[-chunk:], cache, last_only=True)
    finally:
        model.ops = ops
    return got


def one_round(layers, sel, block):
    """CPU seconds per part of every tile of every layer, dense and top-k interleaved."""
    from minisparse.attention.topk import row_budgets
    from minisparse.fast import attention as fa, prefill as fp
    tt = time.thread_time
    acc = {(m, p): 0.0 for m in PARTS for p in PARTS[m]}
    for q, k, v, q_pos, k_pos in layers:
        Hq, Tq, d = q.shape
        Hkv = k.shape[0]
        G = Hq // Hkv
        sc = np.float32(1 / np.sqrt(d))
        n_vis = np.searchsorted(k_pos, q_pos, side="right")
        budget = row_budgets(sel.k, sel.fraction, q_pos, k_pos, 1)
        per_kv = sel.per == "kv"
        out_d = np.empty((G, block, d), np.float32)                   # dense's results
        lse_d = np.empty((G, block))
        for g in range(Hkv):
            for t0 in range(0, Tq, block):
                t1 = min(t0 + block, Tq)
                b, S = t1 - t0, int(n_vis[t0:t1].max())
                qt = np.multiply(q[g * G:(g + 1) * G, t0:t1], sc).reshape(G * b, d)
                a = tt()                                              # ---- dense
                s = qt @ k[g, :S].T
                m = np.empty(G * b, np.float32)
                l = np.empty(G * b, np.float32)
                a1 = tt()
                fa._softmax_rows(s, n_vis[t0:t1], m, l)
                a2 = tt()
                o = s @ v[g, :S]
                fa._finish_rows(o, m, l, out_d[:, :b], lse_d[:, :b])
                a3 = tt()
                for p, x in zip(PARTS["dense"], (a1 - a, a2 - a1, a3 - a2)):
                    acc["dense", p] += x
                a = tt()                                              # ---- top-k
                s = qt @ k[g, :S].T
                a1 = tt()
                rows = b if per_kv else G * b
                kept = np.empty((rows, S), np.int64)
                counts = np.zeros(rows, np.int64)
                a2 = tt()
                fp.topk_tile_keys(s, q_pos[t0:t1], k_pos[:S], budget[t0:t1], sel.recent, G,
                                  per_kv, kept, counts)
                a3 = tt()
                o, ls, na = np.empty((G * b, d), np.float32), np.empty(G * b), np.empty(G * b, np.int64)
                a4 = tt()
                fp.topk_attend(s, v[g], q_pos[t0:t1], k_pos[:S], budget[t0:t1], sel.recent, G,
                               per_kv, o, ls, na)
                a5 = tt()
                for p, x in zip(PARTS["topk"], (a1 - a, a3 - a2, (a5 - a4) - (a3 - a2))):
                    acc["topk", p] += x
    return acc


def list_lengths(layers, sel):
    """Per ranking row (per query head; one a group for /kv), the keys at or above the row's lower
    bound that the selection partitions, over the row's budget: the lane bound of top_keys, or
    on a checkout from before it, the block bound (_block_max_floor) it replaced."""
    from minisparse.attention.topk import row_budgets
    from minisparse.fast import prefill as fp
    out = []
    for q, k, v, q_pos, k_pos in layers:
        Hq, Tq, d = q.shape
        G = Hq // k.shape[0]
        e_all = np.searchsorted(k_pos, q_pos - sel.recent, side="right")
        budget = np.minimum(row_budgets(sel.k, sel.fraction, q_pos, k_pos, 1), e_all)
        for h in range(0, Hq, G if sel.per == "kv" else 1):
            g = h // G
            hs = range(h, h + G) if sel.per == "kv" else [h]
            sc = np.float32(1 / np.sqrt(d))
            scores = [np.multiply(q[i], sc) @ k[g].T for i in hs]         # (Tq, Tk) f32 each
            # /kv ranks the group's summed scores in float64, as TopK sums them
            s = sum(x.astype(np.float64) for x in scores) if sel.per == "kv" else scores[0]
            for t in range(0, Tq, 8):                                      # every 8th query
                e, keep = int(e_all[t]), int(budget[t])
                if not 0 < keep < e:
                    continue
                row = np.ascontiguousarray(s[t, :e])
                if hasattr(fp, "_lane_max"):
                    L = min(e, (fp.LANES_PER_KEEP * keep + 15) // 16 * 16)
                    lanes = np.empty(L, row.dtype)
                    fp._lane_max(row, e, L, lanes)
                    floor = np.sort(lanes)[L - keep]               # keep-th largest
                else:
                    floor = fp._block_max_floor(row, e, keep)
                out.append(np.count_nonzero(row >= floor) / keep)
    return np.array(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=3400)
    ap.add_argument("--chunk", type=int, default=256, help="as `ask --chunk` (its default)")
    ap.add_argument("--spec", default="topk=2%", help="an exact top-k spec")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default: next to this script, "
                                                "named by tokens and spec)")
    a = ap.parse_args(argv)
    import minisparse
    from minisparse.attention.topk import TopK
    from minisparse.fast import attention as fa
    from minisparse.fast.threads import prefill_heap
    from minisparse.lab.texts import builtin_text
    from minisparse.spec import parse_attention_spec
    from threadpoolctl import threadpool_limits
    sel = parse_attention_spec(a.spec)
    if type(sel) is not TopK:
        raise SystemExit(f"--spec {a.spec!r}: expected an exact top-k spec (topk=...)")
    model = minisparse.load_model(a.model)
    ids = model.tokenizer.encode(builtin_text("pydoc"))[:a.tokens]
    if len(ids) < a.tokens:
        raise SystemExit(f"--tokens {a.tokens}: the text has only {len(ids)} tokens")
    layers = capture(model, ids, a.chunk)
    G = layers[0][0].shape[0] // layers[0][1].shape[0]
    block = max(1, fa.TILE_ROWS // G)                                  # attend_tiles' default
    with threadpool_limits(1, "blas"), prefill_heap(a.chunk):
        one_round(layers[:1], sel, block)                              # compile
        rounds = [one_round(layers, sel, block) for _ in range(a.rounds)]
    med = {key: float(np.median([r[key] for r in rounds])) for key in rounds[0]}
    lists = list_lengths(layers, sel)
    tot = {m: sum(med[m, p] for p in PARTS[m]) for m in PARTS}
    print(f"\none chunk of {a.chunk} queries after {a.tokens - a.chunk} tokens ({a.model}, "
          f"{len(layers)} layers, tiles of {block} queries), CPU s on one thread, median of "
          f"{a.rounds} rounds; load average at the end {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores\n")
    print("| tile | part | CPU s | share |\n|---|---|---:|---:|")
    for m in PARTS:
        name = "dense" if m == "dense" else a.spec
        for p in PARTS[m]:
            print(f"| {name} | {p} | {med[m, p]:.3f} | {med[m, p] / tot[m]:.0%} |")
        print(f"| {name} | **total** | **{tot[m]:.3f}** | |")
    print(f"\n{a.spec} / dense: {tot['topk'] / tot['dense']:.2f}; after the scores: "
          f"{(tot['topk'] - med['topk', 'scores (sgemm)']) / (tot['dense'] - med['dense', 'scores (sgemm)']):.2f}")
    print(f"keys in the list the selection partitions, over the budget (every 8th query): "
          f"median {np.median(lists):.2f}, 90th percentile {np.percentile(lists, 90):.2f}")
    out = a.out or str(Path(__file__).with_name(
        f"profile_topk_tile_{a.tokens}_{a.spec.replace('=', '').replace('%', 'pc').replace('/', '_')}.json"))
    Path(out).write_text(json.dumps({
        "model": a.model, "tokens": a.tokens, "chunk": a.chunk, "spec": a.spec, "block": block,
        "rounds": [{f"{m}: {p}": x for (m, p), x in r.items()} for r in rounds],
        "median": {f"{m}: {p}": x for (m, p), x in med.items()}, "total": tot,
        "list_over_budget": {"median": float(np.median(lists)),
                             "p90": float(np.percentile(lists, 90))},
        "load_average": os.getloadavg(), "cores": os.cpu_count(),
        "command": "python3 benchmarks/profile_topk_tile.py " + " ".join(argv or sys.argv[1:])},
        indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
