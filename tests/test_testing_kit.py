"""The public kit (minisparse.testing) catches planted bugs, passes correct selectors and masks,
and times selection apart from the kernel. Each planted bug must raise AssertionError from
check_selector with a shrunk counterexample that rebuilds the failing problem."""
import re

import numpy as np
import pytest

from minisparse.attention import Selection, Selector, Sinks, TopK, Window, attend
from minisparse.testing import (MaskSelector, check_selector, from_mask_fn, make_problem,
                                time_selector)

FEW = 15                                   # examples per invariant: a planted bug fails at once


# ---- planted bugs ------------------------------------------------------------------------------
def most_like_newest(q, k, q_pos, k_pos):
    """Each query reads the causal key most similar to the NEWEST key of the call: a future key
    steers the choice of the earlier rows (the kernel's causality cannot stop that)."""
    sim = (k[0] @ k[0, -1]).astype(np.float64)                         # (Tk,) reads k[-1]
    causal = k_pos[None, :] <= q_pos[:, None]                            # (Tq, Tk)
    best = np.where(causal, sim[None, :], -np.inf).argmax(-1)           # (Tq,)
    return np.arange(len(k_pos))[None, :] == best[:, None]


class DoubleCount(Selector):
    """Every key by range, key 0 again by index, and the Selection claims to be normalised:
    the kernel reads key 0 twice."""
    def _select(self, q, k, q_pos, k_pos):
        tq, tk = len(q_pos), k.shape[1]
        return Selection.from_lists(np.arange(tq + 1), np.zeros(tq, np.int64), tk, tq=tq,
                                    r_ptr=np.arange(tq + 1), r_lo=np.zeros(tq), r_hi=np.full(tq, tk),
                                    normalized=True)

    def describe(self):
        return "double-count"


class RowIndexWindow(Selector):
    """A window of 2 keys ending at the query's ROW index t, not at its position: right for a
    prefill (row t is key t), wrong for a decode step (its one row is t = 0)."""
    def _select(self, q, k, q_pos, k_pos):
        t = np.arange(len(q_pos))
        return Selection.from_ranges(np.maximum(t - 1, 0), t + 1, k.shape[1], tq=len(q_pos))

    def describe(self):
        return "row-index-window"


@pytest.mark.parametrize("bug, invariant", [
    (most_like_newest, "later_keys_change_nothing"),
    (DoubleCount(), "density_equals_keys_read"),
    (DoubleCount(), "kernel_equals_reference"),
    (RowIndexWindow(), "decode_equals_prefill"),
], ids=["future-key", "double-count-density", "double-count-output", "decode-not-prefill"])
def test_check_selector_catches_each_planted_bug_with_a_counterexample(bug, invariant, capsys):
    with pytest.raises(AssertionError) as err:
        check_selector(bug, max_examples=FEW, only=[invariant])
    msg = str(err.value)
    print(msg)                                                   # the counterexample, for the docs
    assert f"invariant {invariant!r} fails" in msg
    # the shrunk counterexample is a make_problem(...) call that rebuilds the failing input
    call = msg[msg.index("make_problem("):].split("\n")[0].rstrip(",")
    call = call[:call.index(")") + 1]
    prob = eval(call, {"make_problem": make_problem})
    assert prob.k.shape[1] >= 1


def test_check_selector_without_only_fails_on_a_planted_bug():
    with pytest.raises(AssertionError, match="fails"):
        check_selector(RowIndexWindow(), max_examples=FEW)


# ---- correct selectors and masks pass ---------------------------------------------------------
def sliding_and_sink(q, k, q_pos, k_pos):
    """A FlexAttention-style mask_mod over positions: the first key and a window of 3."""
    return (k_pos[None, :] == k_pos[0]) | (q_pos[:, None] - k_pos[None, :] < 3)


def best_key_per_head(q, k, q_pos, k_pos):
    """Content-aware: each query head reads its own highest-scoring causal key and itself."""
    g = q.shape[0] // k.shape[0]
    s = np.einsum("htd,hsd->hts", q, np.repeat(k, g, 0).astype(np.float32))   # (Hq, Tq, Tk)
    causal = k_pos[None, None, :] <= q_pos[None, :, None]
    best = np.where(causal, s, -np.inf).argmax(-1)                            # (Hq, Tq)
    return (np.arange(len(k_pos)) == best[..., None]) | (k_pos == q_pos[:, None])[None]


@pytest.mark.parametrize("obj", [sliding_and_sink, best_key_per_head,
                                 lambda: Sinks(1) | TopK(3), Window(2) & TopK(4)],
                         ids=["mask", "content-mask", "factory", "intersection"])
def test_correct_selectors_and_masks_pass_every_invariant(obj):
    names = check_selector(obj, max_examples=FEW)
    assert "density_equals_keys_read" in names and "decode_equals_prefill" in names


def test_mask_selector_reads_exactly_the_masked_causal_keys():
    p = make_problem(seed=3, hq=2, hkv=1, k_pos=[0, 2, 3, 7, 8])
    sel = from_mask_fn(sliding_and_sink)
    _, st = attend(p.q, p.k, p.v, sel, q_pos=p.q_pos, k_pos=p.k_pos, return_stats=True)
    # row at position 8 reads the sink (0) and positions 7, 8 (8 - p < 3)
    assert st.n_attended[:, -1].tolist() == [3, 3]


def test_mask_with_a_wrong_shape_is_an_error_naming_it():
    bad = MaskSelector(lambda q, k, qp, kp: np.ones((len(qp), len(kp) + 1), bool), name="wide")
    with pytest.raises(ValueError, match="mask 'wide': expected a bool array"):
        bad.select(None, np.zeros((1, 3, 2), np.float32), np.arange(3), np.arange(3))


def test_check_selector_rejects_what_is_not_a_selector():
    with pytest.raises(ValueError, match="expected a Selector"):
        check_selector(42)


# ---- composition and timing ---------------------------------------------------------------------
def test_intersection_reads_the_keys_both_read():
    p = make_problem(seed=1, hq=2, hkv=1, k_pos=list(range(10)))
    q, k, v, qp, kp = p
    both = (Window(3) & TopK(4)).select(q, k, qp, kp).to_mask(2, 10, 10)[0]
    a = Window(3).select(q, k, qp, kp).to_mask(2, 10, 10)[0]
    b = TopK(4).select(q, k, qp, kp).to_mask(2, 10, 10)[0]
    assert np.array_equal(both, a & b)


def test_intersection_of_pseudo_keys_is_an_error():
    from minisparse.attention import Landmarks
    p = make_problem(k_pos=list(range(12)))
    with pytest.raises(ValueError, match="pseudo-keys"):
        (Window(3) & Landmarks(4)).select(p.q, p.k, p.q_pos, p.k_pos)


def test_time_selector_times_select_and_kernel_apart():
    t = time_selector(TopK(8), make_problem(k_pos=range(256), tq=64, d=16), repeat=2)
    assert set(t) == {"select_s", "kernel_s"} and t["select_s"] > 0 and t["kernel_s"] > 0


def test_the_docs_example_fails_as_docs_testing_md_shows():
    # the first python block of docs/testing.md is the planted-bug example; it must fail the way
    # the page says, and pass once fixed as the page says
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    code = text.split("```python\n")[1].split("```")[0]
    with pytest.raises(AssertionError, match="invariant 'decode_equals_prefill' fails") as err:
        exec(code, {"__name__": "docs_example"})
    # Hypothesis names the shrunk example "Falsifying example" (6.155) or "Failing test case"
    # (6.170 and later); the kit passes its text on as it is
    assert re.search(r"(Falsifying example|Failing test case): decode_equals_prefill\(", str(err.value))
    assert "make_problem(" in str(err.value)
    fixed = code.replace("i = np.arange(len(q_pos))", 'i = np.searchsorted(k_pos, q_pos, side="right") - 1')
    assert fixed != code
    exec(fixed, {"__name__": "docs_example"})


def test_check_selector_takes_a_selector_class_and_rejects_a_factory_of_something_else():
    from minisparse.attention import Dense
    assert check_selector(Dense, max_examples=5, only=["covering_equals_dense"]) == ["covering_equals_dense"]
    with pytest.raises(ValueError, match="returned int, expected a Selector"):
        check_selector(lambda: 3)
    with pytest.raises(ValueError, match="not invariants that apply"):
        check_selector(Dense, only=["no_such_invariant"])
