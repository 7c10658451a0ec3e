"""`minisparse info`: describe a model from its metadata and tensor table; only --check reads
the weights, one tensor at a time."""
from __future__ import annotations

from . import flags
from .flags import CLIError


def add_parser(sub):
    i = sub.add_parser("info", help="describe a GGUF model")
    i.add_argument("model", nargs="?", default="default")
    i.add_argument("--check", action="store_true", help="report NaN/inf in weights")
    i.set_defaults(func=run)


def run(args):
    from ..gguf_io import open_gguf, read_config, tensor_to_float32
    from ..tokenizer import load_tokenizer
    path = flags.resolve_model(args.model)
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
