"""Loki: keys are ranked in a PCA basis of the keys, on its first r components only; the top k
are then read exactly.

Follows Singhania et al. 2024, "Loki: Low-rank Keys for Efficient Sparse Attention": the keys of
a layer and KV head live near a low-dimensional subspace, so q.k ~ (q P_r).(k P_r) with P_r the
top-r principal directions. Loki calibrates P offline on a calibration set; minisparse
calibrates it from the keys it has seen: the first `calib` keys of the layer (the start of the
first prefill), once, and keeps it (`for_layer` stores it in the cache's selector_state).
Leaves out: the offline calibration set, pre-RoPE keys (the cache here holds keys after RoPE,
which Loki reports works too), centring (P is the uncentred PCA, the eigenvectors of K^T K: the
basis that best keeps dot products with K), and storing keys in the PCA basis (they are
projected per call, the result is the same ranking).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .selection import Q
from .topk import ApproxTopK, budget_text, check_budget, dot, parse_budget, score_rows


def pca_basis(k):
    """Principal directions of keys k (Hkv, n, d): (Hkv, d, d) float32, row c of head h the c-th
    direction (eigenvalues of K^T K descending; each direction's largest entry positive)."""
    k64 = np.asarray(k, np.float64)
    out = np.empty((k.shape[0], k.shape[2], k.shape[2]), np.float32)
    for h in range(k.shape[0]):
        w, v = np.linalg.eigh(k64[h].T @ k64[h])                              # ascending
        v = v[:, ::-1].T                                                      # (d, d) rows
        v *= np.sign(v[np.arange(len(v)), np.abs(v).argmax(1)])[:, None]
        out[h] = v
    return out


@njit(cache=True)
def project(x, basis, r, group):
    """x (H, T, d) on the first r rows of basis (Hkv, d, d), head h reading basis[h // group]:
    (H, T, r) float32, each entry one float32 dot (a row's projection never depends on the
    batch it came in, so decode == prefill)."""
    H, T, d = x.shape
    out = np.empty((H, T, r), np.float32)
    for h in range(H):
        for t in range(T):
            for c in range(r):
                out[h, t, c] = dot(x[h, t], basis[h // group, c])
    return out


class Loki(ApproxTopK):
    """Loki(r, k, calib): per query head, rank the causal keys by (q P_r).(k P_r), P the PCA basis
    of the first `calib` keys, and read the top k (or ceil(fraction * n_causal)) exactly.

    Rows that see fewer than `calib` keys have no basis yet (it would read later keys): they
    rank by the exact q.k, so Loki there is exact top-k. Bound to a basis (`bind`, or `for_layer`
    with a cache's selector_state), every row uses that basis.

    >>> x = np.random.default_rng(0).standard_normal((1, 8, 4)).astype(np.float32)
    >>> Loki(2, 3, calib=4).select(x, x).idx.size      # 1+2+3 keys for the first rows, then 3 each
    21
    """

    def __init__(self, r, k=None, fraction=None, calib=1024, basis=None):
        if int(r) < 1:
            raise ValueError(f"Loki: r (principal components) must be >= 1, got {r}")
        if int(calib) < 1:
            raise ValueError(f"Loki: calib (keys the basis is fitted on) must be >= 1, got {calib}")
        self.r, self.calib = int(r), int(calib)
        self.k, self.fraction = check_budget("Loki", k, fraction)
        self.basis = basis                                   # (Hkv, d, d) or None

    def bind(self, basis):
        """Bound to a basis (Hkv, d, d); any other state (a union bound to a GateCache passes its
        cache to every member) leaves it as it is."""
        if not isinstance(basis, np.ndarray):
            return self
        return Loki(self.r, self.k, self.fraction, self.calib, basis)

    def for_layer(self, layer, state, k, v):
        """Fit the basis once, on this layer's first `calib` keys, when the cache holds that many;
        keep it in `state` for every later step."""
        if state is None:
            return self
        key = (self.describe(), layer)
        if key not in state and k.shape[1] >= self.calib:
            state[key] = pca_basis(k[:, :self.calib])
        return self.bind(state[key]) if key in state else self

    def row_scores(self, q, k, q_pos, k_pos):
        if q is None:
            raise ValueError("Loki: needs the queries (content-based), got q=None")
        d = q.shape[-1]
        if self.r > d:
            raise ValueError(f"Loki: r = {self.r} components, but the head width d is {d}")
        q = np.ascontiguousarray(q, np.float32)
        k = np.ascontiguousarray(k, np.float32)
        G = q.shape[0] // k.shape[0]
        basis = self.basis
        exact = None
        if basis is None:
            exact = score_rows(q, k, q_pos, k_pos, False)                      # (Hq*Tq, Tk)
            if k.shape[1] < self.calib:
                return Q, q.shape[0], exact
            basis = pca_basis(k[:, :self.calib])       # the first calib keys: causal for the
        if basis.shape[1:] != (d, d):                  # rows that see them all, the only users
            raise ValueError(f"Loki: basis {basis.shape} does not match head width {d}")
        S = score_rows(project(q, basis, self.r, G), project(k, basis, self.r, 1),
                       q_pos, k_pos, False)                                    # (Hq*Tq, Tk)
        if exact is not None:
            n_causal = np.searchsorted(k_pos, q_pos, side="right")            # (Tq,)
            early = np.tile(n_causal < self.calib, q.shape[0])                # (Hq*Tq,)
            S[early] = exact[early]
        return Q, q.shape[0], S

    def describe(self):
        s = f"loki={self.r}/{budget_text(self.k, self.fraction)}"
        return s + (f"/c{self.calib}" if self.calib != 1024 else "")

    @staticmethod
    def from_spec(val):
        """`loki=16/64` (r = 16 components, k = 64 keys), `loki=16/2%`, `loki=16/64/c512` (basis
        from the first 512 keys; default 1024)."""
        parts = (val or "").split("/")
        if len(parts) not in (2, 3) or not parts[0].isdigit():
            raise ValueError(f"'loki={val}': expected r/k[/cN], e.g. loki=16/64 or loki=16/64/c512")
        k, f = parse_budget(parts[1], f"loki={val}")
        calib = 1024
        if len(parts) == 3:
            if not (parts[2].startswith("c") and parts[2][1:].isdigit()):
                raise ValueError(f"'loki={val}': unknown part {parts[2]!r} (cN: calibration keys)")
            calib = int(parts[2][1:])
        return Loki(int(parts[0]), k, f, calib)
