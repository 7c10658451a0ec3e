"""The long-context harness: one variant (attention spec, cache spec, dense layers) on a task set
under a named protocol, dense beside it as the baseline, every answer smoke-checked.

Protocols (named in every record and row):
  query-aware     context + question are one prompt: the keys for the answer are chosen with the
                  question in the cache (RULER's setting; Quest, MagicPIG and top-k at decode).
  query-agnostic  the context alone is prefilled into the cache (compressed by a bounded cache,
                  indexed at the first decode step by an indexed selector), then the question is
                  fed token by token and answered: kvpress's protocol (Devoto et al. 2025), where a
                  press cannot know the question. A per-query selector such as top-k scores every
                  key at every step, so it reads the same keys under both; only what the cache keeps
                  and what an index was built from can differ.
Leaves out plots and claims (docs/lab.md); scoring is RULER's string match (Hsieh et al. 2024): an
answer counts when it appears as a whole word in the output, `correct` when all of them do.

    >>> model = minisparse.load_model("models/minisparse-pydoc.gguf")                  # doctest: +SKIP
    >>> exs = make_task_set(["niah_single_digits"], model.tokenizer, 256, [0.5], n=2)   # doctest: +SKIP
    >>> out = run_suite(model, exs, ["dense", "topk=16"], ["query-aware"])            # doctest: +SKIP
    >>> print(markdown_table(out["rows"]))                                            # doctest: +SKIP
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

# the spec parsers, imported here only, so a move of the grammar is one line to repoint
from ..spec import parse_attention_spec, parse_cache_spec
from .runner import Uncorrected
from .stats import accuracy, bootstrap_ratio, perplexity_ratio
from .tasks import Example, context_ids, question_ids

PROTOCOLS = ("query-aware", "query-agnostic")
DENSE = "dense"


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """What runs: `attention` (a spec for Model.forward, None = dense) in a `cache` (a cache spec,
    None = the full KV cache), `dense_layers` kept dense, and whether the prefill is sparse too
    (default: dense prefill, sparse decoding, as Quest and MagicPIG run; a bounded cache bounds
    the prefill whatever this says); `uncorrected`: the selector's keys read with log-weight 0
    (lab.runner.Uncorrected: MagicPIG's sampled keys without its importance correction)."""
    name: str
    attention: str | None = None
    cache: str | None = None
    dense_layers: tuple[int, ...] = ()
    sparse_prefill: bool = False
    uncorrected: bool = False


def _selector(variant: Variant):
    """The variant's attention selector (None for dense), uncorrected when it says so."""
    if variant.attention is None:
        return None
    sel = parse_attention_spec(variant.attention)
    return Uncorrected(sel) if variant.uncorrected else sel


def parse_variant(text: str, dense_layers=()) -> Variant:
    """`SPEC[@cache=CACHE][@dl=0,1][@prefill=sparse|dense][@uncorrected]`; SPEC is `dense` or an
    attention spec. `dense_layers` is the default for entries without `@dl=`.

    >>> parse_variant("quest=16/256@dl=0,1")
    Variant(name='quest=16/256@dl=0,1', attention='quest=16/256', cache=None, dense_layers=(0, 1), sparse_prefill=False, uncorrected=False)
    >>> parse_variant("magicpig=K8L75@uncorrected").uncorrected
    True
    >>> parse_variant("dense@cache=streaming=4+252").cache
    'streaming=4+252'
    """
    head, *mods = [p.strip() for p in text.strip().split("@")]
    if not head:
        raise ValueError(f"variant {text!r}: empty attention spec (write 'dense' for full attention)")
    kw = {"attention": None if head.lower() == DENSE else head, "dense_layers": tuple(dense_layers)}
    for m in mods:
        key, eq, val = m.partition("=")
        if key == "uncorrected" and not eq:
            if kw["attention"] is None:
                raise ValueError(f"variant {text!r}: @uncorrected drops a selector's log-weights; "
                                 f"dense has none (give an attention spec such as magicpig=K8L75)")
            kw["uncorrected"] = True
            continue
        if not eq or not val:
            raise ValueError(f"variant {text!r}: modifier {m!r} needs a value (cache=..., dl=..., prefill=...)")
        if key == "cache":
            kw["cache"] = None if val.lower() == DENSE else val
        elif key == "dl":
            try:
                kw["dense_layers"] = tuple(int(x) for x in val.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"variant {text!r}: dl= takes layer indices like 0,1; got {val!r}") from None
        elif key == "prefill":
            if val not in ("sparse", "dense"):
                raise ValueError(f"variant {text!r}: prefill= takes 'sparse' or 'dense', got {val!r}")
            kw["sparse_prefill"] = val == "sparse"
        else:
            raise ValueError(f"variant {text!r}: unknown modifier {key!r}; known: cache, dl, prefill, uncorrected")
    if kw["attention"] is not None:
        parse_attention_spec(kw["attention"])        # a bad spec fails here, before any run
    return Variant(name=text.strip(), **kw)


def _check(variant: Variant, model) -> None:
    if variant.cache is not None:
        parse_cache_spec(variant.cache, model)
    bad = [l for l in variant.dense_layers if not 0 <= l < model.config.n_layers]
    if bad:
        raise ValueError(f"variant {variant.name!r}: dense layers {bad} outside 0..{model.config.n_layers - 1}")


# ----------------------------------------------------------------------------- smoke check


def smoke_check(text: str) -> list[str]:
    """Flags of degenerate output (kvpress#134: a compressed cache that makes the model loop or
    print nothing): "empty" (nothing but spaces), "newline-only", "loop" (a word n-gram, n <= 6,
    four times in a row, or a run of 20+ characters made of one unit of <= 20 repeated).

    >>> smoke_check("12345"), smoke_check("\\n\\n"), smoke_check("the the the the end")
    ([], ['newline-only'], ['loop'])
    """
    if not text.strip():
        return ["newline-only" if "\n" in text else "empty"]
    words = text.split()
    for n in range(1, 7):
        for i in range(len(words) - 4 * n + 1):
            if words[i:i + n] * 4 == words[i:i + 4 * n]:
                return ["loop"]
    for u in range(1, 21):                     # a unit of u characters, 4+ times and 20+ characters
        if re.search(rf"(.{{{u}}})\1{{{max(3, -(-20 // u) - 1)},}}", text, flags=re.S):
            return ["loop"]
    return []


def found(answer: str, output: str) -> bool:
    """RULER's string match, on whole words: "fall" is not found in "fallback"."""
    return re.search(r"(?<!\w)" + re.escape(answer.lower()) + r"(?!\w)", output.lower()) is not None


# ----------------------------------------------------------------------------- one example


def _keys(stats) -> dict:
    """Keys read per (query, head, layer), the keys causality allowed in the cache, and the
    positions before the query (what a full cache would hold), averaged over the answer steps."""
    if not stats:
        return {"keys_read": None, "keys_causal": None, "positions": None, "density": None, "layer_density": []}
    read = np.mean([r["n_attended"].mean() for r in stats])
    causal = np.mean([r["n_causal"].mean() for r in stats])
    pos = np.mean([(np.asarray(r["q_pos"]) + 1.0).mean() for r in stats])
    layers = sorted({r["layer"] for r in stats})
    per = [float(np.mean([r["n_attended"].mean() / (np.asarray(r["q_pos"]) + 1.0).mean()
                          for r in stats if r["layer"] == l])) for l in layers]
    return {"keys_read": float(read), "keys_causal": float(causal), "positions": float(pos),
            "density": float(read / pos), "layer_density": per}


def _prompt(model, ex: Example, protocol: str):
    """(prefill ids, steps): what `protocol` prefills, then the tokens fed one at a time, the
    last of which is the first answer step."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    tok = model.tokenizer
    ctx, q = context_ids(tok, ex.context), question_ids(tok, ex.question)
    limit = model.config.context_length
    if len(ctx) + len(q) + ex.max_new_tokens > limit:
        raise ValueError(f"{ex.task} at {len(ctx) + len(q)} tokens + {ex.max_new_tokens} to generate exceeds "
                         f"the model's context of {limit}")
    prefill = ctx + q if protocol == "query-aware" else ctx
    steps = [] if protocol == "query-aware" else q      # fed one at a time before the answer
    return prefill[:-1], [prefill[-1]] + list(steps)


def shares_dense_prefill(variant: Variant) -> bool:
    """True when the variant prefills dense into the full KV cache: its cache after the prefill
    is then the same for every such variant, so run_suite prefills each example once for them."""
    return variant.cache is None and (variant.attention is None or not variant.sparse_prefill)


def dense_prefill(model, ex: Example, protocol: str, chunk: int = 512):
    """The full KV cache after `protocol`'s prefill of ex, dense: what run_example builds for
    every variant that shares_dense_prefill, to hand it as `prefilled`."""
    prefill, _ = _prompt(model, ex, protocol)
    cache = model.new_cache()
    for a in range(0, len(prefill), chunk):
        model.forward(prefill[a:a + chunk], cache, last_only=True)
    return cache


def copy_cache(cache):
    """An independent copy of a full KV cache (its buffers copied, its selector indexes not:
    a dense prefill builds none)."""
    from ..cache import KVCache
    meta, arrays = cache.state(reserve=256)                  # fresh arrays, 256 free slots
    return KVCache.from_state(meta, arrays, cfg=cache.cfg)


def run_example(model, ex: Example, variant: Variant, protocol: str, chunk: int = 512,
                prefilled=None) -> dict:
    """Prefill under `protocol`, greedy-decode the answer with `variant`, score and smoke-check it.

    prefilled: dense_prefill's cache for this example and protocol, for a variant that
    shares_dense_prefill: copied, and the prefill skipped (the same cache, bit for bit).
    Decoding stops at an end-of-text token, at max_new_tokens, or at a newline once some visible
    text was written (answers are one line; leading whitespace is kept for the smoke check to see).
    """
    tok = model.tokenizer
    prefill, steps = _prompt(model, ex, protocol)
    sel = _selector(variant)
    pre = sel if variant.sparse_prefill else None
    dl = variant.dense_layers
    if prefilled is not None:
        if not shares_dense_prefill(variant):
            raise ValueError(f"variant {variant.name!r}: prefilled is for variants that prefill "
                             f"dense into the full KV cache")
        if prefilled.next_pos != len(prefill):
            raise ValueError(f"prefilled holds {prefilled.next_pos} positions; this example's "
                             f"{protocol} prefill has {len(prefill)}")
        cache = copy_cache(prefilled)
    else:
        cache = parse_cache_spec(variant.cache, model) if variant.cache else model.new_cache()
        for a in range(0, len(prefill), chunk):
            model.forward(prefill[a:a + chunk], cache, attention=pre, dense_layers=dl, last_only=True)
    for t in steps[:-1]:
        model.forward([t], cache, attention=sel, dense_layers=dl, last_only=True)
    ans_stats: list = []
    logits = model.forward([steps[-1]], cache, attention=sel, dense_layers=dl, stats=ans_stats,
                           last_only=True)                                          # (1, V)
    gen: list[int] = []
    eot = set(getattr(tok, "eot_ids", ()) or ())
    for _ in range(ex.max_new_tokens):
        nxt = int(np.argmax(logits[-1]))
        if nxt in eot:
            break
        gen.append(nxt)
        text = tok.decode(gen)
        if "\n" in text.lstrip() or len(gen) == ex.max_new_tokens:
            break
        logits = model.forward([nxt], cache, attention=sel, dense_layers=dl, stats=ans_stats, last_only=True)
    output = tok.decode(gen)
    hits = [found(a, output) for a in ex.answers]
    return {"task": ex.task, "protocol": protocol, "variant": variant.name, "attention": variant.attention,
            "cache": variant.cache, "dense_layers": list(dl), "sparse_prefill": variant.sparse_prefill,
            "uncorrected": variant.uncorrected,
            "target_tokens": ex.target_tokens, "n_tokens": ex.n_tokens, "depth": ex.depth,
            "depth_actual": ex.depth_actual, "needle_tokens": list(ex.needle_tokens), "seed": ex.seed,
            "answers": list(ex.answers), "output": output,
            "correct": all(hits), "score": float(np.mean(hits)), "degenerate": smoke_check(output),
            **_keys(ans_stats)}


# ----------------------------------------------------------------------------- a task set


def run_suite(model, examples, variants, protocols=PROTOCOLS, dense_layers=(), chunk: int = 512,
              progress=None, share_prefill=True) -> dict:
    """Every example under every variant (strings or Variants) and protocol; dense is added as
    the baseline when absent. Returns {"records": [...], "rows": summarize(records)}.

    share_prefill: the variants that prefill dense into the full KV cache (shares_dense_prefill)
    start from one dense prefill per example and protocol, copied, instead of one each: the
    same records (tests/test_lab_suite.py), the prefill paid once."""
    vs = [v if isinstance(v, Variant) else parse_variant(v, dense_layers) for v in variants]
    if not any(v.attention is None and v.cache is None for v in vs):
        vs.insert(0, Variant(DENSE))
    for v in vs:
        _check(v, model)
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {p!r}")
    total, done, records = len(examples) * len(vs) * len(protocols), 0, []
    for ex in examples:
        for p in protocols:
            shared = None
            for v in vs:
                if share_prefill and shares_dense_prefill(v) and shared is None:
                    shared = dense_prefill(model, ex, p, chunk)
                pre = shared if share_prefill and shares_dense_prefill(v) else None
                records.append(run_example(model, ex, v, p, chunk, prefilled=pre))
                done += 1
                if progress is not None:
                    progress(done, total)
    return {"records": records, "rows": summarize(records), "pooled": pooled_rows(records)}


def _summary_row(task, length, protocol, variant, rs, base) -> dict:
    """One row of summarize (or pooled_rows) over the records rs, dense's records `base` (or
    None) beside them; records are paired with dense's by (task, seed, depth)."""
    acc = accuracy(r["correct"] for r in rs)
    row = {"task": task, "length": length, "protocol": protocol, "variant": variant,
           "attention": rs[0]["attention"], "cache": rs[0]["cache"], "dense_layers": rs[0]["dense_layers"],
           **acc, "score": float(np.mean([r["score"] for r in rs])),
           "seeds": sorted({r["seed"] for r in rs}),
           "depths": sorted({r["depth"] for r in rs if r["depth"] is not None}),
           "n_tokens_mean": float(np.mean([r["n_tokens"] for r in rs]))}
    for k in ("keys_read", "keys_causal", "positions", "density"):
        vals = [r[k] for r in rs if r[k] is not None]
        row[k] = float(np.mean(vals)) if vals else None
    kinds = Counter(f for r in rs for f in r["degenerate"])
    row["degenerate"] = sum(bool(r["degenerate"]) for r in rs)
    row["degenerate_kinds"] = dict(kinds)
    row["dense_acc"] = row["dense_n"] = row["vs_dense"] = None
    row["uninformative"] = None
    if base is not None:
        dacc = accuracy(r["correct"] for r in base)
        row["dense_acc"], row["dense_n"] = dacc["acc"], dacc["n"]
        row["uninformative"] = dacc["acc"] < 0.5
        pair = {(r["task"], r["seed"], r["depth"]): r["correct"] for r in base}
        paired = [(float(r["correct"]), float(pair[(r["task"], r["seed"], r["depth"])])) for r in rs
                  if (r["task"], r["seed"], r["depth"]) in pair]
        if paired and sum(d for _, d in paired) > 0:
            num, den = zip(*paired)
            row["vs_dense"] = bootstrap_ratio(num, den, n_boot=2000, seed=0)
    return row


def _dense_names(records) -> set:
    return {r["variant"] for r in records if r["attention"] is None and r["cache"] is None}


def summarize(records) -> list[dict]:
    """One row per (task, length, protocol, variant): n, accuracy with its Wilson interval, seeds,
    keys read, degenerate outputs, dense's accuracy in the same cell and `uninformative` when dense
    scores below 50% there (RULER's threshold for a usable cell: the row is kept, and marked),
    and the accuracy relative to dense with a paired bootstrap interval."""
    cells: dict = {}
    for r in records:
        cells.setdefault((r["task"], r["target_tokens"], r["protocol"], r["variant"]), []).append(r)
    dense_names = _dense_names(records)
    rows = []
    for (task, length, protocol, variant), rs in cells.items():
        base = next((cells[(task, length, protocol, d)] for d in dense_names
                     if (task, length, protocol, d) in cells), None)
        rows.append(_summary_row(task, length, protocol, variant, rs, base))
    return rows


POOLED = "all tasks"


def pooled_rows(records) -> list[dict]:
    """Per (length, protocol, variant), one row with task "all tasks" pooling the examples of the
    informative tasks (dense >= 50% in that task's cell; RULER averages over tasks the same way,
    here by example so that the Wilson interval counts them): the fields of summarize's rows, the
    paired bootstrap against dense over the pooled pairs, and `tasks`, the tasks pooled. A
    (length, protocol) where no task is informative has no pooled row."""
    dense_names = _dense_names(records)
    groups: dict = {}
    for r in records:
        groups.setdefault((r["target_tokens"], r["protocol"]), []).append(r)
    rows = []
    for (length, protocol), rs in groups.items():
        dense_by_task: dict = {}
        for r in rs:
            if r["variant"] in dense_names:
                dense_by_task.setdefault((r["task"], r["variant"]), []).append(r["correct"])
        dense_name = next((d for d in sorted(dense_names, key=lambda d: (d != DENSE, d))
                           if any(v == d for _, v in dense_by_task)), None)
        if dense_name is None:
            continue
        tasks = sorted(t for (t, v), c in dense_by_task.items() if v == dense_name and np.mean(c) >= 0.5)
        if not tasks:
            continue
        base = [r for r in rs if r["variant"] == dense_name and r["task"] in tasks]
        by_variant: dict = {}
        for r in rs:
            if r["task"] in tasks:
                by_variant.setdefault(r["variant"], []).append(r)
        for variant, vrs in by_variant.items():
            row = _summary_row(POOLED, length, protocol, variant, vrs, base)
            row["tasks"] = tasks
            rows.append(row)
    return rows


def markdown_table(rows) -> str:
    """The rows as a markdown table: accuracy [95% Wilson interval] (n), dense's accuracy in the
    same cell, keys read per query (and as a share of the positions), degenerate outputs, notes;
    pooled_rows' rows ("all tasks") fit too, their note naming the tasks pooled."""
    head = ("| task | tokens | protocol | variant | n | accuracy [95% CI] | dense | vs dense [95% CI] "
            "| keys read (share) | degenerate | note |")
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        keys = "-" if r["keys_read"] is None else f"{r['keys_read']:.0f} ({r['density']:.1%})"
        b = r["vs_dense"]
        vs = "-" if not b else f"{b['ratio']:.2f} [{b['lo']:.2f}, {b['hi']:.2f}]"
        dense = "-" if r["dense_acc"] is None else f"{r['dense_acc']:.2f}"
        deg = str(r["degenerate"]) + (" (" + ", ".join(f"{k} {v}" for k, v in r["degenerate_kinds"].items()) + ")"
                                      if r["degenerate"] else "")
        note = "uninformative (dense < 50%)" if r["uninformative"] else ""
        if r["task"] == POOLED and r.get("tasks"):
            note = "pooled: " + ", ".join(r["tasks"])
        out.append(f"| {r['task']} | {r['length']} | {r['protocol']} | `{r['variant']}` | {r['n']} | "
                   f"{r['acc']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] | {dense} | {vs} | {keys} | {deg} | {note} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- perplexity


def _nll(logits, targets) -> np.ndarray:
    """-log softmax(logits)[target] per row, nats: logits (T, V), targets (T,) -> (T,)."""
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]               # (T,)
    return lse - logits[np.arange(len(targets)), np.asarray(targets)]


def token_nll(model, ids, variant: Variant, chunk: int = 512, stats=None) -> np.ndarray:
    """Negative log-likelihood (nats) of ids[1:] given the prefix, under `variant` (its attention
    in every forward call: perplexity has no separate prefill), shape (len(ids) - 1,).
    stats: a list that receives Model.forward's per-layer records of every call."""
    ids = list(ids)
    if len(ids) > model.config.context_length:
        raise ValueError(f"{len(ids)} tokens exceed the model's context of {model.config.context_length}")
    cache = parse_cache_spec(variant.cache, model) if variant.cache else model.new_cache()
    sel = _selector(variant)
    out = []
    for a in range(0, len(ids) - 1, chunk):
        x = ids[a:min(a + chunk, len(ids) - 1)]
        logits = model.forward(x, cache, attention=sel, dense_layers=variant.dense_layers, stats=stats)  # (T, V)
        out.append(_nll(logits, ids[a + 1:a + 1 + len(x)]))
    return np.concatenate(out)


def prefix_prefill(model, ids, variant: Variant | None = None, chunk: int = 512):
    """The cache after prefilling ids (all but the last token's logits skipped) the way `variant`
    prefills: dense into the full KV cache by default (None, or a variant that
    shares_dense_prefill), else into its own cache with its selector when it prefills sparse."""
    v = variant or Variant(DENSE)
    cache = parse_cache_spec(v.cache, model) if v.cache else model.new_cache()
    sel = _selector(v) if v.sparse_prefill else None
    for a in range(0, len(ids), chunk):
        model.forward(list(ids[a:a + chunk]), cache, attention=sel, dense_layers=v.dense_layers, last_only=True)
    return cache


def last_nll(model, ids, variant: Variant, last: int, chunk: int = 512, prefilled=None,
             stats=None) -> np.ndarray:
    """Negative log-likelihood (nats) of the last `last` tokens of ids as decode sees them, shape
    (last,): ids[:-last - 1] prefilled (prefix_prefill: dense unless the variant prefills its own
    way), then ids[-last - 1:-1] fed teacher-forced in chunks with the variant's selector, each
    row predicting the next token. The keys of a long prefix are then chosen by the selector, as
    in decode, where a whole-text run would score mostly short prefixes.

    prefilled: prefix_prefill's dense cache of the same prefix, for a variant that
    shares_dense_prefill: copied (bit for bit), the prefill skipped.
    stats: a list that receives Model.forward's per-layer records of the scored calls."""
    ids = list(ids)
    if not 1 <= last < len(ids):
        raise ValueError(f"last={last}: expected 1 <= last < {len(ids)} (the text's tokens)")
    if len(ids) > model.config.context_length:
        raise ValueError(f"{len(ids)} tokens exceed the model's context of {model.config.context_length}")
    prefix = ids[:len(ids) - last - 1]
    if prefilled is not None:
        if not shares_dense_prefill(variant):
            raise ValueError(f"variant {variant.name!r}: prefilled is for variants that prefill "
                             f"dense into the full KV cache")
        if prefilled.next_pos != len(prefix):
            raise ValueError(f"prefilled holds {prefilled.next_pos} positions; the prefix has {len(prefix)}")
        cache = copy_cache(prefilled)
    else:
        cache = prefix_prefill(model, prefix, variant, chunk)
    sel = _selector(variant)
    inputs, out = ids[len(prefix):-1], []                                  # (last,) fed, each predicts the next
    for a in range(0, last, chunk):
        logits = model.forward(inputs[a:a + chunk], cache, attention=sel, dense_layers=variant.dense_layers,
                               stats=stats)                                # (T, V)
        out.append(_nll(logits, ids[len(prefix) + 1 + a:len(prefix) + 1 + a + len(logits)]))
    return np.concatenate(out)


PPL_PROTOCOLS = ("whole-text", "last-tokens")


def perplexity_rows(model, texts: dict, variants, n_tokens: int, dense_layers=(), seed: int = 0,
                    last: int | None = None, chunk: int = 512, share_prefill: bool = True) -> list[dict]:
    """Perplexity ratio variant / dense over the same tokens of each text's first n_tokens, with a
    block bootstrap interval (stats.perplexity_ratio), one row per (text, variant).

    last=None (protocol "whole-text"): every token scored, the variant's attention in every call.
    last=N (protocol "last-tokens"): the last N tokens scored after a prefill of the rest
    (last_nll), dense for the variants that shares_dense_prefill (one prefill per text, copied
    for each of them when share_prefill), bounded caches and sparse prefills their own way.
    Rows carry the protocol, `last`, and the keys read per (query, head, layer) over the scored
    tokens (as the task rows do)."""
    vs = [v if isinstance(v, Variant) else parse_variant(v, dense_layers) for v in variants]
    for v in vs:
        _check(v, model)
    protocol = "whole-text" if last is None else "last-tokens"
    rows = []
    for name, text in texts.items():
        ids = context_ids(model.tokenizer, text)[:n_tokens]
        if len(ids) < n_tokens:
            raise ValueError(f"text {name!r} has {len(ids)} tokens, fewer than {n_tokens}")
        # the dense baseline always prefills dense, so the shared prefix always serves it
        shared = prefix_prefill(model, ids[:len(ids) - last - 1], None, chunk) if last and share_prefill else None

        def nll(v, stats=None):
            if last is None:
                return token_nll(model, ids, v, chunk, stats=stats)
            pre = shared if shared is not None and shares_dense_prefill(v) else None
            return last_nll(model, ids, v, last, chunk, prefilled=pre, stats=stats)
        dense = nll(Variant(DENSE))
        for v in vs:
            st: list = []
            r = perplexity_ratio(nll(v, st), dense, seed=seed)
            rows.append({"text": name, "length": n_tokens, "variant": v.name, **asdict(v), **r,
                         "protocol": protocol, "last": last, **_keys(st)})
    return rows
