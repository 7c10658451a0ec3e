"""KIVI's 2-bit KV cache: keys quantised per channel (groups of G tokens), values per token (groups
of G channels), the most recent tokens kept in full precision; attention reads K, V dequantised.

Leaves out a fused low-bit attention kernel: every read dequantises the whole stored part (O(S d)
per layer and call, about the work of the attention itself), so this saves memory, not time; and
eviction (it stores every position, like the dense cache). Follows Liu et al. 2024, "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache" (Algorithm 1): asymmetric min/max
quantisation x = code * scale + zero with code in {0, 1, 2, 3}, scale = (max - min) / 3 per group.

    keys    full precision until R have gathered, then those R are quantised, each channel in
            groups of G tokens (R a multiple of G): 0..R-1 keys stay full precision
    values  the last R tokens full precision; a token leaving that window is quantised on its
            own, its d channels in groups of G

Storage: codes packed four to a byte (uint8), scale and zero float32 per group (KIVI keeps them
in float16; float32 here keeps the error bound one formula), residual float32.

Shape legend: Hkv KV heads, T tokens in this call, S positions held, N quantised tokens, d head
width, G group size, R residual length, L layers.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from .base import Cache

LEVELS = 3          # 2 bits: codes 0..3, so the range is cut into 3 steps


# ---- the math: plain NumPy ------------------------------------------------------------------
def quantize(x, axis):
    """Asymmetric 2-bit quantisation of x with one (scale, zero) per slice along `axis`.

    Returns codes (x's shape, uint8 in 0..3), scale and zero (x's shape with `axis` of length 1,
    float32): x ~ codes * scale + zero, |x - that| <= scale / 2 (+ float32 rounding).

    >>> c, s, z = quantize(np.array([[0.0, 1.0, 2.0, 3.0]], np.float32), axis=1)
    >>> c.tolist(), s.tolist(), z.tolist()
    ([[0, 1, 2, 3]], [[1.0]], [[0.0]])
    """
    x = np.asarray(x, np.float32)
    zero = x.min(axis=axis, keepdims=True)                                  # min of each group
    scale = (x.max(axis=axis, keepdims=True) - zero) / LEVELS               # (max - min) / 3
    step = np.where(scale > 0, scale, 1.0)                  # a constant group: every code 0, exact
    codes = np.clip(np.rint((x - zero) / step), 0, LEVELS).astype(np.uint8)
    return codes, scale.astype(np.float32), zero.astype(np.float32)


def dequantize(codes, scale, zero):
    """codes * scale + zero in float32 (scale, zero broadcast over their group)."""
    return codes.astype(np.float32) * scale + zero


def pack(codes):
    """(..., n) codes in 0..3, n a multiple of 4 -> (..., n / 4) uint8, four codes a byte."""
    c = codes.reshape(codes.shape[:-1] + (-1, 4)).astype(np.uint8)         # (..., n/4, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack(packed):
    """Inverse of pack: (..., n / 4) uint8 -> (..., n) codes."""
    c = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)        # (..., n/4, 4)
    return c.reshape(packed.shape[:-1] + (4 * packed.shape[-1],))


def quantize_keys(k, G):
    """k (Hkv, N, d), N a multiple of G -> packed codes (Hkv, N, d/4), scale, zero (Hkv, N/G, d):
    per channel, in groups of G consecutive tokens (keys have outlier channels, so a channel
    shares one range)."""
    Hkv, N, d = k.shape
    g = k.reshape(Hkv, N // G, G, d)                                        # (Hkv, N/G, G, d)
    codes, scale, zero = quantize(g, axis=2)                               # scale (Hkv, N/G, 1, d)
    return pack(codes.reshape(Hkv, N, d)), scale[:, :, 0], zero[:, :, 0]


def dequantize_keys(packed, scale, zero, G):
    """Inverse of quantize_keys up to the error: (Hkv, N, d) float32."""
    Hkv, N, d = packed.shape[0], packed.shape[1], 4 * packed.shape[2]
    codes = unpack(packed).reshape(Hkv, N // G, G, d)                       # (Hkv, N/G, G, d)
    return dequantize(codes, scale[:, :, None], zero[:, :, None]).reshape(Hkv, N, d)


def quantize_values(v, G):
    """v (Hkv, N, d), d a multiple of G -> packed codes (Hkv, N, d/4), scale, zero (Hkv, N, d/G):
    per token, in groups of G channels."""
    Hkv, N, d = v.shape
    g = v.reshape(Hkv, N, d // G, G)                                        # (Hkv, N, d/G, G)
    codes, scale, zero = quantize(g, axis=3)                               # scale (Hkv, N, d/G, 1)
    return pack(codes.reshape(Hkv, N, d)), scale[..., 0], zero[..., 0]


def dequantize_values(packed, scale, zero, G):
    """Inverse of quantize_values up to the error: (Hkv, N, d) float32."""
    Hkv, N, d = packed.shape[0], packed.shape[1], 4 * packed.shape[2]
    codes = unpack(packed).reshape(Hkv, N, d // G, G)                       # (Hkv, N, d/G, G)
    return dequantize(codes, scale[..., None], zero[..., None]).reshape(Hkv, N, d)


# ---- the cache --------------------------------------------------------------------------------
class KiviCache(Cache):
    """Every position kept (as the dense KVCache), stored as KIVI 2-bit codes plus a full-precision
    residual (see the module docstring); `update` returns float32 K, V, so it composes with every
    selector.

    >>> from types import SimpleNamespace
    >>> c = KiviCache(SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=8), group=4, residual=4)
    >>> k = np.arange(48, dtype=np.float32).reshape(1, 6, 8)
    >>> K, V, k_pos = c.update(0, k, k, np.arange(6)); c.advance(6)
    >>> len(c), c.quantized_keys(0), c.quantized_values(0)
    (6, 4, 2)
    """

    def __init__(self, cfg, group=32, residual=128):
        self.group, self.residual = int(group), int(residual)
        d = cfg.head_dim
        if self.group < 1 or self.residual < 1 or self.residual % self.group:
            raise ValueError(f"kivi2: residual R={residual} must be a positive multiple of the group "
                             f"size G={group} (keys are quantised R at a time, G tokens a group)")
        if d % self.group or d % 4:
            raise ValueError(f"kivi2: the group size G={group} must divide the head width d={d} "
                             f"(values are grouped along channels), and 4 must divide d")
        self.cfg = cfg
        L, Hkv = cfg.n_layers, cfg.n_kv_heads
        z = lambda *sh, dt=np.float32: [np.zeros(sh, dt) for _ in range(L)]   # noqa: E731
        self.kc, self.ks, self.kz = z(Hkv, 0, d // 4, dt=np.uint8), z(Hkv, 0, d), z(Hkv, 0, d)
        self.vc, self.vs, self.vz = z(Hkv, 0, d // 4, dt=np.uint8), z(Hkv, 0, d // self.group), \
            z(Hkv, 0, d // self.group)
        self.kr, self.vr = z(Hkv, 0, d), z(Hkv, 0, d)                       # full-precision residuals
        self.n = 0
        self.next_pos = 0
        self.selector_state = {}

    def __len__(self):
        return self.n

    def describe(self):
        """Its spec: parse_cache_spec(c.describe(), model) builds the same cache."""
        return f"kivi2/g{self.group}/r{self.residual}"

    def quantized_keys(self, layer):
        return self.kc[layer].shape[1]

    def quantized_values(self, layer):
        return self.vc[layer].shape[1]

    def read(self, layer):
        """(K, V) (Hkv, S, d) float32 as attention reads them: dequantised part, then residual."""
        G = self.group
        K = np.concatenate([dequantize_keys(self.kc[layer], self.ks[layer], self.kz[layer], G),
                            self.kr[layer]], axis=1)                             # (Hkv, S, d)
        V = np.concatenate([dequantize_values(self.vc[layer], self.vs[layer], self.vz[layer], G),
                            self.vr[layer]], axis=1)                             # (Hkv, S, d)
        return K, V

    def update(self, layer, k_new, v_new, pos, q=None):
        """Append k_new, v_new (Hkv, T, d); return K, V (Hkv, S, d): the keys stored before this
        call as they dequantise, this call's in full precision; then quantise what left the
        residual. q is unused (nothing is scored)."""
        k_new, v_new = np.asarray(k_new, np.float32), np.asarray(v_new, np.float32)
        K, V = self.read(layer)                                                  # (Hkv, S - T, d)
        K = np.concatenate([K, k_new], axis=1)                                   # (Hkv, S, d)
        V = np.concatenate([V, v_new], axis=1)
        k_all = np.concatenate([self.kr[layer], k_new], axis=1)                  # residual + new
        v_all = np.concatenate([self.vr[layer], v_new], axis=1)
        G, R = self.group, self.residual
        nk = (k_all.shape[1] // R) * R                    # keys: whole residuals of R, flushed
        if nk:
            c, s, z = quantize_keys(k_all[:, :nk], G)
            self.kc[layer] = np.concatenate([self.kc[layer], c], axis=1)
            self.ks[layer] = np.concatenate([self.ks[layer], s], axis=1)
            self.kz[layer] = np.concatenate([self.kz[layer], z], axis=1)
        self.kr[layer] = k_all[:, nk:]
        nv = max(0, v_all.shape[1] - R)                   # values: all but the last R
        if nv:
            c, s, z = quantize_values(v_all[:, :nv], G)
            self.vc[layer] = np.concatenate([self.vc[layer], c], axis=1)
            self.vs[layer] = np.concatenate([self.vs[layer], s], axis=1)
            self.vz[layer] = np.concatenate([self.vz[layer], z], axis=1)
        self.vr[layer] = v_all[:, nv:]
        return K, V, np.arange(K.shape[1], dtype=np.int64)

    def advance(self, T):
        self.n += T
        self.next_pos += T

    def nbytes(self):
        """Bytes stored: packed codes, float32 scale and zero per group, float32 residuals."""
        parts = (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz, self.kr, self.vr)
        return sum(a.nbytes for p in parts for a in p)

    def memory(self):
        """{"kivi2": bytes stored, "float32": / "float16": bytes of the dense cache holding the
        same positions, "ratio_float16": float16 bytes / kivi2 bytes}."""
        cfg = self.cfg
        dense = lambda size: 2 * cfg.n_layers * cfg.n_kv_heads * self.n * cfg.head_dim * size  # noqa: E731
        out = {"kivi2": self.nbytes(), "float32": dense(4), "float16": dense(2)}
        out["ratio_float16"] = out["float16"] / max(out["kivi2"], 1)
        return out

    # ---- saving --------------------------------------------------------------------------------
    _ARRAYS = ("kc", "ks", "kz", "vc", "vs", "vz", "kr", "vr")
    _NAMES = {"kr": "k", "vr": "v"}       # the residuals are saved as k, v: (L, Hkv, S', d) like the dense cache's

    def state(self):
        """(meta, arrays): each stored array stacked over layers (every layer holds the same shapes)."""
        arrays = {self._NAMES.get(a, a): np.stack(getattr(self, a)) for a in self._ARRAYS}
        meta = {"kind": "KiviCache", "n": self.n, "next_pos": self.next_pos, "group": self.group,
                "residual": self.residual}
        return meta, arrays

    @classmethod
    def from_state(cls, meta, arrays, cfg=None, model=None):
        """Rebuild from `state()`; the shapes (L, Hkv, d) come from cfg, the model, or the saved
        residual k (L, Hkv, S', d)."""
        if cfg is None:
            L, Hkv, _, d = np.shape(arrays["k"])
            cfg = model.config if model is not None else SimpleNamespace(n_layers=L, n_kv_heads=Hkv, head_dim=d)
        c = cls(cfg, meta["group"], meta["residual"])
        for a in cls._ARRAYS:
            arr = np.asarray(arrays[cls._NAMES.get(a, a)])
            if arr.shape[:2] != (cfg.n_layers, cfg.n_kv_heads):
                raise ValueError(f"KiviCache state: {a} is {arr.shape}; expected (L, Hkv, ...) = "
                                 f"({cfg.n_layers}, {cfg.n_kv_heads}, ...)")
            setattr(c, a, [np.array(arr[l]) for l in range(cfg.n_layers)])
        c.n, c.next_pos = int(meta["n"]), int(meta["next_pos"])
        if c.kc[0].shape[1] + c.kr[0].shape[1] != c.n or c.vc[0].shape[1] + c.vr[0].shape[1] != c.n:
            raise ValueError(f"KiviCache state: stored keys/values do not add up to n={c.n}")
        return c


def attention_error_bound(q, k, k_hat, v, v_hat):
    """A bound on |o_hat - o| per output channel for one query q (d,) over keys k, k_hat and values
    v, v_hat (S, d), o = softmax(q k^T / sqrt d) v:

        |s_hat_j - s_j| <= delta = max_j ||q|| ||k_hat_j - k_j|| / sqrt(d)      (Cauchy-Schwarz)
        p_hat_j / p_j in [e^(-2 delta), e^(2 delta)], so sum_j |p_hat_j - p_j| <= e^(2 delta) - 1
        |o_hat_c - o_c| <= sum_j |p_hat_j - p_j| |v_jc| + sum_j p_hat_j |v_hat_jc - v_jc|
                        <= (e^(2 delta) - 1) max_j |v_jc| + max_j |v_hat_jc - v_jc|

    Returns (d,) float64; with KIVI's per-element bound |x_hat - x| <= scale / 2 the norms above
    are at most the root sum of squares of half the scales of each key's channels."""
    q, k, k_hat, v, v_hat = (np.asarray(a, np.float64) for a in (q, k, k_hat, v, v_hat))
    d = q.shape[-1]
    delta = np.linalg.norm(q) * np.linalg.norm(k_hat - k, axis=1).max() / np.sqrt(d)
    return np.expm1(2 * delta) * np.abs(v).max(axis=0) + np.abs(v_hat - v).max(axis=0)
