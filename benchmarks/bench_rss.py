"""Where a model's resident memory goes: bench_engine.py's RSS measurement, step by step.

Each worker is a fresh subprocess that imports minisparse from one source tree (`--roots`; the
first is this checkout), takes the runtime floor as bench_engine.py does (`warm_minisparse_kernels`:
Python, NumPy, Numba/LLVM and the compiled kernels, no model), then loads the model and records
RSS after each step: the GGUF walk and weights, the tokenizer, encoding a prompt, a 128-token
prefill and 32 decode steps (bench_engine.py's decode run, which uses random ids: here the prompt
also goes through the tokenizer, so its working memory counts). `model part` is the peak RSS
(VmHWM) minus the floor, over the GGUF file's size: issue 23's memory figure; `peak` is the
process's own. Each root is measured with its own bench_engine.py (its floor, as that tree
reports it), on each thread count of `--threads` (Numba, BLAS, OpenMP, as bench_engine.py sets
them). Roots and thread counts alternate run by run, so a loaded machine weighs on all alike.

    python3 benchmarks/bench_rss.py --roots . ../main --threads 2 1 --runs 3    # this checkout vs main
    python3 benchmarks/bench_rss.py --tokenizer-parts              # the tokenizer's parts, one process
    python3 benchmarks/bench_rss.py --kv-fill                      # a lazy cache's fill vs np.zeros
    python3 benchmarks/bench_rss.py --encode                       # minisparse's BPE vs the library's
    python3 benchmarks/bench_rss.py --variants                     # what each fused-layer variant holds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" * 8


def compiled_kernels():
    """{module.name: compiled signatures} of every Numba function minisparse's loaded modules
    define: what a run has loaded of the package's machine code so far."""
    from numba.core.registry import CPUDispatcher
    return {f"{name}.{k}": len(v.overloads) for name, mod in list(sys.modules.items())
            if name.startswith("minisparse") for k, v in list(vars(mod).items())
            if isinstance(v, CPUDispatcher)}


def worker(root, model, steps):
    sys.path.insert(0, str(Path(root).resolve()))
    import numba
    import numpy as np
    import minisparse
    import minisparse.registry
    from minisparse.gguf_io import load_gguf
    from minisparse.model import Model
    from minisparse import fast as fast_path
    own = Path(root).resolve() / "benchmarks"
    sys.path.insert(1, str(own if (own / "bench_engine.py").is_file() else HERE))
    from bench_engine import peak_rss_mb, rss_mb, rss_parts_mb, warm_minisparse_kernels
    path = minisparse.registry.resolve(model) if not Path(model).is_file() else model
    out = {"root": str(root), "threads": numba.get_num_threads(), "runtime": rss_mb()}
    warm_minisparse_kernels()
    out["floor"] = rss_mb()
    in_floor = compiled_kernels()
    out["floor_parts"] = rss_parts_mb()
    cfg, weights, f = load_gguf(path, dequant=False)
    out["gguf+weights"] = rss_mb()
    from minisparse.tokenizer import load_tokenizer
    tok = load_tokenizer(f)
    del f
    out["tokenizer"] = rss_mb()
    m = Model(cfg, weights, tok, path, ops=fast_path.FAST)
    ids = tok.encode(PROMPT)
    out["encode"] = rss_mb()
    rng = np.random.default_rng(0)
    m.forward([1] + rng.integers(3, cfg.n_vocab, 15).tolist(), m.new_cache(), last_only=True)  # warm-up
    out["warm-up"] = rss_mb()
    ids = (ids + rng.integers(3, cfg.n_vocab, 128).tolist())[:128]
    cache = m.new_cache()
    t = int(np.argmax(m.forward(ids, cache, last_only=True)[-1]))
    out["prefill128"] = rss_mb()
    text = []
    for _ in range(steps):
        t = int(np.argmax(m.forward([t], cache)[-1]))
        text.append(tok.decode_piece(t))
    out["decode"] = rss_mb()
    out["peak"] = peak_rss_mb()
    # code the floor did not load, so counted as the model's (a kernel or a signature first
    # compiled or loaded from Numba's cache by the model's own run)
    out["kernels_after_floor"] = {k: n - in_floor.get(k, 0) for k, n in compiled_kernels().items()
                                  if n > in_floor.get(k, 0)}
    out["parts"] = rss_parts_mb(path)
    out["gguf_mb"] = Path(path).stat().st_size / 2**20
    out["model_part_x"] = (out["peak"] - out["floor"]) / out["gguf_mb"]
    print(json.dumps(out))


def tokenizer_parts(root, model):
    """Anonymous RSS of the tokenizer's parts, each built on its own with the heap trimmed between
    (glibc's malloc_trim), so freed temporaries do not count: the whole Tokenizer (minisparse's
    BPE, and the tokenizers library's with backend="tokenizers"), the tokenizers library's BPE
    model from the vocabulary alone and with the merges, and the compact tables."""
    import ctypes
    import gc
    sys.path.insert(0, str(Path(root).resolve()))
    import minisparse.registry
    from minisparse.gguf_io import open_gguf
    from minisparse.tokenizer import load_tokenizer
    from tokenizers import Tokenizer as HF, models
    trim = ctypes.CDLL("libc.so.6").malloc_trim

    def anon():
        gc.collect(), trim(0)
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    f = open_gguf(minisparse.registry.resolve(model) if not Path(model).is_file() else model, model=True)
    out, a = {}, anon()
    tok = load_tokenizer(f, backend="tokenizers")
    out["Tokenizer, backend=tokenizers"] = anon() - a
    del tok
    a = anon()
    tok = load_tokenizer(f)
    out["Tokenizer"] = anon() - a
    bpe = tok.bpe
    merge_tables = (len(bpe.pair_keys) + len(bpe.pair_vals)) * 8 if bpe is not None else 0
    out["compact tables (tracked)"] = (sum(x.blob.__sizeof__() + x.offsets.nbytes for x in (tok.tokens, tok._bytes))
                                       + tok.types.nbytes + merge_tables) / 2**20
    tokens, raw = f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.merges")
    # what the tables replaced: the token texts, their bytes and types as lists of Python objects
    # (the types' items are small ints, which Python shares: only their list counts)
    as_lists = (tokens, [tok.token_bytes(i) for i in range(len(tokens))])
    out["the same as lists (getsizeof)"] = (sum(sys.getsizeof(v) + sum(map(sys.getsizeof, v)) for v in as_lists)
                                            + sys.getsizeof([0] * len(tokens))) / 2**20
    del tok, as_lists
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in raw]
    a = anon()
    bpe_vocab = HF(models.BPE(vocab, []))
    b = anon()
    out["HF BPE, vocabulary only"] = b - a
    bpe = HF(models.BPE(vocab, merges))
    out["HF BPE, vocabulary and merges"] = anon() - b
    del bpe, bpe_vocab
    print(json.dumps(out))


def kv_fill(root, rounds=7):
    """What lazy allocation costs: filling a SmolLM2-shaped cache (30 layers, 3 KV heads, d 64)
    with a 2048-token prefill and 32 decode steps after it (one doubling), from a new cache each
    time, with the cache's `lazy_zeros` and with np.zeros in its place; interleaved, medians."""
    import time
    from types import SimpleNamespace
    import numpy as np
    sys.path.insert(0, str(Path(root).resolve()))
    import minisparse.cache.dense as dense
    cfg, lazy = SimpleNamespace(n_layers=30, n_kv_heads=3, head_dim=64), dense.lazy_zeros
    k = np.ones((3, 2048, 64), np.float32)

    def fill():
        t, c = time.perf_counter(), dense.KVCache(cfg)
        for T in [2048] + [1] * 32:
            for layer in range(30):
                c.update(layer, k[:, :T], k[:, :T], c.next_pos + np.arange(T))
            c.advance(T)
        return time.perf_counter() - t

    times = {"lazy_zeros": [], "np.zeros": []}
    for _ in range(rounds):
        for name in times:
            dense.lazy_zeros = lazy if name == "lazy_zeros" else (lambda shape, dtype=np.float32: np.zeros(shape, dtype))
            times[name].append(fill())
    dense.lazy_zeros = lazy
    print(json.dumps({n: round(statistics.median(v) * 1e3, 1) for n, v in times.items()}), "ms")


def encode(root, models, rounds=5, n_tokens=8192):
    """The gpt2-family encoders side by side: minisparse's ByteLevelBPE and the tokenizers library's
    BPE (load_tokenizer's backend="tokenizers"). Equal ids on real text (Python's bundled
    documentation, pydoc_data.topics, and Python source files, each whole) as `generate` encodes a
    prompt and as `ask` encodes a document and a question (ask.split_prompt: the chat template,
    special tokens parsed), equal text back; and the time to encode an n_tokens-token document
    with a new tokenizer (no word remembered), interleaved, medians of `rounds`."""
    import time
    sys.path.insert(0, str(Path(root).resolve()))
    import argparse as argparse_module
    import minisparse.registry
    import minisparse.tokenizer as tokenizer_module
    from pydoc_data.topics import topics
    from minisparse.ask import split_prompt
    from minisparse.tokenizer import load_tokenizer
    texts = {"pydoc_data.topics": "\n\n".join(topics[k] for k in sorted(topics)),
             "argparse.py": Path(argparse_module.__file__).read_text(encoding="utf-8"),
             "minisparse/tokenizer.py": Path(tokenizer_module.__file__).read_text(encoding="utf-8")}
    out = {}
    for model in models:
        path = minisparse.registry.resolve(model) if not Path(model).is_file() else model
        own, lib = load_tokenizer(path), load_tokenizer(path, backend="tokenizers")
        row = {"same_ids": {}, "tokens": {}}
        for name, text in texts.items():
            ids = own.encode(text)                                          # generate
            asked = [split_prompt(t, text, "What does it say about lists?") for t in (own, lib)]   # ask
            row["same_ids"][name] = (ids == lib.encode(text) and own.decode(ids) == lib.decode(ids)
                                     and asked[0] == asked[1])
            row["tokens"][name] = len(ids)
        ids = lib.encode(texts["pydoc_data.topics"])[:n_tokens]
        doc = lib.decode(ids)                                 # a document of n_tokens tokens
        times = {"minisparse": [], "tokenizers": []}
        for _ in range(rounds):
            for backend in times:
                tok = load_tokenizer(path, backend=backend)
                t = time.perf_counter()
                tok.encode(doc)
                times[backend].append(time.perf_counter() - t)
        row["doc_tokens"] = len(lib.encode(doc))
        row["encode_ms"] = {b: round(statistics.median(v) * 1e3, 1) for b, v in times.items()}
        out[model] = row
        print(f"{model}: same ids {row['same_ids']} ({row['tokens']} tokens); encoding a "
              f"{row['doc_tokens']}-token document, new tokenizer, median of {rounds}: "
              + ", ".join(f"{b} {ms} ms" for b, ms in row["encode_ms"].items()))
    (HERE / "bench_rss_encode.json").write_text(json.dumps(out, indent=1))


def variant_cost(root, first, second):
    """Anonymous RSS a decode step pinned at `second` free cores adds (heap trimmed) after a floor
    taken with free_cores pinned at `first` (bench_engine.py's one pass), on two Numba threads:
    the fused decode layer's one-thread and two-thread variants are separate compiled functions,
    so the step loads whichever the floor did not."""
    import ctypes
    import gc
    import numpy as np
    sys.path.insert(0, str(Path(root).resolve()))
    sys.path.insert(1, str(HERE))
    import bench_engine
    from minisparse import load_model
    from minisparse.fast import step, threads
    trim = ctypes.CDLL("libc.so.6").malloc_trim

    def anon():
        gc.collect(), trim(0)
        return bench_engine.rss_parts_mb()["RssAnon"]
    with threads.pinned_free_cores(first):
        bench_engine._warm_kernels(False)
    tiny = load_model(bench_engine.ROOT / "tests" / "fixtures" / "oracle" / "llama_g2_hd64_q8_0.gguf")
    step.PARALLEL_MIN_WEIGHTS = 0                   # its small matrices take SmolLM2's layer
    a = anon()
    with threads.pinned_free_cores(second):
        cache = tiny.new_cache()
        logits = tiny.forward([1, 2, 3], cache=cache)
        for _ in range(2):
            logits = tiny.forward([int(np.argmax(logits[-1]))], cache=cache)
    del cache, logits
    print(json.dumps({"floor_free_cores": first, "step_free_cores": second, "anon_mb": anon() - a,
                      "one_thread_layer": bool(step._layer.signatures),
                      "two_thread_layer": bool(step._layer_parallel.signatures)}))


STEPS = ("runtime", "floor", "gguf+weights", "tokenizer", "encode", "warm-up", "prefill128", "decode", "peak")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roots", nargs="+", default=["."], help="source trees to import minisparse from")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts, each measured")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "bench_rss.json"))
    ap.add_argument("--tokenizer-parts", action="store_true", help="only the tokenizer's parts (glibc)")
    ap.add_argument("--kv-fill", action="store_true", help="only the cost of a lazily allocated cache")
    ap.add_argument("--encode", nargs="*", metavar="MODEL",
                    help="only compare the gpt2-family encoders on these models (default smollm2 and pydoc)")
    ap.add_argument("--variants", action="store_true",
                    help="only what a fused-layer variant the floor did not load adds (two threads)")
    ap.add_argument("--variant-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    # the "only" modes measure one thing each and take only the options listed here: any other
    # option given with one is refused, not ignored (--roots: its first root alone)
    modes = {"kv_fill": {"roots"}, "encode": {"roots"}, "tokenizer_parts": {"roots", "model"},
             "variants": {"roots", "runs"}}
    given = {k for k, v in vars(a).items() if v != ap.get_default(k)} - {"worker", "variant_worker"}
    chosen = [m for m in modes if m in given]
    if len(chosen) > 1:
        ap.error("--" + " and --".join(m.replace("_", "-") for m in chosen) + ": one mode at a time")
    if chosen:
        extra = given - modes[chosen[0]] - {chosen[0]}
        if extra or len(a.roots) > 1:
            bad = sorted(extra) + (["roots (a second root)"] if len(a.roots) > 1 else [])
            ap.error(f"--{chosen[0].replace('_', '-')} does not take " + ", ".join(
                "--" + b.replace("_", "-") for b in bad))
    if a.kv_fill:
        return kv_fill(a.roots[0])
    if a.encode is not None:
        return encode(a.roots[0], a.encode or ["smollm2", "models/minisparse-pydoc.gguf"])
    if a.tokenizer_parts:
        return tokenizer_parts(a.roots[0], a.model)
    if a.worker:
        return worker(a.worker, a.model, a.steps)
    if a.variant_worker:
        return variant_cost(a.roots[0], *a.variant_worker)
    if a.variants:
        env = {**os.environ, "PYTHONPATH": "", "NUMBA_NUM_THREADS": "2"}
        for i in range(a.runs):
            for first, second in ((2, 2), (2, 1), (1, 2)):
                p = subprocess.run([sys.executable, __file__, "--roots", a.roots[0], "--variant-worker",
                                    str(first), str(second)], capture_output=True, text=True, env=env)
                if p.returncode:
                    sys.exit(f"variant worker failed:\n{p.stderr[-3000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"floor at {first} free core(s), a decode step at {second}: +{r['anon_mb']:.2f} MB "
                      f"anonymous; layers loaded: one-thread {r['one_thread_layer']}, "
                      f"two-thread {r['two_thread_layer']}")
        return
    if min(a.threads) < 1:
        ap.error(f"--threads: each count must be >= 1, got {a.threads}")
    rows = {(r, n): [] for r in a.roots for n in a.threads}
    for i in range(a.runs):
        for r, n in rows:
            env = {**os.environ, "PYTHONPATH": "", **{k: str(n) for k in
                   ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "BENCH_THREADS")}}
            p = subprocess.run([sys.executable, __file__, "--worker", r, "--model", a.model,
                                "--steps", str(a.steps)], capture_output=True, text=True, env=env, cwd=r)
            if p.returncode:
                sys.exit(f"worker {r} ({n} threads) failed:\n{p.stderr[-3000:]}")
            rows[r, n].append(json.loads(p.stdout.strip().splitlines()[-1]))
    name = lambda r, n: f"{r} @{n}t"                                    # noqa: E731
    w = max(12, *(len(name(*k)) + 1 for k in rows))
    print(f"{'root':<{w}}" + "".join(f"{s:>13}" for s in STEPS) + f"{'model part':>12}{'range':>14}")
    for (r, n), runs in rows.items():
        med = {s: statistics.median(x[s] for x in runs) for s in STEPS}
        parts = [x["model_part_x"] for x in runs]
        print(f"{name(r, n):<{w}}" + "".join(f"{med[s]:13.1f}" for s in STEPS)
              + f"{statistics.median(parts):11.3f}x  {min(parts):.3f}-{max(parts):.3f}")
    print("\nthe model part at the end of decode (MB, medians), by kind of page (/proc/self/status, smaps):")
    print(f"{'root':<{w}}{'GGUF pages':>12}{'other file pages':>18}{'anonymous':>11}")
    for (r, n), runs in rows.items():
        gg = statistics.median(x["parts"]["gguf_mapped"] for x in runs)
        fi = statistics.median(x["parts"]["RssFile"] - x["floor_parts"]["RssFile"] for x in runs) - gg
        an = statistics.median(x["parts"]["RssAnon"] - x["floor_parts"]["RssAnon"] for x in runs)
        print(f"{name(r, n):<{w}}{gg:12.1f}{fi:18.1f}{an:11.1f}")
    late = {name(*k): sorted({f for x in runs for f in x["kernels_after_floor"]}) for k, runs in rows.items()}
    print("\nkernels first loaded after the floor (counted as the model's):",
          "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in late.items()))
    rows = {name(*k): v for k, v in rows.items()}
    Path(a.out).write_text(json.dumps({"model": a.model, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
