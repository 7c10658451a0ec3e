"""The eval runner: parse a list of variants, run each through the real model over one text
(teacher forced), compare it with dense attention at the same analysis positions, and write
results.json plus a Markdown table.

Leaves out plotting (plots.py), the pass-key task's generator (needle.py) and the CLI (cli.py).
The rule for a variant string (docs/lab.md): if its first member's name is a cache policy
(`recursive=`, `streaming=`, `press=`) the variant is a bounded cache parsed by
`minisparse.spec.parse_cache_spec`; otherwise it is an attention spec
parsed by `minisparse.spec.parse_attention_spec`, the CLI's `--attention` syntax. The prefix
`uncorrected:` (lab only) reads the same keys with the samplers' log-weights dropped.

Shape legend: T tokens, A analysis rows, Hq / Hkv query / KV heads, d head width, V vocabulary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import metrics as M


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One `;`-separated entry of --variants: an attention selector or a bounded-cache factory."""
    spec: str
    kind: str                       # "attention" | "cache" | "error"
    selector: object = None
    make_cache: object = None       # () -> cache: kind "cache", or an attention variant under --kv
    error: str | None = None
    nominal: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """Member names joined by '+' ("sinks+window", "topk"): one plot curve per family."""
        return "+".join(tok.split("=")[0].strip().lower() for tok in self.spec.split(",")
                        if tok.split("=")[0].strip().lower() not in ("seed", "mode"))


def nominal_budget(sel) -> dict:
    """The budget the spec asks for (the selector's `budget`: keys and/or a fraction)."""
    from ..attention import RandomMask, Union
    parts = []
    for m in (sel.members if isinstance(sel, Union) else (sel,)):
        parts.append(m.describe())
        if isinstance(m, RandomMask) and m.keys is None:     # a key count's coverage is per row
            parts[-1] += f" (expected random coverage {m.expected_coverage():.3f})"
    budget = sel.budget
    keys, frac = (None, None) if budget is None else budget
    return {"describe": ",".join(parts), "keys": keys or None, "fraction": frac or None}


def _with_seed(sel, seed):
    """Give samplers without an explicit `,seed=` the run's --seed (recorded in the result)."""
    from ..attention import TopP, Union
    if isinstance(sel, Union):
        return type(sel)(*[_with_seed(m, seed) for m in sel.members])
    if isinstance(sel, TopP):                     # the seed belongs to its candidates
        return sel if sel.candidates is None else TopP(sel.p, _with_seed(sel.candidates, seed))
    return sel if sel.deterministic else sel.with_options(seed=seed)


class Uncorrected:
    """Lab-only wrapper (`uncorrected:SPEC`): the inner selector's keys, each read with log-weight
    0. Applied to MagicPIG it removes the -log P(sampled) importance correction while keeping the
    very same sampled set, which isolates what the correction buys."""
    deterministic = True

    def __init__(self, inner):
        self.inner = inner

    def select(self, q, k, q_pos=None, k_pos=None):
        from ..attention import Selection
        s = self.inner.select(q, k, q_pos, k_pos).normalize()
        return Selection(s.head_kind, s.n_heads, s.tq, s.tk, s.range_ptr, s.range_lo, s.range_hi,
                         s.idx_ptr, s.idx, np.zeros_like(s.logw), np.ones_like(s.exact),
                         s.extra_k, s.extra_v, s.extra_pos, s.extra_lo, s.extra_hi, normalized=True)

    def at_layer(self, layer, shared):
        """The inner selector of that layer, still uncorrected (Model.forward asks every layer)."""
        return Uncorrected(self.inner.at_layer(layer, shared))

    def describe(self):
        return "uncorrected:" + self.inner.describe()


def parse_variants(text: str, model, seed: int = 0, kv: str | None = None) -> list[Variant]:
    """Split --variants on ';' and parse each; a variant that fails to parse becomes an error
    row (kind "error") instead of stopping the run. kv: a storage spec (eval's --kv, 'kivi2')
    that every attention variant's store-all cache takes; a bounded-cache variant with it is an
    error row (KIVI quantises the store-all cache only)."""
    from ..spec import CACHE_NAMES, parse_attention_spec, parse_cache_spec
    out = []
    for spec in (s.strip() for s in text.split(";")):
        if not spec:
            continue
        name = spec.split(",")[0].split("=")[0].split("/")[0].strip().lower().removeprefix("uncorrected:")
        try:
            if name in CACHE_NAMES and kv is not None:
                raise ValueError(f"--kv {kv} quantises the store-all cache; it does not compose "
                                 f"with the cache variant {spec!r}")
            if name in CACHE_NAMES:
                make = lambda spec=spec: parse_cache_spec(spec, model)  # noqa: E731
                probe = make()                                 # fail now, not mid-run
                out.append(Variant(spec, "cache", make_cache=make, nominal={
                    "describe": spec, "keys": probe.max_keys, "fraction": None}))
            else:
                body = spec[len("uncorrected:"):] if spec.startswith("uncorrected:") else spec
                sel = parse_attention_spec(body)
                if "seed=" not in body:
                    sel = _with_seed(sel, seed)
                nom = nominal_budget(sel)
                if body is not spec:
                    sel, nom["describe"] = Uncorrected(sel), "uncorrected:" + nom["describe"]
                make = None if kv is None else (lambda: parse_cache_spec(kv, model))   # noqa: E731
                if make is not None:
                    make()                                     # fail now, not mid-run
                out.append(Variant(spec, "attention", selector=sel, make_cache=make, nominal=nom))
        except Exception as e:       # noqa: BLE001 - any parse failure is reported, not raised
            out.append(Variant(spec, "error", error=f"{type(e).__name__}: {e}"))
    return out


# ----------------------------------------------------------------------------- one run


class _Trace(dict):
    """A trace dict that keeps only q, k, v, attn_out per layer, appending across calls (the
    model writes each name once per call; a chunked run makes several calls)."""
    WANT = ("q", "k", "v", "attn_out")

    def __setitem__(self, name, value):
        if name.startswith("blk.") and name.rsplit(".", 1)[-1] in self.WANT:
            self.setdefault(name, []).append(np.asarray(value))

    def get_layer(self, l):
        q, k, v = (np.concatenate(self[f"blk.{l}.{n}"], axis=1) for n in "qkv")   # (H, T, d)
        o = np.concatenate(self[f"blk.{l}.attn_out"], axis=0)                      # (T, Hq*d)
        return q, k, v, o


def _record_reads(cache):
    """Wrap cache.update so each call records (layer, query positions, key positions read)."""
    calls, update = [], cache.update

    def rec(layer, k_new, v_new, pos, q=None):
        from ..cache import SlotCache
        bounded = isinstance(cache, SlotCache) and layer in cache.pos      # held before this call
        old = cache.positions(layer)[0] if bounded else np.zeros(0, np.int64)
        calls.append((layer, np.asarray(pos).copy(), np.concatenate([old, np.asarray(pos)])))
        return update(layer, k_new, v_new, pos, q=q)
    cache.update = rec
    return calls


def run_one(model, ids, variant, first, last, dense_layers=(), chunk=512, protocol="B", tick=None):
    """Run ids (T,) through the model under `variant`, teacher forced, in chunks.

    protocol "B": every position attends sparsely; "A": positions before `first` are prefilled
    dense, the analysis rows [first, last) and after run sparse. Returns (log-probs (A, V) of the
    next token at rows [first, last), stats records, trace, cache-read records or None)."""
    T = len(ids)
    cache = variant.make_cache() if variant.make_cache is not None else model.new_cache()
    reads = _record_reads(cache) if variant.kind == "cache" else None
    sel = variant.selector if variant.kind == "attention" else None
    stats, trace, rows = [], _Trace(), []
    bounds = sorted({0, T, *(range(0, T, chunk))} | ({first} if protocol == "A" else set()))
    for a, b in zip(bounds[:-1], bounds[1:]):
        att = None if (protocol == "A" and b <= first) else sel
        lg = model.forward(ids[a:b], cache, attention=att, dense_layers=dense_layers,
                           stats=stats, trace=trace)                     # (b - a, V)
        lo, hi = max(a, first), min(b, last)
        if hi > lo:
            rows.append(M.log_softmax(lg[lo - a:hi - a]))                 # (hi - lo, V)
        if tick:
            tick(b - a)
    return np.concatenate(rows), stats, trace, reads


def _density_by_layer(stats, L, first, last):
    """Per layer: realised density (Hq, A) at analysis rows, keys read (Hq, A), and the density
    over every position (Hq, T)."""
    out = []
    for l in range(L):
        recs = [r for r in stats if r["layer"] == l]
        qp = np.concatenate([r["q_pos"] for r in recs])                  # (T,)
        na = np.concatenate([r["n_attended"] for r in recs], axis=1)     # (Hq, T)
        dens = M.realised_density(na, qp)                                 # (Hq, T)
        sel = (qp >= first) & (qp < last)
        out.append((dens[:, sel], na[:, sel], dens))
    return out


def selection_mask(sel, hq, tq, tk):
    """Boolean (Hq, Tq, Tk) of the REAL keys a Selection lists per row (pseudo-keys dropped),
    built with difference arrays instead of Selection.to_mask's per-index Python loop."""
    from ..attention import KV, SHARED
    s = sel.normalize()
    R = s.n_heads * tq
    if s.range_lo.size:                       # a selection of indices only skips the ranges
        diff = np.zeros((R, tk + 1), np.int32)                             # (R, Tk+1)
        rr = np.repeat(np.arange(R), np.diff(s.range_ptr))
        np.add.at(diff, (rr, np.minimum(s.range_lo, tk)), 1)
        np.add.at(diff, (rr, np.minimum(s.range_hi, tk)), -1)
        mask = np.cumsum(diff, axis=1)[:, :tk] > 0                       # (R, Tk)
    else:
        mask = np.zeros((R, tk), bool)                                     # (R, Tk)
    ri = np.repeat(np.arange(R), np.diff(s.idx_ptr))
    real = s.idx < tk
    mask[ri[real], s.idx[real]] = True
    mask = mask.reshape(s.n_heads, tq, tk)
    if s.head_kind == SHARED:
        return np.broadcast_to(mask, (hq, tq, tk))
    if s.head_kind == KV:
        return np.repeat(mask, hq // s.n_heads, axis=0)
    return mask


def _select(model):
    """How a selection is made for model: the fast path's (minisparse.fast.prefill.select: an
    exact TopK's keys from matrix products, as its prefill chose them) or the selector's own."""
    from ..fast import FAST
    from ..fast.prefill import select
    return select if model.ops is FAST else (lambda sel, *a: sel.select(*a))


def layer_metrics(model, variant, trace, reads, l, first, last, dense_layers, shared=None):
    """Recall and relative output error of layer l at rows [first, last), on the variant's own
    q/k/v: dense probabilities p (Hq, A, Tk) float64, dense output o = attend(..., Dense()).
    shared: one dict handed to the layers in order, as Model.forward does (Selector.at_layer:
    TidalDecode's reusing layers read what its selecting layer left there)."""
    from ..attention import Dense, attend
    q, k, v, o_model = trace.get_layer(l)
    qa = np.ascontiguousarray(q[:, first:last])                            # (Hq, A, d)
    k, v = np.ascontiguousarray(k[:, :last]), np.ascontiguousarray(v[:, :last])  # (Hkv, Tk, d)
    qpos, kpos = np.arange(first, last), np.arange(last)
    Hq, A, d = qa.shape
    p = M.dense_probs(qa, k, qpos, kpos)                                    # (Hq, A, Tk)
    o = attend(qa, k, v, Dense(), qpos, kpos)                               # (Hq, A, d)
    if variant.kind == "cache":
        # what the model computed (the cache may re-rotate keys); keys read = held + new
        o_s = o_model[first:last].reshape(A, Hq, d).transpose(1, 0, 2)      # (Hq, A, d)
        mask = np.zeros((1, A, last), bool)
        for layer, pos, kp in reads:
            if layer != l:
                continue
            for t in np.nonzero((pos >= first) & (pos < last))[0]:
                mask[0, pos[t] - first, kp[(kp <= pos[t]) & (kp < last)]] = True
    else:
        # the selector layer l ran (at_layer: DuoAttention's head roles differ by layer)
        sel = (Dense() if (variant.kind != "attention" or l in dense_layers)
               else variant.selector.at_layer(l, {"model": model} if shared is None else shared))
        # once: the keys read are the keys masked; on the fast path, the keys its prefill read
        chosen = _select(model)(sel, qa, k, qpos, kpos)
        o_s = attend(qa, k, v, chosen, qpos, kpos)                           # (Hq, A, d)
        mask = selection_mask(chosen, Hq, A, last)                           # (Hq, A, Tk)
    return M.mass_recall(p, mask), M.rel_error(o_s, o)                      # (Hq, A) each


def approx_recall(variant, trace, l, first, last, dense_layers):
    """(Hq, A) recall@k against exact top-k at layer l's analysis rows, for the selectors that
    rank by an approximate score (SparQ, Loki, the indexer: topk.ApproxTopK); None otherwise."""
    from ..attention.topk import ApproxTopK
    sel = variant.selector
    if variant.kind != "attention" or l in dense_layers or not isinstance(sel, ApproxTopK):
        return None
    q, k, _, _ = trace.get_layer(l)
    return sel.recall(np.ascontiguousarray(q[:, first:last]), np.ascontiguousarray(k[:, :last]),
                      np.arange(first, last), np.arange(last))


# ----------------------------------------------------------------------------- the sweep


def run_text(model, ids, variants, analysis=256, dense_layers=(), chunk=512, protocol="B",
             progress=None, seed=0) -> dict:
    """Evaluate every variant on ids (T,) against dense; returns {"dense": {...}, "variants": [...]}.

    Analysis rows are the last `analysis` positions that have a next token: [T-1-A, T-1)."""
    from ..attention import Dense
    T, L = len(ids), model.config.n_layers
    A = min(analysis, T - 1)
    first, last = T - 1 - A, T - 1
    targets = np.asarray(ids[first + 1:last + 1])
    ok = [v for v in variants if v.kind != "error"]
    total = T * (1 + len(ok))
    done = [0]

    def tick(n):
        done[0] += n
        if progress:
            progress(done[0], total)

    base = Variant("dense", "attention", selector=Dense())
    t0 = time.perf_counter()
    logp_d, _, _, _ = run_one(model, ids, base, first, last, dense_layers, chunk, protocol, tick)
    dense_s = time.perf_counter() - t0
    out = []
    for var in variants:
        row = {"spec": var.spec, "kind": var.kind, "family": var.family, "error": var.error,
               "protocol": protocol, "dense_layers": list(dense_layers), "seed": seed,
               "budget": {"nominal": var.nominal}}
        if var.kind == "error":
            out.append(row)
            continue
        t0 = time.perf_counter()
        try:
            logp, stats, trace, reads = run_one(model, ids, var, first, last, dense_layers, chunk,
                                                protocol, tick)
            dens = _density_by_layer(stats, L, first, last)
            layers, rec_all, err_all, topk_all = [], [], [], []
            shared = {"model": model}   # one dict for the layers in order, as Model.forward's
            for l in range(L):
                rec, err = layer_metrics(model, var, trace, reads, l, first, last, dense_layers,
                                         shared)
                rec_all.append(rec), err_all.append(err)
                layers.append({"layer": l, "dense": l in dense_layers,
                               "density": M.summary(dens[l][0]), "density_all": M.summary(dens[l][2]),
                               "keys_read": M.summary(dens[l][1]),
                               "recall": M.summary(rec), "rel_error": M.summary(err)})
                tk = approx_recall(var, trace, l, first, last, dense_layers)
                if tk is not None:                 # recall@k of SparQ / Loki / the indexer
                    topk_all.append(tk)
                    layers[-1]["topk_recall"] = M.summary(tk)
            del trace
        except Exception as e:   # noqa: BLE001 - a variant that fails at run time is a row too
            row.update(kind="error", error=f"{type(e).__name__}: {e}")
            out.append(row)
            continue
        row.update({
            "density": M.summary(np.stack([d[0] for d in dens])),
            "density_all": M.summary(np.stack([d[2] for d in dens])),
            "recall": M.summary(np.stack(rec_all)), "rel_error": M.summary(np.stack(err_all)),
            "lm": M.lm_metrics(logp_d, logp, targets), "layers": layers,
            "seconds": round(time.perf_counter() - t0, 2)})
        if topk_all:
            row["topk_recall"] = M.summary(np.stack(topk_all))
        row["budget"].update({"keys_read_mean": float(np.mean([d[1].mean() for d in dens])),
                              "density_mean": row["density"]["mean"]})
        out.append(row)
    return {"n_tokens": T, "analysis_rows": [first, last], "protocol": protocol,
            "dense": {"nll": float(-logp_d[np.arange(A), targets].mean()),
                      "ppl": float(np.exp(-logp_d[np.arange(A), targets].mean())),
                      "seconds": round(dense_s, 2)},
            "variants": out}


# ----------------------------------------------------------------------------- reporting


def sparse_density(r):
    """Mean realised density over the layers not kept dense (all layers when none are): with
    --dense-layers the pooled density is dominated by the dense layers."""
    ls = [l["density"]["mean"] for l in r["layers"] if not l["dense"]]
    return sum(ls) / len(ls) if ls else r["density"]["mean"]


def _f(x, fmt="{:.3f}"):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def budget_text(nominal: dict) -> str:
    """The budget as the spec states it: "256 keys", "5%", both when a union adds them, or "—"
    for rules that fix neither (dense, MagicPIG uncapped, strided)."""
    keys, frac = nominal.get("keys"), nominal.get("fraction")
    parts = ([f"{keys} keys"] if keys else []) + ([f"{100 * frac:g}%"] if frac else [])
    return " + ".join(parts) or "—"


def markdown_table(res: dict) -> str:
    """The text results as a Markdown table (one row per variant, dense first)."""
    t = res["text"]
    lines = [f"Model `{res['model']}`, text `{res['text_name']}` ({t['n_tokens']} tokens), analysis "
             f"rows {t['analysis_rows'][0]}..{t['analysis_rows'][1] - 1}, protocol {t['protocol']}, "
             f"dense layers {res['dense_layers'] or 'none'}, seed {res['seed']}; dense perplexity "
             f"{t['dense']['ppl']:.3f} over those rows.", "",
             "| variant | budget | keys read | density (mean ± sd) | density, sparse layers | "
             "mass recall | rel. error ‖o_S−o‖/‖o‖ | ppl ratio | KL (nats) | agreement | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in t["variants"]:
        if r["kind"] == "error":
            lines.append(f"| `{r['spec']}` | error: {r['error']} |||||||||| ")
            continue
        lm = r["lm"]
        lines.append(
            f"| `{r['spec']}` | {budget_text(r['budget']['nominal'])} | "
            f"{r['budget']['keys_read_mean']:.1f} | {r['density']['mean']:.3f} ± "
            f"{r['density']['std']:.3f} | {sparse_density(r):.3f} | {_f(r['recall']['mean'])} | {_f(r['rel_error']['mean'], '{:.4f}')} | "
            f"{_f(lm['ppl_ratio'], '{:.4f}')} | {_f(lm['kl'], '{:.4f}')} | {_f(lm['agreement'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
