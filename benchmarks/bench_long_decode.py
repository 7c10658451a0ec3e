"""Long-context decode on SmolLM2: tokens/s after 2k, 4k and 8k-token prompts, dense and each
sparse family, with llama.cpp's dense decode beside them, the keys each step reads, how close it
gets to the bandwidth floor of the bytes it reads, and its quality against dense.

Protocol (the top-k paper's): a real text (Python source: the stdlib's argparse, then more
modules until the length is reached) of n + 1 tokens; one dense prefill of its first n - m
tokens per length; each attention spec then decodes the text's last m tokens (teacher forcing)
from its own copy of that cache, the bounded caches (--caches) from their own prefill of the
same tokens. One step of every variant after another, so the machine's load hits all of them
alike. m = --steps, or --ppl-tokens at the lengths named by --ppl-at, where the table also
carries the perplexity ratio against dense over those tokens (exp of the mean NLL difference,
with a moving-block bootstrap interval: minisparse/lab/stats.py). Quality columns: top-1
agreement with dense and mean KL(dense || variant) in nats, step by step.

llama.cpp (llama-cpp-python, its default KV type f16 and no flash attention, --llama-threads
threads) reads the same token ids: it prefills the same n - m and decodes the same m tokens, in
a block before minisparse's steps at each length (its OpenMP threads spin-wait after a step and
would slow the step that followed). "x llama.cpp" = llama.cpp's ms/token / the variant's.

Bytes a step reads (the floor is bytes / copy bandwidth, measured here with a 256 MiB
np.copyto): the GGUF file's tensors once (every matrix is read once a token), plus, per layer,
K and V rows of the keys attended (mean over query heads, times Hkv: each KV head's rows are
read once for its query heads when they agree, so this is the floor; float16 rows for
llama.cpp), plus what the selection scans: every key's K row for exact top-k, two bound rows per
page for Quest, the centroids for IVF. "MB/token" = those bytes; "of floor" = floor ms / measured ms (1.0 = at bandwidth). The first step is reported apart: it compiles and builds the per-layer indexes
(IVF's k-means, Quest's page bounds).

A variant named "SPEC +int8" is SPEC with MINISPARSE_INT8's 8-bit-activation products
(minisparse/fast/q8.py; llama.cpp quantises its activations to 8 bits the same way) switched on
for its own steps only, so the float32 and the 8-bit weights part run side by side in one run;
its quality columns compare it with the float32 dense reference.

--layer-only: no model; one layer's decode attention (selection, index upkeep and kernel) at
SmolLM2's shapes (Hq 9, Hkv 3, d 64) on random keys, each step appending a key as decode does:
what the sparse families cost per layer, apart from the weights' matrix-vector products.

    python3 benchmarks/bench_long_decode.py --ppl-at 8000 --out benchmarks/bench_long_decode.json
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
from minisparse.fast import q8, quant  # noqa: E402
from minisparse.lab.stats import perplexity_ratio  # noqa: E402
from minisparse.registry import resolve  # noqa: E402
from minisparse.spec import parse_attention_spec, parse_cache_spec  # noqa: E402

SPECS = ["dense", "topk=128", "topk=128/kv", "sinks=4,window=252", "sinks=4,window=764",
         "sinks=4,window=764 +int8", "sinks=4,window=1020", "sinks=4,window=1020 +int8",
         "quest=16/256", "ivf=64/p8/c256,seed=2"]
INT8 = " +int8"                 # a variant's suffix: its steps take the 8-bit-activation products
CACHES = ["streaming=4+252", "recursive=B256"]
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
    spec = spec.removesuffix(INT8)
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


# ---- llama.cpp beside minisparse ------------------------------------------------------------
# The build the lead installed (llama-cpp-python 0.3.36, a portable wheel): recorded in the JSON
# so a reader knows which CPU features its kernels could use.
LLAMA_CPP_BUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
                   "pip wheel llama-cpp-python==0.3.36")


class LlamaCpp:
    """llama.cpp through llama-cpp-python with its defaults (KV cache type, no flash attention),
    on `threads` threads, fed token ids directly (the same ids minisparse reads)."""

    def __init__(self, path, n_ctx, threads):
        from llama_cpp import Llama, llama_print_system_info
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.info = llama_print_system_info().decode().strip()

    def prefill(self, ids):
        self.llm.reset()                                          # a fresh context each length
        self.llm.eval(list(ids))

    def step(self, tok):
        """Logits (V,) after appending token tok."""
        self.llm.eval([int(tok)])
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()


LLAMA = "llama.cpp (dense)"


def run_length(model, n, m, specs, caches, llama=None):
    """Prefill the first n - m tokens of a real text of n + 1, then decode its last m tokens
    (teacher forcing: every variant reads the text's own tokens), one step of every minisparse
    variant in turn; llama.cpp prefills and decodes the same tokens first, in a block of its own
    (its OpenMP threads spin-wait after each step and would slow whatever step came next).
    Returns (prefill seconds, {variant: per-step records}); each step records its time, keys
    read, top-1 agreement and KL against dense, and the NLL of the text's next token."""
    ids = real_text_ids(model.tokenizer, n + 1)
    prompt, feed, target = ids[:n - m], ids[n - m:n], ids[n - m + 1:n + 1]
    lcpp = None
    if llama is not None:
        t0 = time.perf_counter()
        llama.prefill(prompt)
        lcpp = {"prefill_s": time.perf_counter() - t0, "ms": [], "logits": []}
        for tok in feed:
            t0 = time.perf_counter()
            lg = llama.step(tok)
            lcpp["ms"].append(1e3 * (time.perf_counter() - t0))
            lcpp["logits"].append(logsoftmax(lg))
    t0 = time.perf_counter()
    base, _ = model.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    variants = {}
    for spec in specs:
        sel = spec[:-len(INT8)] if spec.endswith(INT8) else spec
        variants[spec] = {"cache": copy.deepcopy(base), "int8": spec.endswith(INT8),
                          "attention": None if sel == "dense" else parse_attention_spec(sel)}
    for spec in caches:
        c = parse_cache_spec(spec, model)
        model.prefill(prompt, cache=c)
        variants[spec + " (cache)"] = {"cache": c, "attention": None}
    if lcpp is not None:
        variants[LLAMA] = lcpp
    int8_default = quant.INT8_DECODE
    for v in variants.values():
        v.update(agree=[], kl=[], keys=[], nll=[], **({} if "ms" in v else {"ms": []}))
    for i, (tok, nxt) in enumerate(zip(feed, target)):
        ref = None
        for name, v in variants.items():                          # dense first: the reference
            st = []
            if name == LLAMA:
                lp = v["logits"][i]
            else:
                quant.INT8_DECODE = v.get("int8") or int8_default   # else as the environment says
                try:
                    t0 = time.perf_counter()
                    lg = model.forward([tok], v["cache"], attention=v["attention"], stats=st,
                                       last_only=True)[-1]
                    v["ms"].append(1e3 * (time.perf_counter() - t0))
                finally:
                    quant.INT8_DECODE = int8_default
                lp = logsoftmax(lg)
            v["keys"].append(float(np.mean([s["n_attended"].mean() for s in st])) if st
                             else float(len(prompt) + i + 1))
            if ref is None:
                ref = lp
            v["agree"].append(int(np.argmax(lp) == np.argmax(ref)))
            v["kl"].append(float(np.sum(np.exp(ref) * (ref - lp))))
            v["nll"].append(float(-lp[nxt]))
    if lcpp is not None:
        del lcpp["logits"]
    return prefill_s, variants


def layer_only(lengths, steps, specs, bw):
    """One layer's decode attention per spec at SmolLM2's shapes (see the module docstring)."""
    from minisparse import fast
    from minisparse.model import PLAIN
    attend = (fast.FAST if fast.enabled() else PLAIN).attend      # what a model's layer runs
    Hq, Hkv, d = 9, 3, 64
    rng = np.random.default_rng(0)
    row = Hkv * d * 4
    rows = []
    print("| keys held | variant | keys/step | us/layer (median) | us/layer (min) | x dense | "
          "floor us | of floor | first us |")
    print("|---|---|---|---|---|---|---|---|---|")
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
                 "us_min": float(np.min(res[s]["us"][1:])),
                 "us_steps": res[s]["us"], "x_dense": dense_us / med, "floor_us": floor,
                 "of_floor": floor / med, "first_us": res[s]["us"][0]}
            rows.append(r)
            print(f"| {S} | {s} | {keys:.0f} | {med:.0f} | {r['us_min']:.0f} | "
                  f"{r['x_dense']:.2f} | {floor:.0f} | {r['of_floor']:.2f} | "
                  f"{r['first_us']:.0f} |", flush=True)
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
    ap.add_argument("--ppl-at", default="",
                    help="prompt lengths (of --lengths, comma-separated) at which every variant "
                         "decodes the text's last --ppl-tokens tokens instead of --steps, with "
                         "the perplexity ratio against dense over them")
    ap.add_argument("--ppl-tokens", type=int, default=512)
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--llama-threads", type=int, default=2)
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
    if a.layer_only and a.specs == ";".join(SPECS):
        specs = [s for s in specs if not s.endswith(INT8)]         # no weights: no int8 part
    elif a.layer_only and any(s.endswith(INT8) for s in specs):
        ap.error(f"--layer-only runs no weights: {INT8.strip()} variants mean nothing there")
    if any(s.endswith(INT8) for s in specs) and not q8.available():
        ap.error(f"{INT8.strip()} variants need the 8-bit kernels (x86-64 with AVX2); this CPU "
                 f"has not got them")
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
    ppl_at = {int(x) for x in a.ppl_at.split(",") if x}
    if not ppl_at <= set(lengths):
        ap.error(f"--ppl-at {a.ppl_at}: each must be one of --lengths {a.lengths}")
    decoded = {n: a.ppl_tokens if n in ppl_at else a.steps for n in lengths}   # tokens decoded
    if max(lengths) + 1 > cfg.context_length or any(n <= m for n, m in decoded.items()):
        ap.error(f"--lengths: each must exceed the tokens it decodes and stay below the "
                 f"context {cfg.context_length}")
    llama = None
    if not a.no_llama_cpp:
        try:
            llama = LlamaCpp(path, max(lengths) + 8, a.llama_threads)
        except ImportError:
            ap.error("llama-cpp-python is not installed; pass --no-llama-cpp to run without it")
    bw = copy_bandwidth()
    wb = weight_bytes(model)
    kv_row = cfg.n_kv_heads * cfg.head_dim * 4                    # one K (or V) row, all KV heads
    rows = []
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {wb / 1e6:.1f} MB a token; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"numba threads {_numba_threads()}; MINISPARSE_INT8 default {int(quant.INT8_DECODE)}; "
          f"tokens decoded per variant: {decoded}"
          + (f"; llama.cpp on {a.llama_threads} threads" if llama else ""), flush=True)
    print("| prompt | variant | keys/step | ms/token (median) | tok/s | x dense | x llama.cpp | "
          "MB/token | floor ms | of floor | first step ms | top-1 agree | KL nats | "
          "ppl ratio [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in lengths:
        pre_s, var = run_length(model, n, decoded[n], specs, caches, llama)
        dense_ms = float(np.median(var[next(iter(var))]["ms"][1:]))
        llama_ms = float(np.median(var[LLAMA]["ms"][1:])) if llama else None
        nll_dense = var[next(iter(var))]["nll"]
        for name, v in var.items():
            med = float(np.median(v["ms"][1:]))
            keys = float(np.mean(v["keys"][1:]))
            kv_bytes = cfg.n_layers * 2 * keys * kv_row
            if name == LLAMA:
                kv_bytes /= 2                                     # its default KV type: f16
            scan = cfg.n_layers * scan_bytes(name, n, cfg)
            floor_ms = 1e3 * (wb + kv_bytes + scan) / bw
            pr = perplexity_ratio(v["nll"], nll_dense, seed=0) if n in ppl_at else None
            r = {"prompt": n, "decoded": decoded[n], "variant": name, "keys_per_step": keys,
                 "ms_median": med,
                 "ms_steps": v["ms"], "tok_s": 1e3 / med, "x_dense": dense_ms / med,
                 "x_llama_cpp": llama_ms / med if llama else None,
                 "bytes": {"weights": wb, "kv": kv_bytes, "scan": scan},
                 "floor_ms": floor_ms, "of_floor": floor_ms / med, "first_ms": v["ms"][0],
                 "top1_agree": float(np.mean(v["agree"])), "kl": float(np.mean(v["kl"])),
                 "nll_mean": float(np.mean(v["nll"])), "perplexity_ratio": pr,
                 "prefill_s": v.get("prefill_s", pre_s)}
            rows.append(r)
            xl = f"{r['x_llama_cpp']:.2f}" if llama else "—"
            ppl = f"{pr['ratio']:.3f} [{pr['lo']:.3f}, {pr['hi']:.3f}]" if pr else "—"
            print(f"| {n} | {name} | {keys:.0f} | {med:.1f} | {r['tok_s']:.1f} | "
                  f"{r['x_dense']:.2f} | {xl} | {(wb + kv_bytes + scan) / 1e6:.1f} | "
                  f"{floor_ms:.1f} | {r['of_floor']:.2f} | "
                  f"{r['first_ms']:.0f} | {r['top1_agree']:.2f} | {r['kl']:.4f} | {ppl} |",
                  flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({
            "command": "python3 benchmarks/bench_long_decode.py " + " ".join(sys.argv[1:]),
            "model": str(path), "decoded_tokens": decoded, "copy_bandwidth_Bps": bw,
            "weight_bytes": wb, "load_average": os.getloadavg(),
            "numba_threads": _numba_threads(), "text": "stdlib sources: " + ", ".join(MODULES),
            "int8_default": bool(quant.INT8_DECODE),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "llama.cpp": None if llama is None else {
                "threads": a.llama_threads, "build": LLAMA_CPP_BUILD, "system_info": llama.info,
                "kv_type": "default (f16)", "flash_attn": "default (off)"},
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
