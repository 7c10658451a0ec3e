"""Time to first answer for `minisparse ask`: cold (prefill + save) vs warm (load the saved cache).

Each configuration runs `python -m minisparse ask` in a fresh subprocess (so peak RSS is that
run's own) with an empty cache folder for the cold run, then again for the warm run. Prints a
table and writes JSON. Documents are built from the Python docs (pydoc_data) to the requested
token count. Left out: statistical repeats of the cold run (minutes each); warm runs repeat.
"answer ms/step" is what `ask` prints for the answer's decode steps after its first token (the
warm run's): the decode rate with the configuration's --attention over the whole document. A
config's PREFILL field "sparse" runs `ask --prefill sparse` (the selector in the prefill too),
whose cold run must not be slower than the same config's dense prefill. `--rounds R` runs the
cold runs R times, interleaved (every config's, round after round, so a loaded machine slows them
alike), and reports their medians, wall and CPU (user + system of the `ask` process), each also
as a ratio to the first config's, and the prefill's own time as `ask` prints it (wall, and CPU
of all its threads).

    python3 benchmarks/bench_ask.py --out benchmarks/bench_ask.json [--quick]
    python3 benchmarks/bench_ask.py --config smollm2:8000:dense:dense \
        --config smollm2:8000:sinks=4,window=1020:dense \
        --config smollm2:8000:sinks=4,window=1020:dense:sparse --out benchmarks/bench_ask_8k.json
    python3 benchmarks/bench_ask.py --rounds 3 --config smollm2:3400:dense:dense \
        --config smollm2:3400:topk=2%:dense:sparse --out benchmarks/bench_ask_3k_topk.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_document(tokenizer, n_tokens):
    import pydoc_data.topics as t
    text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    ids = tokenizer.encode(text, add_bos=False)[:n_tokens]
    return tokenizer.decode(ids)


def run(model, doc, attention, cache, cache_dir, n=16, prefill="dense"):
    cmd = [sys.executable, "-m", "minisparse", "ask", "-m", model, "--context", doc, "-p",
           "What does this document describe?", "-n", str(n), "--temp", "0", "--cache", cache]
    if attention:
        cmd += ["--attention", attention]
    if prefill != "dense":
        cmd += ["--prefill", prefill]
    env = {**os.environ, "MINISPARSE_CACHE": cache_dir}
    wrapped = [sys.executable, "-c", "import resource,subprocess,sys;"
               "r=subprocess.run(sys.argv[1:]);"
               "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
               "print('PEAK_RSS_KB', u.ru_maxrss, 'CPU_S', u.ru_utime + u.ru_stime, file=sys.stderr);"
               "sys.exit(r.returncode)", *cmd]
    t0 = time.perf_counter()
    p = subprocess.run(wrapped, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode:
        lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("PEAK_RSS_KB")]
        return {"error": lines[-1] if lines else f"exit {p.returncode}"}
    first = re.search(r"time to first answer token: ([\d.]+) s", p.stderr)
    step = re.search(r"answer decode: \d+ steps after the first token, ([\d.]+) ms a step", p.stderr)
    rss = re.search(r"PEAK_RSS_KB (\d+) CPU_S ([\d.]+)", p.stderr)
    pre = re.search(r"prefill: \d+ tokens in ([\d.]+) s \(([\d.]+) s CPU", p.stderr)
    return {"wall_s": round(wall, 2), "cpu_s": round(float(rss.group(2)), 2) if rss else None,
            "prefill_s": float(pre.group(1)) if pre else None,
            "prefill_cpu_s": float(pre.group(2)) if pre else None,
            "answer_first_token_s": float(first.group(1)) if first else None,
            "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "answer_ms_per_step": float(step.group(1)) if step else None,
            "prefilled": "prefill [" in p.stderr, "answer": p.stdout.strip()[:80]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/bench_ask.json")
    ap.add_argument("--quick", action="store_true", help="4k tokens on the embedded model only")
    ap.add_argument("--config", action="append", default=[],
                    help="MODEL:TOKENS:ATTENTION:CACHE[:PREFILL] (ATTENTION 'dense' = none; PREFILL "
                         "dense, the default, or sparse: ask --prefill); replaces the default list")
    ap.add_argument("--rounds", type=int, default=1,
                    help="cold runs of every config, interleaved round after round (medians reported)")
    ap.add_argument("--answer-tokens", type=int, default=16,
                    help="tokens each answer decodes (-n); the decode column times those after the first")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: expected at least 1")
    import minisparse
    from minisparse.registry import resolve
    configs = [("default", 4096, None, "streaming=4+1020", "dense"),
               ("default", 4096, "sinks=4,window=256", "streaming=4+1020", "dense")]
    if args.config:
        configs = []
        for x in args.config:
            f = x.split(":")
            if len(f) not in (4, 5) or (len(f) == 5 and f[4] not in ("dense", "sparse")):
                ap.error(f"--config {x!r}: expected MODEL:TOKENS:ATTENTION:CACHE[:dense|sparse]")
            configs.append((f[0], int(f[1]), None if f[2] == "dense" else f[2], f[3],
                            f[4] if len(f) == 5 else "dense"))
    elif not args.quick:
        configs += [("default", 8192, None, "streaming=4+1020", "dense"),
                    ("smollm2", 4096, None, "dense", "dense"),
                    ("smollm2", 4096, "sinks=4,window=256", "dense", "dense")]
    rows, plans = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, n_tok, attention, cache, prefill) in enumerate(configs):
            try:
                path = str(resolve(name))
            except Exception as e:     # noqa: BLE001 - an absent optional model is a row, not a crash
                rows.append({"model": name, "tokens": n_tok, "error": str(e)})
                continue
            doc = Path(tmp) / f"doc{i}.txt"
            doc.write_text(make_document(minisparse.load_tokenizer(path), n_tok))
            rows.append({"model": name, "tokens": n_tok, "attention": attention or "dense",
                         "cache": cache, "prefill": prefill, "cold_rounds": []})
            plans.append((rows[-1], (path, str(doc), attention, cache),
                          dict(n=args.answer_tokens, prefill=prefill), Path(tmp) / f"kv{i}"))
        for r in range(args.rounds):                   # cold runs interleaved, round after round
            for row, what, go, kv in plans:
                shutil.rmtree(kv, ignore_errors=True)  # an empty cache folder: a cold run
                row["cold_rounds"].append(run(*what, str(kv), **go))
                print(f"round {r}: {row['attention']} [{row['prefill']} prefill, {row['tokens']} "
                      f"tokens] cold {row['cold_rounds'][-1]}", file=sys.stderr, flush=True)
        for row, what, go, kv in plans:                # warm: the last cold run's saved cache
            warm = [run(*what, str(kv), **go) for _ in range(3)]
            ok = [w for w in warm if "error" not in w]
            row["warm_median_of_3"] = (sorted(ok, key=lambda w: w["wall_s"])[len(ok) // 2] if ok
                                       else {"error": warm[0].get("error")})
            cold = [c for c in row["cold_rounds"] if "error" not in c]
            row["cold"] = (sorted(cold, key=lambda c: c["wall_s"])[len(cold) // 2] if cold
                           else row["cold_rounds"][0])
            if cold:
                for key in ("wall_s", "cpu_s", "prefill_s", "prefill_cpu_s"):
                    row[f"cold_median_{key}"] = float(np.median([c[key] for c in cold]))
            print(json.dumps(row), file=sys.stderr)
    first = next((r for r in rows if "cold_median_wall_s" in r), None)
    print(f"\ncold: median of {args.rounds} interleaved rounds; / first: the ratio to the first "
          f"config's median; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n| model | doc tokens | attention | cache | prefill | cold wall s | cold CPU s | "
          "cold CPU / first | prefill wall s | prefill CPU s | prefill CPU / first | warm wall s | "
          "answer ms/step (warm) | cold RSS MiB | warm RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "cold_median_wall_s" not in r or "error" in r["warm_median_of_3"]:
            err = r.get("error") or r.get("cold", {}).get("error") or r["warm_median_of_3"].get("error")
            print(f"| {r['model']} | {r['tokens']} | {r.get('attention', '')} | {r.get('cache', '')} | "
                  f"{r.get('prefill', '')} | error: {err} |||||||||")
            continue
        c, w = r["cold"], r["warm_median_of_3"]
        ratio = lambda key: r[key] / first[key]      # noqa: E731 - to the first config's median
        print(f"| {r['model']} | {r['tokens']} | {r['attention']} | {r['cache']} | {r['prefill']} | "
              f"{r['cold_median_wall_s']:.2f} | {r['cold_median_cpu_s']:.2f} | "
              f"{ratio('cold_median_cpu_s'):.2f} | {r['cold_median_prefill_s']:.2f} | "
              f"{r['cold_median_prefill_cpu_s']:.2f} | {ratio('cold_median_prefill_cpu_s'):.2f} | "
              f"{w['wall_s']} | {w['answer_ms_per_step']} | {c['peak_rss_mib']} | {w['peak_rss_mib']} |")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "load_average": os.getloadavg()}
    meta["rounds"] = args.rounds
    meta["command"] = "python3 benchmarks/bench_ask.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
