"""A float64 NumPy forward pass over a GGUF file, kept beside the oracles to localise disagreements.

Leaves out: KV caching, sampling, every quant format `gguf.quants.dequantize` does not handle.
Follows llama.cpp's graph for `llama` (interleaved-pair RoPE) and `qwen2` (NEOX half-split RoPE,
q/k/v biases). It is a debugging aid, not a third oracle: it was written by this project.
`forward(path, ids, taps)` fills `taps` with per-layer intermediates (name -> float64 array).
"""
from __future__ import annotations

import numpy as np
import gguf


def _meta(r: gguf.GGUFReader, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def load(path):
    r = gguf.GGUFReader(str(path))
    arch = _meta(r, "general.architecture")
    w = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        w[t.name.removesuffix(".weight")] = a.reshape(tuple(int(n) for n in reversed(t.shape)))
    D = int(_meta(r, f"{arch}.embedding_length"))
    Hq = int(_meta(r, f"{arch}.attention.head_count"))
    cfg = dict(arch=arch, D=D, Hq=Hq, Hkv=int(_meta(r, f"{arch}.attention.head_count_kv", Hq)),
               d=int(_meta(r, f"{arch}.attention.key_length", D // Hq)),
               L=int(_meta(r, f"{arch}.block_count")),
               eps=float(_meta(r, f"{arch}.attention.layer_norm_rms_epsilon")),
               base=float(_meta(r, f"{arch}.rope.freq_base", 10000.0)))
    return cfg, w


def rms_norm(x, g, eps):                       # x (T, D)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope(x, pos, base, neox):                  # x (H, T, d), pos (T,)
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)   # (d/2,)
    ang = pos[:, None] * inv[None, :]          # (T, d/2)
    c, s = np.cos(ang), np.sin(ang)
    if neox:                                   # pairs (i, i + d/2)
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * c - b * s, a * s + b * c], -1)
    a, b = x[..., 0::2], x[..., 1::2]          # pairs (2i, 2i+1)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def forward(path, ids, taps: dict | None = None) -> np.ndarray:
    cfg, w = load(path)
    taps = {} if taps is None else taps
    T, Hq, Hkv, d = len(ids), cfg["Hq"], cfg["Hkv"], cfg["d"]
    G, neox, pos = Hq // Hkv, cfg["arch"] == "qwen2", np.arange(T, dtype=np.float64)
    x = w["token_embd"][np.asarray(ids)]       # (T, D)
    for i in range(cfg["L"]):
        p = f"blk.{i}."
        h = rms_norm(x, w[p + "attn_norm"], cfg["eps"])
        q, k, v = (h @ w[p + n].T + w.get(p + n + ".bias", 0.0) for n in ("attn_q", "attn_k", "attn_v"))
        taps[p + "q_preRoPE"] = q
        q = rope(q.reshape(T, Hq, d).transpose(1, 0, 2), pos, cfg["base"], neox)    # (Hq, T, d)
        k = rope(k.reshape(T, Hkv, d).transpose(1, 0, 2), pos, cfg["base"], neox)   # (Hkv, T, d)
        v = v.reshape(T, Hkv, d).transpose(1, 0, 2)                                 # (Hkv, T, d)
        k, v = np.repeat(k, G, 0), np.repeat(v, G, 0)                               # (Hq, T, d)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)                                   # (Hq, T, T)
        s = np.where(np.tri(T, dtype=bool), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v                                      # (Hq, T, d)
        o = o.transpose(1, 0, 2).reshape(T, Hq * d)
        taps[p + "attn_out"] = o
        x = x + o @ w[p + "attn_output"].T
        h = rms_norm(x, w[p + "ffn_norm"], cfg["eps"])
        g, u = h @ w[p + "ffn_gate"].T, h @ w[p + "ffn_up"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down"].T
        taps[p + "out"] = x
    h = rms_norm(x, w["output_norm"], cfg["eps"])
    return h @ w.get("output", w["token_embd"]).T                                   # (T, V)
