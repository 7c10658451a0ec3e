"""Spec strings -> selectors: "sinks=4,window=128" (comma = union), used by attend, the CLI's
`--attention` and the lab's `--variants` (variants separated by ';', split by the caller).

Leaves out the selectors themselves. A new selector registers here: one entry in REGISTRY
mapping its token name to a constructor taking the text after '=' (or None).
"""
from __future__ import annotations

from .selection import Selector, Union


def _int(name):
    def make(cls):
        def build(val):
            if val is None:
                raise ValueError(f"attention spec: '{name}' needs a value, e.g. {name}=64")
            try:
                return cls(int(val))
            except ValueError as e:
                raise ValueError(f"attention spec: '{name}={val}': {e}") from None
        return build
    return make


def _registry():
    from . import patterns as P
    from .random_mask import parse_random
    from .gated import Gated
    from . import hybrid, ivf, lsh, quest, topk                # content-based (issue 4)
    reg = {
        "dense": lambda v: P.Dense(),
        "window": _int("window")(P.Window),
        "sinks": _int("sinks")(P.Sinks),
        "globals": lambda v: P.Globals([int(x) for x in (v or "0").split("/")]),
        "blocks": _int("blocks")(P.BlockLocal),
        "strided": _int("strided")(P.Strided),
        "fixed": _int("fixed")(lambda l: P.Strided(l, "fixed")),
        "logstride": lambda v: P.LogStride(),
        "landmarks": _int("landmarks")(P.Landmarks),
        "loglandmarks": _int("loglandmarks")(lambda b: P.Landmarks(b, reach="log")),
        "ruvllm": lambda v: P.RuvLLM(),
        "random": parse_random,
        "gate": Gated.from_spec,                 # FastGRNN-gated (gated.py)
        "topk": topk.TopK.from_spec,             # topk=64, topk=2%, topk=64/kv, topk=64/r16
        "ivf": ivf.IVF.from_spec,                # ivf=64/p8/c256
        "lsh": lsh.LSH.from_spec,                # lsh=K8L75/5% (frequency rank)
        "magicpig": lsh.LSH.magicpig_from_spec,  # magicpig=K8L75 (sampler), ,seed=N
        "quest": quest.Quest.from_spec,          # quest=16/5%
        "hybrid": hybrid.Hybrid.from_spec,       # hybrid=5%/0.5 (top-k + LSH rank)
    }
    for name, build in _EXTRA.items():
        reg[name] = build
    return reg


# Spare hook for selectors defined outside this package (plugins); in-package selectors add
# their line to the table above.
_EXTRA: dict = {}

# Options that modify the member just before them: "random=1%x70,seed=3,mode=structural".
MODIFIERS = ("seed", "mode")


def known_names():
    return sorted(_registry())


def parse_attention_spec(spec: str) -> Selector:
    """Parse "name[=value],name[=value],..." into one selector (a Union when several).

    >>> parse_attention_spec("sinks=4,window=128")
    Union<sinks=4,window=128>
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attention spec: expected a non-empty string like 'sinks=4,window=128', "
                         f"got {spec!r}")
    reg = _registry()
    members = []
    for tok in spec.split(","):
        tok = tok.strip()
        name, _, val = tok.partition("=")
        name, val = name.strip().lower(), (val.strip() or None) if "=" in tok else None
        if name in MODIFIERS:
            if not members or not hasattr(members[-1], "with_options"):
                raise ValueError(f"attention spec: '{tok}' must follow a selector that takes "
                                 f"{name} (e.g. random=1%x70,{name}=...)")
            members[-1] = members[-1].with_options(**{name: val})
            continue
        if name not in reg:
            raise ValueError(f"attention spec: unknown selector '{tok}' in {spec!r}; known: "
                             + ", ".join(sorted(reg)) + "; modifiers: " + ", ".join(MODIFIERS))
        members.append(reg[name](val))
    return members[0] if len(members) == 1 else Union(*members)
