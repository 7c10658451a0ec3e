"""Budgets as users state them: every family with a budget takes an absolute key count (64 ...
1024) and, where it makes sense, a fraction; the spec round-trips, the Budget reports it, and a
decode row reads no more than it (exactly it for the exact families)."""
import numpy as np
import pytest

from minisparse.attention import attend
from minisparse.spec import parse_attention_spec

KEYS = [64, 128, 256, 512, 1024]
# spec template, keys its Budget adds to B (fixed parts), keys an exact family reads beyond B
# (None: an approximate one, which reads at most its Budget)
ABSOLUTE = [("topk={}", 0, 0), ("topk={}/kv", 0, 0), ("quest=16/{}", 0, 0),
            ("ivf={}/p8,seed=1", 0, None), ("lsh=K8L75/{},seed=1", 0, None),
            ("magicpig=K8L75/{},seed=1", 0, None),
            ("hybrid={}/0.5", 0, 0), ("random={}x1,seed=1", 4 + 16, None),
            ("window={}", 0, 1),     # a window of B: the B keys before the query, and its own
            ("tidal={}/13", 0, 0),   # outside a model: top-k
            ("ashape=4/{}", 4, 4),   # 4 sinks and a window of B keys
            ("vslash={}/0/s4/b64", 4 + 64, None)]   # B columns, 4 sinks, 64 band diagonals
FRACTION = ["topk={}", "topk={}/kv", "quest=16/{}", "ivf={}/p8,seed=1", "lsh=K8L75/{},seed=1",
            "magicpig=K8L75/{},seed=1",
            "hybrid={}/0.5", "random={}x1,seed=1", "tidal={}/13", "vslash={}/0/s4/b0"]


@pytest.fixture(scope="module")
def qkv():
    r = np.random.default_rng(0)
    S = 2048
    q = r.standard_normal((4, 1, 16)).astype(np.float32)          # one decode row, 4 query heads
    k = r.standard_normal((2, S, 16)).astype(np.float32)          # 2 KV heads
    return q, k, k.copy(), S


@pytest.mark.parametrize("B", KEYS)
@pytest.mark.parametrize("template,extra,beyond", ABSOLUTE, ids=[a[0] for a in ABSOLUTE])
def test_absolute_budget_round_trips_and_bounds_the_keys_read(qkv, template, extra, beyond, B):
    q, k, v, S = qkv
    sel = parse_attention_spec(template.format(B))
    assert parse_attention_spec(str(sel)) == sel                  # the spec names one selector
    assert sel.budget.keys == B + extra and sel.budget.fraction is None
    _, st = attend(q, k, v, sel, q_pos=[S - 1], return_stats=True)
    n = st.n_attended[:, 0]
    if beyond is not None:
        assert (n == B + beyond).all(), n                         # Quest: B // 16 whole pages
    else:
        assert (n <= B + extra).all() and (n > 0).all(), n


@pytest.mark.parametrize("template", FRACTION)
@pytest.mark.parametrize("pct", ["2%", "5%", "0.1"])
def test_fraction_budget_round_trips(qkv, template, pct):
    q, k, v, S = qkv
    sel = parse_attention_spec(template.format(pct))
    f = float(pct[:-1]) / 100 if pct.endswith("%") else float(pct)
    assert parse_attention_spec(str(sel)) == sel
    assert sel.budget.fraction == pytest.approx(f)
    _, st = attend(q, k, v, sel, q_pos=[S - 1], return_stats=True)
    # ceil(f * S) keys at most, plus a random mask's sinks and window
    assert (st.n_attended[:, 0] <= np.ceil(f * S) + 20).all()


def test_random_keys_with_structural_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="structural.*needs a density"):
        parse_attention_spec("random=64,mode=structural")
