"""Cache policy specs, shared by the CLI (`ask --cache`), the lab (`eval --variants`) and tests.

`dense`, `recursive=B512[/n4][/b64][/acc][/perhead]` (budget, protection divisor, block,
accumulate mode, per-KV-head keep sets), `streaming=4+508[/reassigned]` (sinks + window),
`press=0.5` (kvpress-style compression ratio). Left out on purpose: choosing the scorer here
(RecursiveCompressor's default scorer is used; build one in Python for another).
"""
from __future__ import annotations

CACHE_NAMES = ("recursive", "streaming", "press")     # the bounded ones; "dense" = KVCache


def parse_cache_spec(spec: str, model):
    """A new, empty cache for `spec` and `model` (a Model: streaming re-assignment needs it).

    >>> import minisparse                                                   # doctest: +SKIP
    >>> parse_cache_spec("streaming=4+60", model)                           # doctest: +SKIP
    """
    from . import PressCache, RecursiveCompressor, StreamingCache
    name, _, val = spec.partition("=")
    name, parts = name.strip().lower(), [p for p in val.strip().split("/") if p]
    if name == "dense" and not parts:
        return model.new_cache()
    if name not in CACHE_NAMES:
        raise ValueError(f"cache spec {spec!r}: unknown cache {name!r}; known: dense, {', '.join(CACHE_NAMES)}")
    if not parts:
        raise ValueError(f"cache spec {spec!r}: needs a value, e.g. recursive=B512, streaming=4+508, press=0.5")
    try:
        if name == "recursive":
            kw = {"budget": int(parts[0].lstrip("Bb"))}
            for p in parts[1:]:
                if p[0] == "n":
                    kw["protection_divisor"] = int(p[1:])
                elif p[0] == "b":
                    kw["block"] = int(p[1:])
                elif p == "acc":
                    kw["mode"] = "accumulate"
                elif p == "perhead":
                    kw["per_head"] = True
                else:
                    raise ValueError(f"unknown option {p!r} (n<divisor>, b<block>, acc, perhead)")
            return RecursiveCompressor(**kw)
        if name == "streaming":
            s, _, w = parts[0].partition("+")
            mode = "reassigned" if "reassigned" in parts[1:] else "original"
            return StreamingCache(int(s), int(w), mode, model=model)
        return PressCache(float(parts[0]))
    except ValueError as e:
        raise ValueError(f"cache spec {spec!r}: {e}") from None


def max_keys(cache):
    """The most positions `cache` keeps: its budget (recursive), sinks + window (streaming), or
    None when no fixed number bounds it (the dense KVCache; press, which keeps a ratio)."""
    budget = getattr(cache, "budget", None)
    if budget is None and hasattr(cache, "sinks") and hasattr(cache, "window"):
        return cache.sinks + cache.window
    return budget
