"""The shared property suite: every selector in SELECTORS goes through the same invariants.

A new selector joins by adding one Case to SELECTORS: a small instance (the tests use Tk <= 24)
and `cover(tk)`, the same family with a budget that reads every causal key of Tk keys (window
>= Tk, top-k k >= Tk, landmarks with Tk <= block so every key is read exactly, ...), which
the covering property needs. No property test returns early: each draw reaches its assertion,
and test_every_property_asserts_in_at_least_80_percent_of_its_draws checks the tally.
"""
import ast
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minisparse.attention import (BlockLocal, Dense, Globals, Landmarks, LogStride, RandomMask,
                                  RuvLLM, Sinks, Strided, Window, attend, dense_reference)
from minisparse.gate import Gated
from minisparse.spec import suite_selectors
from minisparse.testing import KERNEL_REL, kernel_tol
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


@st.composite
def problems(draw, full_queries=False, max_tk=MAX_TK):
    seed = draw(st.integers(0, 2**31 - 1))
    tk = draw(st.integers(1, max_tk))
    tq = tk if full_queries else draw(st.integers(1, tk))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (2, 2)]))
    d = draw(st.sampled_from([4, 8]))
    offset = draw(st.integers(0, MAX_OFFSET))            # positions need not start at 0
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    k_pos = np.arange(tk, dtype=np.int64) + offset
    return f(hq, tq, d), f(hkv, tk, d), f(hkv, tk, d), k_pos[tk - tq:].copy(), k_pos


@st.composite
def covering_problems(draw, case):
    """(selector covering every causal key, problem): the budget is built from the drawn Tk."""
    prob = draw(problems(max_tk=case.cover_max_tk))
    return case.cover(prob[1].shape[1]), prob


@pytest.mark.parametrize("case", MASKABLE, ids=ids(MASKABLE))
@given(problems())
def test_kernel_equals_reference_on_the_selected_set(case, prob):
    tally = drawn("kernel_equals_reference", case)
    q, k, v, q_pos, k_pos = prob
    sel = case.make()
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    # the selection's mask and log-weights (MagicPIG's -log P; 0 for the exact selectors)
    mask, logw = sel.select(q, k, q_pos, k_pos).to_mask(q.shape[0], q.shape[1], k.shape[1])
    ref = dense_reference(q, k, v, q_pos, k_pos, mask=mask, logw=logw)
    tally[1] += 1
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v, logw=logw))


@pytest.mark.parametrize("case", COVERING, ids=ids(COVERING))
@given(data=st.data())
def test_selector_covering_all_causal_keys_equals_dense(case, data):
    tally = drawn("covering_equals_dense", case)
    sel, (q, k, v, q_pos, k_pos) = data.draw(covering_problems(case))
    out, st_ = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_stats=True)
    ref = dense_reference(q, k, v, q_pos, k_pos)
    tally[1] += 1
    assert (st_.n_attended == st_.n_causal).all(), f"{sel} does not cover Tk={k.shape[1]}"
    np.testing.assert_allclose(out, ref, rtol=0, atol=kernel_tol(q, k, v))


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems(full_queries=True), st.data())
def test_output_at_i_unchanged_when_later_keys_change(case, prob, data):
    tally = drawn("causal", case)
    q, k, v, q_pos, k_pos = prob
    tk = k.shape[1]
    i = data.draw(st.integers(0, tk - 1))
    k2, v2 = k.copy(), v.copy()
    k2[:, i + 1:] = 100.0 * np.random.default_rng(i).standard_normal(k2[:, i + 1:].shape)
    v2[:, i + 1:] = -7.0
    sel = case.make()
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, k2, v2, sel, q_pos=q_pos, k_pos=k_pos)
    tally[1] += 1
    # exact: row i's selection and arithmetic read nothing after position i
    np.testing.assert_array_equal(a[:, :i + 1], b[:, :i + 1])


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems(full_queries=True))
def test_decode_step_equals_prefill_row(case, prob):
    tally = drawn("decode_equals_prefill", case)
    q, k, v, q_pos, k_pos = prob
    sel = case.make()
    pre, lse = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    tally[1] += 1
    for i in range(k.shape[1]):
        dec, dl = attend(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], sel, q_pos=q_pos[i:i + 1],
                         k_pos=k_pos[:i + 1], return_lse=True)
        # the same row selection read in the same order: the same float operations. Allow only
        # the reassociation freedom of the vectorised dot (kernel_tol), which is also 0 in practice
        np.testing.assert_allclose(dec[:, 0], pre[:, i], rtol=0, atol=kernel_tol(q, k, v))
        np.testing.assert_allclose(dl[:, 0], lse[:, i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems())
def test_gqa_equals_multihead_on_repeated_kv(case, prob):
    tally = drawn("gqa", case)
    q, k, v, q_pos, k_pos = prob
    g = q.shape[0] // k.shape[0]
    sel = case.make()
    a = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    b = attend(q, np.repeat(k, g, axis=0), np.repeat(v, g, axis=0), sel, q_pos=q_pos, k_pos=k_pos)
    tally[1] += 1
    np.testing.assert_array_equal(a, b)                   # same rows, same numbers, same order


@pytest.mark.parametrize("case", EXACT, ids=ids(EXACT))
@given(problems())
def test_error_bounded_by_missing_probability_mass(case, prob):
    tally = drawn("missing_mass_bound", case)
    q, k, v, q_pos, k_pos = prob
    sel = case.make()
    out = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    hq, tq, d = q.shape
    mask, _ = sel.select(q, k, q_pos, k_pos).to_mask(hq, tq, k.shape[1])
    # dense probabilities p (Hq, Tq, Tk) in float64
    kk = np.repeat(k, hq // k.shape[0], 0).astype(np.float64)
    s = np.einsum("htd,hsd->hts", q.astype(np.float64), kk) / np.sqrt(d)
    causal = k_pos[None, None, :] <= q_pos[None, :, None]
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    mass = (p * (mask & causal)).sum(-1)                  # (Hq, Tq) P_S
    ref = dense_reference(q, k, v, q_pos, k_pos)
    err = np.linalg.norm(out - ref, axis=-1)              # (Hq, Tq)
    vmax = np.linalg.norm(v, axis=-1).max()
    # o_S = sum_S p_j v_j / P_S, so o - o_S = (1 - 1/P_S) sum_S p_j v_j + sum_notS p_j v_j and
    # |o - o_S| <= (1 - P_S) vmax + (1 - P_S) vmax. Slack: the kernel's per-element float32 error
    # (kernel_tol) over d elements, |.|_2 <= sqrt(d) * max. A row that reads no key (P_S = 0)
    # outputs 0, and |0 - o| <= vmax <= the bound's 2 vmax: no row is left out.
    bound = 2 * (1 - mass) * vmax + np.sqrt(d) * kernel_tol(q, k, v)
    tally[1] += 1
    assert (err <= bound).all()


@pytest.mark.parametrize("case", SELECTORS, ids=IDS)
@given(problems(), st.sampled_from([1e4, -1e4]))
def test_extreme_logits_give_no_nan(case, prob, big):
    tally = drawn("extreme_logits", case)
    q, k, v, q_pos, k_pos = prob
    q = q / np.maximum(np.abs(q).max(), 1e-6) * np.float32(np.sqrt(abs(big)))
    k = k / np.maximum(np.abs(k).max(), 1e-6) * np.float32(np.sqrt(abs(big)) * np.sign(big))
    out, lse = attend(q, k, v, case.make(), q_pos=q_pos, k_pos=k_pos, return_lse=True)
    tally[1] += 1
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    # outputs are convex combinations of values, up to the kernel's relative float32 error
    # KERNEL_REL (minisparse/testing/bounds.py; the logit term does not apply: any weights give
    # a convex combination)
    assert (np.abs(out) <= np.abs(v).max() * (1 + KERNEL_REL)).all()


# ---- the suite's own checks ------------------------------------------------------------------
PROPERTIES = [(test_kernel_equals_reference_on_the_selected_set, "kernel_equals_reference", MASKABLE),
              (test_selector_covering_all_causal_keys_equals_dense, "covering_equals_dense", COVERING),
              (test_output_at_i_unchanged_when_later_keys_change, "causal", SELECTORS),
              (test_decode_step_equals_prefill_row, "decode_equals_prefill", SELECTORS),
              (test_gqa_equals_multihead_on_repeated_kv, "gqa", SELECTORS),
              (test_error_bounded_by_missing_probability_mass, "missing_mass_bound", EXACT),
              (test_extreme_logits_give_no_nan, "extreme_logits", SELECTORS)]


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
