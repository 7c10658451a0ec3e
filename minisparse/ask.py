"""`minisparse ask`: prefill a long document once, keep its KV cache on disk, ask many questions.

Workflow: read the files -> wrap them in the model's chat template -> print the cost (tokens,
KV bytes for the chosen cache policy, time estimated from a measured warm-up) -> prefill in
chunks with a progress bar -> save the cache (minisparse.persist) -> answer, streaming. The next
`ask` about the same document, model and policies loads the cache memory-mapped and skips the
prefill. Left out on purpose: retrieval/chunk ranking (the whole document is read), batching.

By default the document is prefilled dense and only the answer runs the selector (the top-k
attention paper's protocol, Gupta et al. 2021): the saved dense cache then serves every
attention spec. `prefill="sparse"` runs the selector in the prefill too. The saved cache's key
covers everything its K/V depend on: the model file, the document, the attention the prefill
ran ("dense", or the spec and the layers it keeps dense), the cache policy, the prefill chunk. Two `ask` runs
on the same document at once both prefill and both answer; each writes its own temporary folder
and renames it into place (minisparse.persist), so one complete cache ends up on disk, the last
to land, and nothing half-written is ever loaded. No lock: waiting on another process's prefill would save nothing
when it is killed, and two prefills of one document are rare. The command line is in
minisparse/cli/ask.py.
"""
from __future__ import annotations

import sys
import time

from .errors import MinisparseError
from .progress import Progress
from .persist import CacheError, cache_dir, cache_key, load_cache, save_cache

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


def beyond_context_warning(n, trained, why) -> str:
    """The one wording of the note printed when a run goes past the context a model was trained on."""
    return f"[beyond the trained context: {n} > {trained} tokens; {why}]"


def read_documents(paths) -> str:
    """The files' text joined by blank lines; a file that is missing or not UTF-8 is refused,
    named (replacing its bytes would answer about a text nobody wrote)."""
    docs = []
    for f in paths:
        try:
            with open(f, encoding="utf-8") as fh:
                docs.append(fh.read())
        except OSError as e:
            raise MinisparseError(f"--context {f}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise MinisparseError(f"--context {f}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                                  f"offset {e.start}); convert it first, e.g. iconv -t utf-8") from None
    return "\n\n".join(docs)


PREFILL = ("dense", "sparse")     # what the document's prefill runs: see prepare


def answer(model, model_path, document, question, *, sampling=None, **kw):
    """Yield the answer's text pieces (prepare, then Model.generate from the prepared cache).

    sampling: Model.generate's keyword arguments (max_new_tokens, temperature, top_k, ...);
    the others are prepare's.
    """
    sampling = sampling or {}
    cache, suffix = prepare(model, model_path, document, question,
                            n_predict=sampling.get("max_new_tokens", 128), **kw)
    yield from model.generate(suffix, **sampling, attention=kw.get("attention"),
                              dense_layers=cache_layers(kw.get("attention"), kw.get("dense_layers", ())),
                              cache=cache, add_bos=False, stats=kw.get("stats"))


def cache_layers(attention, dense_layers):
    """The dense layers that matter: none without a sparse attention."""
    return tuple(sorted(set(dense_layers))) if attention is not None else ()


def prepare(model, model_path, document, question, *, n_predict=128, files=(), cache_spec="dense",
            chunk=256, attention=None, dense_layers=(), prefill="dense", use_saved=True,
            stats=None, log=None):
    """(cache holding the document, the question's token ids): the saved cache when it is
    whole and for this key, else a prefill (saved unless use_saved is False). The cost, the
    cache used and the notes go to `log` (stderr).

    attention: a selector or None (dense), what the answer reads with. prefill: "dense" (the
    document's K/V do not depend on the selector, so one saved cache serves every attention
    spec) or "sparse" (the prefill runs the selector too; its spec string, str(attention), and
    dense_layers are then part of the cache key). stats: a list that receives forward's
    per-layer attention records of the prefill (a sparse one only).
    """
    log = log or sys.stderr
    if chunk < 1:
        raise MinisparseError(f"--chunk: expected a positive number of tokens, got {chunk}")
    if prefill not in PREFILL:
        raise MinisparseError(f"--prefill: expected one of {', '.join(PREFILL)}, got {prefill!r}")
    if prefill == "dense":           # the K/V of a dense prefill are the same for every selector
        attention, dense_layers, stats = None, (), None
    cfg = model.config
    prefix, suffix = split_prompt(model.tokenizer, document, question)
    n = len(prefix) + len(suffix) + n_predict
    cache, bound = make_cache(model, cache_spec)
    held = n if bound is None else min(n, bound)
    need = kv_bytes(cfg, held)
    label = ""
    if n > cfg.context_length:
        if bound is None:
            raise MinisparseError(f"the document and question take {n} tokens but {model_path} was "
                                  f"trained on {cfg.context_length}; run with a bounded cache, e.g. "
                                  f"--cache streaming=4+{cfg.context_length // 2}")
        label = beyond_context_warning(n, cfg.context_length, f"attention bounded by --cache {cache_spec}")
    avail = available_memory()
    print(f"document: {len(prefix)} tokens, question: {len(suffix)} tokens; KV cache "
          f"({cache_spec or 'dense'}): {fmt_bytes(need)}", file=log)
    if avail is not None and need > 0.8 * avail:
        fit = int(0.5 * avail / kv_bytes(cfg, 1))
        raise MinisparseError(f"the KV cache would need {fmt_bytes(need)} but {fmt_bytes(avail)} is "
                              f"available; use a bounded cache such as --cache recursive=B{fit}")
    attn_label = str(attention) if attention is not None else "dense"
    dense_layers = cache_layers(attention, dense_layers)
    key = cache_key(model_path, document, attn_label, cache_spec or "dense", dense_layers, chunk)
    folder = cache_dir() / key
    loaded = None
    if folder.exists() and use_saved:
        try:
            loaded = load_cache(folder, model, key=key, next_pos=len(prefix))
            print(f"using the saved cache {folder} ({len(loaded)} positions; no prefill)", file=log)
        except CacheError as e:
            print(f"saved cache rejected, rebuilding: {e}", file=log)
    if loaded is None:
        warm = min(64, len(prefix))
        model.forward(prefix[:8], model.new_cache(), attention=attention)     # compile/load kernels
        t0 = time.perf_counter()
        model.forward(prefix[:warm], model.new_cache(), attention=attention)
        rate = warm / max(time.perf_counter() - t0, 1e-9)
        print(f"estimated prefill time: {len(prefix) / rate:.0f} s (warm-up {rate:.0f} tok/s on "
              f"{warm} tokens; attention grows with length, so this is a lower bound)", file=log)
        t0, c0 = time.perf_counter(), time.process_time()
        with Progress("prefill", stream=log) as bar:
            model.prefill(prefix, cache, chunk=chunk, progress=bar, attention=attention,
                          dense_layers=dense_layers, stats=stats)
        # CPU time as well as wall: on a shared machine the wall time says more about the others
        print(f"prefill: {len(prefix)} tokens in {time.perf_counter() - t0:.2f} s "
              f"({time.process_time() - c0:.2f} s CPU, all threads)", file=log)
        if cache.next_pos != len(prefix):    # never save (and later answer from) a partial cache
            raise MinisparseError(f"the prefill took in {cache.next_pos} of {len(prefix)} tokens; "
                                  f"nothing saved")
        if use_saved:
            save_cache(cache, folder, key=key, extra={
                "model": str(model_path), "tokens": len(prefix), "files": list(map(str, files)),
                "attention": attn_label, "dense_layers": list(dense_layers), "cache": cache_spec or "dense",
                "chunk": chunk})
        loaded = cache
    if label:
        print(label, file=log)
    return loaded, suffix
