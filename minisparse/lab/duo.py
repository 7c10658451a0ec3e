"""DuoAttention's head split, calibrated without optimisation on the model's own synthetic data:
each (layer, KV head) is scored by how much its attention output changes when it reads only
sinks + window instead of every key, on the rows where retrieval happens (the question and the
teacher-forced answer of pass-key examples); the top fraction are retrieval heads.

Follows the role split of Xiao et al. 2024 (DuoAttention), not its training: the paper learns one
gate per KV head by distillation on synthetic pass-key data; this ranking needs one dense forward
per example and no gradient. Each layer is scored on the dense model's own inputs (teacher forced:
a head's change does not propagate to the layers after it). The selector and the file format are
minisparse.attention.duo.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..attention import Dense, Sinks, Window, attend
from ..attention.duo import Calibration, calibration_path, file_sha256
from .tasks import context_ids, make_task_set, question_ids

DEPTHS = (0.2, 0.4, 0.6, 0.8)


class _QKV(dict):
    """A forward trace keeping each layer's k, v and the q rows from `first` on (the rest of a
    trace, every intermediate of every layer, is not needed here)."""

    def __init__(self, first: int):
        super().__init__()
        self.first = first

    def __setitem__(self, name, value):
        if name.endswith(".q"):
            super().__setitem__(name, np.array(value[:, self.first:]))       # (Hq, R, d)
        elif name.endswith((".k", ".v")):
            super().__setitem__(name, np.array(value))                        # (Hkv, T, d)


def head_changes(model, ids, first: int, sinks: int, window: int) -> np.ndarray:
    """(L, Hq): per layer and query head, the mean over rows first .. len(ids)-1 of
    ||o_dense - o_stream|| / ||o_dense||, o the head's attention output on the dense model's
    own q, k, v, o_stream reading only positions < sinks and the window [t - window, t]."""
    cfg = model.config
    trace = _QKV(first)
    model.forward(ids, trace=trace, last_only=True)
    pos = np.arange(len(ids), dtype=np.int64)                                 # (T,)
    stream = Sinks(sinks) | Window(window)
    out = np.zeros((cfg.n_layers, cfg.n_heads))
    for l in range(cfg.n_layers):
        q, k, v = trace[f"blk.{l}.q"], trace[f"blk.{l}.k"], trace[f"blk.{l}.v"]
        full = attend(q, k, v, Dense(), q_pos=pos[first:], k_pos=pos)         # (Hq, R, d)
        part = attend(q, k, v, stream, q_pos=pos[first:], k_pos=pos)          # (Hq, R, d)
        change = np.linalg.norm(full - part, axis=2)                          # (Hq, R)
        # a zero output (all values zero) changes by zero too: count it as no change
        out[l] = (change / np.maximum(np.linalg.norm(full, axis=2), 1e-30)).mean(1)
    return out


def calibrate(model, task: str = "passkey", n: int = 4, length: int = 1536, seed: int = 0,
              sinks: int = 4, window: int = 256, depths=DEPTHS, progress=None) -> Calibration:
    """Score every (layer, KV head) on n examples of `task` (minisparse.lab.tasks) of `length`
    tokens, needles at `depths` in turn, seeds seed .. seed+n-1. A KV head's score is the max of
    its query heads' (it may stream only if every query head reading it can)."""
    cfg, tok = model.config, model.tokenizer
    if model.path is None:
        raise ValueError("calibrate: the model has no file (model.path); the calibration is "
                         "saved beside the model file and names its hash")
    if length <= sinks + window + 1:
        raise ValueError(f"calibrate: length {length} must exceed sinks + window + 1 = "
                         f"{sinks + window + 1}, or streaming reads every key and nothing is ranked")
    t0 = time.perf_counter()
    examples = make_task_set([task], tok, length, list(depths), n, seed)
    q_scores, lengths, rows = np.zeros((cfg.n_layers, cfg.n_heads)), [], []
    for i, ex in enumerate(examples):
        ctx = context_ids(tok, ex.context)
        ids = ctx + question_ids(tok, ex.question) + question_ids(tok, " " + ex.answers[0])
        q_scores += head_changes(model, ids, len(ctx), sinks, window) / n
        lengths.append(len(ids))
        rows.append(len(ids) - len(ctx))
        if progress is not None:
            progress(i + 1, n)
    g = cfg.n_heads // cfg.n_kv_heads
    scores = q_scores.reshape(cfg.n_layers, cfg.n_kv_heads, g).max(2)       # (L, Hkv)
    data = {"task": task, "n": n, "seeds": [ex.seed for ex in examples], "lengths": lengths,
            "depths": [ex.depth for ex in examples], "rows_compared": rows,
            "rows": "question and teacher-forced answer tokens",
            "score": "mean over rows of ||o_dense - o_stream|| / ||o_dense||; KV head = max of its query heads"}
    return Calibration(scores, q_scores, file_sha256(model.path), Path(model.path).name, sinks,
                       window, data, time.perf_counter() - t0)


def save_beside(cal: Calibration, model_path) -> Path:
    """Write the calibration where Duo looks for it: `<model>.duo.json`."""
    return cal.save(calibration_path(model_path))


def ranked(cal: Calibration, fraction: float | None = None) -> list[tuple[int, int, float, str]]:
    """[(layer, KV head, score, role)] highest score first; role 'retrieval' or 'streaming'
    at `fraction` (or '' when None)."""
    mask = cal.retrieval(fraction) if fraction is not None else None
    order = np.argsort(-cal.scores.ravel(), kind="stable")
    hkv = cal.scores.shape[1]
    return [(int(i // hkv), int(i % hkv), float(cal.scores.ravel()[i]),
             "" if mask is None else ("retrieval" if mask.ravel()[i] else "streaming"))
            for i in order]
