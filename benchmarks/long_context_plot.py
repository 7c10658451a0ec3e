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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a JSON written by benchmarks/long_context_suite.py")
    ap.add_argument("--png", help="draw the plot here (accuracy or perplexity ratio against keys read)")
    ap.add_argument("--title", help="the plot's title (default: model, length and protocol from the JSON)")
    a = ap.parse_args(argv)
    try:
        d = json.loads(Path(a.json).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{a.json}: not a readable JSON ({e})") from None
    records = d.get("records")
    if records:
        rows = summarize(records) + pooled_rows(records)
        print(markdown_table(rows))
        r0 = records[0]
        title = a.title or f"{Path(d.get('model', '?')).stem}, {r0['target_tokens']} tokens, {r0['protocol']}"
        if a.png:
            plot_rows(rows, a.png, title)
    elif d.get("rows") and "text" in d["rows"][0]:
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
