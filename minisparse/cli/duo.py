"""`minisparse duo`: DuoAttention's head split. `calibrate` scores every (layer, KV head) on the
model's own synthetic pass-key examples and writes `<model>.duo.json` beside the model file (or
--out), which `--attention duo=0.5` then reads; `show` prints the heads ranked.

minisparse/lab/duo.py computes the scores; minisparse/attention/duo.py is the selector and the
file format. Left out: the paper's gate training.
"""
from __future__ import annotations

import sys

from . import flags
from .flags import CLIError


def add_parser(sub):
    d = sub.add_parser("duo", help="DuoAttention: calibrate or show the retrieval / streaming head split")
    dsub = d.add_subparsers(dest="duo_command", required=True)
    c = dsub.add_parser("calibrate", help="score the heads and write <model>.duo.json")
    flags.add_model_args(c, dequant=False)
    c.add_argument("--task", default="passkey", help="a lab task (minisparse/lab/tasks.py)")
    c.add_argument("--n", type=flags.positive_int, default=4, help="examples (seeds SEED .. SEED+n-1)")
    c.add_argument("--length", type=flags.positive_int, default=1536, help="tokens per example")
    c.add_argument("--seed", type=int, default=0, help="seed of the first example")
    c.add_argument("--sinks", type=int, default=4, help="sinks the streaming heads read")
    c.add_argument("--window", type=int, default=256, help="window the streaming heads read")
    c.add_argument("--out", default=None, help="write here instead of beside the model (then "
                   "duo= does not find it by itself)")
    c.set_defaults(func=run_calibrate)
    s = dsub.add_parser("show", help="print the heads ranked by score")
    flags.add_model_args(s, dequant=False)
    s.add_argument("--fraction", type=float, default=None, help="mark the retrieval heads at this fraction")
    s.add_argument("--top", type=int, default=None, help="print only the first N heads")
    s.set_defaults(func=run_show)


def run_calibrate(args):
    from .. import load_model
    from ..lab.duo import calibrate, save_beside
    from ..lab.tasks import TASKS
    if args.task not in TASKS:
        raise CLIError(f"--task: unknown task {args.task!r}; known: {', '.join(TASKS)}")
    if args.sinks < 0 or args.window < 0:
        raise CLIError(f"--sinks / --window: expected >= 0, got {args.sinks} / {args.window}")
    path = flags.resolve_model(args.model)
    model = load_model(path)
    progress = lambda i, n: print(f"\rexample {i}/{n}", end="", file=sys.stderr, flush=True)  # noqa: E731
    cal = calibrate(model, args.task, args.n, args.length, args.seed, args.sinks, args.window,
                    progress=progress)
    print(file=sys.stderr)
    out = cal.save(args.out) if args.out else save_beside(cal, path)
    print(f"wrote {out}: {cal.scores.size} (layer, KV head) scores from {args.n} {args.task} "
          f"examples of {args.length} tokens in {cal.cost_s:.1f} s")
    return 0


def run_show(args):
    from ..attention.duo import calibration_for
    from ..lab.duo import ranked
    if args.fraction is not None and not 0 <= args.fraction <= 1:
        raise CLIError(f"--fraction: expected a number in [0, 1], got {args.fraction}")
    path = flags.resolve_model(args.model)
    cal = calibration_for(path)
    rows = ranked(cal, args.fraction)
    print(f"# {path}: {cal.data.get('n')} {cal.data.get('task')} examples, seeds "
          f"{cal.data.get('seeds')}, sinks {cal.sinks}, window {cal.window}")
    print("rank  layer  kv_head  score    role")
    for i, (l, h, s, role) in enumerate(rows[:args.top]):
        print(f"{i:>4}  {l:>5}  {h:>7}  {s:.4f}  {role}")
    return 0
