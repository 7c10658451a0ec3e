"""The shared property suite: every selector in SELECTORS goes through the same invariants.

A new selector joins by adding one Case to SELECTORS: a small instance (the tests use Tk <= 24)
and `cover(tk)`, the same family with a budget that reads every causal key of Tk keys (window
>= Tk, top-k k >= Tk, landmarks with Tk <= block so every key is read exactly, ...), which
the covering property needs. No property test returns early: each draw reaches its assertion,
and test_every_property_asserts_in_at_least_80_percent_of_its_draws checks the tally.
The strategies and the invariants themselves are the public kit's (minisparse.testing), which
a user runs on their own selector with check_selector: one source of truth.
"""
import ast
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import (BlockLocal, Dense, Globals, Landmarks, LogStride, RandomMask,
                                  RuvLLM, Sinks, Strided, Window)
from minisparse.gate import Gated
from minisparse.spec import suite_selectors
from minisparse.testing import invariants as inv, problems as kit_problems
from minisparse.attention import IVF, LSH, Hybrid, Quest, TopK   # content-based

MAX_TK = 24
MAX_OFFSET = 5                        # first key position drawn in 0 .. MAX_OFFSET


class Case(NamedTuple):
    name: str
    make: Callable                    # () -> the small instance every property runs
    cover: Callable                   # tk -> the same family covering every causal key of tk
    cover_max_tk: int = MAX_TK        # largest Tk that `cover` covers
    pseudo_keys: bool = False         # reads landmarks: no mask form (closed form in test_attention_patterns)


SELECTORS = [
    Case("dense", lambda: Dense(), lambda tk: Dense()),
    Case("window3", lambda: Window(3), lambda tk: Window(tk)),
    Case("sinks2|window2", lambda: Sinks(2) | Window(2), lambda tk: Sinks(2) | Window(tk)),
    Case("globals0/5|window1", lambda: Globals([0, 5]) | Window(1),
         lambda tk: Globals([0, 5]) | Window(tk)),
    # a block of b positions covers when it holds every key position (< MAX_OFFSET + Tk)
    Case("blocks4", lambda: BlockLocal(4), lambda tk: BlockLocal(tk + MAX_OFFSET)),
    Case("strided3", lambda: Strided(3), lambda tk: Strided(tk)),          # local part [i - l, i]
    Case("fixed3", lambda: Strided(3, "fixed"), lambda tk: Strided(tk + MAX_OFFSET, "fixed")),
    # i - 2^m reaches i, i-1, i-2 but not i-3: it covers up to 3 keys
    Case("logstride", lambda: LogStride(), lambda tk: LogStride(), cover_max_tk=3),
    Case("landmarks4", lambda: Landmarks(4), lambda tk: Landmarks(tk), pseudo_keys=True),
    Case("window2|landmarks4", lambda: Window(2) | Landmarks(4),
         lambda tk: Window(2) | Landmarks(tk), pseudo_keys=True),
    Case("loglandmarks3", lambda: Landmarks(3, reach="log"),
         lambda tk: Landmarks(tk, reach="log"), pseudo_keys=True),
    Case("ruvllm(w4,b4)", lambda: RuvLLM(window=4, block=4),
         lambda tk: RuvLLM(window=4, block=tk), pseudo_keys=True),
    Case("random-stochastic", lambda: RandomMask(0.2, 3, seed=7, sinks=1, window=1),
         # draws with replacement never surely cover: the family's own window does
         lambda tk: RandomMask(0.2, 3, seed=7, sinks=1, window=tk)),
    Case("random-structural", lambda: RandomMask(0.25, 2, mode="structural", seed=7, sinks=1, window=1),
         lambda tk: RandomMask(0.25, 2, mode="structural", seed=7, sinks=1, window=tk)),
    Case("gate(b3,w2,s1)", lambda: Gated(budget=3, window=2, sinks=1, gate="untrained"),
         lambda tk: Gated(budget=tk, window=2, sinks=1, gate="untrained")),
    Case("topk3|r2", lambda: TopK(3, recent=2), lambda tk: TopK(tk, recent=2)),
    Case("topk25%", lambda: TopK(fraction=0.25), lambda tk: TopK(fraction=1.0)),
    Case("quest4/6", lambda: Quest(4, k=6), lambda tk: Quest(4, k=tk + 4)),  # whole pages: k // 4 >= pages
    Case("lsh-rank-K4L8", lambda: LSH(4, 8, seed=1, k=4), lambda tk: LSH(4, 8, seed=1, k=tk)),
    Case("magicpig-K3L10", lambda: LSH(3, 10, seed=1, mode="sample"),
         # a sampler reads a key with weight 1/P: it covers exactly only through exact members,
         # whose picks win the union (each key read once, log-weight 0)
         lambda tk: Sinks(1) | Window(tk) | LSH(3, 10, seed=1, mode="sample")),
    Case("sinks1|window2|magicpig-K3L10", lambda: Sinks(1) | Window(2) | LSH(3, 10, seed=1, mode="sample"),
         lambda tk: Sinks(1) | Window(tk) | LSH(3, 10, seed=1, mode="sample")),
    Case("ivf4-all-lists-probed", lambda: IVF(4, nprobe=64, n_lists=4),
         lambda tk: IVF(tk, nprobe=64, n_lists=4)),
    Case("hybrid6/0.5(topk+lsh)", lambda: Hybrid(TopK(0), LSH(4, 8, k=0), 0.5, k=6),
         lambda tk: Hybrid(TopK(0), LSH(4, 8, k=0), 0.5, k=tk)),
]


def _reads_pseudo_keys(sel) -> bool:
    r = np.random.default_rng(0)
    q, k = r.standard_normal((2, MAX_TK, 8)).astype(np.float32), r.standard_normal((1, MAX_TK, 8)).astype(np.float32)
    pos = np.arange(MAX_TK)
    return sel.select(q, k, pos, pos).n_extra > 0


def registry_case(spec, make):
    """The Case of a family registered in minisparse.spec (its `small` spec): how a new family
    joins this suite with no line here. Its covering form is the union with a window of every
    key: exact picks win the union, so covering then tests that the family's own picks (exact,
    weighted or pseudo-keys) merge into dense without a key counted twice."""
    return Case(f"spec:{spec}", make, lambda tk: make() | Window(tk),
                pseudo_keys=_reads_pseudo_keys(make()))


SELECTORS += [registry_case(spec, make) for spec, make in suite_selectors()]
COVERING = SELECTORS + [Case("window-huge", lambda: Window(10**6), lambda tk: Window(10**6)),
                        Case("sinks-huge", lambda: Sinks(10**6), lambda tk: Sinks(10**6))]
MASKABLE = [c for c in SELECTORS if not c.pseudo_keys]          # real keys only: a mask + logw
EXACT = [c for c in SELECTORS if c.make().exact_subset]         # real keys, log-weight 0
IDS = [c.name for c in SELECTORS]


def ids(cases):
    return [c.name for c in cases]


# (property, selector) -> [draws, draws that reached the assertion]; a test at the end checks it
TALLY: dict = {}


def drawn(prop, case):
    """Count one draw of `prop` on `case`; the test bumps [1] just before its assertion."""
    tally = TALLY.setdefault((prop, case.name), [0, 0])
    tally[0] += 1
    return tally


# The problems and the invariants are the public kit's (minisparse.testing): one source of truth
# for this suite and for a user's check_selector. Positions may have gaps and K/V be float16,
# except in the covering property, whose `cover(tk)` budgets count contiguous positions.
def problems(full_queries=False, max_tk=MAX_TK, gaps=True):
    return kit_problems(max_tk=max_tk, full_queries=full_queries, max_offset=MAX_OFFSET,
                        gaps=gaps, float16=gaps)


@st.composite
def covering_problems(draw, case):
    """(selector covering every causal key, problem): the budget is built from the drawn Tk."""
    prob = draw(problems(max_tk=case.cover_max_tk, gaps=False))
    return case.cover(prob.k.shape[1]), prob


@pytest.mark.parametrize("case", MASKABLE, ids=ids(MASKABLE))
@given(problems())
def test_kernel_equals_reference_on_the_selected_set(case, prob):
    tally = drawn("kernel_equals_reference", case)
    tally[1] += 1
    inv.kernel_equals_reference(case.make(), prob)


@pytest.mark.parametrize("case", COVERING, ids=ids(COVERING))
@given(data=st.data())
def test_selector_covering_all_causal_keys_equals_dense(case, data):
    tally = drawn("covering_equals_dense", case)
    sel, prob = data.draw(covering_problems(case))
    tally[1] += 1
    inv.covering_equals_dense(sel, prob)


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems(full_queries=True), st.data())
def test_output_at_i_unchanged_when_later_keys_change(case, prob, data):
    tally = drawn("causal", case)
    i = data.draw(st.integers(0, prob.k.shape[1] - 1))
    tally[1] += 1
    inv.later_keys_change_nothing(case.make(), prob, i)


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems(full_queries=True))
def test_decode_step_equals_prefill_row(case, prob):
    tally = drawn("decode_equals_prefill", case)
    tally[1] += 1
    inv.decode_equals_prefill(case.make(), prob)


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems())
def test_gqa_equals_multihead_on_repeated_kv(case, prob):
    tally = drawn("gqa", case)
    tally[1] += 1
    inv.gqa_equals_repeated_kv(case.make(), prob)


@pytest.mark.parametrize("case", EXACT, ids=ids(EXACT))
@given(problems())
def test_error_bounded_by_missing_probability_mass(case, prob):
    tally = drawn("missing_mass_bound", case)
    tally[1] += 1
    inv.error_bounded_by_missing_mass(case.make(), prob)


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems(), st.sampled_from([1e4, -1e4]))
def test_extreme_logits_give_no_nan(case, prob, big):
    tally = drawn("extreme_logits", case)
    tally[1] += 1
    inv.extreme_logits_finite(case.make(), prob, big)


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems())
def test_same_seed_gives_the_same_selection(case, prob):
    tally = drawn("same_seed", case)
    tally[1] += 1
    inv.same_seed_same_selection(case.make, prob)


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems())
def test_reported_density_equals_the_keys_read(case, prob):
    tally = drawn("density", case)
    tally[1] += 1
    inv.density_equals_keys_read(case.make(), prob)


# ---- the suite's own checks ------------------------------------------------------------------
PROPERTIES = [(test_kernel_equals_reference_on_the_selected_set, "kernel_equals_reference", MASKABLE),
              (test_selector_covering_all_causal_keys_equals_dense, "covering_equals_dense", COVERING),
              (test_output_at_i_unchanged_when_later_keys_change, "causal", SELECTORS),
              (test_decode_step_equals_prefill_row, "decode_equals_prefill", SELECTORS),
              (test_gqa_equals_multihead_on_repeated_kv, "gqa", SELECTORS),
              (test_error_bounded_by_missing_probability_mass, "missing_mass_bound", EXACT),
              (test_extreme_logits_give_no_nan, "extreme_logits", SELECTORS),
              (test_same_seed_gives_the_same_selection, "same_seed", SELECTORS),
              (test_reported_density_equals_the_keys_read, "density", SELECTORS)]


def test_every_property_asserts_in_at_least_80_percent_of_its_draws():
    # Runs last in this file: pairs the session already ran are read from TALLY; a pair not run
    # (deselected with -k, or this test alone) is run here, so the check never passes vacuously.
    for fn, prop, cases in PROPERTIES:
        for case in cases:
            if (prop, case.name) not in TALLY:
                fn(case=case)
    low = {key: (n, hit) for key, (n, hit) in TALLY.items() if n == 0 or hit < 0.8 * n}
    assert not low, f"(property, selector): (draws, assertions reached) below 80%: {low}"
    assert len(TALLY) == sum(len(cases) for _, _, cases in PROPERTIES)


def test_every_selector_with_pseudo_keys_is_marked_and_only_those():
    # the kernel-vs-reference property leaves out the pseudo_keys cases (no mask form): the mark
    # must be honest, or a selector could opt out of the kernel check by a wrong flag
    r = np.random.default_rng(0)
    q, k = r.standard_normal((2, MAX_TK, 8)).astype(np.float32), r.standard_normal((1, MAX_TK, 8)).astype(np.float32)
    pos = np.arange(MAX_TK)
    for case in SELECTORS:
        assert (case.make().select(q, k, pos, pos).n_extra > 0) == case.pseudo_keys, case.name


def test_no_hypothesis_test_returns_before_its_assertion():
    # a `return` in a @given test ends a draw without asserting; strategies build preconditions
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(fn, ast.FunctionDef)
                    and any("given" in ast.unparse(d) for d in fn.decorator_list)):
                continue
            stack = list(ast.iter_child_nodes(fn))
            while stack:
                node = stack.pop()
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    continue                          # a nested helper may return
                assert not isinstance(node, ast.Return), f"{path.name}::{fn.name} line {node.lineno}"
                stack.extend(ast.iter_child_nodes(node))
