"""LSH: SimHash of the queries and of the mean-centred keys with L tables of K seeded Gaussian
planes each; BMRT's frequency rank (keep the keys colliding in most tables) and MagicPIG's
sampler (take keys colliding in >= 2 tables, logit corrected by -log P(sampled)).

Leaves out hash-bucket lookup tables (collisions are counted by a scan over the key codes) and
GPU/CPU split. Follows Charikar 2002 (SimHash: a bit collides with probability 1 - theta/pi),
MagicPIG (Chen et al. 2024: K=8, L=75, collision threshold 2, importance weights, centred keys)
and BMRT/LASER-KV's frequency_rank. Sinks and the window stay exact by union: `Sinks(4) |
Window(64) | LSH(...)`; a key both sampled and in the window is read once with weight 1.

Centring: q.(k - mu) = q.k - q.mu shifts every logit of a row by the same amount, so the
softmax is unchanged while the angles spread out. The centre is frozen per block of `block`
positions: a query at position p centres by the mean of the keys at positions < B*floor(p/B)
(B = block; rows of the first block have no earlier keys and no centre). So every key is hashed
once per block, not once per row, and a row still depends only on its past: decode step i
equals prefill row i. Decode over a long cache binds an LSHIndex: the codes of all keys against
the current block's centre, extended per token and rebuilt when the query enters a new block.
"""
from __future__ import annotations

import math
import re

import numpy as np
from numba import njit, prange

from .selection import Q, Selection, append_along
from .topk import Ranked, budget_text, check_budget, parse_budget, row_budgets

# positions per frozen centre: a block change re-hashes every key (S*K*L compares and the key
# projections), so B trades that cost, paid once per B rows, against a centre up to B-1 keys old
CENTRE_BLOCK = 256


@njit(cache=True)
def p_sampled(p, K, L):
    """P(a key collides with the query in >= 2 of L tables of K bits), per-bit collision p:
    1 - (1 - x)^L - L x (1 - x)^(L-1) with x = p^K, as 1 - e^y (1 + L x / (1 - x)),
    y = L log1p(-x). That form cancels as P -> 0, losing ~2 eps / (L x)^2 relative (P ~ (L x)^2 / 2):
    below L x = 1/20 (an error up to 1e-13) the binomial terms m = 2..L are summed instead,
    each from the one before (they fall at least 50x per step there)."""
    if L < 2:
        return 0.0
    x = p ** K
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    l1 = math.log1p(-x)
    if L * x >= 0.05:
        return min(1.0, max(0.0, 1.0 - math.exp(L * l1) * (1.0 + L * x / (1.0 - x))))
    term = math.exp(math.log(0.5 * L * (L - 1)) + 2.0 * math.log(x) + (L - 2) * l1)
    s = term
    ratio = x / (1.0 - x)
    for m in range(2, L):
        term *= (L - m) / (m + 1.0) * ratio
        s += term
        if term <= 1e-18 * s:
            break
    return min(s, 1.0)


@njit(cache=True)
def project(x, W):
    """Projections x (H, T, d) onto the planes W (K*L, d) -> (H, T, K*L) float64, each entry
    summed over i = 0..d-1 in that order: the arithmetic `hash_codes` does, written plainly."""
    H, T, d = x.shape
    out = np.zeros((H, T, W.shape[0]), np.float64)
    for h in range(H):
        for j in range(T):
            for i in range(d):
                for b in range(W.shape[0]):
                    out[h, j, b] += W[b, i] * np.float64(x[h, j, i])
    return out


@njit(cache=True, parallel=True, fastmath={"contract"})
def hash_codes(x, WT, offs, K, L, pos, upto, out):
    """out (C, H, L, T) <- the codes of x (H, T, d) against C centres: table l's code of vector
    j has bit c set when (W x_j)[l*K + c] > offs[., h, l*K + c] (offs (C, H, KL) = W mu).

    W x_j is summed over i in order whatever the batch (as `project` does, up to fused
    multiply-adds): a key hashes alike in prefill and in decode. WT (d, KL) = W.T; four
    vectors share each row of WT read, and their projections stay in a local buffer (no
    (H, T, KL) array). Only vectors with pos[j] <= upto[c] are coded against centre c (no
    later query reads the others)."""
    H, T, d = x.shape
    C = offs.shape[0]
    B = K * L
    nt = (T + 3) // 4
    for r in prange(H * nt):
        h, j0 = r // nt, (r % nt) * 4
        n = min(4, T - j0)
        acc = np.zeros((4, B), np.float64)
        for i in range(d):
            w = WT[i]
            for u in range(n):
                xi = np.float64(x[h, j0 + u, i])
                a = acc[u]
                for b in range(B):
                    a[b] += w[b] * xi
        for c in range(C):
            for u in range(n):
                if pos[j0 + u] > upto[c]:
                    continue
                for l in range(L):
                    code = np.int64(0)
                    for bit in range(K):
                        code |= np.int64(acc[u, l * K + bit] > offs[c, h, l * K + bit]) << bit
                    out[c, h, l, j0 + u] = code


@njit(cache=True)
def centres(k, k_pos, ends):
    """(C, Hkv, d) float64: for each end e, the mean of the keys at positions < e, summed in key
    order; zero (no centre) where there is no such key."""
    Hkv, Tk, d = k.shape
    mu = np.zeros((ends.size, Hkv, d), np.float64)
    for c in range(ends.size):
        n = 0
        for j in range(Tk):
            if k_pos[j] < ends[c]:
                n += 1
                for g in range(Hkv):
                    for i in range(d):
                        mu[c, g, i] += k[g, j, i]
        if n > 0:
            mu[c] /= n
    return mu


@njit(cache=True, parallel=True)
def centred_sqnorms(k, mu):
    """(C, Hkv, Tk) float64: |k_j - mu[c, g]|^2, four partial sums in a fixed order."""
    C, Hkv, d = mu.shape
    Tk = k.shape[1]
    out = np.empty((C, Hkv, Tk), np.float64)
    for r in prange(C * Hkv):
        c, g = r // Hkv, r % Hkv
        m = mu[c, g]
        for j in range(Tk):
            s0 = s1 = s2 = s3 = 0.0
            i = 0
            while i + 4 <= d:
                x0, x1 = k[g, j, i] - m[i], k[g, j, i + 1] - m[i + 1]
                x2, x3 = k[g, j, i + 2] - m[i + 2], k[g, j, i + 3] - m[i + 3]
                s0 += x0 * x0
                s1 += x1 * x1
                s2 += x2 * x2
                s3 += x3 * x3
                i += 4
            while i < d:
                x0 = k[g, j, i] - m[i]
                s0 += x0 * x0
                i += 1
            out[c, g, j] = (s0 + s1) + (s2 + s3)
    return out


@njit(cache=True, inline="always")
def _log_weight(q, h, t, k, g, j, m, qn, kn, K, L):
    """-log P(key j of KV head g sampled for query t of head h): the angle between q and the key
    centred by m (float64 sums), through p_sampled. qn = |q|^2, kn = |k_j - m|^2."""
    # four partial sums, in a fixed order (i mod 4): independent adds run side by side
    d0 = d1 = d2 = d3 = 0.0
    d = q.shape[2]
    i = 0
    while i + 4 <= d:
        d0 += q[h, t, i] * (k[g, j, i] - m[i])
        d1 += q[h, t, i + 1] * (k[g, j, i + 1] - m[i + 1])
        d2 += q[h, t, i + 2] * (k[g, j, i + 2] - m[i + 2])
        d3 += q[h, t, i + 3] * (k[g, j, i + 3] - m[i + 3])
        i += 4
    while i < d:
        d0 += q[h, t, i] * (k[g, j, i] - m[i])
        i += 1
    dot = (d0 + d1) + (d2 + d3)
    # a key equal to the mean has no angle: take p = 1 (read with weight 1)
    cos = dot / math.sqrt(qn * kn) if qn * kn > 0 else 1.0
    p = 1.0 - math.acos(min(1.0, max(-1.0, cos))) / math.pi
    # a sampled key has P > 0 in exact arithmetic; the floor keeps the weight finite
    return -math.log(max(p_sampled(p, K, L), 1e-30))


@njit(cache=True, parallel=True)
def lsh_counts(qcodes, kcodes, row_centre, q_pos, k_pos, G):
    """(Hq*Tq, Tk) int16: the tables in which key j collides with query row r = h*Tq + t, -1
    where k_pos[j] > q_pos[t] (not causal). qcodes (Hq, L, Tq); kcodes (C, Hkv, L, >= Tk) the
    keys' codes against C centres; row_centre (Tq,) each query's centre. Rows run on the
    threads; a row counts by byte compares over contiguous codes, 255 tables at a time."""
    Hq, L, Tq = qcodes.shape
    Tk = k_pos.size
    out = np.empty((Hq * Tq, Tk), np.int16)
    for r in prange(Hq * Tq):
        h, t = r // Tq, r % Tq
        g, ci = h // G, row_centre[t]
        row = out[r]
        row[:] = 0
        c8 = np.empty(Tk, np.uint8)
        for l0 in range(0, L, 255):
            c8[:] = 0
            for l in range(l0, min(L, l0 + 255)):
                ql = qcodes[h, l, t]
                col = kcodes[ci, g, l]
                for j in range(Tk):
                    c8[j] += np.uint8(col[j] == ql)
            for j in range(Tk):
                row[j] += c8[j]
        for j in range(Tk):
            if k_pos[j] > q_pos[t]:
                row[j] = -1
    return out


@njit(cache=True, parallel=True)
def sampled_rows(q, k, counts, row_centre, mu, kn, K, L):
    """MagicPIG's rows as CSR: per row the keys colliding in >= 2 tables (ascending) and their
    log-weights -log P(sampled) (float32) from the angle between q and k - mu[row's centre].
    counts (R, Tk) from lsh_counts; kn (C, Hkv, >= Tk) from centred_sqnorms. Returns
    (ptr (R+1,), idx, logw)."""
    Hq, Tq, d = q.shape
    G = Hq // k.shape[0]
    R, Tk = counts.shape
    n = np.zeros(R, np.int64)
    for r in prange(R):
        c = 0
        for j in range(Tk):
            c += counts[r, j] >= 2
        n[r] = c
    ptr = np.zeros(R + 1, np.int64)
    ptr[1:] = np.cumsum(n)
    idx = np.empty(ptr[-1], np.int64)
    logw = np.empty(ptr[-1], np.float32)
    for r in prange(R):
        h, t = r // Tq, r % Tq
        g = h // G
        m, kc = mu[row_centre[t], g], kn[row_centre[t], g]
        qn = 0.0
        for i in range(d):
            qn += np.float64(q[h, t, i]) ** 2
        o = ptr[r]
        for j in range(Tk):
            if counts[r, j] >= 2:
                idx[o] = j
                logw[o] = _log_weight(q, h, t, k, g, j, m, qn, kc[j], K, L)
                o += 1
    return ptr, idx, logw


@njit(cache=True, parallel=True)
def ranked_rows(counts, budget, L):
    """BMRT's frequency rank as CSR: per row the budget[r] causal keys colliding in the most
    tables, ties to the later key (topk.top_rows' rule), ascending. counts (R, Tk) from
    lsh_counts hold 0..L, so each row's threshold comes from a histogram, not a sort."""
    R, Tk = counts.shape
    nb = np.empty(R, np.int64)                   # keys the row takes
    cut = np.empty(R, np.int64)                  # the nb-th largest count
    skip = np.empty(R, np.int64)                 # keys at that count passed over (the earliest)
    for r in prange(R):
        h4 = np.zeros((4, L + 2), np.int64)      # four histograms: no store-to-load chain
        for j in range(Tk):
            h4[j % 4, counts[r, j] + 1] += 1     # -1 (not causal) lands in bin 0
        hist = h4[0] + h4[1] + h4[2] + h4[3]
        b = min(budget[r], Tk - hist[0])
        above, cs = 0, L
        while b > 0 and above + hist[cs + 1] < b:
            above += hist[cs + 1]
            cs -= 1
        nb[r] = b
        cut[r], skip[r] = (cs, hist[cs + 1] - (b - above)) if b > 0 else (L + 1, 0)
    ptr = np.zeros(R + 1, np.int64)
    ptr[1:] = np.cumsum(nb)
    idx = np.empty(ptr[-1], np.int64)
    for r in prange(R):
        buf = np.empty(Tk, np.int64)
        cs, sk = cut[r], skip[r]
        o = 0
        seen = 0                                 # keys at count cs so far
        for j in range(Tk):                      # branch-free: write, then advance if taken
            c = counts[r, j]
            tie = c == cs
            buf[o] = j
            o += (c > cs) | (tie & (seen >= sk))
            seen += tie
            if o == Tk:
                break
        idx[ptr[r]:ptr[r + 1]] = buf[:o]
    return ptr, idx


def planes(seed, K, L, d):
    """The seeded Gaussian planes (K*L, d) float64: table l uses rows l*K .. l*K + K-1."""
    return np.random.default_rng(seed).standard_normal((K * L, d))


def code_dtype(K):
    """The smallest integer holding K bits (at S = 256k, 8 heads, L = 75, uint8 codes take 157 MB)."""
    return next(t for b, t in ((8, np.uint8), (16, np.uint16), (32, np.uint32), (63, np.int64))
                if K <= b)


def centre_end(q_pos, block):
    """The centre of a query at position p is the mean of the keys at positions < this: its
    own causal keys (p + 1) in the first block, those before its block (B*floor(p/B)) after."""
    p = np.asarray(q_pos, np.int64)
    return np.where(p < block, p + 1, p // block * block)


def codes_of(x, W, mu, K, L, pos=None, upto=None):
    """(C, H, L, T) codes of x (H, T, d) against the centres mu (C, H, d) (a zero centre: not
    centred), through hash_codes: the one way codes are made, by the unbound rule and the
    decode index alike. With pos (T,) and upto (C,): only x_j with pos[j] <= upto[c] against
    centre c (the rest stay 0)."""
    C, H, d = mu.shape
    T = x.shape[1]
    off = project(mu.reshape(C * H, 1, d), W).reshape(C, H, -1)               # (C, H, KL)
    if pos is None:
        pos, upto = np.zeros(T, np.int64), np.zeros(C, np.int64)
    out = np.zeros((C, x.shape[0], L, T), code_dtype(K))
    hash_codes(x, np.ascontiguousarray(W.T), off, K, L, pos, upto, out)
    return out


class LSHIndex:
    """The codes of one layer's keys against the centre of the block the next query falls in,
    for decode: build at the first decode step, extend per token; `end` says which block it is
    for (the centre is the mean of keys [0, end)), and a selector rebuilds it when the query
    moves into the next block. Keys are at positions 0, 1, ... (a cache that keeps them all).

    >>> import numpy as np
    >>> ix = LSHIndex(np.ones((1, 5, 4), np.float32), bits=4, tables=3, seed=0, block=4)
    >>> ix.end, ix.n
    (4, 5)
    >>> ix.extend(np.ones((1, 2, 4), np.float32)); ix.n
    7
    """

    def __init__(self, k, bits=8, tables=75, seed=0, block=CENTRE_BLOCK):
        self.K, self.L, self.seed, self.block = int(bits), int(tables), int(seed), int(block)
        self.W = planes(self.seed, self.K, self.L, k.shape[2])                  # (KL, d)
        self.end = int(centre_end(max(k.shape[1] - 1, 0), self.block))        # next query's block
        S = k.shape[1]
        self.mu = centres(k, np.arange(S, dtype=np.int64), np.array([self.end]))[0]  # (Hkv, d)
        self._buf = codes_of(k, self.W, self.mu[None], self.K, self.L)[0]       # (Hkv, L, S)
        self._kn = centred_sqnorms(k, self.mu[None])[0]                          # (Hkv, S)
        self.n = S

    @property
    def codes(self):
        """(Hkv, L, n) codes of the keys so far (a view of the growable buffer)."""
        return self._buf[:, :, :self.n]

    def extend(self, k_new):
        """Append the codes of k_new (Hkv, T, d) against the same centre."""
        if k_new.shape[1]:
            c = codes_of(k_new, self.W, self.mu[None], self.K, self.L)[0]       # (Hkv, L, T)
            self._buf = append_along(self._buf, self.n, c, axis=2)
            self._kn = append_along(self._kn, self.n, centred_sqnorms(k_new, self.mu[None])[0],
                                    axis=1)
        self.n += k_new.shape[1]


class LSH(Ranked):
    """SimHash with L = `tables` tables of K = `bits` planes, per query head; keys centred by the
    mean of the keys before the query's block of `block` positions (module docstring).

    mode="rank" (BMRT frequency_rank): keep the budget (k keys or ceil(fraction * n_causal)) of
      causal keys colliding with the query in the most tables; ties go to the later key.
    mode="sample" (MagicPIG): take every causal key colliding in >= 2 tables, with log-weight
      -log P(sampled) so the softmax sums are importance-weighted (unbiased for the numerator
      and the normaliser). Compose with Sinks | Window to keep those exact. A budget (k or
      fraction) caps the keys a row samples: past it, those colliding in the most tables stay,
      each with its weight (a truncated sample: no longer unbiased).
    `seed` fixes the planes (recorded in describe()); `index` an LSHIndex bound for decode.

    >>> import numpy as np
    >>> from minisparse.attention import attend
    >>> x = np.random.default_rng(0).standard_normal((1, 30, 8)).astype(np.float32)
    >>> _, st = attend(x, x, x, LSH(4, 10, k=5), return_stats=True)
    >>> int(st.n_attended[0, -1])
    5
    """

    def __init__(self, bits=8, tables=75, seed=0, mode="rank", k=None, fraction=None, index=None,
                 block=CENTRE_BLOCK):
        if not 1 <= int(bits) <= 62 or not 1 <= int(tables) <= 32767 or int(block) < 1:
            raise ValueError(f"LSH: need 1 <= bits <= 62, 1 <= tables <= 32767 (int16 counts) "
                             f"and block >= 1; got "
                             f"bits={bits}, tables={tables}, block={block}")
        if mode not in ("rank", "sample"):
            raise ValueError(f"LSH: mode must be 'rank' or 'sample', got {mode!r}")
        self.K, self.L, self.seed, self.mode = int(bits), int(tables), int(seed), mode
        self.block = int(block)
        if mode == "rank":
            self.k, self.fraction = check_budget("LSH(mode='rank')", k, fraction)
        else:                                   # an optional cap on the keys sampled
            self.k, self.fraction = ((None, None) if k is None and fraction is None
                                     else check_budget("LSH(mode='sample')", k, fraction))
            self.exact_subset = False           # weighted by -log P(sampled)
        self.index = index

    def _copy(self, **kw):
        a = dict(bits=self.K, tables=self.L, seed=self.seed, mode=self.mode, k=self.k,
                 fraction=self.fraction, index=self.index, block=self.block)
        a.update(kw)
        return LSH(**a)

    def bind(self, index):
        """This selector reading codes from an LSHIndex (same bits, tables, seed, block)."""
        mine = (self.K, self.L, self.seed, self.block)
        if (index.K, index.L, index.seed, index.block) != mine:
            raise ValueError(f"LSH.bind: index has K={index.K}, L={index.L}, seed={index.seed}, "
                             f"block={index.block}; selector has K, L, seed, block = {mine}")
        return self._copy(index=index)

    def for_layer(self, layer, state, k, v):
        """Bound to this layer's LSHIndex in the cache's state: built at the first decode step
        and again whenever the query (at position S-1) enters a new block, else extended with
        the keys appended since."""
        if state is None:
            return self
        S = k.shape[1]
        key = (self.describe(), layer)
        ix = state.get(key)
        if ix is None or ix.n > S or ix.end != centre_end(S - 1, self.block):
            ix = state[key] = LSHIndex(k, self.K, self.L, self.seed, self.block)
        elif ix.n < S:
            ix.extend(k[:, ix.n:])
        return self.bind(ix)

    options = ("seed",)

    def _with_options(self, seed=None):
        return self._copy(seed=self.seed if seed is None else int(seed))

    def counts(self, q, k, q_pos, k_pos):
        """(counts (Hq*Tq, Tk) int16 from lsh_counts, -1 where not causal; row_centre (Tq,);
        mu (C, Hkv, d) the centres; kn (C, Hkv, >= Tk) the centred keys' squared norms, empty
        in rank mode). Keys are hashed once per centre the rows use, or read from the bound
        index when it holds the one centre they need."""
        if q is None:
            raise ValueError("LSH: needs the queries (content-based), got q=None")
        Hkv, Tk, d = k.shape
        ix = self.index
        if ix is not None and (ix.n < Tk or ix.W.shape[1] != d):
            raise ValueError(f"LSH: bound index holds {ix.n} keys of width {ix.W.shape[1]}; "
                             f"attention got Tk={Tk}, d={d}")
        W = planes(self.seed, self.K, self.L, d) if ix is None else ix.W       # (KL, d)
        q_pos, k_pos = np.asarray(q_pos, np.int64), np.asarray(k_pos, np.int64)
        ends, row_centre = np.unique(centre_end(q_pos, self.block), return_inverse=True)
        # the index holds the codes against the one centre a decode step needs, keys at 0..n-1
        if (ix is not None and ends.size == 1 and ends[0] == ix.end
                and np.array_equal(k_pos, np.arange(Tk))):
            mu, kcodes, kn = ix.mu[None], ix._buf[None], ix._kn[None]  # (1, Hkv, ., cap)
        else:
            mu = centres(k, k_pos, ends)                                       # (C, Hkv, d)
            last = np.full(ends.size, np.iinfo(np.int64).min)                  # (C,) latest row
            np.maximum.at(last, row_centre, q_pos)
            kcodes = codes_of(k, W, mu, self.K, self.L, k_pos, last)           # (C, Hkv, L, Tk)
            # only the sampler's weights need the centred keys' norms
            kn = centred_sqnorms(k, mu) if self.mode == "sample" else np.zeros((0, 0, 0))
        qcodes = codes_of(q, W, np.zeros((1, q.shape[0], d)), self.K, self.L)[0]  # (Hq, L, Tq)
        counts = lsh_counts(qcodes, kcodes, row_centre.astype(np.int64), q_pos, k_pos,
                            q.shape[0] // Hkv)
        return counts, row_centre.astype(np.int64), mu, kn

    def collisions(self, q, k, q_pos, k_pos, want_logw=False):
        """(counts (Hq*Tq, Tk) float64 with -inf where not causal, logw (Hq*Tq, Tk) float32,
        zero where not sampled; (0, 0) unless want_logw)."""
        c, row_centre, mu, kn = self.counts(q, k, q_pos, k_pos)
        counts = np.where(c >= 0, c, -np.inf)                                  # (R, Tk)
        logw = np.zeros((0, 0), np.float32)
        if want_logw:
            if kn.shape[0] == 0:                                               # rank mode
                kn = centred_sqnorms(k, mu)
            ptr, idx, lw = sampled_rows(q, k, c, row_centre, mu, kn, self.K, self.L)
            logw = np.zeros(c.shape, np.float32)                               # (R, Tk)
            logw[np.repeat(np.arange(c.shape[0]), np.diff(ptr)), idx] = lw
        return counts, logw

    def row_scores(self, q, k, q_pos, k_pos):
        counts, _ = self.collisions(q, k, q_pos, k_pos)
        return Q, q.shape[0], counts

    def _select(self, q, k, q_pos, k_pos):
        c, row_centre, mu, kn = self.counts(q, k, q_pos, k_pos)                    # (R, Tk)
        logw = None
        if self.mode == "rank":                  # Ranked._select's keys, from the small counts
            b = row_budgets(self.k, self.fraction, q_pos, k_pos, q.shape[0])
            ptr, idx = ranked_rows(c, b, self.L)
        else:
            if self.k is not None or self.fraction is not None:
                # the cap: of the sampled keys, the budget colliding in the most tables
                b = row_budgets(self.k, self.fraction, q_pos, k_pos, q.shape[0])
                ptr, idx = ranked_rows(np.where(c >= 2, c, np.int16(-1)), b, self.L)
                kept = np.full(c.shape, -1, np.int16)                          # (R, Tk)
                rows = np.repeat(np.arange(c.shape[0]), np.diff(ptr))
                kept[rows, idx] = c[rows, idx]
                c = kept
            ptr, idx, logw = sampled_rows(q, k, c, row_centre, mu, kn, self.K, self.L)
        return Selection.from_lists(ptr, idx, k.shape[1], head_kind=Q, n_heads=q.shape[0],
                                    tq=q_pos.size, logw=logw, normalized=True)

    def describe(self):
        kl = f"K{self.K}L{self.L}" + ("" if self.block == CENTRE_BLOCK else f"B{self.block}")
        if self.mode == "sample":
            cap = "" if self.k is None and self.fraction is None else "/" + budget_text(self.k, self.fraction)
            return f"magicpig={kl}{cap},seed={self.seed}"
        return f"lsh={kl}/{budget_text(self.k, self.fraction)},seed={self.seed}"

    @staticmethod
    def parse_klb(text, name):
        """'K8L75' -> (8, 75, CENTRE_BLOCK); 'K8L75B64' -> (8, 75, 64): bits, tables, block."""
        m = re.fullmatch(r"K(\d+)L(\d+)(?:B(\d+))?", text.upper())
        if m is None:
            raise ValueError(f"attention spec: '{name}': expected KbitsLtables like K8L75 "
                             f"(or with the centre's block, like K8L75B256)")
        return int(m[1]), int(m[2]), int(m[3]) if m[3] else CENTRE_BLOCK

    @staticmethod
    def parse_kl(text, name):
        """'K8L75' -> (8, 75): bits and tables, the default block (a Hybrid's LSH)."""
        K, L, block = LSH.parse_klb(text, name)
        if block != CENTRE_BLOCK:
            raise ValueError(f"attention spec: '{name}': takes KbitsLtables like K8L75, no block")
        return K, L

    @staticmethod
    def from_spec(val):
        """`lsh=K8L75/5%` (frequency rank, budget 5%) or `lsh=K8L75/64`; seed via `,seed=N`;
        `K8L75B64` sets the centre's block."""
        kl, _, b = (val or "").partition("/")
        if not b:
            raise ValueError(f"attention spec: 'lsh={val}': expected K8L75/BUDGET, e.g. lsh=K8L75/5%")
        K, L, block = LSH.parse_klb(kl, f"lsh={val}")
        k, f = parse_budget(b, f"lsh={val}")
        return LSH(K, L, 0, "rank", k, f, block=block)

    @staticmethod
    def magicpig_from_spec(val):
        """`magicpig=K8L75` (sampler); `magicpig=K8L75/256` or `/5%` caps the keys a row samples
        (those colliding in the most tables); seed via `,seed=N`; sinks/window exactly by union."""
        kl, _, b = (val or "").partition("/")
        K, L, block = LSH.parse_klb(kl, f"magicpig={val}")
        k, f = parse_budget(b, f"magicpig={val}") if b else (None, None)
        return LSH(K, L, 0, "sample", k, f, block=block)
