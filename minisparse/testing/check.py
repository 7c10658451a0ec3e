"""check_selector: every invariant of the kit (invariants.py) run under Hypothesis on one
selector, a failure raised as an AssertionError carrying the shrunk counterexample; and
time_selector, which times a selector's choice apart from the kernel's arithmetic.

Takes a Selector (instance or class), a zero-argument factory, or a mask function
fn(q, k, q_pos, k_pos) -> bool (Hq, Tq, Tk) (wrapped in MaskSelector). Follows Hypothesis's
conventions: each property is one @given test, shrunk on failure, reproducible from its repr.
"""
from __future__ import annotations

import inspect
import time

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from ..attention.kernel import attend
from ..attention.patterns import Dense
from ..attention.selector import Selector
from . import invariants as inv
from .mask import MaskSelector
from .strategies import MAX_TK, make_problem, problems


def as_factory(obj):
    """() -> Selector for a Selector instance or subclass, a zero-argument factory, or a mask
    function of four arguments (q, k, q_pos, k_pos)."""
    if isinstance(obj, Selector):
        return lambda: obj
    if isinstance(obj, type) and issubclass(obj, Selector):
        return obj
    if callable(obj):
        n = len([p for p in inspect.signature(obj).parameters.values()
                 if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        if n == 4:
            return lambda: MaskSelector(obj)
        if n == 0:
            return lambda: _checked(obj(), obj)
    raise ValueError(f"check_selector: expected a Selector, a Selector subclass, a zero-argument "
                     f"factory or a mask function fn(q, k, q_pos, k_pos); got {obj!r}")


def _checked(sel, factory):
    if not isinstance(sel, Selector):
        raise ValueError(f"check_selector: factory {factory!r} returned {type(sel).__name__}, "
                         f"expected a Selector")
    return sel


def _reads_pseudo_keys(sel):
    p = make_problem(seed=0, hq=2, hkv=1, k_pos=list(range(MAX_TK)), d=8)
    return inv._selection(sel, p).n_extra > 0


def _invariants(make, cover, max_tk, kw):
    """[(name, @given test)] that apply to the selector make() builds."""
    sel = make()
    full = problems(max_tk=max_tk, full_queries=True, **kw)
    some = problems(max_tk=max_tk, **kw)
    tests = []

    def add(name):
        def keep(fn):
            fn.hypothesis.inner_test.__name__ = name          # the counterexample names it
            tests.append((name, fn))
        return keep

    if not _reads_pseudo_keys(sel):
        @add("kernel_equals_reference")
        @given(some)
        def _(p):
            inv.kernel_equals_reference(make(), p)

    @add("covering_equals_dense")
    @given(some)
    def _(p):
        inv.covering_equals_dense(cover(p.k.shape[1]), p)

    @add("later_keys_change_nothing")
    @given(full, st.data())
    def _(p, data):
        inv.later_keys_change_nothing(make(), p, data.draw(st.integers(0, p.k.shape[1] - 1), label="i"))

    @add("decode_equals_prefill")
    @given(full)
    def _(p):
        inv.decode_equals_prefill(make(), p)

    @add("gqa_equals_repeated_kv")
    @given(some)
    def _(p):
        inv.gqa_equals_repeated_kv(make(), p)

    if sel.exact_subset:
        @add("error_bounded_by_missing_mass")
        @given(some)
        def _(p):
            inv.error_bounded_by_missing_mass(make(), p)

    @add("extreme_logits_finite")
    @given(some, st.sampled_from([1e4, -1e4]))
    def _(p, big):
        inv.extreme_logits_finite(make(), p, big)

    @add("same_seed_same_selection")
    @given(some)
    def _(p):
        inv.same_seed_same_selection(make, p)

    @add("density_equals_keys_read")
    @given(some)
    def _(p):
        inv.density_equals_keys_read(make(), p)
    return tests


def check_selector(obj, cover=None, max_examples=25, max_tk=MAX_TK, gaps=True, float16=True,
                   only=None):
    """Run every invariant of the kit on obj; return the names checked, or raise AssertionError
    naming the invariant, with Hypothesis's shrunk counterexample (a `make_problem(...)` call).

    obj: a Selector, a Selector subclass, a zero-argument factory (a fresh instance per draw:
    the same seed must give the same selection), or a mask function fn(q, k, q_pos, k_pos) ->
    bool (Hq, Tq, Tk). cover(tk) -> the same family reading every causal key of tk keys; by
    default the union with Dense() (exact picks win the union, so covering then checks that the
    selector's own picks merge into dense with no key counted twice). gaps / float16: draw
    positions with gaps and float16 K/V; only: a list of invariant names to run.

    >>> from minisparse.attention import Window
    >>> names = check_selector(Window(3), cover=lambda tk: Window(10**6), max_examples=3)
    >>> "decode_equals_prefill" in names
    True
    """
    make = as_factory(obj)
    cover = cover or (lambda tk: make() | Dense())
    tests = _invariants(make, cover, max_tk, dict(gaps=gaps, float16=float16))
    names = [n for n, _ in tests]
    if only is not None:
        unknown = set(only) - set(names)
        if unknown:
            raise ValueError(f"check_selector: only={sorted(unknown)} are not invariants that "
                             f"apply here; expected some of {names}")
        tests = [(n, t) for n, t in tests if n in only]
    run = settings(max_examples=max_examples, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   print_blob=False,
                   # no "explain" phase: its lines of NumPy internals bury the counterexample
                   phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
    for name, test in tests:
        try:
            run(test)()
        except AssertionError as e:
            notes = "\n".join(getattr(e, "__notes__", []))
            raise AssertionError(f"check_selector({make()}): invariant {name!r} fails.\n{notes}\n"
                                 f"{e}") from None
    return [n for n, _ in tests]


def report(obj, **kw) -> bool:
    """check_selector(obj, **kw) for a notebook cell: print "all invariants hold" or the
    counterexample instead of raising; return whether every invariant held."""
    try:
        names = check_selector(obj, **kw)
    except AssertionError as e:
        print(e)
        return False
    print(f"all invariants hold ({len(names)} checked: {', '.join(names)})")
    return True


def time_selector(sel, problem, repeat=5):
    """{select_s, kernel_s}: median seconds of sel.select alone and of the kernel reading the
    Selection it returned, on one Problem (make_problem(...)); the first call (JIT compilation)
    is not counted.

    >>> from minisparse.attention import Window
    >>> sorted(time_selector(Window(4), make_problem(k_pos=range(64), d=8), repeat=1))
    ['kernel_s', 'select_s']
    """
    q, k, v, q_pos, k_pos = problem
    k32 = k.astype(np.float32)

    def clock(fn):
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)), out

    select_s, selection = clock(lambda: sel.select(q, k32, q_pos, k_pos).normalize())
    kernel_s, _ = clock(lambda: attend(q, k, v, selection, q_pos=q_pos, k_pos=k_pos))
    return {"select_s": select_s, "kernel_s": kernel_s}
