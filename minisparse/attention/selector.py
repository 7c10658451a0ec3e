"""The Selector contract: what every sparse-attention selector is and has, `Union` (a | b) and
`Intersection` (a & b).

Leaves out the key choices themselves (one family per file: patterns.py, topk.py, ...) and the
spec grammar that builds selectors from text (minisparse.spec, one layer up). Written for the
kernel (kernel.py) to be the floor: a selector hands it a Selection, the kernel never asks back.

Every selector has:
    select(q, k, q_pos=None, k_pos=None) -> Selection   q (Hq, Tq, d) or None for position-only
        rules, k (Hkv, Tk, d), positions default to arange; subclasses fill `_select`
    at_layer(layer, shared) -> Selector   the selector one layer of a model runs, in prefill and
        decode alike; identity unless its rule depends on the layer (DuoAttention's head roles,
        TidalDecode's reuse of an earlier layer's positions). `shared` is a dict that lives for
        one forward call and is seen by every layer of it, in order; Model.forward puts itself
        in it as shared["model"] (a calibrated rule finds its file next to model.path)
    for_layer(layer, state, k, v) -> Selector   the selector for one layer of a model; identity
        unless it keeps a per-layer index in the cache's `selector_state` (IVF, LSH, Landmarks)
    bind(state) -> Selector   bound to a prebuilt index or running state; identity by default
    describe() / str(sel)   its spec, so that parse_attention_spec(str(sel)) == sel
    == and hash   by spec: two selectors are equal when their specs are
    budget    Budget(keys, fraction): the nominal number of keys a query reads, or the fraction
              of its causal keys, summed over a union; None for rules that fix neither
    exact_subset    True when it reads only real keys with log-weight 0 (the coverage bound of
                    the shared property suite applies); False for landmarks and samplers
    deterministic   False when its choice depends on a seed ("seed" in options); the seed is
                    then part of its spec (",seed=N"), so a spec names one fixed set
    options, with_options(**opts)   the trailing spec options it takes and a copy with them
                    set; an option it does not take is a ValueError naming it
    covers_all_causal   True when it reads every causal key (Dense): the suite compares it to dense
    row_local   True when a row's keys depend only on its own query and the keys it may see; False
                when they depend on the other rows of the call (MInference's vertical-slash, whose
                pattern comes from the call's last queries): then decode step i equals the call
                that holds query i alone, not prefill row i, and a row may depend on later keys
                up to the call's last query (the shared suite checks those weaker forms)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .selection import Q, Selection, default_positions, union


class Budget(NamedTuple):
    """A nominal budget: `keys` per query, `fraction` of its causal keys, or both (a union)."""
    keys: int | None = None
    fraction: float | None = None

    def __add__(self, other):
        add = lambda a, b: b if a is None else a if b is None else a + b   # noqa: E731
        return Budget(add(self.keys, other.keys), add(self.fraction, other.fraction))


class Selector:
    """Base class of every selector; see the module docstring for the contract. Subclasses
    implement `_select(q, k, q_pos, k_pos) -> Selection` and `describe()`, and override the
    class attributes below where they differ."""
    covers_all_causal = False
    exact_subset = True
    row_local = True
    options = ()             # names of the trailing spec options it takes (",seed=N", ",mode=M")

    @property
    def deterministic(self) -> bool:
        """False when its choice depends on a seed (random masks, LSH planes, IVF's k-means, an
        untrained gate): the seed is then an option and part of its spec."""
        return "seed" not in self.options

    def select(self, q, k, q_pos=None, k_pos=None) -> Selection:
        """Index sets for q (Hq, Tq, d) against k (Hkv, Tk, d) at the given positions."""
        tq = len(q_pos) if q is None else q.shape[1]
        q_pos, k_pos = default_positions(tq, k.shape[1], q_pos, k_pos)
        return self._select(q, k, q_pos, k_pos)

    def _select(self, q, k, q_pos, k_pos) -> Selection:
        raise NotImplementedError(f"{type(self).__name__}._select")

    @property
    def budget(self) -> Budget | None:
        return None

    def at_layer(self, layer, shared) -> "Selector":
        """The selector that layer `layer` of a model runs, in prefill and in decode. `shared` is
        a dict made fresh for each forward call and handed to every layer in order, so a layer
        may leave something for the layers after it (TidalDecode's positions). Default: the
        selector itself, the same at every layer."""
        return self

    def for_layer(self, layer, state, k, v) -> "Selector":
        """This selector for one decode step at one layer of a model. `state` is a dict the cache
        owns (None for a cache that evicts keys); k, v (Hkv, S, d) are the keys it holds after
        this step's append. Selectors with per-layer indexes (IVF, LSH, Landmarks) build theirs at
        the first decode step (from keys all <= the query: causal), keep it in `state` and extend
        it as keys arrive, as MagicPIG and the top-k paper build theirs after prefill. Prefill
        runs the selector's per-call rule. An approximate index (IVF) is the one exception
        to "decode step i equals prefill row i": its sets depend on when it was built; LSH's
        index is rebuilt per block as its rule's centre moves, and Landmarks' running means
        equal the static ones, both bit for bit. Default: no state, the selector itself."""
        return self

    def with_options(self, **options) -> "Selector":
        """A copy with spec options set (seed=, mode=; values as text or numbers). An option this
        selector does not take is an error naming it: nothing is dropped."""
        for name in options:
            if name not in self.options:
                takes = ", ".join(self.options) or "no options"
                raise ValueError(f"{self.describe()}: takes {takes}, not {name!r}")
        return self._with_options(**options) if options else self

    def _with_options(self, **options) -> "Selector":
        raise NotImplementedError(f"{type(self).__name__}._with_options")

    def bind(self, state) -> "Selector":
        """This selector reading a prebuilt index or running state; default: nothing to bind."""
        return self

    def _indexed_for_layer(self, layer, state, k, build) -> "Selector":
        """for_layer of a selector with a growing key index (IVF, LSH): the index kept in `state`
        under (describe(), layer) is made by build() at first use, when it holds more keys than k
        (a new cache) or reports itself `stale`; otherwise the keys appended since are added to
        it (`extend`). Returns this selector bound to it."""
        if state is None:
            return self
        key = (self.describe(), layer)
        ix = state.get(key)
        if ix is None or ix.n > k.shape[1] or ix.stale:
            ix = state[key] = build()
        elif ix.n < k.shape[1]:
            ix.extend(k[:, ix.n:])
        return self.bind(ix)

    def describe(self) -> str:
        raise NotImplementedError(f"{type(self).__name__}.describe")

    def __str__(self):
        return self.describe()

    def __repr__(self):
        return f"{type(self).__name__}<{self.describe()}>"

    def __eq__(self, other):
        return isinstance(other, Selector) and self.describe() == other.describe()

    def __hash__(self):
        return hash(self.describe())

    def __or__(self, other: "Selector") -> "Union":
        return Union(self, other)

    def __and__(self, other: "Selector") -> "Intersection":
        return Intersection(self, other)


def flatten(cls, members) -> tuple:
    """members as one flat tuple: a member that is itself a `cls` (a | (b | c)) gives its own."""
    flat = []
    for m in members:
        if not isinstance(m, Selector):
            raise ValueError(f"{cls.__name__}: members must be Selectors, got {type(m).__name__}")
        flat.extend(m.members if isinstance(m, cls) else [m])
    return tuple(flat)


class Composition(Selector):
    """What Union and Intersection share: a flat tuple of members, deterministic, exact and
    row-local when every member is, and a layer's or a state's selector made member by member.
    type(self): a named composition (RuvLLM's preset) keeps its name, hence its spec."""

    def __init__(self, flat: tuple):
        self.members = flat
        self.exact_subset = all(m.exact_subset for m in flat)
        self.row_local = all(m.row_local for m in flat)

    @property
    def deterministic(self):
        return all(m.deterministic for m in self.members)

    def _remade(self, members):
        """self when every member came back as itself (a decode step asks twice a layer: no
        new composition then), else a new one of the same type."""
        if all(a is b for a, b in zip(members, self.members)):
            return self
        return type(self)(*members)

    def bind(self, state):
        return self._remade([m.bind(state) for m in self.members])

    def at_layer(self, layer, shared):
        return self._remade([m.at_layer(layer, shared) for m in self.members])

    def for_layer(self, layer, state, k, v):
        return self._remade([m.for_layer(layer, state, k, v) for m in self.members])


class Union(Composition):
    """Keys read by any member, each once (exact picks win over weighted ones)."""

    def __init__(self, *members: Selector):
        super().__init__(flatten(Union, members))
        self.covers_all_causal = any(m.covers_all_causal for m in self.members)

    def _select(self, q, k, q_pos, k_pos):
        hq = k.shape[0] if q is None else q.shape[0]
        return union([m._select(q, k, q_pos, k_pos) for m in self.members], hq, k.shape[0])

    @property
    def budget(self):
        parts = [m.budget for m in self.members if m.budget is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def describe(self):
        return ",".join(m.describe() for m in self.members)



class Intersection(Composition):
    """Keys read by every member (a & b). A key's log-weight is the sum of its members' (for
    independent samplers P(kept by all) is the product of the P's, so the -log P add); it is exact
    when every member picked it exactly. Pseudo-keys have no intersection (a landmark is no key
    of the other member): an error. Built through (Hq, Tq, Tk) masks, so O(Hq Tq Tk): for
    composing and testing variants, not for long contexts."""

    def __init__(self, *members: Selector):
        super().__init__(flatten(Intersection, members))
        self.covers_all_causal = all(m.covers_all_causal for m in self.members)

    def _select(self, q, k, q_pos, k_pos):
        hq = k.shape[0] if q is None else q.shape[0]
        tq, tk = len(q_pos), k.shape[1]
        mask = np.ones((hq, tq, tk), bool)                        # (Hq, Tq, Tk)
        logw = np.zeros((hq, tq, tk), np.float64)                 # (Hq, Tq, Tk)
        for m in self.members:
            s = m._select(q, k, q_pos, k_pos).normalize()
            if s.n_extra:
                raise ValueError(f"Intersection: {m} reads pseudo-keys, which have no "
                                 f"intersection with real keys")
            mm, lw = s.to_mask(hq, tq, tk)
            mask &= mm
            logw += lw
        rows = mask.reshape(hq * tq, tk)
        ptr = np.concatenate([[0], np.cumsum(rows.sum(1))])      # (R+1,)
        idx = np.nonzero(rows)[1]                                 # sorted within each row
        w = logw.reshape(hq * tq, tk)[rows]
        sel = Selection.from_lists(ptr, idx, tk, head_kind=Q, n_heads=hq, tq=tq, logw=w,
                                   normalized=True)
        sel.exact = w == 0
        return sel

    def describe(self):
        # not a spec the grammar parses: the grammar has unions only
        return "&".join(f"({m.describe()})" for m in self.members)
