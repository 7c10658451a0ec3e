"""One lab run, as `minisparse eval` asks for it: texts and/or pass-key needles through every
variant, then results.json, results.md and (when matplotlib is there) PNGs in one folder.

Leaves out the flags (minisparse/cli/eval.py), the metrics (runner.py / metrics.py) and the
plots' drawing (plots.py).
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


def run_eval(args, model, path, dense_layers, plots=True):
    """Run what the parsed `eval` arguments ask for on `model` (loaded from `path`) and write the
    results to args.out; plots=False writes the tables only. Returns the results dict."""
    from ..errors import MinisparseError
    from . import needle as N
    from ..progress import Progress
    from .runner import markdown_table, parse_variants, run_text
    from .texts import builtin_text
    variants = parse_variants(args.variants, model, args.seed, kv=args.kv)
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
                raise MinisparseError(f"--text {args.text}: {e}") from None
        else:
            text = builtin_text(args.builtin)
        ids = model.tokenizer.encode(text)[: args.ctx_size]
        if len(ids) < 2:
            raise MinisparseError(f"the text encodes to {len(ids)} tokens; need at least 2")
        res["text_name"] = args.text or args.builtin
        with Progress("eval text") as bar:
            txt = run_text(model, ids, variants, args.analysis, dense_layers, args.chunk,
                           args.protocol, bar, seed=args.seed)
        txt["sha256_tokens"] = hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()
        res["text"] = txt
    if args.needle:
        lengths = [int(x) for x in _floats(args.needle_lengths, "--needle-lengths")]
        depths = _floats(args.needle_depths, "--needle-depths")
        prot = tuple(p.strip() for p in args.needle_protocols.split(",") if p.strip())
        if any(p not in ("A", "B") for p in prot):
            raise MinisparseError(f"--needle-protocols: expected A and/or B, got {args.needle_protocols!r}")
        seeds = list(range(args.seed, args.seed + args.needle_seeds))
        with Progress("eval needle", "runs") as bar:
            res["needle"] = N.run_needle(model, variants, lengths, depths, seeds, prot,
                                         dense_layers, bar)
    res["variants_parsed"] = [{"spec": v.spec, "kind": v.kind, "error": v.error, "nominal": v.nominal}
                              for v in variants]
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=_json_default))
    md = []
    if res["text"]:
        md.append(markdown_table(res))
    if res["needle"]:
        md.append(needle_table(res["needle"]))
    (out / "results.md").write_text("\n".join(md))
    sys.stdout.write("\n".join(md))
    if plots:
        from .plots import needle_heatmaps, quality_vs_density
        if res["text"]:
            quality_vs_density(res, out / "quality_vs_density.png")
        if res["needle"]:
            needle_heatmaps(res, out / "needle.png")
    print(f"minisparse eval: wrote {out}/results.json, results.md{' and plots' if plots else ''} "
          f"in {res['wall_seconds']} s", file=sys.stderr)
    return res


def command_line(args) -> str:
    """The command that reproduces this run, rebuilt from the parsed arguments."""
    import shlex
    parts = ["minisparse", "eval", "-m", args.model, "--variants", args.variants]
    if args.text or args.builtin:
        parts += ["--text", args.text] if args.text else ["--builtin", args.builtin]
        parts += ["-c", str(args.ctx_size), "--analysis", str(args.analysis), "--protocol", args.protocol]
    if args.dense_layers:
        parts += ["--dense-layers", args.dense_layers]
    if args.kv:
        parts += ["--kv", args.kv]
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
