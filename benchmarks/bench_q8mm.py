"""The prefill weight product alone: q8mm's 8-bit products (llama.cpp's arithmetic) against
sgemm on the dequantised weights (np.matmul, what quant.matmul's float tiles end in) and against
quant.matmul's whole float32 path (tile dequantisation + sgemm), on SmolLM2-135M's shapes at
2,048 tokens, one thread and two, interleaved (each repeat runs every engine once, in turn).
CPU time (all threads of this process) and wall time, medians; GFLOP/s = 2 T in out / time.

    python3 benchmarks/bench_q8mm.py [--repeats 7]
    python3 benchmarks/bench_q8mm.py --phases     # one thread: quantise x, repack W, the kernel alone

Writes benchmarks/bench_q8mm.json. Weights: random Q4_1 blocks (seed 0) of each shape; the
product's cost does not depend on the values.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from gguf import GGMLQuantizationType as QT   # noqa: E402

from minisparse.fast import q8mm, quant, threads  # noqa: E402
from minisparse.quant import QuantMatrix  # noqa: E402
from test_quant_kernels import random_blocks  # noqa: E402

T = 2048
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]      # (out, in): q/o, k/v, gate/up, down


def engines(W, Wf):
    def float_path(x):
        saved, quant.INT8_DECODE = quant.INT8_DECODE, False
        try:
            return quant.matmul(x, W)
        finally:
            quant.INT8_DECODE = saved
    return {"q8mm": lambda x: q8mm.matmul(x, W),
            "sgemm (dequantised W)": lambda x: threads.matmul_t(x, Wf),
            "quant.matmul float32": float_path}


def phases(repeats):
    """q8mm.matmul's three steps apart, one thread, CPU time medians (interleaved)."""
    rng = np.random.default_rng(0)
    for n_out, n_in in SHAPES:
        W = QuantMatrix(random_blocks(QT.Q4_1, n_out, n_in, rng), (n_out, n_in), QT.Q4_1)
        x = rng.standard_normal((T, n_in)).astype(np.float32)
        nb, G = n_in // 32, -(-n_out // q8mm.ROWS)
        qx, dx, sx, qs = (np.empty((T, n_in), np.int8), np.empty((T, nb), np.float32),
                          np.empty((T, nb), np.float32), np.empty((T, nb), np.int32))
        wq, dw, mw = (np.empty((G, nb * 512), np.uint8), np.empty((G, nb * 16), np.float32),
                      np.empty((G, nb * 16), np.float32))
        y, spare = np.empty((T, n_out), np.float32), np.empty((T, q8mm.ROWS), np.float32)
        steps = {"quantise x": lambda: q8mm._quantize_rows(x, qx, dx, sx, qs, 0, T),
                 "repack W": lambda: q8mm._repack(3, W.raw, 0, 0, G, wq, dw, mw),
                 "kernel": lambda: q8mm._tile(3, wq, dw, mw, n_out, qx, dx, sx, qs, 0, T, y, 0, spare)}
        times = {k: [] for k in steps}
        for _ in range(repeats + 1):
            for k, f in steps.items():
                c = time.process_time()
                f()
                times[k].append(time.process_time() - c)
        med = {k: float(np.median(v[1:])) for k, v in times.items()}
        print(f"{T}x{n_in} @ {n_in}x{n_out}: " + "  ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items())
              + f"  kernel {2 * T * n_in * n_out / med['kernel'] / 1e9:.0f} GFLOP/CPU-s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--phases", action="store_true", help="only time q8mm's steps apart, one thread")
    args = ap.parse_args()
    if args.phases:
        threads.set_threads(1)
        return phases(args.repeats)
    rng = np.random.default_rng(0)
    rows = []
    for n_threads in (1, 2):
        threads.set_threads(n_threads)
        for n_out, n_in in SHAPES:
            W = QuantMatrix(random_blocks(QT.Q4_1, n_out, n_in, rng), (n_out, n_in), QT.Q4_1)
            Wf = W.dequantize()
            x = rng.standard_normal((T, n_in)).astype(np.float32)
            eng = engines(W, Wf)
            cpu, wall = {k: [] for k in eng}, {k: [] for k in eng}
            with threads.prefill_threads(T):
                for f in eng.values():
                    f(x)                                   # compile, warm the caches
                for _ in range(args.repeats):
                    for k, f in eng.items():
                        c, w = time.process_time(), time.perf_counter()
                        f(x)
                        cpu[k].append(time.process_time() - c)
                        wall[k].append(time.perf_counter() - w)
            flop = 2 * T * n_in * n_out
            base = float(np.median(wall["sgemm (dequantised W)"]))
            for k in eng:
                c, w = float(np.median(cpu[k])), float(np.median(wall[k]))
                rows.append(dict(threads=n_threads, shape=f"{T}x{n_in} @ {n_in}x{n_out}", engine=k,
                                 cpu_ms=1e3 * c, wall_ms=1e3 * w, gflops_wall=flop / w / 1e9,
                                 gflops_per_cpu_s=flop / c / 1e9, sgemm_wall_over_this=base / w))
                r = rows[-1]
                print(f"{n_threads} thr  {r['shape']:22s} {k:22s} cpu {r['cpu_ms']:7.1f} ms  wall {r['wall_ms']:7.1f} ms"
                      f"  {r['gflops_wall']:6.0f} GFLOP/s  per CPU-s {r['gflops_per_cpu_s']:6.0f}  sgemm/this {r['sgemm_wall_over_this']:.2f}",
                      flush=True)
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"tokens": T, "repeats": args.repeats, "load_average": os.getloadavg(),
                               "rows": rows}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
