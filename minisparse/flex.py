"""FlexAttention both ways: a minisparse selection as the mask_mod / score_mod / BlockMask that
torch.nn.attention.flex_attention takes, and a FlexAttention mask_mod as a minisparse selector,
so a mask written for a GPU engine is property-tested here (minisparse.testing.check_selector).

torch is an optional extra (pip install minisparse[torch]), imported only when called. Leaves out
pseudo-keys (landmarks have no mask form: an error naming them) and batch (minisparse has none);
follows the mask_mod(b, h, q_idx, kv_idx) / score_mod(score, b, h, q_idx, kv_idx) signatures of
torch.nn.attention.flex_attention (PyTorch >= 2.5).
"""
from __future__ import annotations

import numpy as np

from .attention.selection import Selection
from .testing.mask import MaskSelector


def _torch():
    try:
        import torch
        from torch.nn.attention import flex_attention
    except ImportError as e:                                     # the extra is not installed
        raise ImportError("minisparse.flex needs torch with FlexAttention (PyTorch >= 2.5): "
                          "pip install minisparse[torch]") from e
    return torch, flex_attention


def selection_arrays(selection, hq, q_pos, k_pos):
    """(mask (Hq, Tq, Tk) bool, logw (Hq, Tq, Tk) float64): the keys a Selection makes each row
    read with causality by position applied (FlexAttention applies none of its own), and their
    log-weights (0 for exact picks; a sampler's -log P)."""
    if selection.n_extra:
        raise ValueError(f"minisparse.flex: the selection reads {selection.n_extra} pseudo-keys "
                         f"(landmarks), which have no FlexAttention mask form")
    q_pos, k_pos = np.asarray(q_pos, np.int64), np.asarray(k_pos, np.int64)
    mask, logw = selection.to_mask(hq, len(q_pos), len(k_pos))
    mask &= k_pos[None, None, :] <= q_pos[None, :, None]         # (Hq, Tq, Tk)
    return mask, np.where(mask, logw, 0.0)


def to_mask_mod(selection, hq, q_pos, k_pos):
    """mask_mod(b, h, q_idx, kv_idx) -> bool: True where query row q_idx of head h reads key
    kv_idx (indices into this call's queries and keys, as FlexAttention passes them).

    >>> import numpy as np
    >>> from minisparse.attention import Window
    >>> pos = np.arange(4)
    >>> s = Window(1).select(None, np.zeros((1, 4, 2), np.float32), pos, pos)
    >>> mm = to_mask_mod(s, 1, pos, pos)
    >>> import torch; bool(mm(0, 0, torch.tensor(3), torch.tensor(2)))
    True
    """
    torch, _ = _torch()
    mask = torch.from_numpy(selection_arrays(selection, hq, q_pos, k_pos)[0])

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[h, q_idx, kv_idx]
    return mask_mod


def to_score_mod(selection, hq, q_pos, k_pos):
    """score_mod(score, b, h, q_idx, kv_idx) adding the selection's log-weights (MagicPIG's
    -log P), or None when every log-weight is 0 (exact selectors need no score_mod)."""
    torch, _ = _torch()
    logw = selection_arrays(selection, hq, q_pos, k_pos)[1]
    if not logw.any():
        return None
    lw = torch.from_numpy(logw.astype(np.float32))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + lw[h, q_idx, kv_idx]
    return score_mod


def to_block_mask(selection, hq, q_pos, k_pos, block_size=128):
    """The BlockMask flex_attention(..., block_mask=) takes for this selection, on the CPU."""
    torch, fa = _torch()
    return fa.create_block_mask(to_mask_mod(selection, hq, q_pos, k_pos), None, hq, len(q_pos),
                                len(k_pos), device="cpu", BLOCK_SIZE=block_size)


def flex_attend(q, k, v, selector, q_pos, k_pos, block_size=128):
    """flex_attention on the keys `selector` (a Selector or a Selection) picks, with its
    log-weights as a score_mod: out (Hq, Tq, d) float32, the counterpart of minisparse's attend.
    q (Hq, Tq, d), k, v (Hkv, Tk, d); float16 K/V are computed in float32, as attend does."""
    torch, fa = _torch()
    q = np.asarray(q, np.float32)
    k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
    sel = selector if isinstance(selector, Selection) else selector.select(q, k, q_pos, k_pos)
    sel = sel.normalize()
    hq = q.shape[0]
    bm = to_block_mask(sel, hq, q_pos, k_pos, block_size)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))[None]   # noqa: E731  (1, H, T, d)
    import warnings
    with warnings.catch_warnings():
        # eager (uncompiled) flex_attention warns that it materialises the scores: intended here
        warnings.simplefilter("ignore", UserWarning)
        out = fa.flex_attention(t(q), t(k), t(v), score_mod=to_score_mod(sel, hq, q_pos, k_pos),
                                block_mask=bm, enable_gqa=hq != k.shape[0])
    return out[0].numpy()


def from_mask_mod(mask_mod, name=None) -> MaskSelector:
    """A selector reading the keys a FlexAttention mask_mod(b, h, q_idx, kv_idx) allows. The
    mask_mod is called once on broadcast tensors (h (Hq,1,1), q_idx (1,Tq,1), kv_idx (1,1,Tk)),
    with positions where FlexAttention passes indices: they agree for a prefill from position 0,
    and a causal mask_mod stays causal for a decode step or a cache with gaps.

    >>> import numpy as np
    >>> sel = from_mask_mod(lambda b, h, q_idx, kv_idx: q_idx - kv_idx < 2, name="window2")
    >>> pos = np.arange(5)
    >>> sel.select(None, np.zeros((1, 5, 2), np.float32), pos, pos).rows(0, 4)
    ([], [(3, 0.0), (4, 0.0)])
    """
    torch, _ = _torch()

    def fn(q, k, q_pos, k_pos):
        hq = k.shape[0] if q is None else q.shape[0]
        h = torch.arange(hq)[:, None, None]
        qi = torch.from_numpy(np.asarray(q_pos, np.int64))[None, :, None]
        ki = torch.from_numpy(np.asarray(k_pos, np.int64))[None, None, :]
        m = torch.as_tensor(mask_mod(torch.tensor(0), h, qi, ki))
        return np.broadcast_to(m.numpy().astype(bool), (hq, len(q_pos), len(k_pos)))
    return MaskSelector(fn, name or getattr(mask_mod, "__name__", "mask_mod"))
