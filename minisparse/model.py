"""The forward pass of a Llama-family model, top to bottom, in NumPy: the plain path.

embedding -> L x [RMSNorm -> q,k,v (+ qwen2 biases) -> RoPE -> cache -> attention -> out proj
-> residual -> RMSNorm -> SwiGLU -> residual] -> RMSNorm -> output head. Follows llama.cpp's
`llama` and `qwen2` graphs (and llama2.c's `forward`). Attention goes through
`minisparse.attention.attend`, so every sparse selector runs inside the real model.
Left out on purpose: batching, MoE, sliding-window layers, and speed: the functions here are
the textbook, and a forward calls them through `Ops`, the one seam where the fast path
(minisparse/fast/) puts its own versions of the same functions. Weights are `QuantMatrix` (GGUF
blocks kept in place, quant.py) or float32 arrays; `linear` dequantises a QuantMatrix and
multiplies, and `embed` dequantises just the rows asked for.

Shape legend: T tokens in this call, S positions held in the cache, D model width,
Hq / Hkv query / KV heads, G = Hq // Hkv, d head width, F FFN width, V vocabulary, L layers.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from .attention import Dense, attend
from .attention.kernel import reference_kernel
from .cache import KVCache
from .gguf_io import Config
from .quant import QuantMatrix
from .spec import parse_attention_spec


# ----------------------------------------------------------------------------- math


def embed(table, tokens):
    """Rows tokens (T,) of the embedding table (V, D) -> (T, D) float32; a QuantMatrix
    dequantises just those rows."""
    return table[tokens]                                      # (T, D)


def rms_norm(x, w, eps, out=None):
    """x (T, D) * w (D,) / rms(x): llama's RMSNorm (into out, if given).

    The mean square is summed in float64 as ggml does (its sum is a ggml_float = double), which
    also keeps extreme activations finite: x*x overflows float32 above |x| ~ 1.8e19. einsum
    squares and sums each row in one pass, without a float64 copy of x.

    >>> rms_norm(np.array([[3.0, 4.0]], np.float32), np.ones(2, np.float32), 0.0).round(4)
    array([[0.8485, 1.1314]], dtype=float32)
    """
    ms = np.einsum("...d,...d->...", x, x, dtype=np.float64)[..., None] / x.shape[-1]  # (T, 1)
    out = np.multiply(x, (1.0 / np.sqrt(ms + eps)).astype(np.float32), out=out)       # (T, D)
    out *= w                                                                          # (T, D)
    return out


def linear(x, w, b=None):
    """x (T, in) @ w.T with w (out, in) in GGUF data order (+ b (out,)) -> (T, out).

    w is a float32 array, or a `QuantMatrix`, dequantised here to float32 first.

    >>> linear(np.ones((1, 2), np.float32), np.eye(2, dtype=np.float32), np.ones(2, np.float32))
    array([[2., 2.]], dtype=float32)
    """
    if isinstance(w, QuantMatrix):
        w = w.dequantize()                                    # (out, in) float32
    y = x @ w.T                                               # (T, in) @ (in, out) -> (T, out)
    return y if b is None else y + b


def rope_tables(pos, cfg: Config, freq_factors=None):
    """cos, sin (T, rope_dim/2) for positions pos (T,).

    theta_i = pos / scale * base^(-2i/rope_dim); Llama 3.1 files carry `rope_freqs` factors that
    divide the frequencies.
    """
    half = cfg.rope_dim // 2
    inv_freq = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dim)  # (d/2,)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors[:half]
    ang = (np.asarray(pos, np.float64) / cfg.rope_scale)[:, None] * inv_freq[None, :]    # (T, d/2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin, style: str, rope_dim: int, out=None):
    """Rotate x (H, T, d) into a new array (or out); only the first rope_dim dims of each head rotate.

    "interleaved" rotates adjacent pairs (x0,x1),(x2,x3)... as GGUF `llama` weights expect (the
    converter permuted HF's q/k rows for it); "neox" rotates halves (x_i, x_{i+r/2}) as qwen2 does.
    """
    r = x[..., :rope_dim]                                     # (H, T, r)
    if style == "interleaved":
        a, b = r[..., 0::2], r[..., 1::2]                     # (H, T, r/2) each
    else:
        a, b = r[..., : rope_dim // 2], r[..., rope_dim // 2:]
    ra = a * cos - b * sin                                    # (H, T, r/2)
    rb = a * sin + b * cos                                    # (H, T, r/2)
    out = np.empty_like(x) if out is None else out            # (H, T, d)
    if style == "interleaved":
        out[..., 0:rope_dim:2], out[..., 1:rope_dim:2] = ra, rb
    else:
        out[..., : rope_dim // 2], out[..., rope_dim // 2: rope_dim] = ra, rb
    out[..., rope_dim:] = x[..., rope_dim:]                   # (H, T, d - r) pass through
    return out


def silu(x):
    with np.errstate(over="ignore"):      # exp(-x) -> inf for x < -88 gives the right limit, -0
        return x / (1.0 + np.exp(-x))


def glu(g, u, out=None):
    """silu(g) * u = g / (1 + exp(-g)) * u, element-wise; g, u (T, F) (into out, if given).

    The same operations in the same order as silu(g) * u (the same bits), in one output array:
    no temporaries the size of the FFN's activations."""
    t = np.negative(g, out=out)                               # (T, F)  -g
    with np.errstate(over="ignore"):                          # as in silu
        np.exp(t, out=t)                                      # (T, F)  exp(-g)
    t += 1.0                                                  # (T, F)
    np.divide(g, t, out=t)                                    # (T, F)  silu(g)
    t *= u                                                    # (T, F)
    return t


def swiglu(x, w_gate, w_up, w_down):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); x (T, D) -> (T, D)."""
    return linear(glu(linear(x, w_gate), linear(x, w_up)), w_down)     # (T, F) -> (T, D)


# ----------------------------------------------------------------------------- the seam


def _as_is(T):
    """The plain path runs a forward of any length as it is."""
    return nullcontext()


@dataclass(frozen=True)
class Ops:
    """The functions a forward calls, so that one model runs on the plain path or the fast one.

    embed, rms_norm, linear, rope (apply_rope's signature), glu and attend
    (minisparse.attention.attend's) must give what the functions above give, to the bit or
    within a tested float32 bound; forward_context(T) is a context manager a T-token forward
    runs inside; decode_step, when set, may take a one-token forward whole (the logits, or None
    to run it as written); linears, when set, takes the products that share one input
    (`products`) in one call, each as linear gives it. `PLAIN` holds this module's functions and
    the reference attention kernel; minisparse/fast/ builds `FAST` (tests/test_fast_path.py
    holds it to PLAIN)."""
    embed: Callable
    rms_norm: Callable
    linear: Callable
    rope: Callable
    glu: Callable
    attend: Callable
    forward_context: Callable = _as_is
    decode_step: Callable | None = None
    linears: Callable | None = None

    def products(self, x, ws, bs):
        """[linear(x, w, b) for w, b in zip(ws, bs)]: q, k and v (gate and up) read the same x,
        so `linears` may prepare it once for all of them (the fast path quantises it once)."""
        if self.linears is not None:
            return self.linears(x, ws, bs)
        return [self.linear(x, w, b) for w, b in zip(ws, bs)]


PLAIN = Ops(embed=embed, rms_norm=rms_norm, linear=linear, rope=apply_rope, glu=glu,
            attend=partial(attend, kernel=reference_kernel))


# ----------------------------------------------------------------------------- the model


class Model:
    """A loaded model: config, weights named after GGUF tensors, tokenizer, and the `Ops` its
    forward runs with (PLAIN here; minisparse.load_model picks the fast ones by default)."""

    def __init__(self, cfg: Config, weights: dict, tokenizer=None, path=None, ops: Ops = PLAIN):
        self.config, self.weights, self.tokenizer, self.path = cfg, weights, tokenizer, path
        self.ops = ops

    def new_cache(self, dtype=np.float32) -> KVCache:
        return KVCache(self.config, dtype=dtype)

    def rope(self, x, pos):
        """This model's RoPE applied to x (H, T, d) at positions pos (T,) -> a new (H, T, d)."""
        cfg = self.config
        cos, sin = rope_tables(pos, cfg, self.weights.get("rope_freqs"))  # (T, r/2)
        return self.ops.rope(x, cos, sin, cfg.rope_style, cfg.rope_dim)    # (H, T, d)

    def forward(self, tokens, cache=None, attention=None, dense_layers=(), stats=None, trace=None,
                last_only=False):
        """Logits (T, V) for tokens (T,) appended at positions cache.next_pos ... .

        last_only: logits (1, V) of the last token only, as generation needs: the output head
        (V x D, the largest matrix) then runs on one row, not T.

        attention: a selector, a spec string ("sinks=4,window=128") or None for dense;
        dense_layers: layer indices that stay dense whatever the selector;
        stats: a list that receives per layer {layer, q_pos, n_attended, n_causal};
        trace: a dict that receives named intermediates ("embed", "blk.0.q", ...) for teaching.
        """
        cfg, w, ops = self.config, self.weights, self.ops
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.n_vocab):
            raise ValueError(f"token ids must be in [0, {cfg.n_vocab}); got {tokens.min()}..{tokens.max()}")
        cache = self.new_cache() if cache is None else cache
        block = cache.block
        if block and len(tokens) > block:   # bounded caches compress between blocks of this size
            out = [self.forward(tokens[a:a + block], cache, attention, dense_layers, stats, trace,
                                last_only) for a in range(0, len(tokens), block)]
            return out[-1] if last_only else np.concatenate(out)
        selector = parse_attention_spec(attention) if isinstance(attention, str) else attention
        if len(tokens) == 1 and ops.decode_step is not None:    # the fast path's fused step
            logits = ops.decode_step(self, tokens, cache, selector, dense_layers, stats, trace)
            if logits is not None:
                return logits
        T, Hq, Hkv, d = len(tokens), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pos = cache.next_pos + np.arange(T)                   # (T,)
        cos, sin = rope_tables(pos, cfg, w.get("rope_freqs"))  # (T, r/2)
        rec = trace.__setitem__ if trace is not None else (lambda name, value: None)

        # seen by every layer of this call, in order (Selector.at_layer); it names the model so
        # that a rule calibrated on it (DuoAttention's head roles) finds its calibration file
        shared = {"model": self}
        x = ops.embed(w["token_embd"], tokens)                # (T, D)
        rec("embed", x)
        with ops.forward_context(T):
            for l in range(cfg.n_layers):
                p = f"blk.{l}."
                # ---- attention
                h = ops.rms_norm(x, w[p + "attn_norm"], cfg.norm_eps)                # (T, D)
                qkv = (p + "attn_q", p + "attn_k", p + "attn_v")   # linear(h, w[n], w[n + ".bias"]) each
                q, k, v = ops.products(h, [w[n] for n in qkv], [w.get(n + ".bias") for n in qkv])
                # q (T, Hq*d), k (T, Hkv*d), v (T, Hkv*d)
                q = q.reshape(T, Hq, d).transpose(1, 0, 2)                           # (Hq, T, d)
                k = k.reshape(T, Hkv, d).transpose(1, 0, 2)                          # (Hkv, T, d)
                v = v.reshape(T, Hkv, d).transpose(1, 0, 2)                          # (Hkv, T, d)
                q = ops.rope(q, cos, sin, cfg.rope_style, cfg.rope_dim)              # (Hq, T, d)
                k = ops.rope(k, cos, sin, cfg.rope_style, cfg.rope_dim)              # (Hkv, T, d)
                rec(p + "q", q), rec(p + "k", k), rec(p + "v", v)
                K, Vv, k_pos = cache.update(l, k, v, pos, q=q)                    # (Hkv, >=S, d), (S,)
                sel = Dense() if (selector is None or l in dense_layers) else selector.at_layer(l, shared)
                if T == 1:   # decode: indexed selectors (IVF, LSH, landmarks) keep a per-layer index
                    S = len(k_pos)   # in the cache, built at the first step and extended at each one
                    sel = sel.for_layer(l, cache.selector_state, K[:, :S], Vv[:, :S])
                held = cache.held(l)     # heads holding different counts (Ada-KV) read their own
                if held is not None:
                    sel = held if isinstance(sel, Dense) else sel & held
                o, st = ops.attend(q, K, Vv, sel, q_pos=pos, k_pos=k_pos, return_stats=True,
                                   buffer=True)                                      # (Hq, T, d)
                if stats is not None:
                    stats.append({"layer": l, "q_pos": pos, "n_attended": st.n_attended,
                                  "n_causal": st.n_causal})
                o = o.transpose(1, 0, 2).reshape(T, Hq * d)                         # (T, Hq*d)
                rec(p + "attn_out", o)
                x = x + ops.linear(o, w[p + "attn_output"])                          # (T, D)
                # ---- feed-forward: SwiGLU, down(silu(gate(h)) * up(h))
                h = ops.rms_norm(x, w[p + "ffn_norm"], cfg.norm_eps)                 # (T, D)
                g, u = ops.products(h, [w[p + "ffn_gate"], w[p + "ffn_up"]], [None, None])  # (T, F) each
                x = x + ops.linear(ops.glu(g, u), w[p + "ffn_down"])                 # (T, D)
                rec(p + "out", x)
        cache.advance(T)
        if last_only:
            x = x[-1:]                                                               # (1, D)
        x = ops.rms_norm(x, w["output_norm"], cfg.norm_eps)                         # (T, D)
        head = w["token_embd"] if cfg.tied_embeddings else w["output"]               # (V, D)
        logits = ops.linear(x, head)                                                 # (T, V)
        rec("logits", logits)
        return logits

    def prefill(self, text_or_tokens, cache=None, chunk=512, progress=None, **kw):
        """Run a long context into a cache in chunks of `chunk` tokens; returns (cache, last logits).

        progress(done, total) is called after each chunk (the CLI draws its bar with it). Chunks
        give the same logits as one call (tested) while bounding the (T, S) score memory.
        """
        ids = self.tokenizer.encode(text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
        cache = self.new_cache() if cache is None else cache
        logits = None
        for a in range(0, len(ids), chunk):
            logits = self.forward(ids[a:a + chunk], cache, last_only=True, **kw)[-1]
            if progress is not None:
                progress(min(a + chunk, len(ids)), len(ids))
        return cache, logits

    def trace(self, tokens, **kw):
        """Run forward on tokens and return (logits, {step name: array}) for teaching."""
        steps = {}
        logits = self.forward(tokens, trace=steps, **kw)
        return logits, steps

    def generate(self, prompt, max_new_tokens=128, temperature=0.8, top_k=40, top_p=0.95,
                 min_p=0.05, repeat_penalty=1.0, seed=None, attention=None, dense_layers=(),
                 cache=None, add_bos=None, stop_at_eos=True, stats=None):
        """Yield text pieces of a continuation of `prompt` (str, or a list of token ids).

        Greedy when temperature <= 0. The seed is recorded in `self.last_seed`.
        stats: a list that receives forward's per-layer attention records of every step.
        """
        from .sampling import Sampler   # local: sampling is optional for forward-only users
        tok = self.tokenizer
        ids = list(prompt) if not isinstance(prompt, str) else tok.encode(prompt, add_bos=add_bos)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; pass add_bos=True or a non-empty prompt")
        cache = self.new_cache() if cache is None else cache
        ctx = self.config.context_length
        # what attention can see is bounded by what the cache holds: a bounded cache (sinks +
        # window, recursive) may run past the trained context; its caller labels such answers
        if len(cache) + len(ids) > ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {ctx} "
                             f"({len(cache)} already used); shorten it or raise -c")
        sampler = Sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        self.last_seed = sampler.seed
        logits = self.forward(ids, cache, attention, dense_layers, stats, last_only=True)[-1]
        stream = tok.decode_stream() if tok is not None else None
        for i in ids if stream is not None else ():
            stream.push(i)        # the prompt was printed already; this sets SentencePiece's prefix-space state
        history = list(ids)
        for _ in range(max_new_tokens):
            nxt = sampler(logits, history)
            if stop_at_eos and tok is not None and nxt in tok.eot_ids:
                break
            history.append(nxt)
            piece = stream.push(nxt) if stream is not None else str(nxt)
            if piece:
                yield piece
            if len(cache) >= ctx:
                break
            logits = self.forward([nxt], cache, attention, dense_layers, stats)[-1]
        if stream is not None:
            tail = stream.flush()
            if tail:
                yield tail

