"""`minisparse ask`: the command line of minisparse/ask.py (prefill a document once, keep its KV
cache on disk, answer questions about it)."""
from __future__ import annotations

import sys
import time

from . import flags


def add_parser(sub):
    a = sub.add_parser("ask", help="prefill documents once, then answer questions about them")
    flags.add_model_args(a, dequant=False)
    a.add_argument("--context", nargs="+", required=True, help="UTF-8 text files to read")
    a.add_argument("-p", "--prompt", required=True, help="the question")
    a.add_argument("--cache", default="dense",
                   help="cache policy: dense, streaming=4+1020, recursive=B2048/knorm, press=0.5/tova, "
                        "pyramid=512, adakv=512 (scorers: docs/caches.md; grammar: minisparse/spec.py)")
    a.add_argument("--chunk", type=flags.positive_int, default=256, help="prefill chunk (tokens)")
    a.add_argument("--no-cache", action="store_true", help="do not read or write the saved cache")
    a.add_argument("--prefill", choices=("dense", "sparse"), default="dense",
                   help="what the document's prefill runs: dense (default; one saved cache serves "
                        "every --attention) or sparse (the --attention selector, prefill included)")
    flags.add_sampling_args(a)
    flags.add_attention_args(a)
    flags.add_kv_arg(a)
    a.set_defaults(func=run)


def run(args):
    from ..ask import cache_layers, prepare, read_documents
    sampling = flags.sampling(args)
    selector, dense_layers = flags.attention(args)
    kv = flags.kv(args, args.cache)
    if args.prefill == "sparse" and selector is None:
        raise flags.CLIError("--prefill sparse: only means something with --attention (without it "
                             "the prefill is dense)")
    document = read_documents(args.context)
    model, model_path = flags.load(args, dense_layers)
    stats = [] if selector is not None else None
    cache, suffix = prepare(model, model_path, document, args.prompt, n_predict=args.n_predict,
                            files=args.context, cache_spec=kv or args.cache, chunk=args.chunk,
                            attention=selector, dense_layers=dense_layers, prefill=args.prefill,
                            use_saved=not args.no_cache, stats=stats)
    t0, first, pos0 = time.perf_counter(), None, None
    for piece in model.generate(suffix, **sampling, attention=selector, cache=cache, add_bos=False,
                                dense_layers=cache_layers(selector, dense_layers), stats=stats):
        if first is None:                         # each later decode step adds one position
            first, pos0 = time.perf_counter(), cache.next_pos
        sys.stdout.write(piece)
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    if kv is not None:
        print(flags.kv_line(cache), file=sys.stderr)
    print(f"time to first answer token: {(first or end) - t0:.2f} s", file=sys.stderr)
    steps = cache.next_pos - pos0 if pos0 is not None else 0
    if steps > 0:
        print(f"answer decode: {steps} steps after the first token, "
              f"{1e3 * (end - first) / steps:.1f} ms a step", file=sys.stderr)
    if stats is not None:
        print(flags.density_line(stats, model.config.n_layers), file=sys.stderr)
    return 0
