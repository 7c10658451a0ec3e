"""Time to first answer for `minisparse ask`: cold (prefill + save) vs warm (load the saved cache).

Each configuration runs `python -m minisparse ask` in a fresh subprocess (so peak RSS is that
run's own) with an empty cache folder for the cold run, then again for the warm run. Prints a
table and writes JSON. Documents are built from the Python docs (pydoc_data) to the requested
token count. Left out: statistical repeats of the cold run (minutes each); warm runs repeat.
"answer ms/step" is what `ask` prints for the answer's decode steps after its first token (the
warm run's): the decode rate with the configuration's --attention over the whole document. A
config's PREFILL field "sparse" runs `ask --prefill sparse` (the selector in the prefill too),
whose cold run must not be slower than the same config's dense prefill.

    python3 benchmarks/bench_ask.py --out benchmarks/bench_ask.json [--quick]
    python3 benchmarks/bench_ask.py --config smollm2:8000:dense:dense \
        --config smollm2:8000:sinks=4,window=1020:dense \
        --config smollm2:8000:sinks=4,window=1020:dense:sparse --out benchmarks/bench_ask_8k.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
               "sys.exit(r.returncode)", *cmd]
    t0 = time.perf_counter()
    p = subprocess.run(wrapped, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode:
        lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("PEAK_RSS_KB")]
        return {"error": lines[-1] if lines else f"exit {p.returncode}"}
    first = re.search(r"time to first answer token: ([\d.]+) s", p.stderr)
    step = re.search(r"answer decode: \d+ steps after the first token, ([\d.]+) ms a step", p.stderr)
    rss = re.search(r"PEAK_RSS_KB (\d+)", p.stderr)
    return {"wall_s": round(wall, 2), "answer_first_token_s": float(first.group(1)) if first else None,
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
    ap.add_argument("--answer-tokens", type=int, default=16,
                    help="tokens each answer decodes (-n); the decode column times those after the first")
    args = ap.parse_args()
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
    rows = []
    for name, n_tok, attention, cache, prefill in configs:
        try:
            path = str(resolve(name))
        except Exception as e:     # noqa: BLE001 - an absent optional model is a row, not a crash
            rows.append({"model": name, "tokens": n_tok, "error": str(e)})
            continue
        tok = minisparse.load_tokenizer(path)
        with tempfile.TemporaryDirectory() as tmp:
            doc = Path(tmp) / "doc.txt"
            doc.write_text(make_document(tok, n_tok))
            go = dict(n=args.answer_tokens, prefill=prefill)
            cold = run(path, str(doc), attention, cache, str(Path(tmp) / "kv"), **go)
            warm = [run(path, str(doc), attention, cache, str(Path(tmp) / "kv"), **go)
                    for _ in range(3)]
        ok = [w for w in warm if "error" not in w]
        med = sorted(ok, key=lambda w: w["wall_s"])[len(ok) // 2] if ok else {"error": warm[0].get("error")}
        rows.append({"model": name, "tokens": n_tok, "attention": attention or "dense", "cache": cache,
                     "prefill": prefill, "cold": cold, "warm_median_of_3": med})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print("\n| model | doc tokens | attention | cache | prefill | cold wall s | warm wall s | speed-up | "
          "answer ms/step (warm) | cold RSS MiB | warm RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "cold" not in r or "error" in r["cold"] or "error" in r["warm_median_of_3"]:
            print(f"| {r['model']} | {r['tokens']} | {r.get('attention', '')} | {r.get('cache', '')} | "
                  f"{r.get('prefill', '')} | error: {r.get('error') or r.get('cold', {}).get('error') or r['warm_median_of_3'].get('error')} |||||")
            continue
        c, w = r["cold"], r["warm_median_of_3"]
        print(f"| {r['model']} | {r['tokens']} | {r['attention']} | {r['cache']} | {r['prefill']} | "
              f"{c['wall_s']} | {w['wall_s']} | {c['wall_s'] / w['wall_s']:.1f}x | "
              f"{w['answer_ms_per_step']} | {c['peak_rss_mib']} | {w['peak_rss_mib']} |")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "load_average": os.getloadavg()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
