"""The flags the commands share, defined once, and their checks.

`generate`, `chat` and `ask` take the same sampling flags, `--attention` / `--dense-layers`, and
(`generate`, `chat`) `-c`; these and `eval` take `--kv` (how the cache stores K and V); each flag is checked before the model loads where it can be, and
against the model (layer range, trained context) right after. Left out on purpose: config files,
environment variables standing in for flags.
"""
from __future__ import annotations

import argparse
import sys

from ..ask import beyond_context_warning
from ..errors import MinisparseError
from ..registry import resolve

EXIT_USAGE = 2
DEQUANT_HELP = ("--no-dequant (default): quantised matrices stay as their GGUF blocks, memory about "
                "the file size; --dequant: every weight float32 at load, the reference path, 4-8x "
                "the memory (docs/performance.md)")


class CLIError(MinisparseError):
    """An expected failure: printed as one line, exit code 2."""


def resolve_model(name):
    """-m accepts a path or a registered name (`default`, `smollm2`, ...)."""
    return resolve(name)


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


# ----------------------------------------------------------------------------- definitions


def add_model_args(p, dequant=True):
    p.add_argument("-m", "--model", default="default", help="GGUF path or a registered name")
    if dequant:
        p.add_argument("--dequant", action=argparse.BooleanOptionalAction, default=False,
                       help=DEQUANT_HELP)


def add_sampling_args(p):
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None, help="makes a sampled run reproducible")


def add_attention_args(p):
    p.add_argument("--attention", default=None,
                   help='attention spec, e.g. "sinks=4,window=128" (docs/selectors.md); prints the '
                        'realised density on stderr')
    p.add_argument("--dense-layers", default="",
                   help="comma-separated layers kept dense under --attention (0 = the first)")


def add_kv_arg(p):
    p.add_argument("--kv", default="f32",
                   help="how the KV cache stores keys and values: f32 (float32, the default) or "
                        "kivi2[/g<G>][/r<R>] (KIVI 2-bit: keys per channel, values per token, in "
                        "groups of G=32, the last R=128 tokens float32; docs/caches.md)")


def add_context_arg(p):
    p.add_argument("-c", "--ctx-size", type=positive_int, default=None,
                   help="context length (default: the model's trained context)")


# ----------------------------------------------------------------------------- checks


def sampling(args) -> dict:
    """Model.generate's sampling keywords from the flags; bad values refused before loading."""
    from ..sampling import Sampler
    if args.n_predict < 0:
        raise CLIError(f"-n: expected a number of tokens >= 0, got {args.n_predict}")
    Sampler(args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.seed)
    return {"max_new_tokens": args.n_predict, "temperature": args.temp, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed}


def parse_layers(s):
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise CLIError(f"--dense-layers: expected comma-separated integers, got {s!r}") from None


def attention(args):
    """(selector or None, dense layers) from --attention / --dense-layers, before loading.

    --dense-layers without --attention is refused: every layer is dense then, and a flag that
    changes nothing would be a silently ignored flag."""
    from ..spec import parse_attention_spec
    layers = parse_layers(args.dense_layers)
    if not args.attention:
        if layers:
            raise CLIError("--dense-layers: only means something with --attention (without it "
                           "every layer is dense)")
        return None, ()
    try:
        return parse_attention_spec(args.attention), layers
    except ValueError as e:
        raise CLIError(f"--attention: {e}") from None


def kv(args, cache_spec="dense"):
    """The --kv storage as a cache spec ('kivi2/g32/r128'), or None for float32; checked before
    loading. Storage precision is its own axis (what the cache keeps is --cache's), but KIVI here
    quantises the store-all cache only: with a bounded --cache it is refused, not ignored."""
    text = (args.kv or "").strip()
    if text.lower() in ("f32", "float32"):
        return None
    if text.split("/")[0].split("=")[0].lower() != "kivi2":
        raise CLIError(f"--kv: unknown storage {text!r}; expected f32 or kivi2[/g<G>][/r<R>], "
                       f"e.g. --kv kivi2/g32/r128")
    if cache_spec not in (None, "", "dense"):
        raise CLIError(f"--kv {text}: KIVI quantises the cache that keeps every position; it does "
                       f"not compose with the bounded --cache {cache_spec} (use one of the two)")
    return text


def kv_cache(model, spec):
    """A new cache for the --kv spec from `kv` (None: the dense float32 cache)."""
    if spec is None:
        return model.new_cache()
    from ..spec import parse_cache_spec
    try:
        return parse_cache_spec(spec, model)
    except ValueError as e:
        raise CLIError(f"--kv: {e}") from None


def kv_line(cache) -> str:
    """One line on what a KIVI cache holds and what float32/float16 would hold instead."""
    m = cache.memory()
    return (f"kv {cache.describe()}: {len(cache)} positions in {m['kivi2'] / 2**20:.2f} MiB "
            f"(float16 {m['float16'] / 2**20:.2f} MiB, float32 {m['float32'] / 2**20:.2f} MiB: "
            f"float16 / kivi2 = {m['ratio_float16']:.2f})")


def check_layers(layers, n_layers):
    """Refuse layer numbers the model does not have, naming the valid range."""
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise CLIError(f"--dense-layers: layer {', '.join(map(str, bad))} outside 0..{n_layers - 1} "
                       f"(the model has {n_layers} layers)")


def load(args, dense_layers, dequant=False, ctx_size=None):
    """(model, its path) for -m, with --dense-layers checked against its layers and -c applied:
    what generate, chat and ask do once their flags have passed the checks above."""
    from .. import load_model
    path = resolve_model(args.model)
    model = load_model(path, dequant=dequant)
    check_layers(dense_layers, model.config.n_layers)
    set_context(model, ctx_size)
    return model, path


def set_context(model, ctx_size, stream=None):
    """Apply -c: the context generation may fill. Past the trained context, say so (as `ask` does)."""
    if not ctx_size:
        return
    trained = model.config.context_length
    if ctx_size > trained:
        print(beyond_context_warning(ctx_size, trained, "-c asks for positions the model never "
                                     "saw in training; expect degraded text past them"),
              file=stream or sys.stderr)
    model.config = type(model.config)(**{**model.config.__dict__, "context_length": ctx_size})


def density_line(stats, n_layers) -> str:
    """Realised density from forward's stats records: keys read over causal keys, overall and
    per layer (summed over heads and rows, so long rows weigh as much as they cost)."""
    import numpy as np
    read, causal = np.zeros(n_layers), np.zeros(n_layers)
    for r in stats:
        read[r["layer"]] += np.sum(r["n_attended"])
        causal[r["layer"]] += np.sum(r["n_causal"])
    per = read / np.maximum(causal, 1)
    layers = " ".join(f"{l}:{d:.3f}" for l, d in enumerate(per))
    return (f"density (keys read / causal keys): {read.sum() / max(causal.sum(), 1):.3f} overall, "
            f"{per.min():.3f}..{per.max():.3f} by layer [{layers}]")
