"""Which decode path reproduces llama.cpp's numbers: float32 activations, or 8-bit ones?

llama.cpp rounds the activation vector of every Q4_0 / Q4_1 / Q8_0 product to blocks of 32 int8
(Q8_0 / Q8_1: the block scale dx stored as float16, Q8_1's dx * sum(qx) too) and takes integer
dot products. minisparse's fast path has a float32 kernel (quant.py) and an integer one (q8.py).
This script feeds the same token sequence one token at a time (every product a decode product,
in both engines) to

- llama.cpp (llama-cpp-python; F32 KV cache, so that the cache's precision is not what differs;
  one thread),
- minisparse with float32 activations (MINISPARSE_INT8=0's kernels),
- minisparse with 8-bit activations as q8.quantize rounds them now,
- minisparse with 8-bit activations whose scales stay float32 (q8.py before its scales were
  rounded to float16 as llama.cpp stores them; computed here in NumPy, multiplied by q8's kernel),

and reports, per engine against llama.cpp: the logits' max |difference| and RMS difference
(medians over positions), the KL divergence KL(llama.cpp || engine) and the greedy-token
(argmax) agreement. The sequence: SmolLM2's golden prompt and its 32 greedy tokens
(tests/fixtures/smollm2_greedy.json), then the first tokens of docs/design.md; or, for an oracle
fixture (a two-layer random Q8_0 model), its 24 ids.

    python3 benchmarks/q8_fidelity.py --out benchmarks/q8_fidelity.json
    python3 benchmarks/q8_fidelity.py --model tests/fixtures/oracle/llama_g2_hd64_q8_0.gguf \
        --out benchmarks/q8_fidelity_oracle_q8_0.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sequence(path, tok, n_text):
    """The token ids fed: an oracle fixture's own ids where it has them (tests/fixtures/oracle),
    else SmolLM2's golden prompt and continuation, then docs/design.md's first n_text tokens."""
    beside = Path(path).with_suffix(".npz")
    if beside.exists():
        return [int(i) for i in np.load(beside)["ids"]]
    golden = json.loads((ROOT / "tests" / "fixtures" / "smollm2_greedy.json").read_text())
    text = (ROOT / "docs" / "design.md").read_text()
    return golden["prompt_ids"] + golden["ids"] + tok.encode(text, add_bos=False)[:n_text]


def llama_logits(path, ids):
    from llama_cpp import Llama
    m = Llama(str(path), n_ctx=len(ids) + 8, n_threads=1, n_threads_batch=1, type_k=0, type_v=0,
              flash_attn=False, logits_all=False, verbose=False)
    V = m.n_vocab()
    out = np.empty((len(ids), V), np.float32)
    for t, i in enumerate(ids):
        m.eval([i])                              # one token: llama.cpp's decode products
        out[t] = np.ctypeslib.as_array(m._ctx.get_logits(), shape=(V,))
    return out


def f32_scales_matvec(code, raw, x, y):
    """q8's integer kernel on x rounded with float32 block scales (q8.py's first version)."""
    from minisparse.fast import q8
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(1)
    dx = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.rint(xb * inv[:, None]).astype(np.int8)
    sx = (dx * qx.astype(np.int32).sum(1).astype(np.float32)).astype(np.float32)
    q8._rows(code, raw, qx.reshape(-1), dx, sx, y, 0, raw.shape[0])


def minisparse_logits(model, ids, mode, nudge=False):
    """Logits (T, V) fed one token at a time; nudge: every embedding row moved by one float32 ulp
    (np.nextafter towards +inf), a change far below any rounding the two paths differ by."""
    import dataclasses
    from minisparse.fast import quant
    ops = model.ops
    if nudge:
        def nudged(table, t):
            return np.nextafter(ops.embed(table, t), np.float32(np.inf))          # (T, D)
        model.ops = dataclasses.replace(ops, embed=nudged)
    saved = (quant.INT8_DECODE, quant.q8.matvec_serial, quant.q8.matvec)
    quant.INT8_DECODE = mode != "float32"
    if mode == "int8-f32-scales":
        quant.q8.matvec_serial = quant.q8.matvec = f32_scales_matvec
    try:
        cache = model.new_cache()
        return np.stack([model.forward([i], cache)[-1] for i in ids])
    finally:
        quant.INT8_DECODE, quant.q8.matvec_serial, quant.q8.matvec = saved
        model.ops = ops


def log_softmax(z):
    """Row-wise log-probabilities of logits z (T, V), in float64."""
    z = z.astype(np.float64) - z.max(1, keepdims=True)                          # (T, V)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def compare(a, ref):
    """a, ref (T, V) logits -> the figures against ref."""
    d = a.astype(np.float64) - ref
    lp, lq = log_softmax(ref), log_softmax(a)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    return {"max_abs_median": float(np.median(np.abs(d).max(1))),
            "rms_median": float(np.median(np.sqrt((d ** 2).mean(1)))),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "argmax_agree": int((a.argmax(1) == ref.argmax(1)).sum()), "positions": int(len(a))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text-tokens", type=int, default=90)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import numba
    from minisparse import load_model
    from minisparse.fast import q8
    from minisparse.registry import resolve
    numba.set_num_threads(1)
    path = Path(args.model) if args.model.endswith(".gguf") else resolve(args.model)
    model = load_model(path)
    ids = sequence(path, model.tokenizer, args.text_tokens)
    t0 = time.time()
    ref = llama_logits(path, ids)
    rows = {}
    modes = ["float32", "int8"] + (["int8-f32-scales"] if q8.available() else [])
    for mode in modes:
        rows[mode] = compare(minisparse_logits(model, ids, mode), ref)
    base = {mode: minisparse_logits(model, ids, mode) for mode in ("float32", "int8")}
    rows["float32 vs int8 (each other)"] = compare(base["int8"], base["float32"])
    # how far a one-ulp change of the input carries: float32 sums move by about as much, while an
    # 8-bit rounding that it tips over moves its product by a whole step, and later layers
    # amplify that (no two implementations of the same rounding agree past a few layers unless
    # every other operation agrees to the bit)
    for mode in ("float32", "int8"):
        nudged = minisparse_logits(model, ids, mode, nudge=True)
        rows[f"{mode} vs {mode}, 1-ulp nudged input"] = compare(nudged, base[mode])
    import llama_cpp
    result = {"model": str(path), "tokens": len(ids), "seconds": round(time.time() - t0, 1),
              "llama_cpp": f"llama-cpp-python {llama_cpp.__version__}, F32 KV, 1 thread, one token per eval",
              "against_llama_cpp": rows}
    print(f"{len(ids)} tokens, one at a time, against llama.cpp's logits (the last rows: each other)")
    print(f"{'minisparse decode':40s} {'max|d| med':>10s} {'rms med':>9s} {'KL mean':>9s} "
          f"{'KL max':>9s} {'argmax':>8s}")
    for k, r in rows.items():
        print(f"{k:40s} {r['max_abs_median']:10.4f} {r['rms_median']:9.4f} {r['kl_mean']:9.2e} "
              f"{r['kl_max']:9.2e} {r['argmax_agree']:4d}/{r['positions']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
