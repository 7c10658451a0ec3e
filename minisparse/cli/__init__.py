"""The `minisparse` command: generate, chat, ask, cache, info, eval, duo; one file per command.

Flags follow llama.cpp's (`-m -p -n --temp --top-k --top-p --seed -c`), and the ones commands
share are defined once in flags.py. Every expected failure (bad file, bad value, prompt too long)
is one line on stderr and exit code 2; `--debug` shows the traceback. Left out on purpose: an
interactive REPL, server mode.

A new command is a module here with `add_parser(subparsers)` (adds its parser, sets `func`),
imported below and listed in COMMANDS.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import MinisparseError
from . import ask, cache, chat, duo, generate, info
from . import eval as eval_command
from .chat import encode_chat
from .flags import EXIT_USAGE, CLIError

COMMANDS = (generate, chat, info, ask, cache, eval_command, duo)

__all__ = ["main", "build_parser", "CLIError", "encode_chat", "COMMANDS"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2), like every other expected failure."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def set_threads(n):
    """Run on at most n threads: Numba's (at most the NUMBA_NUM_THREADS it started with), the
    prefill pool's and BLAS's (fast.threads.set_threads)."""
    import numba

    from ..fast.threads import set_threads as limit_threads
    top = numba.config.NUMBA_NUM_THREADS
    if n > top:
        raise CLIError(f"--threads {n}: at most {top} (NUMBA_NUM_THREADS; this machine has "
                       f"{os.cpu_count()} cores)")
    limit_threads(n)


def build_parser():
    from .flags import positive_int
    ap = Parser(prog="minisparse", description=__doc__.splitlines()[0])
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("-t", "--threads", type=positive_int, default=None,
                    help="threads for every pool: the Numba kernels, the prefill workers and BLAS "
                         "(default: every core; parallel kernels then leave out the cores other "
                         "processes are using at the moment)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.threads is not None:
            set_threads(args.threads)
        return args.func(args) or 0
    except (MinisparseError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"minisparse: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
