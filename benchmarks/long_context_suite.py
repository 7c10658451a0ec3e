"""The long-context suite, one table per command: RULER-style tasks (minisparse/lab/tasks.py) at
one length under one protocol, every variant beside dense, accuracy with Wilson 95% intervals,
keys read, degenerate answers flagged; or (--perplexity) the perplexity ratio variant / dense on
long real texts with block-bootstrap intervals. Prints a markdown table and writes JSON with every
record (prompt seeds, outputs, per-layer density) and the command that made it.

Leaves out the claims drawn from the tables (benchmarks/long_context_claims.py, docs/lab.md).

    python3 benchmarks/long_context_suite.py --model smollm2 --length 4096 --protocol query-aware \\
        --variants "dense;topk=128;quest=16/256" --n 20
    python3 benchmarks/long_context_suite.py --model passkey --tasks passkey --length 512 \\
        --protocol query-agnostic --variants "dense;topk=16;dense@cache=streaming=4+60" --n 4
    python3 benchmarks/long_context_suite.py --model smollm2 --perplexity --length 8192 \\
        --variants "topk=128;sinks=4,window=252"
    python3 benchmarks/long_context_suite.py --model smollm2 --perplexity --length 8192 --ppl-last 512 \\
        --variants "topk=164;quest=16/256@dl=0,1"
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout
from minisparse import load_model
from minisparse.lab.suite import PROTOCOLS, markdown_table, parse_variant, perplexity_rows, run_suite
from minisparse.lab.tasks import TASKS, long_texts, make_task_set
from minisparse.registry import resolve, shipped_file

ROOT = Path(__file__).resolve().parent.parent
RULER_TASKS = [t for t in TASKS if t != "passkey"]   # the pass-key task needs the pass-key model


def _model_path(name: str) -> Path:
    if name == "passkey":      # the embedded pass-key model has no registry name
        p = shipped_file("minisparse-passkey.gguf")
        if p is None:
            raise SystemExit("--model passkey: models/minisparse-passkey.gguf not found")
        return p
    return resolve(name)


def _floats(text, flag):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def plot_rows(rows, path, title):
    """Accuracy against the share of keys read (log x), one panel per task, one point per
    variant with its Wilson 95% interval; uninformative panels say so in their title. Each
    variant keeps its colour and marker in every panel, and one legend serves them all."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    colours = plt.get_cmap("tab20").colors
    markers = "os^vD<>pP*hX"
    style = {v: (colours[i % 20], markers[i % len(markers)]) for i, v in enumerate(names)}
    cols = min(3, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows + 1.2), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    handles = {}
    for ax, task in zip(axes.flat, tasks):
        rs = [r for r in rows if r["task"] == task and r["density"]]
        for r in rs:
            c, m = style[r["variant"]]
            # max(0, .): Wilson's bound at 0/n or n/n lands a rounding error past the point
            yerr = [[max(0.0, r["acc"] - r["lo"])], [max(0.0, r["hi"] - r["acc"])]]
            h = ax.errorbar([r["density"]], [r["acc"]], yerr=yerr,
                            fmt=m, color=c, mfc="none", capsize=3, label=f"{r['variant']}")
            handles.setdefault(r["variant"], h)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("share of keys read at the answer")
        ax.set_ylabel("accuracy")
        bad = any(r["uninformative"] for r in rs)
        n = max((r["n"] for r in rs), default=0)
        ax.set_title(f"{task} (n={n})" + (" uninformative: dense < 50%" if bad else ""), fontsize=9)
    fig.legend([handles[v] for v in names if v in handles], [v for v in names if v in handles],
               loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12 if nrows == 1 else 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}", file=sys.stderr)


def plot_ppl_rows(rows, path, title):
    """Perplexity ratio variant / dense against keys read per query (log x), one panel per text,
    one point per variant with its block-bootstrap 95% interval; dense is the point at ratio 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    texts = list(dict.fromkeys(r["text"] for r in rows))
    import matplotlib.ticker
    fig, axes = plt.subplots(1, len(texts), figsize=(4.5 * len(texts), 3.8), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for r in (r for r in rows if r["text"] == text and r["keys_read"]):
            ax.errorbar([r["keys_read"]], [r["ratio"]],
                        yerr=[[max(0.0, r["ratio"] - r["lo"])], [max(0.0, r["hi"] - r["ratio"])]],
                        fmt="o", capsize=3, label=f"{r['variant']} ({r['density']:.1%})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("keys read per query (share of positions)")
        ax.set_ylabel("perplexity ratio vs dense")
        ax.set_title(text, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a GGUF path, a registered name, or 'passkey'")
    ap.add_argument("--length", type=int, required=True, help="tokens per prompt (or per perplexity text)")
    ap.add_argument("--protocol", choices=PROTOCOLS, help="required for task tables")
    ap.add_argument("--variants", required=True,
                    help="';'-separated: dense, an attention spec, modifiers @cache=SPEC @dl=0,1 @prefill=sparse "
                         "@uncorrected (log-weights 0: MagicPIG without its correction)")
    ap.add_argument("--tasks", default=",".join(RULER_TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--n", type=int, default=20, help="examples per task (seeds seed .. seed+n-1)")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths, taken in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-layers", default="", help="layers kept dense for variants without @dl=")
    ap.add_argument("--chunk", type=int, default=512,
                    help="prefill (and perplexity) tokens per forward call; a bounded cache compresses "
                         "after each call, so --chunk LENGTH compresses the prompt once, as "
                         "SnapKV, PyramidKV and Ada-KV do")
    ap.add_argument("--perplexity", action="store_true", help="perplexity ratio table instead of tasks")
    ap.add_argument("--ppl-last", type=int, metavar="N",
                    help="with --perplexity: score only the last N tokens of each text, after a dense "
                         "prefill of the rest shared by the variants that prefill dense (perplexity as "
                         "decode sees it); default: every token, the variant's attention throughout")
    ap.add_argument("--out", help="JSON path (default benchmarks/long_context_<model>_<length>_<protocol>.json)")
    ap.add_argument("--plot", help="PNG path: accuracy against the share of keys read, Wilson intervals drawn "
                                   "(with --perplexity: the ratio against keys read, bootstrap intervals drawn)")
    a = ap.parse_args(argv)

    if a.chunk < 1:
        raise SystemExit(f"--chunk: expected a positive number of tokens, got {a.chunk}")
    dl = tuple(int(x) for x in a.dense_layers.split(",") if x.strip())
    variants = [parse_variant(v, dl) for v in a.variants.split(";") if v.strip()]
    if not variants:
        raise SystemExit("--variants: no variant given")
    model = load_model(_model_path(a.model))
    stem = Path(a.model).stem if Path(a.model).is_file() else a.model
    command = "python3 benchmarks/long_context_suite.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    if a.perplexity:
        if a.protocol:
            raise SystemExit("--protocol has no meaning with --perplexity (every token is scored in one pass)")
        if a.ppl_last is not None and not 1 <= a.ppl_last < a.length:
            raise SystemExit(f"--ppl-last: expected 1 <= N < --length ({a.length}), got {a.ppl_last}")
        texts = long_texts(a.length, tokenizer=model.tokenizer)
        rows = perplexity_rows(model, texts, variants, a.length, seed=a.seed, last=a.ppl_last, chunk=a.chunk)
        print("| text | tokens | protocol | scored | variant | ppl dense | ppl variant | ratio [95% CI] "
              "| keys read (share) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            keys = "-" if r["keys_read"] is None else f"{r['keys_read']:.0f} ({r['density']:.1%})"
            print(f"| {r['text']} | {r['length']} | {r['protocol']} | {r['n']} | `{r['variant']}` | "
                  f"{r['ppl_dense']:.3f} | {r['ppl_sparse']:.3f} | {r['ratio']:.4f} [{r['lo']:.4f}, "
                  f"{r['hi']:.4f}] | {keys} |")
        if a.plot:
            scored = "every token" if a.ppl_last is None else f"last {a.ppl_last} tokens after a dense prefill"
            plot_ppl_rows(rows, a.plot, f"{stem}, {a.length} tokens, {scored}")
        result = {"rows": rows}
        last = "" if a.ppl_last is None else f"_last{a.ppl_last}"
        out = a.out or ROOT / "benchmarks" / f"long_context_ppl_{stem}_{a.length}{last}.json"
    else:
        if a.ppl_last is not None:
            raise SystemExit("--ppl-last needs --perplexity (it picks the scored tokens of a text)")
        if a.protocol is None:
            raise SystemExit("--protocol is required for a task table (query-aware or query-agnostic)")
        tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise SystemExit(f"--tasks: unknown {bad}; known: {', '.join(TASKS)}")
        exs = make_task_set(tasks, model.tokenizer, a.length, _floats(a.depths, "--depths"), a.n, a.seed)

        def progress(done, total):
            print(f"\r{done}/{total} runs, {time.time() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        result = run_suite(model, exs, variants, [a.protocol], chunk=a.chunk, progress=progress)
        print(file=sys.stderr)
        print(markdown_table(result["rows"] + result["pooled"]))
        if a.plot:
            plot_rows(result["rows"] + result["pooled"], a.plot, f"{stem}, {a.length} tokens, {a.protocol}")
        out = a.out or ROOT / "benchmarks" / f"long_context_{stem}_{a.length}_{a.protocol}.json"
    result.update({"command": command, "model": str(_model_path(a.model)), "seconds": round(time.time() - t0, 1),
                   "args": vars(a)})
    Path(out).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwritten {out} ({result['seconds']} s): {command}", file=sys.stderr)


if __name__ == "__main__":
    main()
