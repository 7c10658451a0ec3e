"""LSH: SimHash of the queries and of the mean-centred keys with L tables of K seeded Gaussian
planes each; BMRT's frequency rank (keep the keys colliding in most tables) and MagicPIG's
sampler (take keys colliding in >= 2 tables, logit corrected by -log P(sampled)).

Leaves out hash-bucket lookup tables (collisions are counted by a scan over the key codes) and
GPU/CPU split. Follows Charikar 2002 (SimHash: a bit collides with probability 1 - theta/pi),
MagicPIG (Chen et al. 2024: K=8, L=75, collision threshold 2, importance weights, centred keys)
and BMRT/LASER-KV's frequency_rank. Sinks and the window stay exact by union: `Sinks(4) |
Window(64) | LSH(...)`; a key both sampled and in the window is read once with weight 1.

Centring: q.(k - mu) = q.k - q.mu shifts every logit of a row by the same amount, so the
softmax is unchanged while the angles spread out. Unbound, a row centres by the mean of ITS
causal keys (a row depends only on its past: decode == prefill). Decode over a long cache binds
an LSHIndex: mean frozen after prefill, one packed code per key and table, extended per token.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .selection import Q, Selection, append_along
from .topk import Ranked, budget_text, check_budget, parse_budget


@njit(cache=True)
def p_sampled(p, K, L):
    """P(a key collides with the query in >= 2 of L tables of K bits), per-bit collision p:
    1 - (1 - p^K)^L - L p^K (1 - p^K)^(L-1), summed as binomial terms m = 2..L in log space
    (the closed form cancels catastrophically for small p^K)."""
    if L < 2:
        return 0.0
    x = p ** K
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lx, l1 = math.log(x), math.log1p(-x)
    lg = math.lgamma(L + 1.0)
    s = 0.0
    for m in range(2, L + 1):
        s += math.exp(lg - math.lgamma(m + 1.0) - math.lgamma(L - m + 1.0) + m * lx + (L - m) * l1)
    return min(s, 1.0)


@njit(cache=True)
def project(x, W):
    """Projections x (H, T, d) onto the planes W (K*L, d) -> (H, T, K*L) float64, summed in a
    fixed order per vector (a key's projection does not depend on the other keys)."""
    H, T, d = x.shape
    B = W.shape[0]
    out = np.empty((H, T, B), np.float64)
    for h in range(H):
        for j in range(T):
            for b in range(B):
                s = 0.0
                for i in range(d):
                    s += W[b, i] * x[h, j, i]
                out[h, j, b] = s
    return out


@njit(cache=True)
def _pack(proj, off, K, L, codes):
    # table l's code: bit c set when proj[l*K + c] > off[l*K + c]
    for l in range(L):
        c = np.int64(0)
        for b in range(K):
            if proj[l * K + b] > off[l * K + b]:
                c |= np.int64(1) << b
        codes[l] = c


@njit(cache=True, inline="always")
def _log_weight(q, h, t, k, g, j, m, qn, K, L):
    """-log P(key j of KV head g sampled for query t of head h): the angle between q and the key
    centred by m (float64 sums), through p_sampled. qn = |q|^2."""
    dot = 0.0
    kn = 0.0
    for i in range(q.shape[2]):
        x = k[g, j, i] - m[i]
        dot += q[h, t, i] * x
        kn += x * x
    # a key equal to the mean has no angle: take p = 1 (read with weight 1)
    cos = dot / math.sqrt(qn * kn) if qn * kn > 0 else 1.0
    p = 1.0 - math.acos(min(1.0, max(-1.0, cos))) / math.pi
    # a sampled key has P > 0 in exact arithmetic; the floor keeps the weight finite
    return -math.log(max(p_sampled(p, K, L), 1e-30))


@njit(cache=True)
def lsh_rows(q, k, Pq, Pk, kcodes, mu, K, L, q_pos, k_pos, want_logw):
    """Per (query head h, query t): tables in which each causal key collides with the query,
    and (want_logw) MagicPIG's -log P(sampled) from the angle between q and k - mu.

    Pq (Hq, Tq, KL), Pk (Hkv, Tk, KL) projections; kcodes (Hkv, L, >= Tk) frozen key codes or
    (0, 0, 0) to centre each row by the mean of its causal keys (mu is then computed here);
    mu (Hkv, d) the frozen mean (used with kcodes). Returns counts (R, Tk) float64 (-inf where
    not causal) and logw (R, Tk) float32.
    """
    Hq, Tq, d = q.shape
    Hkv, Tk, _ = k.shape
    G = Hq // Hkv
    B = K * L
    counts = np.empty((Hq * Tq, Tk), np.float64)
    logw = np.zeros((Hq * Tq, Tk) if want_logw else (0, 0), np.float32)
    zero = np.zeros(B, np.float64)
    for r in range(Hq * Tq):
        h = r // Tq
        t = r % Tq
        g = h // G
        qp = q_pos[t]
        qc = np.empty(L, np.int64)
        _pack(Pq[h, t], zero, K, L, qc)                  # queries are not centred
        m = np.zeros(d, np.float64)
        pm = np.zeros(B, np.float64)
        frozen = kcodes.shape[0] > 0
        if frozen:
            for i in range(d):
                m[i] = mu[g, i]
        else:                                            # mean of this row's causal keys
            n = 0
            for j in range(Tk):
                if k_pos[j] <= qp:
                    n += 1
                    for i in range(d):
                        m[i] += k[g, j, i]
                    for b in range(B):
                        pm[b] += Pk[g, j, b]
            for i in range(d):
                m[i] /= max(n, 1)
            for b in range(B):
                pm[b] /= max(n, 1)
        kc = np.empty(L, np.int64)
        if frozen:
            # table by table over contiguous codes (Hkv, L, S): a vectorisable compare per key
            cnt = np.zeros(Tk, np.int64)
            for l in range(L):
                ql = qc[l]
                for j in range(Tk):
                    cnt[j] += kcodes[g, l, j] == ql
        qn = 0.0
        for i in range(d):
            qn += np.float64(q[h, t, i]) ** 2
        for j in range(Tk):
            if k_pos[j] > qp:
                counts[r, j] = -np.inf
                continue
            c = 0
            if frozen:
                c = cnt[j]
            else:
                _pack(Pk[g, j], pm, K, L, kc)
                for l in range(L):
                    c += kc[l] == qc[l]
            counts[r, j] = c
            if want_logw and c >= 2:
                logw[r, j] = _log_weight(q, h, t, k, g, j, m, qn, K, L)
    return counts, logw


@njit(cache=True, parallel=True)
def lsh_rows_sorted(q, k, Pq, Pk, K, L, q_pos, k_pos, want_logw):
    """lsh_rows for unbound rows over keys in position order (a prefill chunk), the same counts
    and log-weights bit for bit, faster: a row's causal keys are a prefix [0, n), so the mean it
    centres by is a prefix sum (summed in the same order as lsh_rows' loop: the same float64
    values); the keys' bits are compared plane by plane over contiguous key rows (a vectorised
    compare, where lsh_rows packs each key's codes one at a time); rows run on the threads (each
    writes its own row). Pq (Hq, Tq, KL), Pk (Hkv, Tk, KL); returns (counts, logw) as lsh_rows."""
    Hq, Tq, d = q.shape
    Hkv, Tk, _ = k.shape
    G = Hq // Hkv
    B = K * L
    counts = np.empty((Hq * Tq, Tk), np.float64)
    logw = np.zeros((Hq * Tq, Tk) if want_logw else (0, 0), np.float32)
    cum_k = np.zeros((Hkv, Tk + 1, d), np.float64)                # prefix sums of keys
    cum_p = np.zeros((Hkv, Tk + 1, B), np.float64)                # and of their projections
    PkT = np.empty((Hkv, B, Tk), np.float64)                      # projections plane by plane
    for g in prange(Hkv):
        for j in range(Tk):
            for i in range(d):
                cum_k[g, j + 1, i] = cum_k[g, j, i] + k[g, j, i]
            for b in range(B):
                cum_p[g, j + 1, b] = cum_p[g, j, b] + Pk[g, j, b]
                PkT[g, b, j] = Pk[g, j, b]
    for r in prange(Hq * Tq):
        h = r // Tq
        t = r % Tq
        g = h // G
        n = np.searchsorted(k_pos, q_pos[t], side="right")      # causal keys [0, n)
        m = np.empty(d, np.float64)
        for i in range(d):
            m[i] = cum_k[g, n, i] / max(n, 1)
        cnt = np.zeros(n, np.int32)
        match = np.empty(n, np.int32)
        for l in range(L):
            match[:] = 1
            for c in range(K):
                b = l * K + c
                pm = cum_p[g, n, b] / max(n, 1)
                col = PkT[g, b]
                if Pq[h, t, b] > 0.0:                            # queries are not centred
                    for j in range(n):
                        match[j] &= col[j] > pm
                else:                                            # the key's bit must be 0
                    for j in range(n):
                        match[j] &= not (col[j] > pm)
            for j in range(n):
                cnt[j] += match[j]
        qn = 0.0
        for i in range(d):
            qn += np.float64(q[h, t, i]) ** 2
        for j in range(n, Tk):
            counts[r, j] = -np.inf
        for j in range(n):
            c = cnt[j]
            counts[r, j] = c
            if want_logw and c >= 2:
                logw[r, j] = _log_weight(q, h, t, k, g, j, m, qn, K, L)
    return counts, logw


# rows (Hq * Tq) from which an unbound call over keys in position order takes lsh_rows_sorted
# (its prefix sums and threads pay for a prefill chunk, not for a decode step's few rows)
SORTED_MIN_ROWS = 64


def planes(seed, K, L, d):
    """The seeded Gaussian planes (K*L, d) float64: table l uses rows l*K .. l*K + K-1."""
    return np.random.default_rng(seed).standard_normal((K * L, d))


class LSHIndex:
    """Frozen-mean SimHash codes of one layer's keys for decode: build after prefill, extend per
    token. The mean is fixed at build; rebuild when the cache has grown well past the keys the
    mean was taken over (say 2x), since centring only helps while mu is near the keys' mean.

    >>> import numpy as np
    >>> ix = LSHIndex(np.ones((1, 5, 4), np.float32), bits=4, tables=3, seed=0)
    >>> ix.extend(np.ones((1, 2, 4), np.float32)); ix.n
    7
    """

    def __init__(self, k, bits=8, tables=75, seed=0):
        self.K, self.L, self.seed = int(bits), int(tables), int(seed)
        self.W = planes(self.seed, self.K, self.L, k.shape[2])                 # (KL, d)
        self.mu = k.astype(np.float64).mean(axis=1)                            # (Hkv, d)
        # smallest integer holding K bits: at S = 256k, 8 heads, L = 75 uint8 codes take 157 MB
        self.dtype = next(t for b, t in ((8, np.uint8), (16, np.uint16), (32, np.uint32),
                                         (63, np.int64)) if self.K <= b)
        self._buf = np.zeros((k.shape[0], self.L, max(1, k.shape[1])), self.dtype)  # (Hkv, L, cap)
        self.n = 0
        self.extend(k)
        self.n_fit = max(self.n, 1)                                            # keys mu was taken over

    @property
    def stale(self):
        """True once the keys have doubled since the mean was taken: time to rebuild."""
        return self.n > 2 * self.n_fit

    @property
    def codes(self):
        """(Hkv, L, n) codes of the keys so far (a view of the growable buffer)."""
        return self._buf[:, :, :self.n]

    def extend(self, k_new):
        """Append the codes of k_new (Hkv, T, d), in chunks (projections are (T, K*L) float64).
        The index is the one source of the codes, so BLAS rounding here is consistent."""
        off = self.W @ self.mu.T                                               # (KL, Hkv)
        w = np.int64(1) << np.arange(self.K, dtype=np.int64)                   # (K,)
        parts = []
        for a in range(0, k_new.shape[1], 4096):
            x = np.asarray(k_new[:, a:a + 4096], np.float64)                   # (Hkv, T', d)
            bits = x @ self.W.T > off.T[:, None, :]                            # (Hkv, T', KL)
            c = (bits.reshape(*bits.shape[:2], self.L, self.K) * w).sum(-1)    # (Hkv, T', L)
            parts.append(c.astype(self.dtype).transpose(0, 2, 1))             # (Hkv, L, T')
        if parts:
            self._buf = append_along(self._buf, self.n, np.concatenate(parts, axis=2), axis=2)
        self.n += k_new.shape[1]


class LSH(Ranked):
    """SimHash with L = `tables` tables of K = `bits` planes, per query head.

    mode="rank" (BMRT frequency_rank): keep the budget (k keys or ceil(fraction * n_causal)) of
      causal keys colliding with the query in the most tables; ties go to the later key.
    mode="sample" (MagicPIG): take every causal key colliding in >= 2 tables, with log-weight
      -log P(sampled) so the softmax sums are importance-weighted (unbiased for the numerator
      and the normaliser). Compose with Sinks | Window to keep those exact.
    `seed` fixes the planes (recorded in describe()); `index` an LSHIndex bound for decode.

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> x = np.random.default_rng(0).standard_normal((1, 30, 8)).astype(np.float32)
    >>> _, st = attend(x, x, x, LSH(4, 10, k=5), return_stats=True)
    >>> int(st.n_attended[0, -1])
    5
    """

    def __init__(self, bits=8, tables=75, seed=0, mode="rank", k=None, fraction=None, index=None):
        if not 1 <= int(bits) <= 62 or int(tables) < 1:
            raise ValueError(f"LSH: need 1 <= bits <= 62 and tables >= 1; got bits={bits}, "
                             f"tables={tables}")
        if mode not in ("rank", "sample"):
            raise ValueError(f"LSH: mode must be 'rank' or 'sample', got {mode!r}")
        self.K, self.L, self.seed, self.mode = int(bits), int(tables), int(seed), mode
        if mode == "rank":
            self.k, self.fraction = check_budget("LSH(mode='rank')", k, fraction)
        else:
            self.k = self.fraction = None
            self.exact_subset = False           # weighted by -log P(sampled)
        self.index = index

    def bind(self, index):
        """This selector reading frozen codes from an LSHIndex (same bits, tables, seed)."""
        if (index.K, index.L, index.seed) != (self.K, self.L, self.seed):
            raise ValueError(f"LSH.bind: index has K={index.K}, L={index.L}, seed={index.seed}; "
                             f"selector has K={self.K}, L={self.L}, seed={self.seed}")
        return LSH(self.K, self.L, self.seed, self.mode, self.k, self.fraction, index)

    def for_layer(self, layer, state, k, v):
        """Bound to this layer's LSHIndex in the cache's state: codes computed once, extended
        with the keys appended since (the mean stays frozen; rebuilt once the keys doubled)."""
        return self._indexed_for_layer(layer, state, k,
                                       lambda: LSHIndex(k, self.K, self.L, self.seed))

    options = ("seed",)

    def _with_options(self, seed=None):
        return LSH(self.K, self.L, self.seed if seed is None else int(seed),
                   self.mode, self.k, self.fraction, self.index)

    def collisions(self, q, k, q_pos, k_pos, want_logw=False):
        """(counts (Hq*Tq, Tk) float64 with -inf where not causal, logw (Hq*Tq, Tk) float32)."""
        if q is None:
            raise ValueError("LSH: needs the queries (content-based), got q=None")
        d = k.shape[2]
        ix = self.index
        if ix is not None:
            if ix.n < k.shape[1] or ix.W.shape[1] != d:
                raise ValueError(f"LSH: bound index holds {ix.n} keys of width {ix.W.shape[1]}; "
                                 f"attention got Tk={k.shape[1]}, d={d}")
            W, kcodes, mu = ix.W, ix._buf, ix.mu                               # (Hkv, L, cap)
            Pk = np.zeros((k.shape[0], 0, 0), np.float64)
        else:
            W = planes(self.seed, self.K, self.L, d)
            kcodes = np.zeros((0, 0, 0), np.int64)
            mu = np.zeros((k.shape[0], d), np.float64)
            Pk = project(k, W)                                                 # (Hkv, Tk, KL)
        Pq = project(q, W)                                                     # (Hq, Tq, KL)
        if ix is None and q_pos.size * q.shape[0] >= SORTED_MIN_ROWS and np.all(k_pos[1:] >= k_pos[:-1]):
            return lsh_rows_sorted(q, k, Pq, Pk, self.K, self.L, q_pos, k_pos, want_logw)
        return lsh_rows(q, k, Pq, Pk, kcodes, mu, self.K, self.L,
                        q_pos, k_pos, want_logw)

    def row_scores(self, q, k, q_pos, k_pos):
        counts, _ = self.collisions(q, k, q_pos, k_pos)
        return Q, q.shape[0], counts

    def _select(self, q, k, q_pos, k_pos):
        if self.mode == "rank":
            return Ranked._select(self, q, k, q_pos, k_pos)
        counts, logw = self.collisions(q, k, q_pos, k_pos, want_logw=True)    # (R, Tk)
        take = counts >= 2                                                     # (R, Tk)
        ptr = np.zeros(take.shape[0] + 1, np.int64)
        np.cumsum(take.sum(1), out=ptr[1:])
        rows, cols = np.nonzero(take)                                          # row-major: sorted
        return Selection.from_lists(ptr, cols, k.shape[1], head_kind=Q, n_heads=q.shape[0],
                                    tq=q_pos.size, logw=logw[rows, cols], normalized=True)

    def describe(self):
        if self.mode == "sample":
            return f"magicpig=K{self.K}L{self.L},seed={self.seed}"
        return f"lsh=K{self.K}L{self.L}/{budget_text(self.k, self.fraction)},seed={self.seed}"

    @staticmethod
    def parse_kl(text, name):
        t = text.upper()
        if not (t.startswith("K") and "L" in t):
            raise ValueError(f"attention spec: '{name}': expected KbitsLtables like K8L75")
        a, _, b = t[1:].partition("L")
        try:
            return int(a), int(b)
        except ValueError:
            raise ValueError(f"attention spec: '{name}': expected KbitsLtables like K8L75") from None

    @staticmethod
    def from_spec(val):
        """`lsh=K8L75/5%` (frequency rank, budget 5%) or `lsh=K8L75/64`; seed via `,seed=N`."""
        kl, _, b = (val or "").partition("/")
        if not b:
            raise ValueError(f"attention spec: 'lsh={val}': expected K8L75/BUDGET, e.g. lsh=K8L75/5%")
        K, L = LSH.parse_kl(kl, f"lsh={val}")
        k, f = parse_budget(b, f"lsh={val}")
        return LSH(K, L, 0, "rank", k, f)

    @staticmethod
    def magicpig_from_spec(val):
        """`magicpig=K8L75` (sampler); seed via `,seed=N`; add sinks/window exactly by union."""
        K, L = LSH.parse_kl(val or "", f"magicpig={val}")
        return LSH(K, L, 0, "sample")
