"""`minisparse eval`: the lab from the command line; writes results.json, results.md and PNGs.

Leaves out the metrics (runner.py / metrics.py) and the plots' drawing (plots.py).
Registered in minisparse/cli.py's SUBCOMMANDS.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _floats(s, name):
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {s!r}") from None


def add_parser(sub):
    e = sub.add_parser("eval", help="the lab: quality vs density of sparse-attention variants")
    e.add_argument("-m", "--model", default="default", help="GGUF path or a registered name")
    e.add_argument("--variants", required=True,
                   help='";"-separated specs: attention ("topk=5%%,sinks=4,window=16") or cache '
                        '("recursive=B512", "streaming=4+508")')
    src = e.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file to evaluate on")
    src.add_argument("--builtin", help="a built-in text: pydoc, copy, stdlib:MODULE, needle")
    e.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens of the text to use")
    e.add_argument("--analysis", type=int, default=256, help="analysis rows: the last N positions")
    e.add_argument("--protocol", choices=("A", "B"), default="B",
                   help="text: B = everything sparse; A = dense before the analysis rows")
    e.add_argument("--dense-layers", default="", help="comma-separated layers kept dense")
    e.add_argument("--chunk", type=int, default=512, help="tokens per forward call")
    e.add_argument("--needle", action="store_true", help="run the pass-key grid (passkey model)")
    e.add_argument("--needle-lengths", default="512,1024,2048")
    e.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1")
    e.add_argument("--needle-seeds", type=int, default=2, help="examples per cell (seeds S..S+n-1)")
    e.add_argument("--needle-protocols", default="A,B")
    e.add_argument("--seed", type=int, default=0, help="seed of samplers without ,seed= and of needles")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args):
    from .. import load_model
    from ..cli import CLIError, parse_layers, resolve_model
    from . import needle as N
    from .plots import needle_heatmaps, quality_vs_density
    from ..progress import Progress
    from .runner import markdown_table, parse_variants, run_text
    from .texts import builtin_text
    if not (args.text or args.builtin or args.needle):
        raise CLIError("eval: give --text FILE, --builtin NAME and/or --needle")
    if args.ctx_size < 2 or args.analysis < 1:
        raise CLIError(f"eval: need -c >= 2 and --analysis >= 1, got {args.ctx_size}, {args.analysis}")
    dense_layers = parse_layers(args.dense_layers)
    path = resolve_model(args.model)
    model = load_model(path)
    bad = [l for l in dense_layers if not 0 <= l < model.config.n_layers]
    if bad:
        raise CLIError(f"--dense-layers: layers {bad} outside 0..{model.config.n_layers - 1}")
    variants = parse_variants(args.variants, model, args.seed)
    for v in variants:
        if v.kind == "error":
            print(f"minisparse eval: variant {v.spec!r} skipped: {v.error}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"command": command_line(args),
           "model": str(args.model), "model_name": Path(path).stem, "model_path": str(path),
           "model_config": {k: v for k, v in model.config.__dict__.items() if isinstance(v, (int, float, str))},
           "dense_layers": list(dense_layers), "seed": args.seed, "text_name": None, "text": None,
           "needle": None, "python": platform.python_version(),
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0 = time.perf_counter()
    if args.text or args.builtin:
        if args.text:
            try:
                text = Path(args.text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CLIError(f"--text {args.text}: {e}") from None
        else:
            text = builtin_text(args.builtin)
        ids = model.tokenizer.encode(text)[: args.ctx_size]
        if len(ids) < 2:
            raise CLIError(f"the text encodes to {len(ids)} tokens; need at least 2")
        res["text_name"] = args.text or args.builtin
        txt = run_text(model, ids, variants, args.analysis, dense_layers, args.chunk, args.protocol,
                       Progress("eval text"), seed=args.seed)
        txt["sha256_tokens"] = hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()
        res["text"] = txt
    if args.needle:
        lengths = [int(x) for x in _floats(args.needle_lengths, "--needle-lengths")]
        depths = _floats(args.needle_depths, "--needle-depths")
        prot = tuple(p.strip() for p in args.needle_protocols.split(",") if p.strip())
        if any(p not in ("A", "B") for p in prot):
            raise CLIError(f"--needle-protocols: expected A and/or B, got {args.needle_protocols!r}")
        seeds = list(range(args.seed, args.seed + args.needle_seeds))
        res["needle"] = N.run_needle(model, variants, lengths, depths, seeds, prot, dense_layers,
                                     Progress("eval needle", "runs"))
    res["variants_parsed"] = [{"spec": v.spec, "kind": v.kind, "error": v.error, "nominal": v.nominal}
                              for v in variants]
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=_json_default))
    md = []
    if res["text"]:
        md.append(markdown_table(res))
        quality_vs_density(res, out / "quality_vs_density.png")
    if res["needle"]:
        md.append(needle_table(res["needle"]))
        needle_heatmaps(res, out / "needle.png")
    (out / "results.md").write_text("\n".join(md))
    sys.stdout.write("\n".join(md))
    print(f"minisparse eval: wrote {out}/results.json, results.md and plots in "
          f"{res['wall_seconds']} s", file=sys.stderr)
    return 0


def command_line(args) -> str:
    """The command that reproduces this run, rebuilt from the parsed arguments."""
    import shlex
    parts = ["minisparse", "eval", "-m", args.model, "--variants", args.variants]
    if args.text or args.builtin:
        parts += ["--text", args.text] if args.text else ["--builtin", args.builtin]
        parts += ["-c", str(args.ctx_size), "--analysis", str(args.analysis), "--protocol", args.protocol]
    if args.dense_layers:
        parts += ["--dense-layers", args.dense_layers]
    if args.needle:
        parts += ["--needle", "--needle-lengths", args.needle_lengths, "--needle-depths",
                  args.needle_depths, "--needle-seeds", str(args.needle_seeds), "--needle-protocols",
                  args.needle_protocols]
    return " ".join(shlex.quote(p) for p in parts + ["--seed", str(args.seed), "--out", args.out])


def needle_table(nd: dict) -> str:
    """Pass-key accuracy per variant and protocol, one column per length (mean over depths)."""
    lines = [f"Pass-key exact match: lengths {nd['lengths']}, depths {nd['depths']}, seeds "
             f"{nd['seeds']}, dense layers {nd['dense_layers'] or 'none'}.", "",
             "| variant | protocol | " + " | ".join(str(n) for n in nd["lengths"]) +
             " | keys read (answer) | density (answer) |",
             "|---|---|" + "---:|" * (len(nd["lengths"]) + 2)]
    for v, by in nd["accuracy"].items():
        for p, grid in sorted(by.items()):
            recs = [r for r in nd["records"] if r["variant"] == v and r["protocol"] == p and r.get("error") is None]
            ka = np.mean([r["keys_read_answer"] for r in recs]) if recs else float("nan")
            da = np.mean([r["density_answer"] for r in recs]) if recs else float("nan")
            accs = " | ".join(f"{np.nanmean(row):.2f}" for row in grid)
            lines.append(f"| `{v}` | {p} | {accs} | {ka:.1f} | {da:.3f} |")
    errs = sorted({(r["variant"], r["error"]) for r in nd["records"] if r.get("error")})
    lines += [f"\nerror in `{v}`: {e}" for v, e in errs]
    return "\n".join(lines) + "\n"


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
