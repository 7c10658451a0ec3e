"""FlexAttention both ways (minisparse.flex): every registered selector family's output equals
torch's flex_attention with the exported mask (and log-weights as a score_mod) on the CPU, and a
mask written for FlexAttention, imported, passes the kit's check_selector."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="FlexAttention needs torch: pip install minisparse[torch]")
pytest.importorskip("torch.nn.attention.flex_attention",
                    reason="FlexAttention needs PyTorch >= 2.5: pip install minisparse[torch]")

from minisparse.attention import LSH, Sinks, TopK, Window, attend               # noqa: E402
from minisparse.flex import (flex_attend, from_mask_mod, selection_arrays,     # noqa: E402
                             to_block_mask)
from minisparse.spec import suite_selectors                                       # noqa: E402
from minisparse.testing import U, check_selector, kernel_tol, logit_err, make_problem  # noqa: E402

FAMILIES = suite_selectors() + [
    ("sinks=1,window=3,magicpig", lambda: Sinks(1) | Window(3) | LSH(3, 10, seed=1, mode="sample")),
    ("window=3&topk=5", lambda: Window(3) & TopK(5)),
]
# 37 keys: no multiple of FlexAttention's block (128, or 16 below); a prefill from position 0,
# and a chunk of 13 queries over gapped positions (a cache that evicted), GQA 4:2, float16 K/V
PROBLEMS = {"prefill": dict(seed=1, hq=4, hkv=2, k_pos=list(range(37)), d=8),
            "gapped-chunk": dict(seed=2, hq=4, hkv=2, tq=13, d=8, kv="float16",
                                 k_pos=(3 + np.cumsum(np.random.default_rng(0).integers(1, 4, 37))).tolist())}


def flex_tol(q, k, v, logw):
    """Bound on |flex_attention - float64 reference| per element. Eager flex_attention on the CPU
    materialises the float32 scores and takes a softmax over all Tk keys: the logit error e of
    logit_err (same dot, scale and log-weight add), and the exp, sums over Tk terms and division
    within (2 Tk + 5) u relative (the kernel_tol derivation with one chunk of Tk keys)."""
    e = logit_err(q, k, logw)
    return (np.expm1(2 * e) + (2 * k.shape[1] + 5) * U) * np.abs(v).max() + 1e-12


@pytest.mark.parametrize("prob", PROBLEMS, ids=list(PROBLEMS))
@pytest.mark.parametrize("spec, make", FAMILIES, ids=[s for s, _ in FAMILIES])
def test_minisparse_equals_flex_attention_with_the_exported_mask(spec, make, prob):
    q, k, v, q_pos, k_pos = p = make_problem(**PROBLEMS[prob])
    sel = make().select(q, k.astype(np.float32), q_pos, k_pos).normalize()
    if sel.n_extra:
        pytest.skip(f"{spec} reads pseudo-keys (landmarks): no FlexAttention mask form")
    ours = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    theirs = flex_attend(q, k, v, sel, q_pos, k_pos, block_size=16)
    mask, logw = selection_arrays(sel, q.shape[0], q_pos, k_pos)
    # a row that reads no key: minisparse gives 0; FlexAttention gives 0 too (no NaN) - compared
    # both within the triangle inequality through the float64 reference: kernel_tol + flex_tol
    tol = kernel_tol(q, k, v, logw=logw) + flex_tol(q, k, v, logw)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol, err_msg=f"{spec} on {p!r}")


def test_block_mask_covers_lengths_that_are_no_block_multiple():
    q, k, v, q_pos, k_pos = make_problem(seed=4, hq=2, hkv=1, k_pos=list(range(37)), d=8)
    sel = Window(5).select(q, k, q_pos, k_pos)
    bm = to_block_mask(sel, 2, q_pos, k_pos, block_size=16)
    assert tuple(bm.shape) == (1, 2, 37, 37)
    dense = bm.to_dense()[0]                                      # (Hq, 3, 3) blocks of 16
    # the last query block (rows 32..36) reads key block 1 (keys 27..31 lie in it) and 2
    assert dense[0, 2].tolist() == [0, 1, 1]


def sliding_window_with_sink(b, h, q_idx, kv_idx):
    """As written for attention-gym: a window of 4 plus the first key, causal."""
    return (q_idx >= kv_idx) & ((q_idx - kv_idx < 4) | (kv_idx == 0))


DOC = torch.tensor([0] * 20 + [1] * 60 + [2] * 60)               # document id of each position


def document_causal(b, h, q_idx, kv_idx):
    """attention-gym's document mask: a query reads earlier keys of its own document."""
    return (q_idx >= kv_idx) & (DOC[q_idx] == DOC[kv_idx])


@pytest.mark.parametrize("mask_mod", [sliding_window_with_sink, document_causal],
                         ids=["sliding+sink", "document"])
def test_a_flex_attention_mask_imported_passes_check_selector(mask_mod):
    names = check_selector(from_mask_mod(mask_mod), max_examples=15)
    assert "kernel_equals_reference" in names and "decode_equals_prefill" in names


def test_an_imported_flex_mask_reads_what_flex_attention_reads():
    sel = from_mask_mod(document_causal)
    q, k, v, q_pos, k_pos = make_problem(seed=5, hq=2, hkv=1, k_pos=list(range(40)), d=8)
    ours = attend(q, k, v, sel, q_pos=q_pos, k_pos=k_pos)
    theirs = flex_attend(q, k, v, sel, q_pos, k_pos)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=kernel_tol(q, k, v) + flex_tol(q, k, v, None))
