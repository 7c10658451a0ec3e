"""`minisparse eval`: the lab from the command line (minisparse/lab/evaluate.py does the run).

Flags are checked, and matplotlib looked for, before the model loads: without matplotlib the
tables are written and the plots skipped, with a note that says so first.
"""
from __future__ import annotations

import sys

from . import flags
from .flags import CLIError


def add_parser(sub):
    e = sub.add_parser("eval", help="the lab: quality vs density of sparse-attention variants")
    flags.add_model_args(e, dequant=False)
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
    e.add_argument("--dense-layers", default="", help="comma-separated layers kept dense in every variant")
    e.add_argument("--chunk", type=flags.positive_int, default=512, help="tokens per forward call")
    e.add_argument("--needle", action="store_true", help="run the pass-key grid (passkey model)")
    e.add_argument("--needle-lengths", default="512,1024,2048")
    e.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1")
    e.add_argument("--needle-seeds", type=int, default=2, help="examples per cell (seeds S..S+n-1)")
    e.add_argument("--needle-protocols", default="A,B")
    e.add_argument("--seed", type=int, default=0, help="seed of samplers without ,seed= and of needles")
    flags.add_kv_arg(e)
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(func=run)



def run(args):
    from .. import load_model
    from ..lab.evaluate import run_eval
    from ..lab.plots import unavailable
    if not (args.text or args.builtin or args.needle):
        raise CLIError("eval: give --text FILE, --builtin NAME and/or --needle")
    if args.ctx_size < 2 or args.analysis < 1:
        raise CLIError(f"eval: need -c >= 2 and --analysis >= 1, got {args.ctx_size}, {args.analysis}")
    dense_layers = flags.parse_layers(args.dense_layers)
    args.kv = flags.kv(args)          # None (float32) or the kivi2 spec the variants' caches take
    if args.kv is not None and args.needle:
        raise CLIError("eval: --kv applies to the text variants; the pass-key grid (--needle) "
                       "does not take it: run the two separately")
    no_plots = unavailable()
    if no_plots:
        print(f"minisparse eval: plots skipped, tables written: {no_plots}", file=sys.stderr)
    path = flags.resolve_model(args.model)
    model = load_model(path)
    flags.check_layers(dense_layers, model.config.n_layers)
    run_eval(args, model, path, dense_layers, plots=not no_plots)
    return 0
