"""Spec strings -> selectors and caches: one grammar, one registry table for both.

    spec    := member ("," member)*            a union of selectors (a cache spec has one member)
    member  := NAME ["=" VALUE] ("," OPTION "=" VALUE)*
    VALUE   := the family's own value, parts separated by "/": "64", "2%/kv", "K8L75/5%", "B512/n4"
    OPTION  := "seed" | "mode"                  modifies the member just before it

"sinks=4,window=128" is a union of two selectors; "topp=0.95,quest=16/512" is Twilight's top-p
pruning the union of the other members (at most one topp); "random=1%x70,seed=3,mode=structural"
is one selector with two options; "streaming=4+508/reassigned" is a cache; "press=0.5/tova" a
cache with its scorer. An option a family does not
take, a value a family does not take, or a part of a value it does not know is an error naming
the token: nothing is dropped. Used by attend's callers (the model), the CLI's --attention and
--cache, and the lab's --variants. Leaves out the selectors and caches themselves; it sits above
attention/, gate/ and cache/ so that the families of all three can be registered in one table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .attention import patterns as P
from .attention.duo import Duo
from .attention.hybrid import Hybrid
from .attention.indexer import Indexer
from .attention.ivf import IVF
from .attention.loki import Loki
from .attention.lsh import LSH
from .attention.minference import VerticalSlash, ashape_from_spec
from .attention.quest import Quest
from .attention.random_mask import parse_random
from .attention.selector import Selector, Union
from .attention.sparq import SparQ
from .attention.topp import TopP
from .attention.tidal import Tidal
from .attention.topk import TopK
from .cache import SCORERS, AdaKV, KiviCache, PressCache, PyramidKV, RecursiveCompressor, StreamingCache
from .gate.gated import Gated

OPTIONS = ("seed", "mode")


@dataclass(frozen=True)
class Family:
    """One registry line. `build(value)` makes the selector (kind "attention") from the text after
    '=' (None when there is none); a cache's `build(value, model)` makes an empty cache for the
    model. `example` is a spec that parses (the round-trip test uses it); `small`, a spec that
    24 keys already exercise (the shared property suite runs it; default: the example)."""
    kind: str
    build: Callable
    example: str
    small: str | None = None


def no_value(name, make):
    """A family that takes no value: 'dense', 'logstride', 'ruvllm'."""
    def build(val):
        if val is not None:
            raise ValueError(f"'{name}={val}': {name} takes no value; write '{name}'")
        return make()
    return build


def int_value(name, make):
    """A family whose value is one integer: 'window=128'."""
    def build(val):
        if val is None:
            raise ValueError(f"'{name}' needs a value, e.g. {name}=64")
        try:
            return make(int(val))
        except ValueError as e:
            raise ValueError(f"'{name}={val}': {e}") from None
    return build


def _globals(val):
    if val is None:
        raise ValueError("'globals' needs positions, e.g. globals=0 or globals=0/5/9")
    try:
        return P.Globals([int(x) for x in val.split("/")])
    except ValueError:
        raise ValueError(f"'globals={val}': expected positions separated by '/', e.g. globals=0/5") from None


# ---- caches: build(value, model) --------------------------------------------------------
def _dense_cache(val, model):
    if val is not None:
        raise ValueError(f"'dense={val}': dense takes no value; write 'dense'")
    return model.new_cache()


def _parts(name, val, example):
    parts = [p for p in (val or "").strip().split("/") if p]
    if not parts:
        raise ValueError(f"'{name}' needs a value, e.g. {example}")
    return parts


def _scorer(p):
    """A scorer part of a cache value ('tova', 'knorm', ...), built with its defaults."""
    return SCORERS[p]()


SCORER_PARTS = ", ".join(sorted(SCORERS))


def _recursive(val, model):
    parts = _parts("recursive", val, "recursive=B512")
    kw = {"budget": int(parts[0].removeprefix("B").removeprefix("b"))}
    for p in parts[1:]:
        if p in SCORERS and "scorer" not in kw:
            kw["scorer"] = _scorer(p)
        elif p[0] == "n" and p[1:].isdigit():
            kw["protection_divisor"] = int(p[1:])
        elif p[0] == "b" and p[1:].isdigit():
            kw["block"] = int(p[1:])
        elif p == "acc":
            kw["mode"] = "accumulate"
        elif p == "perhead":
            kw["per_head"] = True
        else:
            raise ValueError(f"'recursive={val}': unknown part {p!r} (n<divisor>, b<block>, acc, "
                             f"perhead, or one scorer: {SCORER_PARTS})")
    return RecursiveCompressor(**kw)


def _streaming(val, model):
    parts = _parts("streaming", val, "streaming=4+508")
    s, plus, w = parts[0].partition("+")
    if not plus:
        raise ValueError(f"'streaming={val}': expected SINKS+WINDOW, e.g. streaming=4+508")
    for p in parts[1:]:
        if p != "reassigned":
            raise ValueError(f"'streaming={val}': unknown part {p!r} (reassigned)")
    mode = "reassigned" if "reassigned" in parts[1:] else "original"
    return StreamingCache(int(s), int(w), mode, model=model)


def _press(val, model):
    parts = _parts("press", val, "press=0.5")
    kw = {}
    for p in parts[1:]:
        if p in SCORERS and "scorer" not in kw:
            kw["scorer"] = _scorer(p)
        elif p == "perhead":
            kw["per_head"] = True
        else:
            raise ValueError(f"'press={val}': expected a compression ratio, then at most one scorer "
                             f"({SCORER_PARTS}) and perhead, e.g. press=0.5/tova; unknown part {p!r}")
    return PressCache(float(parts[0]), **kw)


def _budget_parts(name, val, model, extra):
    """B[/w<window>][/k<kernel>][/<extra><x>]: the budget in keys per KV head and layer, then
    SnapKV's observation window and pooling kernel, then the family's own knob."""
    parts = _parts(name, val, f"{name}=256")
    if model is None:
        raise ValueError(f"'{name}={val}' needs the model (its layer and head counts)")
    try:
        kw = {"budget": int(parts[0])}
    except ValueError:
        raise ValueError(f"'{name}={val}': the budget {parts[0]!r} must be a whole number of keys "
                         f"per KV head and layer, e.g. {name}=256") from None
    knobs = {"w": ("window", int), "k": ("kernel", int), extra[0]: extra[1:]}
    for p in parts[1:]:
        key = next((c for c in sorted(knobs, key=len, reverse=True)
                    if p.startswith(c) and p[len(c):].replace(".", "", 1).isdigit()), None)
        if key is None or knobs[key][0] in kw:
            raise ValueError(f"'{name}={val}': unknown or repeated part {p!r} (w<window>, k<kernel>, "
                             f"{extra[0]}<{extra[1]}>)")
        kw[knobs[key][0]] = knobs[key][1](p[len(key):])
    return kw


def _pyramid(val, model):
    kw = _budget_parts("pyramid", val, model, ("beta", "beta", float))
    return PyramidKV(n_layers=model.config.n_layers, **kw)


def _adakv(val, model):
    kw = _budget_parts("adakv", val, model, ("a", "alpha", float))
    return AdaKV(n_kv_heads=model.config.n_kv_heads, **kw)


def _kivi2(val, model):
    """kivi2[/g<G>][/r<R>]: KIVI's group size and residual length (defaults 32 and 128)."""
    kw = {}
    for p in (val or "").split("/") if val else []:
        key = {"g": "group", "r": "residual"}.get(p[:1])
        if key is None or key in kw or not p[1:].isdigit():
            raise ValueError(f"'kivi2/{val}': unknown or repeated part {p!r} (g<group>, r<residual>), "
                             f"e.g. kivi2/g32/r128")
        kw[key] = int(p[1:])
    if model is None:
        raise ValueError("'kivi2' needs the model (its layer and head shapes)")
    return KiviCache(model.config, **kw)


# ---- the registry: one line per family ----------------------------------------------------
REGISTRY: dict[str, Family] = {
    "dense": Family("attention", no_value("dense", P.Dense), "dense"),
    "window": Family("attention", int_value("window", P.Window), "window=128", "window=3"),
    "sinks": Family("attention", int_value("sinks", P.Sinks), "sinks=4", "sinks=2"),
    "globals": Family("attention", _globals, "globals=0/5"),
    "blocks": Family("attention", int_value("blocks", P.BlockLocal), "blocks=64", "blocks=4"),
    "strided": Family("attention", int_value("strided", P.Strided), "strided=16", "strided=3"),
    "fixed": Family("attention", int_value("fixed", lambda l: P.Strided(l, "fixed")), "fixed=16", "fixed=3"),
    "logstride": Family("attention", no_value("logstride", P.LogStride), "logstride"),
    "landmarks": Family("attention", int_value("landmarks", P.Landmarks), "landmarks=32", "landmarks=4"),
    "loglandmarks": Family("attention", int_value("loglandmarks", lambda b: P.Landmarks(b, reach="log")),
                           "loglandmarks=32", "loglandmarks=3"),
    "ruvllm": Family("attention", no_value("ruvllm", P.RuvLLM), "ruvllm"),
    "random": Family("attention", parse_random, "random=1%x70,seed=3,mode=structural",
                     "random=20%x3,seed=7"),
    "gate": Family("attention", Gated.from_spec, "gate=8/16/2,mode=untrained,seed=5",
                   "gate=3/2/1,mode=untrained"),
    "topk": Family("attention", TopK.from_spec, "topk=64/kv/r16", "topk=3/r2"),
    "ivf": Family("attention", IVF.from_spec, "ivf=64/p8/c256,seed=2", "ivf=4/p64/c4"),
    "lsh": Family("attention", LSH.from_spec, "lsh=K8L75/5%,seed=1", "lsh=K4L8/4,seed=1"),
    "magicpig": Family("attention", LSH.magicpig_from_spec, "magicpig=K8L75,seed=0",
                       "magicpig=K3L10,seed=1"),
    "quest": Family("attention", Quest.from_spec, "quest=16/5%", "quest=4/6"),
    "hybrid": Family("attention", Hybrid.from_spec, "hybrid=5%/0.5", "hybrid=6/0.5/K4L8"),
    "sparq": Family("attention", SparQ.from_spec, "sparq=16/64", "sparq=2/4"),
    "loki": Family("attention", Loki.from_spec, "loki=16/2%/c512", "loki=2/4/c6"),
    "indexer": Family("attention", Indexer.from_spec, "indexer=64/f16", "indexer=4/q"),
    "topp": Family("attention", TopP.from_spec, "topp=0.95,quest=16/512", "topp=0.8,topk=6"),
    "vslash": Family("attention", VerticalSlash.from_spec, "vslash=64/64/s4/b64", "vslash=2/2/s1/b2/q4"),
    "ashape": Family("attention", ashape_from_spec, "ashape=4/64", "ashape=2/3"),
    "tidal": Family("attention", Tidal.from_spec, "tidal=64/13", "tidal=3/5"),
    "duo": Family("attention", Duo.from_spec, "duo=0.5/s4/w256", "duo=0.5/s1/w2"),
    "kv": Family("cache", _dense_cache, "dense"),
    "recursive": Family("cache", _recursive, "recursive=B512/n4/b64/acc/perhead/knorm"),
    "streaming": Family("cache", _streaming, "streaming=4+508/reassigned"),
    "press": Family("cache", _press, "press=0.5/tova"),
    "pyramid": Family("cache", _pyramid, "pyramid=256/w16/k5/beta20"),
    "adakv": Family("cache", _adakv, "adakv=256/w16/k5/a0.2"),
    "kivi2": Family("cache", _kivi2, "kivi2/g32/r128"),
}
# "dense" names both the dense selector and the dense cache; the cache line is registered as
# "kv" so that each name has one line, and parse_cache_spec reads "dense" as "kv".


def register(name: str, family: Family):
    """Add a family defined outside this package (a plugin) to the registry; in-package families
    add their line to REGISTRY above. A name already taken is an error."""
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"register: name {name!r} must be a lower-case identifier")
    if name in REGISTRY or name in OPTIONS:
        raise ValueError(f"register: {name!r} is already a family or an option")
    if family.kind not in ("attention", "cache"):
        raise ValueError(f"register: kind must be 'attention' or 'cache', got {family.kind!r}")
    REGISTRY[name] = family


def unregister(name: str):
    """Remove a family added by `register` (tests register one and take it away again)."""
    REGISTRY.pop(name)


def known_names(kind: str = "attention") -> list[str]:
    """The registered names of one kind, sorted."""
    names = [n for n, f in REGISTRY.items() if f.kind == kind]
    return sorted("dense" if n == "kv" else n for n in names)


CACHE_NAMES = ("recursive", "streaming", "press", "pyramid", "adakv", "kivi2")     # the bounded ones; "dense" = KVCache


def suite_selectors() -> list[tuple[str, Callable[[], Selector]]]:
    """(spec, make) for every registered attention family, from its `small` spec: the list the
    shared property suite runs, so a family registered here (or by `register`) joins it."""
    out = []
    for name, fam in sorted(REGISTRY.items()):
        if fam.kind == "attention":
            spec = fam.small or fam.example
            out.append((spec, lambda spec=spec: parse_attention_spec(spec)))
    return out


def _tokens(spec: str, what: str):
    """[(name, value or None, {option: value})] for "name[=value][,option=value]..."."""
    if not isinstance(spec, str) or not spec.strip():
        like = "sinks=4,window=128" if what == "attention" else "streaming=4+508"
        raise ValueError(f"{what} spec: expected a non-empty string like {like!r}, got {spec!r}")
    members = []
    for tok in spec.split(","):
        tok = tok.strip()
        name, eq, val = tok.partition("=")
        name, val = name.strip().lower(), (val.strip() or None) if eq else None
        if name in OPTIONS:
            if not members:
                raise ValueError(f"{what} spec {spec!r}: option '{tok}' must follow the member it "
                                 f"modifies (e.g. random=1%x70,{name}=...)")
            if val is None:
                raise ValueError(f"{what} spec {spec!r}: option '{tok}' needs a value")
            if name in members[-1][2]:
                raise ValueError(f"{what} spec {spec!r}: option '{tok}' given twice")
            members[-1][2][name] = val
            continue
        if not name:
            raise ValueError(f"{what} spec {spec!r}: empty member")
        members.append((name, val, {}))
    return members


def parse_attention_spec(spec: str) -> Selector:
    """Parse "name[=value][,option=value],..." into one selector (a Union when several).

    >>> parse_attention_spec("sinks=4,window=128")
    Union<sinks=4,window=128>
    >>> parse_attention_spec("ivf=64,mode=sample")
    Traceback (most recent call last):
    ...
    ValueError: attention spec 'ivf=64,mode=sample': ivf=64/p8: takes seed, not 'mode'
    """
    members = []
    for name, val, opts in _tokens(spec, "attention"):
        fam = REGISTRY.get(name)
        if fam is None or fam.kind != "attention":
            raise ValueError(f"attention spec {spec!r}: unknown selector '{name}'; known: "
                             + ", ".join(known_names("attention")) + "; options: " + ", ".join(OPTIONS))
        try:
            sel = fam.build(val).with_options(**opts)
        except ValueError as e:
            raise ValueError(f"attention spec {spec!r}: {e}") from None
        members.append(sel)
    # Twilight's top-p prunes the keys the other members offer: "topp=0.95,quest=16/512"
    tops = [m for m in members if isinstance(m, TopP)]
    if len(tops) > 1:
        raise ValueError(f"attention spec {spec!r}: one 'topp' per spec (it prunes the union of "
                         f"the other members)")
    rest = [m for m in members if not isinstance(m, TopP)]
    if tops:
        cands = None if not rest else rest[0] if len(rest) == 1 else Union(*rest)
        try:
            return TopP(tops[0].p, cands)
        except ValueError as e:
            raise ValueError(f"attention spec {spec!r}: {e}") from None
    return members[0] if len(members) == 1 else Union(*members)


def parse_cache_spec(spec: str, model):
    """A new, empty cache for `spec` and `model` (a Model: the dense cache takes its shapes,
    streaming re-assignment its RoPE).

    >>> parse_cache_spec("press=0.5/x", model=None)                     # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: cache spec 'press=0.5/x': ...; unknown part 'x'
    """
    members = _tokens(spec, "cache")
    if len(members) != 1:
        raise ValueError(f"cache spec {spec!r}: one cache, e.g. streaming=4+508 (a ',' joins "
                         f"selectors, not caches)")
    name, val, opts = members[0]
    if val is None and "/" in name:        # "kivi2/g32/r128": parts without a leading value
        name, _, val = name.partition("/")
    fam = REGISTRY.get("kv" if name == "dense" else name)
    if fam is None or fam.kind != "cache":
        raise ValueError(f"cache spec {spec!r}: unknown cache {name!r}; known: "
                         + ", ".join(known_names("cache")))
    if opts:
        raise ValueError(f"cache spec {spec!r}: caches take no options, got "
                         + ", ".join(f"'{k}={v}'" for k, v in opts.items()))
    try:
        return fam.build(val, model)
    except ValueError as e:
        raise ValueError(f"cache spec {spec!r}: {e}") from None
