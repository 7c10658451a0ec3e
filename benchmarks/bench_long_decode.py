"""Long-context decode on SmolLM2: tokens/s after 2k, 4k and 8k-token prompts, dense and each
sparse family, with the keys each step reads and how close it gets to the bandwidth floor of
the bytes it reads.

Protocol (the top-k paper's): one dense prefill of a real text (Python source: the stdlib's
argparse, then more modules until the length is reached) per length; each attention spec then
decodes from its own copy of that cache. Bounded caches (--caches) prefill the same tokens into
themselves. Every variant is fed the same tokens (dense's greedy continuation: teacher forcing),
one step of every variant after another, so the machine's load hits all of them alike and each
step's logits compare with dense's at the same position (the quality columns: top-1 agreement
and mean KL(dense || variant) in nats).

Bytes a step reads (the floor is bytes / copy bandwidth, measured here with a 256 MiB
np.copyto): the GGUF file's tensors once (every matrix is read once a token), plus, per layer,
K and V rows of the keys attended (mean over query heads, times Hkv: each KV head's rows are
read once for its query heads when they agree, so this is the floor), plus what the selection
scans: every key's K row for exact top-k, two bound rows per page for Quest, the centroids for
IVF. "of floor" = floor ms / measured ms (1.0 = at bandwidth). The first step is reported apart:
it compiles and builds the per-layer indexes (IVF's k-means, Quest's page bounds).

--layer-only: no model; one layer's decode attention (selection, index upkeep and kernel) at
SmolLM2's shapes (Hq 9, Hkv 3, d 64) on random keys, each step appending a key as decode does:
what the sparse families cost per layer, apart from the weights' matrix-vector products.

llama.cpp is not installed here and is not built by this benchmark: no llama.cpp column.

    python3 benchmarks/bench_long_decode.py --out benchmarks/bench_long_decode.json
    python3 benchmarks/bench_long_decode.py --lengths 2048 --steps 6      # quick look
    python3 benchmarks/bench_long_decode.py --layer-only --lengths 2048,4096,8192 --steps 40
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minisparse  # noqa: E402
from minisparse.registry import resolve  # noqa: E402
from minisparse.spec import parse_attention_spec, parse_cache_spec  # noqa: E402

SPECS = ["dense", "topk=128", "topk=128/kv", "sinks=4,window=252", "quest=16/256",
         "ivf=64/p8/c256,seed=2"]
CACHES = ["streaming=4+252"]
MODULES = ["argparse", "typing", "inspect", "subprocess", "pathlib", "dataclasses"]


def real_text_ids(tok, n):
    """The first n tokens of stdlib sources (argparse first), joined by blank lines."""
    ids = []
    for name in MODULES:
        ids += tok.encode(inspect.getsource(__import__(name)) + "\n\n")
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the stdlib sources give only {len(ids)} tokens; need {n}")


def copy_bandwidth(mb=256, reps=5):
    """Read + write bytes per second of np.copyto over `mb` MiB (median of reps)."""
    a = np.ones(mb << 18, np.float32)
    b = np.empty_like(a)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    return 2 * a.nbytes / float(np.median(ts))


def weight_bytes(model):
    """Bytes of the tensors one token reads: every matrix once (the output head when untied)."""
    tot = 0
    for name, w in model.weights.items():
        if name == "output" and model.config.tied_embeddings:
            continue
        tot += int(getattr(w, "nbytes", 0) or getattr(getattr(w, "data", None), "nbytes", 0))
    return tot


def scan_bytes(spec, S, cfg):
    """Bytes a selection reads beyond the keys it attends, per layer (see the module docstring)."""
    row = cfg.n_kv_heads * cfg.head_dim * 4                       # one K row of every KV head
    if spec.startswith("topk"):
        return S * row
    if spec.startswith("quest"):
        page = int(spec.split("=")[1].split("/")[0])
        return 2 * (S // page) * row
    if spec.startswith("ivf"):
        parts = spec.split("=")[1].split(",")[0].split("/")
        c = [p[1:] for p in parts if p.startswith("c") and p[1:].isdigit()]
        return int(c[0]) * row if c else 0
    return 0


def logsoftmax(x):
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def run_length(model, n, steps, specs, caches):
    cfg = model.config
    ids = real_text_ids(model.tokenizer, n)
    t0 = time.perf_counter()
    base, logits = model.prefill(ids)
    prefill_s = time.perf_counter() - t0
    variants = {}
    for spec in specs:
        variants[spec] = {"cache": copy.deepcopy(base),
                          "attention": None if spec == "dense" else parse_attention_spec(spec)}
    for spec in caches:
        c = parse_cache_spec(spec, model)
        model.prefill(ids, cache=c)
        variants[spec] = {"cache": c, "attention": None}
    for v in variants.values():
        v.update(ms=[], agree=[], kl=[], keys=[])
    tok = int(np.argmax(logits))
    for _ in range(steps):
        ref = None
        for name, v in variants.items():                          # dense first: the reference
            st = []
            t0 = time.perf_counter()
            lg = model.forward([tok], v["cache"], attention=v["attention"], stats=st,
                               last_only=True)[-1]
            v["ms"].append(1e3 * (time.perf_counter() - t0))
            v["keys"].append(float(np.mean([s["n_attended"].mean() for s in st])))
            lp = logsoftmax(lg)
            if ref is None:
                ref = lp
            v["agree"].append(int(np.argmax(lp) == np.argmax(ref)))
            v["kl"].append(float(np.sum(np.exp(ref) * (ref - lp))))
        tok = int(np.argmax(ref))                                 # dense's greedy token for all
    return ids, prefill_s, variants


def layer_only(lengths, steps, specs, bw):
    """One layer's decode attention per spec at SmolLM2's shapes (see the module docstring)."""
    from minisparse.attention import attend
    Hq, Hkv, d = 9, 3, 64
    rng = np.random.default_rng(0)
    row = Hkv * d * 4
    rows = []
    print("| keys held | variant | keys/step | us/layer (median) | x dense | floor us | of floor | "
          "first us |")
    print("|---|---|---|---|---|---|---|---|")
    for S in lengths:
        K = rng.standard_normal((Hkv, S + steps, d)).astype(np.float32)   # (Hkv, cap, d)
        V = rng.standard_normal((Hkv, S + steps, d)).astype(np.float32)
        q = rng.standard_normal((steps, Hq, 1, d)).astype(np.float32)
        res, order = {s: {"us": [], "keys": []} for s in specs}, list(specs)
        states = {s: {} for s in specs}
        sels = {s: None if s == "dense" else parse_attention_spec(s) for s in specs}
        for i in range(steps):                                   # one step of each, in turn
            n = S + i + 1                                        # keys held after the append
            for s in order:
                t0 = time.perf_counter()
                sel = sels[s]
                if sel is not None:
                    sel = sel.for_layer(0, states[s], K[:, :n], V[:, :n])
                _, st = attend(q[i], K, V, sel, q_pos=np.array([n - 1]), k_pos=np.arange(n),
                               buffer=True, return_stats=True)
                res[s]["us"].append(1e6 * (time.perf_counter() - t0))
                res[s]["keys"].append(float(st.n_attended.mean()))
        dense_us = float(np.median(res[order[0]]["us"][1:]))
        for s in order:
            med = float(np.median(res[s]["us"][1:]))
            keys = float(np.mean(res[s]["keys"]))
            floor = 1e6 * (2 * keys * row + scan_bytes(s, S, _Shape)) / bw
            r = {"keys_held": S, "variant": s, "keys_per_step": keys, "us_median": med,
                 "us_steps": res[s]["us"], "x_dense": dense_us / med, "floor_us": floor,
                 "of_floor": floor / med, "first_us": res[s]["us"][0]}
            rows.append(r)
            print(f"| {S} | {s} | {keys:.0f} | {med:.0f} | {r['x_dense']:.2f} | {floor:.0f} | "
                  f"{r['of_floor']:.2f} | {r['first_us']:.0f} |", flush=True)
    return rows


def _numba_threads():
    import numba
    return numba.get_num_threads()


class _Shape:
    """SmolLM2-135M's attention shapes, for --layer-only."""
    n_kv_heads, head_dim = 3, 64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="2048,4096,8000",
                    help="prompt tokens, comma-separated (SmolLM2's context is 8192)")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per variant")
    ap.add_argument("--specs", default=";".join(SPECS), help="attention specs, ';'-separated")
    ap.add_argument("--caches", default=";".join(CACHES),
                    help="cache specs, ';'-separated ('' for none)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--layer-only", action="store_true",
                    help="no model: one layer's decode attention at SmolLM2's shapes")
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2 (the first step is reported apart)")
    lengths = [int(x) for x in a.lengths.split(",")]
    specs = [s for s in a.specs.split(";") if s]
    caches = [s for s in a.caches.split(";") if s]
    if a.layer_only:
        bw = copy_bandwidth()
        print(f"copy bandwidth {bw / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs", flush=True)
        rows = layer_only(lengths, a.steps, [s for s in specs], bw)
        if a.out:
            Path(a.out).write_text(json.dumps({
                "command": "python3 benchmarks/bench_long_decode.py " + " ".join(sys.argv[1:]),
                "mode": "layer-only", "steps": a.steps, "copy_bandwidth_Bps": bw,
                "load_average": os.getloadavg(), "numba_threads": _numba_threads(),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "rows": rows}, indent=1))
        return
    path = resolve(a.model)
    model = minisparse.load_model(path)
    cfg = model.config
    if max(lengths) + a.steps > cfg.context_length:
        ap.error(f"--lengths: {max(lengths)} + {a.steps} steps exceeds the context "
                 f"{cfg.context_length}")
    bw = copy_bandwidth()
    wb = weight_bytes(model)
    kv_row = cfg.n_kv_heads * cfg.head_dim * 4                    # one K (or V) row, all KV heads
    rows = []
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {wb / 1e6:.1f} MB a token; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    print("| prompt | variant | keys/step | ms/token (median) | tok/s | x dense | floor ms | "
          "of floor | first step ms | top-1 agree | KL nats |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in lengths:
        ids, pre_s, var = run_length(model, n, a.steps, specs, caches)
        dense_ms = float(np.median(var[next(iter(var))]["ms"][1:]))
        for name, v in var.items():
            med = float(np.median(v["ms"][1:]))
            keys = float(np.mean(v["keys"][1:]))
            S = n + a.steps
            kv_bytes = cfg.n_layers * 2 * keys * kv_row
            scan = cfg.n_layers * scan_bytes(name, S, cfg)
            floor_ms = 1e3 * (wb + kv_bytes + scan) / bw
            r = {"prompt": n, "variant": name, "keys_per_step": keys, "ms_median": med,
                 "ms_steps": v["ms"], "tok_s": 1e3 / med, "x_dense": dense_ms / med,
                 "bytes": {"weights": wb, "kv": kv_bytes, "scan": scan},
                 "floor_ms": floor_ms, "of_floor": floor_ms / med, "first_ms": v["ms"][0],
                 "top1_agree": float(np.mean(v["agree"])), "kl": float(np.mean(v["kl"])),
                 "prefill_s": pre_s}
            rows.append(r)
            print(f"| {n} | {name} | {keys:.0f} | {med:.1f} | {r['tok_s']:.1f} | "
                  f"{r['x_dense']:.2f} | {floor_ms:.1f} | {r['of_floor']:.2f} | "
                  f"{r['first_ms']:.0f} | {r['top1_agree']:.2f} | {r['kl']:.4f} |", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({
            "command": "python3 benchmarks/bench_long_decode.py " + " ".join(sys.argv[1:]),
            "model": str(path), "steps": a.steps, "copy_bandwidth_Bps": bw,
            "weight_bytes": wb, "load_average": os.getloadavg(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "llama.cpp": "not installed here; not built", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
