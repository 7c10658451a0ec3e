"""FastGRNN salience gate: a tiny recurrent cell runs over the keys of one layer/KV head and
scores each key by the norm of its hidden state; `Gated` (gate/gated.py) keeps the top-scored.

Leaves out the choice of keys per query (gate/gated.py) and caches (minisparse.cache.GateCache
runs this gate over every key it stores). Follows Kusupati et al. 2018, "FastGRNN" (NeurIPS),
eq. 3-5, with ruvllm's variant (ruvllm_sparse_attention 0.1.1, src/fastgrnn_gate.rs, read on
docs.rs) as `cell="ruvllm"`.

The two cells (x the RMS-normalised key, h the running state, sig = logistic sigmoid):
  fastgrnn  a = W x + U h                      one W and one U shared by both branches
            z = sig(a + b_z),  c = tanh(a + b_h)
            h' = z * h + (sig(zeta) * (1 - z) + sig(nu)) * c
  ruvllm    g = sig(W_g x + U_g h + b_g),  c = tanh(W_u x + U_u h + b_u)   separate matrices
            f = clamp(zeta * g + nu, 0, 1);   h' = f * h + (1 - f) * c     zeta, nu raw scalars
Salience s_t = ||h_t||_2 after the cell has read key t: it depends on keys <= t only.

Shape legend: Hkv KV heads, T keys in this call, d head width, H gate hidden width.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from numba import njit

from ..attention.selection import reserve

EPS = 1e-6                       # RMS floor: an all-zero key normalises to zero, not NaN
DEFAULT_WEIGHTS = "fastgrnn_gate.npz"     # shipped in models/ (minisparse.registry.shipped_file)
CELLS = ("fastgrnn", "ruvllm")
PARAM_NAMES = {"fastgrnn": ("W", "U", "b_z", "b_h", "zeta", "nu"),
               "ruvllm": ("W_g", "U_g", "W_u", "U_u", "b_g", "b_u", "zeta", "nu")}


# ----------------------------------------------------------------------------- the scans
@njit(cache=True)
def _rms_normalise(k, t, n, x):
    # x (d,) f64 <- k[n, t] / rms: done in the scan, key by key, so a key's feature does not
    # depend on how many keys came in the same call (decode and prefill see the same bits)
    d = x.size
    ss = 0.0
    for j in range(d):
        ss += np.float64(k[n, t, j]) * np.float64(k[n, t, j])
    r = 1.0 / np.sqrt(ss / d + EPS)
    for j in range(d):
        x[j] = np.float64(k[n, t, j]) * r


@njit(cache=True)
def scan_fastgrnn(k, h, W, U, b_z, b_h, zeta_s, nu_s):
    """Run the paper's cell over k (N, T, d) f32 from state h (N, H) f64 (updated in place).
    zeta_s, nu_s are sig(zeta), sig(nu). Returns salience (N, T) f64 = ||h_t||."""
    N, T, d = k.shape
    H = h.shape[1]
    sal = np.empty((N, T))
    x = np.empty(d)
    hn = np.empty(H)
    for n in range(N):
        for t in range(T):
            _rms_normalise(k, t, n, x)
            ss = 0.0
            for i in range(H):
                a = 0.0
                for j in range(d):
                    a += W[i, j] * x[j]
                for j in range(H):
                    a += U[i, j] * h[n, j]
                z = 1.0 / (1.0 + np.exp(-(a + b_z[i])))
                c = np.tanh(a + b_h[i])
                hn[i] = z * h[n, i] + (zeta_s * (1.0 - z) + nu_s) * c
            for i in range(H):
                h[n, i] = hn[i]
                ss += hn[i] * hn[i]
            sal[n, t] = np.sqrt(ss)
    return sal


@njit(cache=True)
def scan_ruvllm(k, h, W_g, U_g, W_u, U_u, b_g, b_u, zeta, nu):
    """ruvllm's cell over k (N, T, d) f32 from h (N, H) f64 (in place) -> salience (N, T)."""
    N, T, d = k.shape
    H = h.shape[1]
    sal = np.empty((N, T))
    x = np.empty(d)
    hn = np.empty(H)
    for n in range(N):
        for t in range(T):
            _rms_normalise(k, t, n, x)
            ss = 0.0
            for i in range(H):
                ag = b_g[i]
                au = b_u[i]
                for j in range(d):
                    ag += W_g[i, j] * x[j]
                    au += W_u[i, j] * x[j]
                for j in range(H):
                    ag += U_g[i, j] * h[n, j]
                    au += U_u[i, j] * h[n, j]
                g = 1.0 / (1.0 + np.exp(-ag))
                f = min(max(zeta * g + nu, 0.0), 1.0)
                hn[i] = f * h[n, i] + (1.0 - f) * np.tanh(au)
            for i in range(H):
                h[n, i] = hn[i]
                ss += hn[i] * hn[i]
            sal[n, t] = np.sqrt(ss)
    return sal


# ----------------------------------------------------------------------------- the gate
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class FastGRNNGate:
    """A FastGRNN cell with its weights; `salience(k)` scores keys (Hkv, T, d) -> (Hkv, T).

    params: float64 arrays named as in PARAM_NAMES[cell]; W-type matrices are (H, d), U-type
    (H, H), biases (H,), zeta and nu scalars. `trained` and `record` say where they came from:
    an untrained gate (random init) reports itself as such in `label`.

    >>> import numpy as np
    >>> g = FastGRNNGate.random(d=4, hidden=8, seed=0)
    >>> s, h = g.salience(np.ones((2, 5, 4), np.float32))
    >>> s.shape, h.shape, g.label
    ((2, 5), (2, 8), 'untrained fastgrnn (random init, seed 0)')
    """

    def __init__(self, params: dict, cell: str = "fastgrnn", trained: bool = False,
                 record: dict | None = None, name: str = ""):
        if cell not in CELLS:
            raise ValueError(f"FastGRNNGate: cell must be one of {CELLS}, got {cell!r}")
        missing = [p for p in PARAM_NAMES[cell] if p not in params]
        if missing:
            raise ValueError(f"FastGRNNGate({name or cell}): missing parameters {missing}; "
                             f"a {cell} cell needs {PARAM_NAMES[cell]}")
        self.cell, self.trained, self.record, self.name = cell, bool(trained), record or {}, name
        # np.array, not ascontiguousarray: C order, and zeta, nu stay 0-d
        self.params = {p: np.array(params[p], np.float64) for p in PARAM_NAMES[cell]}
        w = self.params["W" if cell == "fastgrnn" else "W_g"]
        self.hidden, self.d = w.shape                                   # (H, d)

    # ---- construction ------------------------------------------------------------------
    @staticmethod
    def random(d: int, hidden: int = 16, seed: int = 0, cell: str = "fastgrnn"):
        """Untrained gate: Glorot-uniform matrices, zero biases; zeta, nu as EdgeML initialises
        them (1, -4: the update starts close to a plain tanh RNN) or ruvllm's (1, 0)."""
        r = np.random.default_rng(seed)
        glorot = lambda o, i: r.uniform(-1, 1, (o, i)) * np.sqrt(6.0 / (o + i))
        if cell == "fastgrnn":
            p = dict(W=glorot(hidden, d), U=glorot(hidden, hidden), b_z=np.zeros(hidden),
                     b_h=np.zeros(hidden), zeta=np.float64(1.0), nu=np.float64(-4.0))
        elif cell == "ruvllm":
            p = dict(W_g=glorot(hidden, d), U_g=glorot(hidden, hidden), W_u=glorot(hidden, d),
                     U_u=glorot(hidden, hidden), b_g=np.zeros(hidden), b_u=np.zeros(hidden),
                     zeta=np.float64(1.0), nu=np.float64(0.0))
        else:
            raise ValueError(f"FastGRNNGate.random: cell must be one of {CELLS}, got {cell!r}")
        return FastGRNNGate(p, cell, trained=False, record={"seed": seed, "init": "random"},
                            name=f"untrained-{cell}-d{d}-s{seed}")

    @property
    def label(self) -> str:
        if self.trained:
            return f"trained {self.cell} ({self.name})"
        return f"untrained {self.cell} (random init, seed {self.record.get('seed', '?')})"

    # ---- scoring -----------------------------------------------------------------------
    def init_state(self, n: int):
        """Zero hidden state (n, H) float64."""
        return np.zeros((n, self.hidden))

    def salience(self, k, h=None):
        """Salience (Hkv, T) f64 of keys k (Hkv, T, d), continuing from state h (Hkv, H) (zeros
        when None; not modified). Returns (salience, new state)."""
        k = np.ascontiguousarray(k, np.float32)
        if k.ndim != 3 or k.shape[2] != self.d:
            raise ValueError(f"FastGRNNGate({self.name}): keys must be (Hkv, T, {self.d}); got "
                             f"{k.shape} (this gate was built for head width {self.d})")
        h = self.init_state(k.shape[0]) if h is None else np.array(h, np.float64)   # (Hkv, H)
        p = self.params
        if self.cell == "fastgrnn":
            s = scan_fastgrnn(k, h, p["W"], p["U"], p["b_z"], p["b_h"],
                              float(_sigmoid(p["zeta"])), float(_sigmoid(p["nu"])))
        else:
            s = scan_ruvllm(k, h, p["W_g"], p["U_g"], p["W_u"], p["U_u"], p["b_g"], p["b_u"],
                            float(p["zeta"]), float(p["nu"]))
        return s, h

    # ---- files -------------------------------------------------------------------------
    def arrays(self, prefix: str) -> dict:
        out = {f"{prefix}/{k}": v for k, v in self.params.items()}
        meta = {"cell": self.cell, "trained": self.trained, "record": self.record}
        out[f"{prefix}/meta"] = np.array(json.dumps(meta))
        return out

    @staticmethod
    def load(path=None, name: str | None = None, d: int | None = None,
             cell: str = "fastgrnn") -> "FastGRNNGate":
        """A gate from an .npz written by models/train_gate.py (default: models/fastgrnn_gate.npz).
        name picks one gate; else the only `cell` gate with head width d."""
        if path is None:
            from ..registry import shipped_file
            path = shipped_file(DEFAULT_WEIGHTS)
            if path is None:
                raise FileNotFoundError(f"{DEFAULT_WEIGHTS} is not in models/ nor in the installed package")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no gate weights; train them with "
                                    f"`python3 models/train_gate.py` or use mode=untrained")
        with np.load(path, allow_pickle=False) as z:
            names = sorted({key.split("/")[0] for key in z.files})
            gates = {}
            for nm in names:
                meta = json.loads(str(z[f"{nm}/meta"]))
                params = {key.split("/", 1)[1]: z[key] for key in z.files
                          if key.startswith(nm + "/") and not key.endswith("/meta")}
                gates[nm] = FastGRNNGate(params, meta["cell"], meta["trained"], meta["record"], nm)
        if name is not None:
            if name not in gates:
                raise ValueError(f"{path}: no gate named {name!r}; it holds {names}")
            return gates[name]
        fit = [g for g in gates.values() if (d is None or g.d == d) and g.cell == cell]
        if len(fit) != 1:
            raise ValueError(f"{path}: expected exactly one {cell} gate for head width {d}; "
                             "found " + ", ".join(f"{g.name} ({g.cell}, d={g.d})"
                                                  for g in gates.values()))
        return fit[0]


def save_gates(path, gates: dict):
    """Write {name: FastGRNNGate} to one .npz (no pickles: plain arrays plus a JSON string)."""
    arrays = {}
    for nm, g in gates.items():
        if "/" in nm:
            raise ValueError(f"save_gates: gate name {nm!r} must not contain '/'")
        arrays.update(g.arrays(nm))
    np.savez(path, **arrays)


# ----------------------------------------------------------------------------- decode state
class GateState:
    """One layer's running gate state: hidden h (Hkv, H), salience and position of every key read
    so far, and per selector configuration the running top-budget heap (gate/gated.py).
    Reading a key is O(H * (d + H)); nothing is ever recomputed."""

    def __init__(self, gate: FastGRNNGate, n_kv: int, capacity: int = 256):
        self.gate = gate
        self.h = gate.init_state(n_kv)                                 # (Hkv, H)
        self.sal = np.zeros((n_kv, capacity))                          # (Hkv, cap)
        self.pos = np.zeros(capacity, np.int64)                        # (cap,)
        self.n = 0
        self.heaps = {}                                                # config -> heap arrays

    @property
    def current(self):
        """Itself: a Gated selector bound to a GateState reads it as it reads a GateCache's."""
        return self

    def append(self, k_new, pos):
        """Read keys k_new (Hkv, T, d) at positions pos (T,), in order."""
        T = k_new.shape[1]
        s, self.h = self.gate.salience(k_new, self.h)                  # (Hkv, T)
        self.sal = reserve(self.sal, self.n, self.n + T, axis=1)       # (Hkv, cap')
        self.pos = reserve(self.pos, self.n, self.n + T, axis=0)       # (cap',)
        self.sal[:, self.n:self.n + T] = s
        self.pos[self.n:self.n + T] = pos
        self.n += T


# ----------------------------------------------------------------------------- training data
class RandomGate:
    """Random keep as a gate: salience = a hash of (seed, key index, head), uniform in [0, 1).
    Causal and prefix-stable like the real gate, so `Gated(gate=RandomGate(s))` is random keep
    at the same budget. The state h (Hkv, 1) counts keys read."""
    trained, cell = False, "random"

    def __init__(self, seed: int = 0):
        self.seed, self.name = int(seed), f"random-s{seed}"
        self.label = f"random keep (seed {seed})"

    def init_state(self, n):
        return np.zeros((n, 1))

    def salience(self, k, h=None):
        n_kv, T = k.shape[0], k.shape[1]
        h = self.init_state(n_kv) if h is None else np.array(h, np.float64)
        j = (int(h[0, 0]) + np.arange(T, dtype=np.uint64))[None, :]              # (1, T)
        x = j * np.uint64(n_kv) + np.arange(n_kv, dtype=np.uint64)[:, None]       # (Hkv, T)
        x = x + np.uint64((self.seed * 0x9E3779B97F4A7C15) % 2**64)            # wraps, as intended
        for m in (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)):  # splitmix64
            x = (x ^ (x >> np.uint64(30))) * m
        x = x ^ (x >> np.uint64(31))
        return (x >> np.uint64(11)).astype(np.float64) / 2.0**53, h + T


def attention_maps(model, tokens):
    """Per layer (q (Hq, T, d), k (Hkv, T, d), p (Hq, T, T) f64 dense causal softmax) for a
    dense forward pass over tokens (T,): the targets and the test set of the gate."""
    _, steps = model.trace(tokens)
    out = []
    for l in range(model.config.n_layers):
        q, k = steps[f"blk.{l}.q"], steps[f"blk.{l}.k"]                           # post-RoPE
        G, T, d = q.shape[0] // k.shape[0], q.shape[1], q.shape[2]
        s = np.einsum("htd,hsd->hts", q.astype(np.float64),
                      np.repeat(k, G, axis=0).astype(np.float64)) / np.sqrt(d)   # (Hq, T, T)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out.append((q, k, p / p.sum(-1, keepdims=True)))
    return out


def future_mass(p, n_kv: int, window: int):
    """Target (Hkv, T): mean attention key j gets from the queries i > j + window (the ones for
    which the gate, not the window, must keep it), averaged over the G query heads of its KV head;
    NaN where no such query exists."""
    hq, T, _ = p.shape
    pg = p.reshape(n_kv, hq // n_kv, T, T).mean(1)                               # (Hkv, T, T)
    i = np.arange(T)
    later = i[:, None] > i[None, :] + window                                      # (Tq, Tk)
    tot = (pg * later).sum(1)                                                     # (Hkv, T)
    n = later.sum(0)                                                              # (T,)
    return np.where(n > 0, tot / np.maximum(n, 1), np.nan)


def mass_recall(maps, selector, start: int = 0):
    """Mean over layers, query heads and queries at positions >= start of the dense attention
    mass that falls on the keys `selector` picks (1.0 = every query's mass is covered)."""
    tot, cnt = 0.0, 0
    for q, k, p in maps:
        T = k.shape[1]
        pos = np.arange(T, dtype=np.int64)
        mask, _ = selector.select(q, k, pos, pos).to_mask(q.shape[0], T, T)        # (Hq, T, T)
        got = (p * mask).sum(-1)[:, start:]                                        # (Hq, T-start)
        tot, cnt = tot + got.sum(), cnt + got.size
    return tot / max(cnt, 1)
