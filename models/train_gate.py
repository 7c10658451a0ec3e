"""Train the FastGRNN salience gate on a model's own attention and ship it in fastgrnn_gate.npz.

Leaves out PyTorch: NumPy forward and hand-written backpropagation through time (checked
against finite differences in tests/test_fastgrnn.py), full-batch Adam. Follows Kusupati et al.
2018's cell (minisparse/gate/fastgrnn.py); the target is each key's mean future attention.

Data: texts the model samples itself from BOS (temperature 1, seeds 0..n-1 for training,
1000.. held out). For every layer and KV head the cell reads the RMS-normalised keys in order;
salience s_t = ||h_t|| is trained with a listwise loss (ListNet, Cao et al. 2007): softmax of
s_t * exp(alpha) over the keys vs. their share of future attention mass (future_mass).

    python3 models/train_gate.py                       # stories260K -> models/fastgrnn_gate.npz
    python3 models/train_gate.py --model models/minisparse-pydoc.gguf --name pydoc --append
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":   # as a script only: importing it (tests, notebook 07) must not
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")   # change Numba's settings mid-process
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minisparse import load_model  # noqa: E402
from minisparse.gate.gated import Gated  # noqa: E402
from minisparse.gate.fastgrnn import (EPS, FastGRNNGate, RandomGate, attention_maps,  # noqa: E402
                                       future_mass, mass_recall, save_gates)

sig = lambda x: 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- data
def sample_ids(model, seed, length):
    """Token ids (length,): ancestral sampling at temperature 1 with the dense KV cache."""
    from minisparse.sampling import Sampler
    tok = model.tokenizer
    ids = [getattr(tok, "bos_id", 1) if tok is not None else 1]
    cache = model.new_cache()
    sampler = Sampler(1.0, 0, 1.0, 0.0, 1.0, seed)
    logits = model.forward(ids, cache)[-1]
    while len(ids) < length:
        ids.append(int(sampler(logits, ids)))
        logits = model.forward(ids[-1:], cache)[-1]
    return np.array(ids, np.int64)


def build_set(model, seeds, length, window, sinks):
    """X (N, T, d) normalised keys, Y (N, T) target shares, M (N, T) bool: the keys scored."""
    X, Y, M, maps_all = [], [], [], []
    for s in seeds:
        maps = attention_maps(model, sample_ids(model, s, length))
        maps_all.append(maps)
        for q, k, p in maps:
            fm = future_mass(p, k.shape[0], window)                              # (Hkv, T)
            for g in range(k.shape[0]):
                kk = k[g].astype(np.float64)                                      # (T, d)
                X.append(kk / np.sqrt((kk * kk).mean(-1, keepdims=True) + EPS))
                m = np.isfinite(fm[g]) & (np.arange(length) >= sinks)
                y = np.where(m, fm[g], 0.0)
                Y.append(y / y.sum()), M.append(m)
    return np.stack(X), np.stack(Y), np.stack(M), maps_all


# ----------------------------------------------------------------------------- model + grads
def _step_fastgrnn(P, x, hp):
    """The paper's cell on a batch: x (N, d), hp (N, H) -> h (N, H) and what backward needs."""
    a = x @ P["W"].T + hp @ P["U"].T                                     # (N, H)
    z, c = sig(a + P["b_z"]), np.tanh(a + P["b_h"])
    zs, ns = sig(P["zeta"]), sig(P["nu"])
    return z * hp + (zs * (1 - z) + ns) * c, (z, c)


def _back_fastgrnn(P, G, dh, x, hp, cache):
    """Accumulate parameter gradients into G for one step; return dL/dh_prev (N, H)."""
    z, c = cache
    zs, ns = sig(P["zeta"]), sig(P["nu"])
    dz, dc = dh * (hp - zs * c), dh * (zs * (1 - z) + ns)
    G["zeta"] += (dh * (1 - z) * c).sum() * zs * (1 - zs)
    G["nu"] += (dh * c).sum() * ns * (1 - ns)
    daz, dah = dz * z * (1 - z), dc * (1 - c * c)
    da = daz + dah
    G["b_z"] += daz.sum(0); G["b_h"] += dah.sum(0)
    G["W"] += da.T @ x; G["U"] += da.T @ hp
    return dh * z + da @ P["U"]


def _step_ruvllm(P, x, hp):
    g = sig(x @ P["W_g"].T + hp @ P["U_g"].T + P["b_g"])                # (N, H)
    c = np.tanh(x @ P["W_u"].T + hp @ P["U_u"].T + P["b_u"])
    v = P["zeta"] * g + P["nu"]
    f = np.clip(v, 0.0, 1.0)
    return f * hp + (1 - f) * c, (g, c, f, (v > 0) & (v < 1))


def _back_ruvllm(P, G, dh, x, hp, cache):
    g, c, f, inside = cache
    dv = dh * (hp - c) * inside                                          # clamp: 0 outside
    dc = dh * (1 - f)
    G["zeta"] += (dv * g).sum(); G["nu"] += dv.sum()
    dag, dau = dv * P["zeta"] * g * (1 - g), dc * (1 - c * c)
    G["b_g"] += dag.sum(0); G["b_u"] += dau.sum(0)
    G["W_g"] += dag.T @ x; G["U_g"] += dag.T @ hp
    G["W_u"] += dau.T @ x; G["U_u"] += dau.T @ hp
    return dh * f + dag @ P["U_g"] + dau @ P["U_u"]


CELL_STEPS = {"fastgrnn": (_step_fastgrnn, _back_fastgrnn), "ruvllm": (_step_ruvllm, _back_ruvllm)}


def loss_and_grad(P, X, Y, M, cell="fastgrnn"):
    """ListNet loss of the cell's salience and its gradient by backpropagation through time.

    P: the cell's parameters (FastGRNNGate names; zeta, nu scalars) plus alpha (log temperature);
    X (N, T, d) normalised keys, Y (N, T) target shares (rows sum to 1 over M), M (N, T) bool.
    """
    step, back = CELL_STEPS[cell]
    N, T, d = X.shape
    H = P["U" if cell == "fastgrnn" else "U_g"].shape[0]
    sc = np.exp(P["alpha"])
    hs, caches = [np.zeros((N, H))], []
    for t in range(T):                                                   # forward
        h, cache = step(P, X[:, t], hs[-1])
        hs.append(h), caches.append(cache)
    s = np.sqrt((np.stack(hs[1:]) ** 2).sum(-1) + 1e-12).T               # (N, T)
    u = np.where(M, s * sc, -np.inf)
    lp = u - u.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))                   # log softmax over M
    loss = -(Y * np.where(M, lp, 0.0)).sum() / N
    du = np.where(M, np.exp(lp) - Y, 0.0) / N                            # (N, T)
    G = {k: np.zeros_like(v) for k, v in P.items()}
    G["alpha"] = np.float64((du * s * sc).sum())
    ds = du * sc                                                         # (N, T)
    dh_next = np.zeros((N, H))
    for t in range(T - 1, -1, -1):                                       # backward
        dh = dh_next + ds[:, t, None] * hs[t + 1] / s[:, t, None]
        dh_next = back(P, G, dh, X[:, t], hs[t], caches[t])
    return loss, G


def adam(P, X, Y, M, steps, lr, cell, log_every=25, Xv=None, Yv=None, Mv=None):
    m = {k: np.zeros_like(v) for k, v in P.items()}
    v = {k: np.zeros_like(x) for k, x in P.items()}
    hist = []
    for i in range(1, steps + 1):
        loss, G = loss_and_grad(P, X, Y, M, cell)
        for k in P:
            m[k] = 0.9 * m[k] + 0.1 * G[k]
            v[k] = 0.999 * v[k] + 0.001 * G[k] ** 2
            P[k] = P[k] - lr * (m[k] / (1 - 0.9**i)) / (np.sqrt(v[k] / (1 - 0.999**i)) + 1e-8)
        if i == 1 or i % log_every == 0 or i == steps:
            val = loss_and_grad(P, Xv, Yv, Mv, cell)[0] if Xv is not None else float("nan")
            hist.append((i, float(loss), float(val)))
            print(f"  step {i:4d}  train loss {loss:.4f}  held-out loss {val:.4f}", flush=True)
    return P, hist


# ----------------------------------------------------------------------------- evaluation
def oracle_recall(maps, window, sinks, budget, start):
    """Upper bound: base plus, per query and KV head, the `budget` eligible keys with the most
    true attention (averaged over the head group), with hindsight."""
    tot, cnt = 0.0, 0
    for q, k, p in maps:
        hq, T, _ = p.shape
        pos = np.arange(T, dtype=np.int64)
        base = Gated(0, window, sinks, gate=RandomGate(0))
        mask, _ = base.select(q, k, pos, pos).to_mask(hq, T, T)
        G = hq // k.shape[0]
        pg = p.reshape(k.shape[0], G, T, T).mean(1)
        for i in range(start, T):
            lo, hi = sinks, i - window
            if hi > lo and budget > 0:
                top = lo + np.argsort(-pg[:, i, lo:hi], axis=1, kind="stable")[:, :budget]
                for g in range(k.shape[0]):
                    mask[g * G:(g + 1) * G, i, top[g]] = True
        got = (p * mask).sum(-1)[:, start:]
        tot, cnt = tot + got.sum(), cnt + got.size
    return tot / cnt


def evaluate(maps_list, gates, budgets, window, sinks, start):
    rows = []
    for B in budgets:
        row = {"budget": B, "window": window, "sinks": sinks, "start": start}
        row["base only"] = np.mean([mass_recall(m, Gated(0, window, sinks, gate=RandomGate(0)),
                                                start) for m in maps_list])
        for label, g in gates.items():
            row[label] = np.mean([mass_recall(m, Gated(B, window, sinks, gate=g), start)
                                  for m in maps_list])
        row["oracle"] = np.mean([oracle_recall(m, window, sinks, B, start) for m in maps_list])
        rows.append({k: (round(float(v), 4) if isinstance(v, float) else v)
                     for k, v in row.items()})
    return rows


def eval_table(args, model, d):
    """Markdown table of held-out recall for the shipped gates of this head width, untrained and
    random keep over 5 seeds each (mean ± sd), base only and the hindsight oracle."""
    import zipfile
    names = sorted({n.split("/")[0] for n in zipfile.ZipFile(args.out).namelist()})
    gates = [FastGRNNGate.load(args.out, name=n) for n in names]
    gates = [g for g in gates if g.d == d]
    seeds = gates[0].record["heldout_seeds"]
    maps = [attention_maps(model, sample_ids(model, s, args.length)) for s in seeds]
    W, S, start = args.window, args.sinks, 64
    rec = lambda m, sel: np.mean([mass_recall(x, sel, start) for x in m])
    print(f"held-out seeds {seeds}, {args.length} tokens, window {W}, sinks {S}, queries >= {start}")
    print("| budget | base only | " + " | ".join(f"trained {g.cell} ({g.name})" for g in gates)
          + " | untrained fastgrnn (5 seeds) | untrained ruvllm (5 seeds) | random keep (5 seeds)"
          " | oracle |")
    print("|" + "---|" * (len(gates) + 6))
    base = rec(maps, Gated(0, W, S, gate=RandomGate(0)))
    for B in args.budgets:
        cells = [f"{base:.4f}"] + [f"{rec(maps, Gated(B, W, S, gate=g)):.4f}" for g in gates]
        for make in (lambda s: FastGRNNGate.random(d, args.hidden, s),
                     lambda s: FastGRNNGate.random(d, args.hidden, s, "ruvllm"), RandomGate):
            v = [rec(maps, Gated(B, W, S, gate=make(s))) for s in range(5)]
            cells.append(f"{np.mean(v):.4f} ± {np.std(v):.4f}")
        cells.append(f"{np.mean([oracle_recall(m, W, S, B, start) for m in maps]):.4f}")
        print(f"| {B} | " + " | ".join(cells) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/fixtures/stories260K.gguf"))
    ap.add_argument("--name", default="stories260K")
    ap.add_argument("--out", default=str(ROOT / "models/fastgrnn_gate.npz"))
    ap.add_argument("--append", action="store_true", help="keep the other gates in --out")
    ap.add_argument("--train-texts", type=int, default=12)
    ap.add_argument("--heldout-texts", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cell", choices=("fastgrnn", "ruvllm"), default="fastgrnn")
    ap.add_argument("--eval-only", action="store_true", help="print the held-out recall table "
                    "of the gates in --out for this model, then stop")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32])
    args = ap.parse_args()

    t0 = time.time()
    model = load_model(args.model)
    d = model.config.head_dim
    if args.eval_only:
        return eval_table(args, model, d)
    train_seeds = list(range(args.train_texts))
    held_seeds = list(range(1000, 1000 + args.heldout_texts))
    print(f"{args.name}: sampling {len(train_seeds)} + {len(held_seeds)} texts of "
          f"{args.length} tokens", flush=True)
    X, Y, M, _ = build_set(model, train_seeds, args.length, args.window, args.sinks)
    Xv, Yv, Mv, held_maps = build_set(model, held_seeds, args.length, args.window, args.sinks)
    print(f"  {X.shape[0]} train sequences, {Xv.shape[0]} held-out ({time.time() - t0:.0f} s)")

    init = FastGRNNGate.random(d, args.hidden, args.seed, args.cell)
    P = {k: np.array(v, np.float64) for k, v in init.params.items()}
    P["alpha"] = np.float64(np.log(5.0))           # listwise temperature: ranking ignores it
    P, hist = adam(P, X, Y, M, args.steps, args.lr, args.cell, Xv=Xv, Yv=Yv, Mv=Mv)
    alpha = float(P.pop("alpha"))

    with open(args.model, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    record = {
        "model": Path(args.model).name, "model_sha256": sha, "head_dim": d,
        "data": f"texts sampled by the model from BOS, temperature 1, {args.length} tokens",
        "train_seeds": train_seeds, "heldout_seeds": held_seeds,
        "target": f"mean attention from queries > key + {args.window} (future_mass), "
                  f"keys at positions >= {args.sinks}",
        "loss": "ListNet cross-entropy, softmax(||h_t|| * exp(alpha)) vs target shares",
        "optimizer": f"Adam lr {args.lr}, full batch, {args.steps} steps", "init_seed": args.seed,
        "hidden": args.hidden, "alpha": alpha, "loss_history": hist,
        "train_loss": hist[-1][1], "heldout_loss": hist[-1][2], "init_heldout_loss": hist[0][2],
    }
    gate = FastGRNNGate(P, args.cell, trained=True, record=record, name=args.name)
    gates = {"trained": gate,
             "untrained (seed 0)": FastGRNNGate.random(d, args.hidden, 0, args.cell),
             "random keep": RandomGate(0)}
    rows = evaluate(held_maps, gates, (8, 32), args.window, args.sinks, start=64)
    record["heldout_recall"] = rows
    gate.record = record
    keep = {}
    if args.append and Path(args.out).is_file():
        import zipfile
        names = {n.split("/")[0] for n in zipfile.ZipFile(args.out).namelist()}
        keep = {n: FastGRNNGate.load(args.out, name=n) for n in names if n != args.name}
    keep[args.name] = gate
    save_gates(args.out, keep)
    print(json.dumps(rows, indent=1))
    print(f"wrote {args.out} ({', '.join(keep)}) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
