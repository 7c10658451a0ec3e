"""minisparse.attention: one Numba kernel over index sets, selectors that choose the sets, and a
float64 dense reference every selector is tested against. The kernel here is the readable
reference; the fast path (minisparse/fast/attention.py: a chunked float32 row kernel, and BLAS
products by query tiles for a dense prefill) plugs into `attend` and is tested against it.

Leaves out caches (minisparse.cache) and the model. Layout follows FlexAttention without batch:
q (Hq, Tq, d), k, v (Hkv, Tk, d); query head h reads KV head h // (Hq // Hkv); causal by
position (key j visible to query t iff k_pos[j] <= q_pos[t]).

How it fits together
--------------------
selector.select(q, k, q_pos, k_pos) -> Selection         (selection.py)
    rows = (row head, query); row heads are shared (1), per KV head, or per query head.
    Each row: a CSR list of key RANGES [lo, hi) (dense / window / sinks / blocks: one range)
    plus a CSR list of EXPLICIT indices with float32 log-weights (samplers add -log P) and an
    exact flag; indices >= Tk name pseudo-keys (landmarks) carried in the Selection, each with
    its own position and the span of real keys it summarises.
a | b  -> Union: rows broadcast to the finer head kind, lists concatenated, then normalised:
    each key read once, exact picks win (log-weight 0); a pseudo-key standing for the `span` keys
    of its block (log-weight log span) loses the c of them the row reads exactly (log-weight
    log(span - c), dropped at c = span), so no key is ever counted twice.
a & b  -> Intersection: keys every member reads (log-weights add), through dense masks: for
    composing and testing variants; pseudo-keys have no intersection.
attend(q, k, v, selector) -> out [, lse] [, stats]       (kernel.py: attend_rows, merge_lse)
    one jitted kernel: ranges then explicit indices, causality by position, online softmax in
    float64; `attend(..., kernel=)` or `use_kernel` runs another (the fast path's). Callers
    parse spec strings. k, v may be float16 (store_kv): attend casts.
dense_reference(q, k, v, q_pos, k_pos, mask, logw)      (reference.py), Selection.to_mask.
Selectors here: Dense, Window, Sinks, Globals, BlockLocal, Strided, LogStride, Landmarks,
RuvLLM (patterns.py), RandomMask (random_mask.py), TopK (topk.py), Quest, LSH / MagicPIG, IVF,
Hybrid, Twilight's TopP, MInference's VerticalSlash and AShape (minference.py), TidalDecode
(tidal.py), DuoAttention's head roles (Duo), and the approximate scorers with exact attention
SparQ, Loki, Indexer
(recall_at_k); the contract they follow is selector.py. Spec strings ("sinks=4,window=128") are parsed
one layer up, by minisparse.spec.parse_attention_spec, which also knows the gated selector
(minisparse.gate): this package imports nothing above itself, and the kernel imports no selector.

Where does a new selector go?
-----------------------------
1. One file `minisparse/attention/<name>.py` with a `Selector` subclass implementing
   `_select(q, k, q_pos, k_pos) -> Selection` (build rows with Selection.from_ranges /
   Selection.from_lists; per-query-head choices use head_kind=Q, n_heads=Hq), `describe()`
   returning its spec, and `budget` when it has one. Set `options = ("seed",)` when a seed
   fixes its choice, and `exact_subset = False` when it reads pseudo-keys or non-zero log-weights.
2. One line in `minisparse/spec.py`'s REGISTRY (e.g. "topk": Family("attention", ...)), or
   `minisparse.spec.register(...)` from outside the package.
3. The shared property suite (tests/test_attention_properties.py) runs every registered
   family's example spec; the round-trip test checks parse_attention_spec(str(sel)) == sel.
   minisparse.testing.check_selector(sel) runs the same invariants on one selector (docs/testing.md).
docs/design.md walks through it.

>>> import numpy as np
>>> from minisparse.attention import attend, Sinks, Window
>>> q = np.ones((2, 5, 4), np.float32); k = v = np.ones((1, 5, 4), np.float32)
>>> out, stats = attend(q, k, v, Sinks(1) | Window(2), return_stats=True)
>>> stats.n_attended[0].tolist()
[1, 2, 3, 4, 4]
"""
from .kernel import (AttentionStats, Inputs, Rows, attend, attend_rows, merge_lse,
                     reference_kernel, store_kv, use_kernel)
from .patterns import (BlockLocal, Dense, Globals, Landmarks, LogStride, RunningLandmarks,
                       RuvLLM, Sinks, Strided, Window)
from .random_mask import RandomMask
from .topk import TopK
from .quest import Quest
from .lsh import LSH, LSHIndex
from .ivf import IVF, IVFIndex
from .hybrid import Hybrid
from .sparq import SparQ
from .loki import Loki
from .indexer import Indexer
from .topp import TopP
from .minference import AShape, VerticalSlash
from .tidal import Tidal
from .duo import Duo
from .reference import dense_reference
from .selection import KV, Q, SHARED, Selection, union
from .selector import Budget, Intersection, Selector, Union

__all__ = [
    "attend", "attend_rows", "reference_kernel", "use_kernel", "Inputs", "Rows", "merge_lse",
    "AttentionStats", "dense_reference", "Selection", "Selector", "Union", "Intersection", "union",
    "SHARED", "KV", "Q",
    "Dense", "Window", "Sinks", "Globals", "BlockLocal", "Strided", "LogStride", "Landmarks",
    "RunningLandmarks", "RuvLLM", "RandomMask", "store_kv", "Budget",
    "TopK", "Quest", "LSH", "LSHIndex", "IVF", "IVFIndex", "Hybrid", "SparQ", "Loki", "Indexer",
    "TopP", "VerticalSlash", "AShape", "Tidal", "Duo",
]
