"""DuoAttention head roles: retrieval heads read every causal key, streaming heads read the
attention sinks and a recent window; which (layer, KV head) is which comes from a calibration
saved next to the model file (`<model>.duo.json`).

Follows Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", which gates each KV head (so a streaming head's KV cache can shrink to sinks +
window for every query head that reads it). Leaves out the paper's trained gates (the ranking
here is optimisation-free: how much a head's output changes under sinks + window, measured by
minisparse.lab.duo), its bounded KV cache for streaming heads (every key stays cached here; the
selector only reads fewer) and its chunked prefill. The calibration (scores, data, the model's
hash) is this file's `Calibration`; computing it runs the model, one layer up.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .selection import KV, Selection, sorted_positions
from .selector import Budget, Selector

SUFFIX = ".duo.json"
FORMAT = "minisparse-duo/1"


def calibration_path(model_path) -> Path:
    """Where the calibration of the model file `model_path` lives: beside it, `<model>.duo.json`."""
    return Path(str(model_path) + SUFFIX)


def n_retrieval(fraction: float, n: int) -> int:
    """Retrieval heads among n for a fraction: round half up (0.5 of 1 head is that head), so a
    fraction > 0 never rounds a single head away and the count is the same on every platform."""
    return min(n, int(math.floor(fraction * n + 0.5)))


_HASHES: dict = {}     # (path, size, mtime_ns) -> sha256: hash a model file once per process


def file_sha256(path) -> str:
    """sha256 of a file's bytes (hex), remembered while its size and mtime stay the same."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _checksum(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Calibration:
    """Per-(layer, KV head) scores (higher = the head's output changes more when it reads only
    sinks + window, so it is kept as a retrieval head) and how they were measured.

    scores    (L, Hkv) mean relative L2 change of the head's output, max over its query heads
    q_scores  (L, Hq)  the same per query head (what the KV head's score is the max of)
    model_sha256, model_name   the model file the scores belong to
    sinks, window              the streaming pattern the scores were measured with
    data      the examples: task, seeds, lengths, depths, which rows were compared
    cost_s    seconds the calibration took (recorded, not checked)
    """
    scores: np.ndarray
    q_scores: np.ndarray
    model_sha256: str
    model_name: str
    sinks: int
    window: int
    data: dict = field(default_factory=dict)
    cost_s: float = 0.0

    def retrieval(self, fraction: float) -> np.ndarray:
        """(L, Hkv) bool: the top `fraction` of all (layer, KV head) pairs by score, ranked over
        the whole model as kvpress and the paper rank them; ties go to the earlier pair."""
        flat = np.asarray(self.scores, np.float64).ravel()
        order = np.argsort(-flat, kind="stable")                  # highest score first
        mask = np.zeros(flat.size, bool)
        mask[order[:n_retrieval(fraction, flat.size)]] = True
        return mask.reshape(self.scores.shape)

    def to_dict(self) -> dict:
        payload = {"format": FORMAT, "scores": np.asarray(self.scores).tolist(),
                   "q_scores": np.asarray(self.q_scores).tolist(),
                   "model_sha256": self.model_sha256, "model_name": self.model_name,
                   "sinks": int(self.sinks), "window": int(self.window), "data": self.data,
                   "cost_s": float(self.cost_s)}
        return {**payload, "checksum": _checksum(payload)}

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @staticmethod
    def load(path, model_path=None) -> "Calibration":
        """Read a calibration; refuse one edited after it was written (its checksum) and, when
        model_path is given, one written for another model file (its sha256)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a DuoAttention calibration (bad JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a DuoAttention calibration (expected format {FORMAT!r})")
        payload = {k: v for k, v in d.items() if k != "checksum"}
        if d.get("checksum") != _checksum(payload):
            raise ValueError(f"{path}: checksum mismatch: the calibration was edited after it was "
                             f"written; recompute it with `minisparse duo calibrate`")
        scores = np.asarray(d["scores"], np.float64)
        q_scores = np.asarray(d["q_scores"], np.float64)
        if scores.ndim != 2 or q_scores.ndim != 2 or q_scores.shape[0] != scores.shape[0]:
            raise ValueError(f"{path}: expected scores (layers, KV heads) and q_scores (layers, "
                             f"query heads); got {scores.shape} and {q_scores.shape}")
        cal = Calibration(scores, q_scores, d["model_sha256"], d["model_name"], d["sinks"],
                          d["window"], d["data"], d["cost_s"])
        if model_path is not None and file_sha256(model_path) != cal.model_sha256:
            raise ValueError(f"{path}: written for another model file ({cal.model_name}, sha256 "
                             f"{cal.model_sha256[:12]}...), not {model_path} (sha256 "
                             f"{file_sha256(model_path)[:12]}...); recompute it with "
                             f"`minisparse duo calibrate -m {model_path}`")
        return cal


_LOADED: dict = {}     # (calibration file, its stat, model file, its stat) -> Calibration


def calibration_for(model_path) -> Calibration:
    """The checked calibration beside model_path; read once while neither file changes."""
    path = calibration_path(model_path)
    if not path.exists():
        raise ValueError(f"duo: no head calibration for {model_path}: expected {path}; write it "
                         f"with `minisparse duo calibrate -m {model_path}`")
    s, m = os.stat(path), os.stat(model_path)
    key = (str(path), s.st_size, s.st_mtime_ns, str(model_path), m.st_size, m.st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = Calibration.load(path, model_path)
    return _LOADED[key]


class Duo(Selector):
    """Duo(fraction, sinks, window): per KV head, every causal key (a retrieval head) or the
    keys at positions < sinks and in [q_pos - window, q_pos] (a streaming head).

    Which heads retrieve: `heads` (Hkv,) bool when given (at_layer sets it from the calibration
    for that layer). Without it (outside a model: the shared property suite, attend on its own)
    no head is known to retrieve, so every head streams, except at fraction 1, where every head
    retrieves in any model. A split by head index (say the first half) would make a model with
    grouped KV heads differ from the same model with its KV heads repeated, which no selector
    may do. In a model, at_layer reads the calibration beside the model file
    (`<model>.duo.json`), or the one passed as `calibration`.

    >>> k = np.zeros((2, 10, 4), np.float32)
    >>> sel = Duo(0.5, sinks=1, window=2, heads=[True, False]).select(None, k, np.array([9]))
    >>> sel.rows(0, 0), sel.rows(1, 0)        # KV head 0 retrieves, KV head 1 streams
    (([(0, 10)], []), ([(0, 1), (7, 10)], []))
    """

    def __init__(self, fraction: float, sinks: int = 4, window: int = 256, heads=None,
                 calibration: Calibration | None = None):
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"Duo: fraction of retrieval heads must be in [0, 1], got {fraction}")
        if int(sinks) < 0 or int(window) < 0:
            raise ValueError(f"Duo: sinks and window must be >= 0, got s{sinks}/w{window}")
        self.fraction, self.sinks, self.window = float(fraction), int(sinks), int(window)
        self.heads = None if heads is None else np.asarray(heads, bool).ravel()
        self.calibration = calibration

    @staticmethod
    def from_spec(val):
        """'0.5/s4/w256' or '50%/s4/w256': the fraction of retrieval heads, then optional sinks
        (s) and window (w) parts; defaults s4, w256."""
        parts = [p for p in (val or "").split("/") if p]
        if not parts:
            raise ValueError("'duo' needs a fraction of retrieval heads, e.g. duo=0.5/s4/w256")
        f = parts[0]
        try:
            fraction = float(f[:-1]) / 100 if f.endswith("%") else float(f)
        except ValueError:
            raise ValueError(f"'duo={val}': expected a fraction of retrieval heads first "
                             f"(0.5 or 50%), got {f!r}") from None
        kw = {}
        for p in parts[1:]:
            name = {"s": "sinks", "w": "window"}.get(p[0])
            if name is None or name in kw or not p[1:].isdigit():
                raise ValueError(f"'duo={val}': unknown or repeated part {p!r} (s<sinks>, "
                                 f"w<window>, each once)")
            kw[name] = int(p[1:])
        return Duo(fraction, **kw)

    def describe(self):
        f = f"{self.fraction:g}"
        return f"duo={f}/s{self.sinks}/w{self.window}"

    @property
    def budget(self):
        # per KV head on average: the retrieval share reads every causal key, the rest sinks+window
        return Budget(round((1 - self.fraction) * (self.sinks + self.window + 1)), self.fraction)

    def with_calibration(self, calibration: Calibration) -> "Duo":
        """This selector reading the given calibration instead of the one beside the model."""
        return Duo(self.fraction, self.sinks, self.window, self.heads, calibration)

    def at_layer(self, layer, shared):
        """The head split of layer `layer`: from the bound calibration, else from the one beside
        the model that runs it (`shared["model"]`, set by Model.forward)."""
        cal = self.calibration
        if cal is None:
            model = shared.get("model")
            if model is None or getattr(model, "path", None) is None:
                raise ValueError(f"{self.describe()}: at_layer needs a calibration; pass one "
                                 f"(Duo.with_calibration) or run it in a model loaded from a file")
            cal = calibration_for(model.path)
        if not 0 <= layer < cal.scores.shape[0]:
            raise ValueError(f"{self.describe()}: layer {layer} outside the calibration's "
                             f"{cal.scores.shape[0]} layers")
        return Duo(self.fraction, self.sinks, self.window, cal.retrieval(self.fraction)[layer], cal)

    def retrieval_heads(self, hkv: int) -> np.ndarray:
        """(Hkv,) bool: which KV heads read every causal key."""
        if self.heads is None:
            return np.full(hkv, self.fraction == 1.0)
        if self.heads.size != hkv:
            raise ValueError(f"{self.describe()}: the head split has {self.heads.size} KV heads, "
                             f"the keys {hkv} (a calibration of another model?)")
        return self.heads

    def _select(self, q, k, q_pos, k_pos):
        sorted_positions("Duo", k_pos)
        hkv, tq, tk = k.shape[0], q_pos.size, k.shape[1]
        hi = np.searchsorted(k_pos, q_pos, side="right")                       # (Tq,) causal end
        cut = np.minimum(np.searchsorted(k_pos, self.sinks, side="left"), hi)  # (Tq,) sinks end
        lo = np.maximum(np.searchsorted(k_pos, q_pos - self.window, side="left"), cut)  # (Tq,)
        fused = lo == cut                          # the window reaches the sinks: one range
        # two range slots per row: [0, cut) the sinks, [lo, hi) the window (or [0, hi) fused)
        s_lo = np.stack([np.zeros(tq, np.int64), np.where(fused, 0, lo)], 1)   # (Tq, 2)
        s_hi = np.stack([cut, hi], 1)                                          # (Tq, 2)
        s_keep = np.stack([(cut > 0) & ~fused, hi > np.where(fused, 0, lo)], 1)
        r_lo = np.stack([np.zeros(tq, np.int64), np.zeros(tq, np.int64)], 1)  # retrieval:
        r_hi = np.stack([np.zeros(tq, np.int64), hi], 1)                       # [0, hi)
        r_keep = np.stack([np.zeros(tq, bool), hi > 0], 1)
        ret = self.retrieval_heads(hkv)[:, None, None]                         # (Hkv, 1, 1)
        lo_all = np.where(ret, r_lo, s_lo).reshape(-1, 2)                      # (Hkv*Tq, 2)
        hi_all = np.where(ret, r_hi, s_hi).reshape(-1, 2)
        keep = np.where(ret, r_keep, s_keep).reshape(-1, 2)
        ptr = np.zeros(hkv * tq + 1, np.int64)
        np.cumsum(keep.sum(1), out=ptr[1:])
        z = np.zeros(0, np.int64)
        return Selection.from_lists(np.zeros(hkv * tq + 1, np.int64), z, tk, head_kind=KV,
                                    n_heads=hkv, tq=tq, r_ptr=ptr, r_lo=lo_all[keep],
                                    r_hi=hi_all[keep], normalized=True)
