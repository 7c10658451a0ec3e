"""`minisparse ask`: prefill a long document once, keep its KV cache on disk, ask many questions.

Workflow: read the files -> wrap them in the model's chat template -> print the cost (tokens,
KV bytes for the chosen cache policy, time estimated from a measured warm-up) -> prefill in
chunks with a progress bar -> save the cache (minisparse.persist) -> answer, streaming. The next
`ask` about the same document, model and policies loads the cache memory-mapped and skips the
prefill. Left out on purpose: retrieval/chunk ranking (the whole document is read), batching.
"""
from __future__ import annotations

import os
import sys
import time

from .errors import MinisparseError
from .progress import Progress
from .persist import CacheError, cache_dir, cache_key, list_caches, load_cache, save_cache

SENTINEL = "\u0000MINISPARSE-QUESTION\u0000"


def split_prompt(tokenizer, document, question):
    """Token ids (prefix, suffix) such that prefix holds the document and everything before it.

    The chat template (if any) is rendered once with a sentinel where the question goes, then cut
    there, so the prefix is the same for every question about this document and can be cached.
    """
    from .chat import apply_chat_template
    content = f"{document}\n\nQuestion: {SENTINEL}"
    text = apply_chat_template(tokenizer, [{"role": "user", "content": content}])
    head, tail = text.split(SENTINEL)
    tail = question + tail
    bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else None
    add_bos = False if bos and head.startswith(bos) else None
    prefix = tokenizer.encode(head, add_bos=add_bos, parse_special=True)
    suffix = tokenizer.encode(tail, add_bos=False, parse_special=True)
    return prefix, suffix


def kv_bytes(cfg, n_positions, dtype_bytes=4):
    """Bytes of K and V for n positions: 2 * L * Hkv * n * d * bytes."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * n_positions * cfg.head_dim * dtype_bytes


def available_memory():
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_cache(model, spec):
    """A cache for the --cache spec: 'dense' or a bounded policy parsed by minisparse.cache."""
    if spec in (None, "", "dense"):
        return model.new_cache(), None
    from .cache import max_keys
    from .spec import parse_cache_spec
    cache = parse_cache_spec(spec, model)
    return cache, max_keys(cache)


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def cmd_ask(args):
    from . import load_model
    from .spec import parse_attention_spec
    from .cli import CLIError, check_sampling, resolve_model
    check_sampling(args)
    selector = parse_attention_spec(args.attention) if args.attention else None
    docs = []
    for f in args.context:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                docs.append(fh.read())
        except OSError as e:
            raise CLIError(f"--context {f}: {e.strerror}") from None
    document = "\n\n".join(docs)
    model_path = resolve_model(args.model)
    model = load_model(model_path)
    cfg = model.config
    prefix, suffix = split_prompt(model.tokenizer, document, args.prompt)
    n = len(prefix) + len(suffix) + args.n_predict
    cache, bound = make_cache(model, args.cache)
    held = n if bound is None else min(n, bound)
    need = kv_bytes(cfg, held)
    label = ""
    if n > cfg.context_length:
        if bound is None:
            raise CLIError(f"the document and question take {n} tokens but {model_path} was trained "
                           f"on {cfg.context_length}; run with a bounded cache, e.g. --cache "
                           f"streaming=4+{cfg.context_length // 2}")
        label = (f"[beyond the trained context: {n} > {cfg.context_length} tokens; "
                 f"attention bounded by --cache {args.cache}]")
    avail = available_memory()
    print(f"document: {len(prefix)} tokens, question: {len(suffix)} tokens; KV cache "
          f"({args.cache or 'dense'}): {fmt_bytes(need)}", file=sys.stderr)
    if avail is not None and need > 0.8 * avail:
        fit = int(0.5 * avail / kv_bytes(cfg, 1))
        raise CLIError(f"the KV cache would need {fmt_bytes(need)} but {fmt_bytes(avail)} is available; "
                       f"use a bounded cache such as --cache recursive=B{fit}")
    attn_label = args.attention or "dense"
    key = cache_key(model_path, document, attn_label, args.cache or "dense")
    folder = cache_dir() / key
    loaded = None
    if folder.exists() and not args.no_cache:
        try:
            loaded = load_cache(folder, model, key=key)
            print(f"using the saved cache {folder} ({len(loaded)} positions; no prefill)", file=sys.stderr)
        except CacheError as e:
            print(f"saved cache rejected, rebuilding: {e}", file=sys.stderr)
    if loaded is None:
        warm = min(64, len(prefix))
        model.forward(prefix[:8], model.new_cache(), attention=selector)     # compile/load kernels
        t0 = time.perf_counter()
        model.forward(prefix[:warm], model.new_cache(), attention=selector)
        rate = warm / max(time.perf_counter() - t0, 1e-9)
        print(f"estimated prefill time: {len(prefix) / rate:.0f} s (warm-up {rate:.0f} tok/s on "
              f"{warm} tokens; attention grows with length, so this is a lower bound)", file=sys.stderr)
        model.prefill(prefix, cache, chunk=args.chunk, progress=Progress("prefill"), attention=selector)
        if not args.no_cache:
            save_cache(cache, folder, key=key, extra={"model": str(model_path), "tokens": len(prefix),
                                                      "files": list(map(str, args.context)),
                                                      "attention": attn_label, "cache": args.cache or "dense"})
        loaded = cache
    if label:
        print(label, file=sys.stderr)
    t0 = time.perf_counter()
    first = None
    for piece in model.generate(suffix, max_new_tokens=args.n_predict, temperature=args.temp,
                                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repeat_penalty=args.repeat_penalty, seed=args.seed,
                                attention=selector, cache=loaded, add_bos=False):
        first = first or time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"time to first answer token: {(first or time.perf_counter()) - t0:.2f} s", file=sys.stderr)
    return 0


def cmd_cache(args):
    rows = list_caches()
    if args.action == "ls":
        total = 0
        for folder, header, size in rows:
            total += size
            extra = (header or {}).get("extra", {})
            what = (f"{extra.get('tokens', '?')} tokens of {', '.join(extra.get('files', [])) or '?'} "
                    f"with {os.path.basename(extra.get('model', '?'))}, cache {extra.get('cache', '?')}"
                    if header else "unreadable header")
            print(f"{folder.name}  {fmt_bytes(size):>10}  {what}")
        print(f"{len(rows)} cached documents, {fmt_bytes(total)} in {cache_dir()}")
    else:
        import shutil
        names = set(args.keys)
        for folder, _, size in rows:
            if args.all or folder.name in names:
                shutil.rmtree(folder)
                names.discard(folder.name)
                print(f"removed {folder.name} ({fmt_bytes(size)})")
        if names:
            raise MinisparseError(f"no cached document named {', '.join(sorted(names))} in {cache_dir()}")
    return 0


def add_parsers(sub):
    from .cli import add_sampling_args
    a = sub.add_parser("ask", help="prefill documents once, then answer questions about them")
    a.add_argument("-m", "--model", default="default")
    a.add_argument("--context", nargs="+", required=True, help="text files to read")
    a.add_argument("-p", "--prompt", required=True, help="the question")
    a.add_argument("--cache", default="dense", help='cache policy: dense, streaming=4+1020, recursive=B2048 (see minisparse/spec.py)')
    a.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    a.add_argument("--no-cache", action="store_true", help="do not read or write the saved cache")
    add_sampling_args(a)
    a.set_defaults(func=cmd_ask)
    c = sub.add_parser("cache", help="list or remove saved document caches")
    c.add_argument("action", choices=["ls", "rm"])
    c.add_argument("keys", nargs="*")
    c.add_argument("--all", action="store_true", help="with rm: remove every cached document")
    c.set_defaults(func=cmd_cache)
