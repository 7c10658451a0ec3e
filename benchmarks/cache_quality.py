"""Teacher-forced quality of every bounded cache against the dense cache on one text: perplexity,
next-token agreement with dense (argmax equal) and the cache size, at budgets of 25/50/75% of it.

Leaves out speed (each cache's cost is dominated by the model here) and kvpress's PressCache
(it compresses after the prompt is read, so teacher-forcing the same text would be dense).
Follows the evaluation of StreamingLLM (Xiao et al. 2023) and BMRT/LASER-KV: the text is fed in
blocks of --block tokens, each block attends to the cache plus itself, then the cache compresses.

    python3 benchmarks/cache_quality.py                                  # stories260K, greedy text
    python3 benchmarks/cache_quality.py -m models/minisparse-pydoc.gguf --text-file Lib/copy.py
    python3 benchmarks/cache_quality.py -m smollm2 --tokens 256 --budgets 0.125,0.25 --only window
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small blocks: BLAS threads fight Numba's pool

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minisparse  # noqa: E402
from minisparse.cache import (H2O, ExactAttention, Hybrid, LSHFrequency, RandomKeep,  # noqa: E402
                              RecursiveCompressor, SnapKV, StreamingCache)


def caches(model, B, block, seed):
    """(name, cache) pairs at budget B; every random choice is seeded by `seed`."""
    rec = lambda scorer, **kw: RecursiveCompressor(B, 4, block, scorer=scorer, **kw)  # noqa: E731
    return [
        ("window only", StreamingCache(0, B, block=block)),
        ("sinks4 + window", StreamingCache(4, B - 4, block=block)),
        ("sinks4 + window, reassigned", StreamingCache(4, B - 4, "reassigned", model, block=block)),
        ("recursive exact", rec(ExactAttention())),
        ("recursive exact per-head", rec(ExactAttention(), per_head=True)),
        ("recursive snapkv", rec(SnapKV())),
        ("recursive h2o", rec(H2O())),
        ("recursive lsh", rec(LSHFrequency(seed=seed))),
        ("recursive hybrid exact+lsh .75", rec(Hybrid(ExactAttention(), LSHFrequency(seed=seed), 0.75))),
        ("recursive random", rec(RandomKeep(seed))),
        # accumulate keeps min(K, c) of the c tokens leaving the window per call: with blocks of
        # 16 <= K = B/2 it would keep everything, so it reads the text in blocks of B (BMRT chunks)
        ("accumulate hybrid (LASER-KV), block B", RecursiveCompressor(
            B, 4, B, "accumulate", Hybrid(ExactAttention(), LSHFrequency(seed=seed), 0.75))),
    ]


def sink_mass(model, ids):
    """Mean share of attention on position 0 for the queries past N/4, averaged over layers and
    heads: how much of a sink the first token is (StreamingLLM's premise)."""
    from minisparse.cache import attention_mass
    steps = {}
    model.forward(ids, trace=steps)
    N, a = len(ids), len(ids) // 4
    shares = []
    for l in range(model.config.n_layers):
        q, k = steps[f"blk.{l}.q"][:, a:], steps[f"blk.{l}.k"]           # (Hq, N-a, d), (Hkv, N, d)
        m = attention_mass(q, k, np.broadcast_to(np.arange(N), (k.shape[0], N)), np.arange(a, N))
        shares.append(m[:, 0].sum() / m.sum())                              # (Hkv, N) -> share
    return float(np.mean(shares))


def log_probs(logits):
    lg = logits.astype(np.float64)                                        # (T, V)
    mx = lg.max(axis=1, keepdims=True)
    return lg - mx - np.log(np.exp(lg - mx).sum(axis=1, keepdims=True))


def evaluate(model, ids, cache):
    """(perplexity, agreement with dense argmax, mean len(cache) after each block, final len)."""
    sizes = []
    out = []
    for a in range(0, len(ids), cache.block):
        out.append(model.forward(ids[a:a + cache.block], cache))
        sizes.append(len(cache))
    return np.concatenate(out), float(np.mean(sizes)), len(cache)


def text_ids(model, args):
    tok = model.tokenizer
    if args.text_file:
        p = Path(args.text_file)
        if not p.exists():   # a stdlib path like Lib/copy.py (the pydoc model's corpus format)
            import sysconfig
            p = Path(sysconfig.get_paths()["stdlib"]) / Path(args.text_file).relative_to("Lib")
        text = f"# file: {args.text_file}\n" + p.read_text(encoding="utf-8")
        return tok.encode(text, add_bos=True)[: args.tokens], f"{args.text_file} (first {args.tokens} tokens)"
    bos = [tok.bos_id]
    gen = "".join(model.generate(bos, max_new_tokens=args.tokens + 64, temperature=args.temperature,
                                 seed=args.seed, stop_at_eos=False))
    how = "greedy" if args.temperature <= 0 else f"T={args.temperature}, seed {args.seed}"
    return (bos + tok.encode(gen))[: args.tokens], f"generated from BOS ({how})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=str(ROOT.parent / "shared" / "fixtures" / "stories260K.gguf"))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--budgets", default="0.25,0.5,0.75", help="fractions of the text length")
    ap.add_argument("--text-file", default=None, help="evaluate on this file instead of a generation")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling and every cache's random choice")
    ap.add_argument("--only", default=None, help="run the caches whose name contains this")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    path = Path(args.model)
    if not path.exists():                     # a registered name: smollm2, default
        from minisparse.registry import resolve
        path = resolve(args.model)
    model = minisparse.load_model(path)
    ids, source = text_ids(model, args)
    N = len(ids)
    dense = model.forward(ids)                                            # (N, V) one call
    lp = log_probs(dense)[:-1]
    dense_ppl = float(np.exp(-lp[np.arange(N - 1), ids[1:]].mean()))
    dense_top = dense.argmax(axis=1)
    print(f"model {Path(args.model).name}, text: {source}, N = {N} tokens, block {args.block}, "
          f"seed {args.seed}; dense perplexity {dense_ppl:.4f}; attention on position 0 "
          f"(queries past N/4, mean over layers): {sink_mass(model, ids):.2%}\n")
    print("| budget | cache | perplexity | vs dense | next-token agreement | mean size | final size | s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for frac in [float(x) for x in args.budgets.split(",")]:
        B = int(round(frac * N))
        for name, cache in caches(model, B, args.block, args.seed):
            if args.only and args.only not in name:
                continue
            t = time.perf_counter()
            logits, mean_size, final = evaluate(model, ids, cache)
            secs = time.perf_counter() - t
            lp = log_probs(logits)[:-1]
            ppl = float(np.exp(-lp[np.arange(N - 1), ids[1:]].mean()))
            agree = float((logits.argmax(axis=1) == dense_top).mean())
            rows.append({"budget_frac": frac, "budget": B, "cache": name, "perplexity": ppl,
                         "dense_perplexity": dense_ppl, "agreement": agree, "mean_size": mean_size,
                         "final_size": final, "seconds": secs})
            print(f"| {frac:.0%} ({B}) | {name} | {ppl:.4f} | {ppl / dense_ppl - 1:+.2%} | {agree:.3f} "
                  f"| {mean_size:.0f} | {final} | {secs:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "text": source, "tokens": N,
                                               "block": args.block, "seed": args.seed,
                                               "dense_perplexity": dense_ppl, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
