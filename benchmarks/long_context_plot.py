"""Tables and plots again from a JSON that long_context_suite.py wrote: the rows are summarised
anew from its records (summarize, pooled_rows), so a JSON written before pooled rows existed
gets them too; perplexity JSONs are drawn from their rows. Prints the markdown table.

    python3 benchmarks/long_context_plot.py benchmarks/long_context_smollm2_4096_query-aware.json \\
        --png docs/lab/long_context/smollm2_4096_query-aware.png
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_suite import plot_ppl_rows, plot_rows
from minisparse.lab.suite import markdown_table, pooled_rows, summarize


def kept(records) -> dict:
    """Per variant: (examples it answers right among those dense answers right, those dense
    answers right), over every task, informative or not: what a variant keeps of dense's answers."""
    key = lambda r: (r["task"], r["seed"], r["depth"], r["protocol"], r["target_tokens"])
    dense = {key(r) for r in records if r["attention"] is None and r["cache"] is None and r["correct"]}
    out = {}
    for r in records:
        a, b = out.get(r["variant"], (0, 0))
        if key(r) in dense:
            out[r["variant"]] = (a + bool(r["correct"]), b + 1)
        else:
            out[r["variant"]] = (a, b)
    return out


def matrix(rows, records=None) -> str:
    """Variants down, tasks across (right answers / n, * where dense < 50%: uninformative), then
    the pooled accuracy over the informative tasks with its Wilson interval, the ratio to dense
    with its paired bootstrap interval, the keys read per query, and (given the records) how many
    of the examples dense answers right, over all tasks, the variant answers right too."""
    cells = [r for r in rows if r["task"] != "all tasks"]
    tasks = list(dict.fromkeys(r["task"] for r in cells))
    names = list(dict.fromkeys(r["variant"] for r in cells))
    pooled = {r["variant"]: r for r in rows if r["task"] == "all tasks"}
    head = ["variant"] + [t + ("*" if any(r["uninformative"] for r in cells if r["task"] == t) else "")
                          for t in tasks] + ["pooled accuracy [95% CI]", "vs dense [95% CI]", "keys read (share)"]
    k = kept(records) if records else {}
    if k:
        head.append("of dense's right answers (all tasks)")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in names:
        line = [f"`{v}`"]
        for t in tasks:
            r = next((r for r in cells if r["task"] == t and r["variant"] == v), None)
            line.append("-" if r is None else f"{round(r['acc'] * r['n'])}/{r['n']}")
        p = pooled.get(v)
        if p is None:
            line += ["-", "-", "-"]
        else:
            b = p.get("vs_dense")
            line += [f"{p['acc']:.2f} [{p['lo']:.2f}, {p['hi']:.2f}] (n={p['n']})",
                     "-" if not b else f"{b['ratio']:.2f} [{b['lo']:.2f}, {b['hi']:.2f}]",
                     f"{p['keys_read']:.0f} ({p['density']:.1%})" if p.get("keys_read") else "-"]
        if k:
            a, b = k.get(v, (0, 0))
            line.append(f"{a}/{b}")
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a JSON written by benchmarks/long_context_suite.py")
    ap.add_argument("--png", help="draw the plot here (accuracy or perplexity ratio against keys read)")
    ap.add_argument("--matrix", action="store_true",
                    help="print a compact table instead: one row per variant, right/n per task "
                         "(* marks a task where dense scores below 50%%), then the pooled row's figures")
    ap.add_argument("--title", help="the plot's title (default: model, length and protocol from the JSON)")
    a = ap.parse_args(argv)
    if a.title and not a.png:
        ap.error("--title names the plot: it needs --png")
    try:
        d = json.loads(Path(a.json).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{a.json}: not a readable JSON ({e})") from None
    records = d.get("records")
    if records:
        rows = summarize(records) + pooled_rows(records)
        print(matrix(rows, records) if a.matrix else markdown_table(rows))
        r0 = records[0]
        title = a.title or f"{Path(d.get('model', '?')).stem}, {r0['target_tokens']} tokens, {r0['protocol']}"
        if a.png:
            plot_rows(rows, a.png, title)
    elif d.get("rows") and "text" in d["rows"][0]:
        if a.matrix:
            raise SystemExit(f"{a.json}: --matrix lays out a task table (variants x tasks); "
                             f"this is a perplexity table")
        rows = d["rows"]
        for r in rows:
            print(f"| {r['text']} | {r['length']} | `{r['variant']}` | {r['ratio']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}] |")
        title = a.title or f"{Path(d.get('model', '?')).stem}, {rows[0]['length']} tokens, perplexity ratio"
        if a.png:
            plot_ppl_rows(rows, a.png, title)
    else:
        raise SystemExit(f"{a.json}: expected 'records' (a task table) or perplexity 'rows' "
                         f"written by long_context_suite.py")


if __name__ == "__main__":
    main()
