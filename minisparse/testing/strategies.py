"""Hypothesis strategies for attention problems: the inputs every property of the kit draws.

A drawn `Problem` covers what a hand-written test forgets: GQA ratios, several head widths,
positions that do not start at 0 and have gaps (a cache that evicted keys), lengths that are no
multiple of any block, float16 keys and values (as a cache stores them) and large logits. Its
repr is the call that rebuilds it, so a shrunk counterexample can be pasted into a test.
Leaves out batch (minisparse has none) and the model; follows FlexAttention's layout without B.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

# (Hq, Hkv): multi-head, GQA 2:1 and 4:2, and two KV heads of one query head each
GQA = ((1, 1), (2, 1), (4, 2), (2, 2))
HEAD_DIMS = (4, 8, 12)                     # 12: a width that is no power of two
MAX_TK = 24


class Problem:
    """One attention problem: q (Hq, Tq, d) float32, k, v (Hkv, Tk, d) float32 or float16,
    q_pos (Tq,), k_pos (Tk,) int64 increasing; the queries are the last Tq keys' positions.
    Unpacks as (q, k, v, q_pos, k_pos); repr is the `make_problem(...)` call that rebuilds it."""

    def __init__(self, q, k, v, q_pos, k_pos, args):
        self.q, self.k, self.v, self.q_pos, self.k_pos = q, k, v, q_pos, k_pos
        self.args = args

    def __iter__(self):
        return iter((self.q, self.k, self.v, self.q_pos, self.k_pos))

    def __repr__(self):
        return "make_problem(" + ", ".join(f"{a}={v!r}" for a, v in self.args.items()) + ")"


def make_problem(seed=0, hq=1, hkv=1, tq=None, k_pos=(0, 1, 2, 3), d=4, kv="float32",
                 logit_scale=1.0):
    """The Problem a strategy drew, rebuilt from its repr: standard normal q, k, v from `seed`,
    q and k scaled by sqrt(logit_scale) (logits grow by logit_scale), k and v stored as `kv`.

    >>> p = make_problem(seed=1, hq=2, hkv=1, tq=2, k_pos=[3, 4, 9], d=4)
    >>> p.q.shape, p.k.shape, p.q_pos.tolist()
    ((2, 2, 4), (1, 3, 4), [4, 9])
    """
    k_pos = np.asarray(k_pos, np.int64)
    tk = k_pos.size
    tq = tk if tq is None else tq
    if tk == 0 or not 1 <= tq <= tk or hq % hkv or np.any(np.diff(k_pos) <= 0):
        raise ValueError(f"make_problem: need 1 <= tq <= len(k_pos), hq a multiple of hkv and "
                         f"increasing k_pos; got tq={tq}, k_pos={k_pos.tolist()}, hq={hq}, hkv={hkv}")
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)     # noqa: E731
    s = np.float32(np.sqrt(logit_scale))
    q, k, v = f(hq, tq, d) * s, (f(hkv, tk, d) * s).astype(kv), f(hkv, tk, d).astype(kv)
    args = dict(seed=seed, hq=hq, hkv=hkv, tq=tq, k_pos=k_pos.tolist(), d=d, kv=kv,
                logit_scale=logit_scale)
    return Problem(q, k, v, k_pos[tk - tq:].copy(), k_pos, args)


@st.composite
def problems(draw, max_tk=MAX_TK, full_queries=False, gqa=GQA, head_dims=HEAD_DIMS,
             max_offset=5, gaps=True, float16=True, logit_scales=(1.0, 1.0, 1.0, 16.0)):
    """Problems of 1..max_tk keys. full_queries: Tq = Tk (a prefill), else 1..Tk queries (a
    decode or a chunk). gaps: positions may skip (an evicting cache); float16: k, v may be stored
    as float16; logit_scales: the logit magnifications drawn from (16 makes softmax peaked).

    >>> from hypothesis import given
    >>> @given(problems(max_tk=4))
    ... def shapes(p):
    ...     q, k, v, q_pos, k_pos = p
    ...     assert q.shape[1] == len(q_pos) <= k.shape[1] == len(k_pos)
    >>> shapes()
    """
    tk = draw(st.integers(1, max_tk))
    tq = tk if full_queries else draw(st.integers(1, tk))
    hq, hkv = draw(st.sampled_from(gqa))
    d = draw(st.sampled_from(head_dims))
    offset = draw(st.integers(0, max_offset))                   # positions need not start at 0
    steps = draw(st.lists(st.integers(1, 4), min_size=tk - 1, max_size=tk - 1)) if gaps \
        else [1] * (tk - 1)
    k_pos = [offset + int(x) for x in np.cumsum([0] + steps)]
    kv = draw(st.sampled_from(["float32", "float16"])) if float16 else "float32"
    scale = draw(st.sampled_from(logit_scales))
    seed = draw(st.integers(0, 2**31 - 1))
    return make_problem(seed, hq, hkv, tq, k_pos, d, kv, scale)
