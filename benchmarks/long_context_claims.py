"""The seeds' long-context claims, checked against the tables long_context_suite.py wrote: for each
claim and each (length, protocol) or (text, length) it applies to, the figures with their 95%
intervals and a verdict: "holds", "does not hold", or "undecided" (the interval straddles the
claim's threshold). Prints a markdown table; --markdown PATH writes it for docs/lab.md with the
command and the inputs; --out PATH writes the verdicts as JSON.

Leaves out running anything (long_context_suite.py) and choosing the variants: a claim with no
matching variant in the inputs is listed as "not run". Variants are matched by what they are
(attention family, cache, layers kept dense) and by keys read, never by position in a list.

Task claims use the pooled rows (lab.suite.pooled_rows: the examples of the tasks where dense
scores >= 50%, recomputed from the records, so older JSONs work) and paired comparisons between
two variants on the same examples (lab.stats.bootstrap_diff, pairs by task, seed and depth).
Perplexity claims compare two rows' block-bootstrap intervals (not paired: the token losses are
not stored), so a claim holds only when the intervals do not overlap.

    python3 benchmarks/long_context_claims.py benchmarks/long_context_smollm2_4096_query-aware.json \\
        benchmarks/long_context_smollm2_4096_query-agnostic.json benchmarks/long_context_ppl_smollm2_8192_last512.json
"""
import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout
from minisparse.lab.stats import bootstrap_diff
from minisparse.lab.suite import pooled_rows

HOLDS, FAILS, UNDECIDED, NOT_RUN = "holds", "does not hold", "undecided", "not run"
EQUAL_KEYS = 0.25      # two variants read "equal keys" when their sparse-layer keys differ by <= 25%


# ----------------------------------------------------------------------------- verdicts


def at_least(lo, hi, threshold):
    """The claim 'value >= threshold' from an interval [lo, hi]."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return UNDECIDED
    return HOLDS if lo >= threshold else FAILS if hi < threshold else UNDECIDED


def above(lo, hi, threshold):
    """The claim 'value > threshold' (strictly better): an interval [t, t] does not hold."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return UNDECIDED
    return HOLDS if lo > threshold else FAILS if hi <= threshold else UNDECIDED


def lower_ppl(a, b):
    """The claim 'a's perplexity ratio is below b's' from two unpaired intervals."""
    return HOLDS if a["hi"] < b["lo"] else FAILS if a["lo"] >= b["hi"] else UNDECIDED


# ----------------------------------------------------------------------------- variants


def family(v) -> str:
    """'topk', 'quest', 'magicpig', 'sinks+window', 'random', ... of an attention spec, or
    'cache:NAME' of a bounded cache without one."""
    if v["attention"] is None:
        return "dense" if v["cache"] is None else "cache:" + re.split(r"[=,]", v["cache"])[0]
    return "+".join(m.split("=")[0].strip().lower() for m in v["attention"].split(",")
                    if m.split("=")[0].strip().lower() not in ("seed", "mode"))


# patterns fixed by position alone (or by a seed): they choose keys without looking at the query
POSITIONAL = {"sinks", "window", "blocks", "strided", "fixed", "logstride", "landmarks", "loglandmarks",
              "globals", "random", "ruvllm", "ashape"}


def query_aware(v) -> bool:
    """True when some member of the variant's attention spec scores keys against the query."""
    return bool(v["attention"]) and any(f not in POSITIONAL for f in family(v).split("+"))


def nominal_keys(v):
    """Keys a variant's spec asks for per query, where its spec says (topk=N, quest=P/N,
    sinks=S,window=W, streaming=S+W), else None: the fallback when a row has no keys read."""
    spec = v["attention"] or v["cache"] or ""
    nums = {m.split("=")[0].strip(): m.split("=", 1)[1] for m in spec.split(",") if "=" in m}
    try:
        if "topk" in nums:
            return float(nums["topk"])
        if "quest" in nums:
            return float(nums["quest"].split("/")[1])
        if "window" in nums:
            return float(nums["window"]) + float(nums.get("sinks", 0))
        if "streaming" in nums:
            return float(sum(int(x) for x in nums["streaming"].split("+")))
    except ValueError:                         # a fraction (topk=2%): no nominal key count
        return None
    return None


def sparse_keys(rs, dense_layers):
    """Keys read per query in the sparse layers, averaged over records or rows rs: the layers kept
    dense read everything, so the layer average would hide a budget; None when not recorded."""
    vals = []
    for r in rs:
        per = r.get("layer_density") or []
        sparse = [d for l, d in enumerate(per) if l not in set(dense_layers)]
        if sparse and r.get("positions"):
            vals.append(float(sum(sparse) / len(sparse)) * r["positions"])
        elif r.get("keys_read") is not None and not dense_layers:
            vals.append(r["keys_read"])
    return sum(vals) / len(vals) if vals else None


def peers(v, pool, info, keys, want) -> list:
    """The variants w of pool with want(info[w]) that are v's peers: the same layers kept dense
    and, within EQUAL_KEYS, the same keys read."""
    return [w for w in pool if want(info[w]) and info[w]["dense_layers"] == info[v]["dense_layers"]
            and equal_keys(keys[w], keys[v])]


def _key(v) -> tuple:
    """What a variant is, apart from its name."""
    return (v["attention"], v["cache"], tuple(v["dense_layers"] or ()), bool(v.get("uncorrected", False)))


def equal_keys(a, b) -> bool:
    return a is not None and b is not None and abs(a - b) <= EQUAL_KEYS * max(a, b)


# ----------------------------------------------------------------------------- loading


def load(paths):
    """(task records, perplexity rows) of the JSONs long_context_suite.py wrote."""
    records, ppl = [], []
    for p in paths:
        d = json.loads(Path(p).read_text())
        if "records" in d:        # each record names its model: two models' cells never mix
            model = Path(str(d.get("model", ""))).stem
            records += [{"model": model, **r} for r in d["records"]]
        elif d.get("rows") and "ppl_sparse" in d["rows"][0]:
            ppl += [{"protocol": "whole-text", "last": None, **r} for r in d["rows"]]
        else:
            raise SystemExit(f"{p}: neither a task table (records) nor a perplexity table (rows with ppl_sparse)")
    return records, ppl


class TaskCell:
    """One (length, protocol) of the task records: pooled rows, and each variant's records and
    sparse-layer keys read, over the informative tasks."""

    def __init__(self, records):
        self.pooled = {r["variant"]: r for r in pooled_rows(records)}
        self.tasks = next(iter(self.pooled.values()))["tasks"] if self.pooled else []
        self.records, self.info = {}, {}
        for r in records:
            if r["task"] in self.tasks:
                self.records.setdefault(r["variant"], []).append(r)
                self.info.setdefault(r["variant"], r)
        self.keys = {v: sparse_keys(rs, self.info[v]["dense_layers"] or ()) for v, rs in self.records.items()}

    def paired(self, a, b) -> dict:
        """bootstrap_diff of accuracy, variant a minus variant b, on their common examples."""
        kb = {(r["task"], r["seed"], r["depth"]): r["correct"] for r in self.records[b]}
        pairs = [(float(r["correct"]), float(kb[(r["task"], r["seed"], r["depth"])])) for r in self.records[a]
                 if (r["task"], r["seed"], r["depth"]) in kb]
        if not pairs:                         # run on different examples: nothing to pair
            return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
        x, y = zip(*pairs)
        return bootstrap_diff(x, y, n_boot=2000, seed=0)

    def acc(self, v) -> str:
        r = self.pooled[v]
        return f"{r['acc']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] (n={r['n']})"


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _diff(d):
    if not d["n"]:
        return "no common examples"
    return f"{d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (paired n={d['n']})"


def _ppl(r):
    return f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


# ----------------------------------------------------------------------------- the claims


CLAIMS = {
    "topk2": "top-k reading <= 2% of the keys keeps >= 95% of dense accuracy",
    "quest256": "Quest, page 16, budget >= 256 keys keeps >= 95% of dense accuracy",
    "quest_topk": "Quest (page 16, budget >= 256) within 5 points of top-k at equal keys",
    "magicpig_quest": "MagicPIG beats Quest at equal keys read",
    "correction": "MagicPIG's importance correction beats the same sampled keys uncorrected",
    "sinks": "sinks + window beats a window alone at equal keys",
    "ris": "RIS random masks (1% x M) beat dense",
    "bounded": "query-aware selection beats a bounded cache at equal keys",
    "paper_layers": "each family as its paper ran it (first layers dense) beats all layers sparse",
}


def task_claims(cell: TaskCell, length: int, protocol: str, model: str = "") -> list[dict]:
    out = []
    where = (f"{model}, " if model else "") + f"{length} tokens, {protocol}"

    def add(claim, figures, verdict):
        out.append({"claim": claim, "text": CLAIMS[claim], "where": where, "figures": figures, "verdict": verdict})

    if not cell.pooled:
        add("topk2", "no task where dense scores >= 50%", UNDECIDED)
        return out
    info, keys, pooled = cell.info, cell.keys, cell.pooled
    names = list(cell.records)
    attention = [v for v in names if info[v]["attention"] and not info[v]["cache"]]
    plain = [v for v in attention if not info[v].get("uncorrected")]

    def vs_dense(v):
        b = pooled[v]["vs_dense"]
        return (f"`{v}` {_fmt(keys[v], 0)} keys: acc {cell.acc(v)}, dense {pooled[v]['dense_acc']:.2f}, "
                "ratio " + ("- (dense never right)" if not b
                            else f"{b['ratio']:.2f} [{b['lo']:.2f}, {b['hi']:.2f}]"),
                b)

    # top-k at <= 2% of the keys: its spec's key count where it gives one (topk=82 is 2% of 4096
    # rounded up: ceil), else the keys it read in its sparse layers
    for v in (v for v in plain if family(info[v]) == "topk"):
        pct = re.fullmatch(r"topk=([\d.]+)%", info[v]["attention"].strip())
        k = float(pct.group(1)) / 100 * length if pct else (nominal_keys(info[v]) or keys[v])
        if k is not None and k <= math.ceil(0.02 * length):
            text, b = vs_dense(v)
            add("topk2", text, at_least(b["lo"], b["hi"], 0.95) if b else UNDECIDED)
    # Quest at page 16, budget >= 256; and beside top-k at equal keys
    for v in (v for v in plain if family(info[v]) == "quest"):
        m = re.fullmatch(r"quest=16/(\d+)", info[v]["attention"].strip())
        if not m or int(m.group(1)) < 256:
            continue
        text, b = vs_dense(v)
        add("quest256", text, at_least(b["lo"], b["hi"], 0.95) if b else UNDECIDED)
        for t in peers(v, plain, info, keys, lambda x: family(x) == "topk"):
            d = cell.paired(v, t)
            add("quest_topk", f"`{v}` {cell.acc(v)} ({_fmt(keys[v], 0)} keys) − `{t}` {cell.acc(t)} "
                              f"({_fmt(keys[t], 0)} keys): {_diff(d)}", at_least(d["lo"], d["hi"], -0.05))
    # MagicPIG vs Quest at equal keys, same dense layers
    for v in (v for v in plain if family(info[v]) == "magicpig"):
        qs = peers(v, plain, info, keys, lambda x: family(x) == "quest")
        for q in qs:
            d = cell.paired(v, q)
            add("magicpig_quest", f"`{v}` {cell.acc(v)} ({_fmt(keys[v], 0)} keys) − `{q}` {cell.acc(q)} "
                                  f"({_fmt(keys[q], 0)} keys): {_diff(d)}", above(d["lo"], d["hi"], 0))
        if not qs:
            add("magicpig_quest", f"`{v}` ({_fmt(keys[v], 0)} keys): no Quest variant with the same dense "
                                  f"layers within {EQUAL_KEYS:.0%} of its keys", NOT_RUN)
    # the correction: the same spec with and without @uncorrected
    for u in (u for u in attention if info[u].get("uncorrected")):
        k = _key(info[u])
        c = next((v for v in plain if _key(info[v])[:3] == k[:3]), None)
        if c is None:
            add("correction", f"`{u}`: its corrected twin was not run", NOT_RUN)
            continue
        d = cell.paired(c, u)
        add("correction", f"`{c}` {cell.acc(c)} − `{u}` {cell.acc(u)}: {_diff(d)}", above(d["lo"], d["hi"], 0))
    # sinks + window against a window alone at equal keys, same dense layers
    for v in (v for v in plain if family(info[v]) == "sinks+window"):
        ws = peers(v, plain, info, keys, lambda x: family(x) == "window")
        for w in ws:
            d = cell.paired(v, w)
            add("sinks", f"`{v}` {cell.acc(v)} − `{w}` {cell.acc(w)}: {_diff(d)}", above(d["lo"], d["hi"], 0))
        if not ws:
            add("sinks", f"`{v}`: no window-only variant at equal keys", NOT_RUN)
    # RIS: realised density against the nominal, and accuracy against dense
    for v in (v for v in plain if family(info[v]) == "random"):
        m = re.search(r"random=([\d.]+)%x(\d+)", info[v]["attention"])
        nominal = "" if not m else (f"nominal {m.group(1)}% x {m.group(2)} (expected coverage "
                                    f"{1 - (1 - float(m.group(1)) / 100) ** int(m.group(2)):.3f}), ")
        text, b = vs_dense(v)
        add("ris", nominal + f"realised share {_fmt(pooled[v]['density'], 3)}; " + text,
            above(b["lo"], b["hi"], 1.0) if b else UNDECIDED)
    # bounded caches against query-aware selection at equal keys, same dense layers
    for c in (c for c in names if info[c]["cache"] and not info[c]["attention"]):
        if keys[c] is not None and pooled[c]["positions"] and keys[c] >= 0.9 * pooled[c]["positions"]:
            continue                     # a cache that keeps (nearly) every key bounds nothing (kivi2)
        ss = peers(c, plain, info, keys, query_aware)
        for s in ss:
            d = cell.paired(s, c)
            add("bounded", f"`{s}` {cell.acc(s)} ({_fmt(keys[s], 0)} keys) − `{c}` {cell.acc(c)} "
                           f"({_fmt(keys[c], 0)} keys): {_diff(d)}", above(d["lo"], d["hi"], 0))
        if not ss:
            add("bounded", f"`{c}` ({_fmt(keys[c], 0)} keys): no attention variant at equal keys", NOT_RUN)
    # as the paper ran it (@dl=...) against all layers sparse
    for v in (v for v in names if info[v]["dense_layers"] and (info[v]["attention"] or info[v]["cache"])):
        k = _key(info[v])
        a = next((x for x in names if _key(info[x]) == (k[0], k[1], (), k[3])), None)
        if a is None:
            add("paper_layers", f"`{v}`: its all-layers-sparse twin was not run", NOT_RUN)
            continue
        d = cell.paired(v, a)
        add("paper_layers", f"`{v}` {cell.acc(v)} − `{a}` {cell.acc(a)}: {_diff(d)}", above(d["lo"], d["hi"], 0))
    return out


def ppl_claims(rows, text: str, length: int, protocol: str) -> list[dict]:
    """The comparisons that perplexity answers too (lower ratio is better), unpaired intervals."""
    out = []
    where = f"{text}, {length} tokens, {protocol}"
    by = {r["variant"]: r for r in rows}
    # rows of older JSONs carry no keys read: the spec's nominal keys stand in
    keys = {v: sparse_keys([r], r["dense_layers"] or ()) or nominal_keys(r) for v, r in by.items()}
    plain = [v for v, r in by.items() if r["attention"] and not r["cache"] and not r.get("uncorrected")]

    def add(claim, a, b):
        out.append({"claim": claim, "text": CLAIMS[claim], "where": where,
                    "figures": f"ppl ratio `{a}` {_ppl(by[a])} vs `{b}` {_ppl(by[b])}",
                    "verdict": lower_ppl(by[a], by[b])})

    for v in plain:
        f = family(by[v])
        if f == "magicpig":
            for q in peers(v, plain, by, keys, lambda x: family(x) == "quest"):
                add("magicpig_quest", v, q)
        if f == "sinks+window":
            for w in peers(v, plain, by, keys, lambda x: family(x) == "window"):
                add("sinks", v, w)
    for u, r in by.items():
        if r.get("uncorrected"):
            c = next((v for v in plain if _key(by[v])[:3] == _key(r)[:3]), None)
            if c:
                add("correction", c, u)
    for c, r in by.items():
        bounds = not (keys[c] and r.get("positions") and keys[c] >= 0.9 * r["positions"])
        if r["cache"] and not r["attention"] and bounds:
            for s in peers(c, plain, by, keys, query_aware):
                add("bounded", s, c)
    for v, r in by.items():
        if r["dense_layers"] and (r["attention"] or r["cache"]):
            k = _key(r)
            a = next((x for x in by if _key(by[x]) == (k[0], k[1], (), k[3])), None)
            if a:
                add("paper_layers", v, a)
    return out


def check(records, ppl) -> list[dict]:
    """Every claim's lines over the task records and perplexity rows, ordered by claim."""
    lines = []
    groups: dict = {}
    for r in records:
        groups.setdefault((r.get("model", ""), r["target_tokens"], r["protocol"]), []).append(r)
    for (model, length, protocol), rs in sorted(groups.items()):
        lines += task_claims(TaskCell(rs), length, protocol, model)
    pg: dict = {}
    for r in ppl:
        name = r["protocol"] + ("" if r.get("last") is None else f" {r['last']}")
        pg.setdefault((r["text"], r["length"], name), []).append(r)
    for (text, length, protocol), rs in sorted(pg.items()):
        lines += ppl_claims(rs, text, length, protocol)
    order = list(CLAIMS)
    return sorted(lines, key=lambda l: order.index(l["claim"]))


def markdown(lines) -> str:
    out = ["| claim | where | figures [95% CI] | verdict |", "|---|---|---|---|"]
    for l in lines:
        v = l["verdict"] if l["verdict"] == HOLDS else f"**{l['verdict']}**"
        out.append(f"| {l['text']} | {l['where']} | {l['figures']} | {v} |")
    missing = [CLAIMS[c] for c in CLAIMS if not any(l["claim"] == c for l in lines)]
    if missing:
        out.append("")
        out.append("Not run (no matching variants in the inputs): " + "; ".join(missing) + ".")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="task or perplexity JSONs written by long_context_suite.py")
    ap.add_argument("--markdown", help="write the table for docs/lab.md here, with the command and inputs")
    ap.add_argument("--out", help="write the verdicts as JSON here")
    a = ap.parse_args(argv)
    for p in a.json:
        if not Path(p).is_file():
            raise SystemExit(f"{p}: no such JSON file")
    records, ppl = load(a.json)
    lines = check(records, ppl)
    table = markdown(lines)
    print(table)
    command = "python3 benchmarks/long_context_claims.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if a.markdown:
        Path(a.markdown).write_text(f"Claims checked by\n\n    {command}\n\n{table}\n")
    if a.out:
        Path(a.out).write_text(json.dumps({"command": command, "inputs": a.json, "claims": lines}, indent=1))
    return lines


if __name__ == "__main__":
    main()
