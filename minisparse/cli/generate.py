"""`minisparse generate`: continue a prompt; the text on stdout, tokens/s (and density) on stderr."""
from __future__ import annotations

import sys
import time

from . import flags
from .flags import CLIError


def add_parser(sub):
    g = sub.add_parser("generate", help="continue a prompt")
    flags.add_model_args(g)
    g.add_argument("-p", "--prompt", default="", help="prompt text")
    flags.add_context_arg(g)
    flags.add_sampling_args(g)
    flags.add_attention_args(g)
    flags.add_kv_arg(g)
    g.set_defaults(func=run)


def run(args):
    sampling = flags.sampling(args)
    selector, dense_layers = flags.attention(args)
    kv = flags.kv(args)
    model, _ = flags.load(args, dense_layers, dequant=args.dequant, ctx_size=args.ctx_size)
    cache = flags.kv_cache(model, kv)
    ids = model.tokenizer.encode(args.prompt)
    if len(ids) >= model.config.context_length:
        raise CLIError(f"the prompt has {len(ids)} tokens but the context (-c) holds "
                       f"{model.config.context_length}; shorten the prompt or raise -c")
    stats = [] if selector is not None else None
    t0 = time.perf_counter()
    pieces = model.generate(ids, **sampling, attention=selector, dense_layers=dense_layers, stats=stats,
                            cache=cache)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    n, t_first = 0, None
    for piece in pieces:
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    t_first = t_first or t1
    pre = len(ids) / max(t_first - t0, 1e-9)
    dec = (n - 1) / max(t1 - t_first, 1e-9) if n > 1 else float("nan")
    print(f"prefill: {len(ids)} tokens, {pre:.1f} tok/s | decode: {n} pieces, {dec:.1f} tok/s | "
          f"seed {model.last_seed}", file=sys.stderr)
    if kv is not None:
        print(flags.kv_line(cache), file=sys.stderr)
    if stats is not None:
        print(flags.density_line(stats, model.config.n_layers), file=sys.stderr)
    return 0
