"""`minisparse chat`: one answer to -p, or a conversation read line by line from stdin, through
the model's chat template. Left out on purpose: a REPL with editing and history."""
from __future__ import annotations

import sys

from . import flags
from .flags import CLIError


def add_parser(sub):
    c = sub.add_parser("chat", help="chat with the model's chat template (e.g. -m smollm2)")
    flags.add_model_args(c)
    c.add_argument("-p", "--prompt", default="", help="one message; without it, read turns from stdin")
    c.add_argument("--system", default="", help="system message")
    flags.add_context_arg(c)
    flags.add_sampling_args(c)
    flags.add_attention_args(c)
    flags.add_kv_arg(c)
    c.set_defaults(func=run)


def encode_chat(tok, messages):
    """Token ids of a chat prompt: the template's own special tokens are parsed, and BOS is not
    added twice when the template already writes it."""
    from ..chat import apply_chat_template
    text = apply_chat_template(tok, messages)
    bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
    add_bos = None if not (bos and text.startswith(bos)) else False
    return tok.encode(text, add_bos=add_bos, parse_special=True)


def run(args):
    sampling = flags.sampling(args)
    selector, dense_layers = flags.attention(args)
    kv = flags.kv(args)
    model, _ = flags.load(args, dense_layers, dequant=args.dequant, ctx_size=args.ctx_size)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt else (line.rstrip("\n") for line in sys.stdin)
    stats = [] if selector is not None else None
    for user in turns:
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = encode_chat(model.tokenizer, messages)
        if len(ids) >= model.config.context_length:
            raise CLIError(f"the conversation has {len(ids)} tokens but the context holds "
                           f"{model.config.context_length}")
        answer = []
        cache = flags.kv_cache(model, kv)             # each turn re-reads the whole conversation
        for piece in model.generate(ids, **sampling, attention=selector, dense_layers=dense_layers,
                                    stats=stats, cache=cache):
            answer.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})
        if kv is not None:
            print(flags.kv_line(cache), file=sys.stderr)
    if stats is not None:
        print(flags.density_line(stats, model.config.n_layers), file=sys.stderr)
    return 0
