"""The `minisparse` command: generate, info (and the subcommands other modules register).

Flags follow llama.cpp's (`-m -p -n --temp --top-k --top-p --seed -c`). Every expected failure
(bad file, bad value, prompt too long) is one line on stderr and exit code 2; `--debug` shows the
traceback. Left out on purpose: an interactive REPL, server mode.

A subcommand lives in its own module and registers here in SUBCOMMANDS as
"name": "module:add_parser" where add_parser(subparsers) adds its parser and sets `func`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

SUBCOMMANDS = {
    # name: "module:function" adding the parser(s)
    "ask, cache": "minisparse.ask:add_parsers",
    "eval": "minisparse.lab.cli:add_parser",
}

EXIT_USAGE = 2
DEQUANT_HELP = ("--no-dequant (default): quantised matrices stay as their GGUF blocks, memory about "
                "the file size; --dequant: every weight float32 at load, the reference path, 4-8x "
                "the memory (docs/performance.md)")


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def resolve_model(name):
    """-m accepts a path or a registered name (`default`, `smollm2`, ...)."""
    from .registry import resolve
    return resolve(name)


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def add_sampling_args(p):
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None, help="makes a sampled run reproducible")
    p.add_argument("--attention", default=None, help='attention spec, e.g. "sinks=4,window=128"')
    p.add_argument("--dense-layers", default="", help="comma-separated layers kept dense")


def parse_layers(s):
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise CLIError(f"--dense-layers: expected comma-separated integers, got {s!r}") from None


def check_sampling(args):
    """Refuse bad sampling values before loading anything."""
    from .sampling import Sampler
    if args.n_predict < 0:
        raise CLIError(f"-n: expected a number of tokens >= 0, got {args.n_predict}")
    Sampler(args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.seed)


def cmd_generate(args):
    from .attention import parse_attention_spec
    from . import load_model
    check_sampling(args)
    selector = None
    if args.attention:
        try:
            selector = parse_attention_spec(args.attention)
        except ValueError as e:
            raise CLIError(f"--attention: {e}") from None
    model = load_model(resolve_model(args.model), dequant=args.dequant)
    if args.ctx_size:
        model.config = type(model.config)(**{**model.config.__dict__, "context_length": args.ctx_size})
    tok = model.tokenizer
    ids = tok.encode(args.prompt)
    if len(ids) >= model.config.context_length:
        raise CLIError(f"the prompt has {len(ids)} tokens but the context (-c) holds "
                       f"{model.config.context_length}; shorten the prompt or raise -c")
    t0 = time.perf_counter()
    pieces = model.generate(ids, max_new_tokens=args.n_predict, temperature=args.temp,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repeat_penalty=args.repeat_penalty, seed=args.seed,
                            attention=selector, dense_layers=parse_layers(args.dense_layers))
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
    return 0


def encode_chat(tok, messages):
    """Token ids of a chat prompt: the template's own special tokens are parsed, and BOS is not
    added twice when the template already writes it."""
    from .chat import apply_chat_template
    text = apply_chat_template(tok, messages)
    bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
    add_bos = None if not (bos and text.startswith(bos)) else False
    return tok.encode(text, add_bos=add_bos, parse_special=True)


def cmd_chat(args):
    """One answer to -p, or a conversation read line by line from stdin."""
    from . import load_model
    check_sampling(args)
    model = load_model(resolve_model(args.model), dequant=args.dequant)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt else (line.rstrip("\n") for line in sys.stdin)
    for user in turns:
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = encode_chat(model.tokenizer, messages)
        if len(ids) >= model.config.context_length:
            raise CLIError(f"the conversation has {len(ids)} tokens but the context holds "
                           f"{model.config.context_length}")
        answer = []
        for piece in model.generate(ids, max_new_tokens=args.n_predict, temperature=args.temp,
                                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                    repeat_penalty=args.repeat_penalty, seed=args.seed):
            answer.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})
    return 0


def cmd_info(args):
    """Describe a model from its metadata and tensor table; only --check reads the weights,
    one tensor at a time."""
    from .gguf_io import open_gguf, read_config, tensor_to_float32
    from .tokenizer import load_tokenizer
    path = resolve_model(args.model)
    f = open_gguf(path, model=True)
    cfg = read_config(f, path)
    types = {}
    for t in f.tensors:
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
    n_params = sum(t.n_elements for t in f.tensors)
    print(f"{'file':<16}{path}")
    for k, v in cfg.__dict__.items():
        print(f"{k:<16}{v}")
    print(f"{'parameters':<16}{n_params:,}")
    print(f"{'tensor types':<16}{', '.join(f'{k} x{v}' for k, v in sorted(types.items()))}")
    tok = load_tokenizer(f)
    print(f"{'tokenizer':<16}{tok.model} (pre {tok.pre}), {tok.vocab_size} tokens, bos {tok.bos_id}, eos {tok.eos_id}")
    if args.check:
        import numpy as np
        bad = [t.name.removesuffix(".weight") for t in f.tensors
               if not np.all(np.isfinite(tensor_to_float32(t, path)))]
        if bad:
            raise CLIError(f"{path}: non-finite values (NaN/inf) in tensors: {', '.join(bad)}")
        print(f"{'check':<16}all tensors finite")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2), like every other expected failure."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def set_threads(n):
    """Run on at most n threads: Numba's (at most the NUMBA_NUM_THREADS it started with), the
    prefill pool's and BLAS's (threads.set_threads)."""
    import numba

    from .threads import set_threads as limit_threads
    top = numba.config.NUMBA_NUM_THREADS
    if n > top:
        raise CLIError(f"--threads {n}: at most {top} (NUMBA_NUM_THREADS; this machine has "
                       f"{os.cpu_count()} cores)")
    limit_threads(n)


def build_parser():
    ap = Parser(prog="minisparse", description=__doc__.splitlines()[0])
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("-t", "--threads", type=positive_int, default=None,
                    help="threads for every pool: the Numba kernels, the prefill workers and BLAS "
                         "(default: every core; parallel kernels then leave out the cores other "
                         "processes are using at the moment)")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("-m", "--model", default="default", help="GGUF path or a registered name")
    g.add_argument("-p", "--prompt", default="", help="prompt text")
    g.add_argument("-c", "--ctx-size", type=positive_int, default=None, help="context length")
    g.add_argument("--dequant", action=argparse.BooleanOptionalAction, default=False, help=DEQUANT_HELP)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat with the model's chat template (e.g. -m smollm2)")
    c.add_argument("-m", "--model", default="default", help="GGUF path or a registered name")
    c.add_argument("-p", "--prompt", default="", help="one message; without it, read turns from stdin")
    c.add_argument("--system", default="", help="system message")
    c.add_argument("--dequant", action=argparse.BooleanOptionalAction, default=False, help=DEQUANT_HELP)
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="describe a GGUF model")
    i.add_argument("model", nargs="?", default="default")
    i.add_argument("--check", action="store_true", help="report NaN/inf in weights")
    i.set_defaults(func=cmd_info)

    for name, target in SUBCOMMANDS.items():
        mod, fn = target.split(":")
        getattr(importlib.import_module(mod), fn)(sub)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    from .errors import MinisparseError
    try:
        if args.threads is not None:
            set_threads(args.threads)
        return args.func(args) or 0
    except (CLIError, MinisparseError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"minisparse: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
