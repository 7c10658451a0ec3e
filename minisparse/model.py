"""The forward pass of a Llama-family model, top to bottom, in NumPy.

embedding -> L x [RMSNorm -> q,k,v (+ qwen2 biases) -> RoPE -> cache -> attention -> out proj
-> residual -> RMSNorm -> SwiGLU -> residual] -> RMSNorm -> output head. Follows llama.cpp's
`llama` and `qwen2` graphs (and llama2.c's `forward`). Attention goes through
`minisparse.attention.attend`, so every sparse selector runs inside the real model.
Left out on purpose: batching, MoE, sliding-window layers. Weights are `QuantMatrix` (quant.py:
Q8_0/Q4_0/Q4_1/Q4_K/Q6_K blocks kept in place) or float32 arrays (other types, vectors, and every
weight with load_model(dequant=True)): `linear` is the one place that dispatches to the kernels,
and `w["token_embd"][tokens]` dequantises just the rows asked for.

Shape legend: T tokens in this call, S positions held in the cache, D model width,
Hq / Hkv query / KV heads, G = Hq // Hkv, d head width, F FFN width, V vocabulary, L layers.
"""
from __future__ import annotations

import numpy as np

from .attention import Dense, attend
from .cache import KVCache
from .gguf_io import Config, load_gguf
from .quant import QuantMatrix
from .spec import parse_attention_spec
from .threads import by_rows, matmul_t, prefill_heap, prefill_threads


# ----------------------------------------------------------------------------- math


@by_rows(0, None, None)   # row t of the output reads row t of x only: split over cores in a prefill
def rms_norm(x, w, eps, out=None):
    """x (T, D) * w (D,) / rms(x): llama's RMSNorm (into out, if given).

    The mean square is summed in float64 as ggml does (its sum is a ggml_float = double), which
    also keeps extreme activations finite: x*x overflows float32 above |x| ~ 1.8e19. einsum
    squares and sums each row in one pass without a float64 copy of x (np.mean(np.square(x,
    dtype=float64)) took 40% longer).
    """
    ms = np.einsum("...d,...d->...", x, x, dtype=np.float64)[..., None] / x.shape[-1]  # (T, 1)
    out = np.multiply(x, (1.0 / np.sqrt(ms + eps)).astype(np.float32), out=out)       # (T, D)
    out *= w
    return out


def linear(x, w, b=None):
    """x (T, in) @ w.T with w (out, in) in GGUF data order -> (T, out).

    w is a float32 array, or a `QuantMatrix` whose kernels read the GGUF blocks directly.
    """
    if isinstance(w, QuantMatrix):
        y = w.matmul(x)                                       # same product, from quant blocks
    else:
        y = matmul_t(x, w)                                    # (T, in) @ (in, out) -> (T, out)
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


@by_rows(1, 0, 0)         # x (H, T, d) and the tables (T, r/2) per position
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
    rb = a * sin + b * cos
    out = np.empty_like(x) if out is None else out
    if style == "interleaved":
        out[..., 0:rope_dim:2], out[..., 1:rope_dim:2] = ra, rb
    else:
        out[..., : rope_dim // 2], out[..., rope_dim // 2: rope_dim] = ra, rb
    out[..., rope_dim:] = x[..., rope_dim:]
    return out


def silu(x):
    with np.errstate(over="ignore"):      # exp(-x) -> inf for x < -88 gives the right limit, -0
        return x / (1.0 + np.exp(-x))


@by_rows(0, 0)
def glu(g, u, out=None):
    """silu(g) * u = g / (1 + exp(-g)) * u, element-wise; g, u (T, F) (into out, if given).

    The same operations in the same order as silu(g) * u (the same bits), in one output: five
    passes over (T, F) and no temporaries (SmolLM2's gate at T = 2048 is 12.6 MB an array)."""
    t = np.negative(g, out=out)                               # (T, F)  -g
    with np.errstate(over="ignore"):                          # as in silu
        np.exp(t, out=t)                                      # exp(-g)
    t += 1.0
    np.divide(g, t, out=t)                                    # silu(g)
    t *= u
    return t


def swiglu(x, w_gate, w_up, w_down):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); x (T, D) -> (T, D)."""
    return linear(glu(linear(x, w_gate), linear(x, w_up)), w_down)     # (T, F) -> (T, D)


# ----------------------------------------------------------------------------- the model


class Model:
    """A loaded model: config, float32 weights named after GGUF tensors, tokenizer."""

    def __init__(self, cfg: Config, weights: dict, tokenizer=None, path=None):
        self.config, self.weights, self.tokenizer, self.path = cfg, weights, tokenizer, path

    def new_cache(self, dtype=np.float32) -> KVCache:
        return KVCache(self.config, dtype=dtype)

    def forward(self, tokens, cache=None, attention=None, dense_layers=(), stats=None, trace=None,
                last_only=False):
        """Logits (T, V) for tokens (T,) appended at positions cache.next_pos ... .

        last_only: logits (1, V) of the last token only, as generation needs: the output head
        (V x D, the largest matrix) then runs on one row, not T (SmolLM2 at T = 2048: 116 GFLOP
        and a 400 MB array saved).

        attention: a selector, a spec string ("sinks=4,window=128") or None for dense;
        dense_layers: layer indices that stay dense whatever the selector;
        stats: a list that receives per layer {layer, q_pos, n_attended, n_causal};
        trace: a dict that receives named intermediates ("embed", "blk.0.q", ...) for teaching.
        """
        cfg, w = self.config, self.weights
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.n_vocab):
            raise ValueError(f"token ids must be in [0, {cfg.n_vocab}); got {tokens.min()}..{tokens.max()}")
        cache = self.new_cache() if cache is None else cache
        block = getattr(cache, "block", None)
        if block and len(tokens) > block:   # bounded caches compress between blocks of this size
            out = [self.forward(tokens[a:a + block], cache, attention, dense_layers, stats, trace,
                                last_only) for a in range(0, len(tokens), block)]
            return out[-1] if last_only else np.concatenate(out)
        selector = parse_attention_spec(attention) if isinstance(attention, str) else attention
        T, Hq, Hkv, d = len(tokens), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pos = cache.next_pos + np.arange(T)                   # (T,)
        cos, sin = rope_tables(pos, cfg, w.get("rope_freqs"))  # (T, r/2)
        rec = trace.__setitem__ if trace is not None else (lambda name, value: None)

        x = w["token_embd"][tokens]                           # (T, D)
        rec("embed", x)
        # a long prompt: NumPy work split over the cores, freed memory reused (threads.py)
        with prefill_heap(T), prefill_threads(T):
            for l in range(cfg.n_layers):
                p = f"blk.{l}."
                # ---- attention
                h = rms_norm(x, w[p + "attn_norm"], cfg.norm_eps)                    # (T, D)
                q = linear(h, w[p + "attn_q"], w.get(p + "attn_q.bias"))             # (T, Hq*d)
                k = linear(h, w[p + "attn_k"], w.get(p + "attn_k.bias"))             # (T, Hkv*d)
                v = linear(h, w[p + "attn_v"], w.get(p + "attn_v.bias"))             # (T, Hkv*d)
                q = q.reshape(T, Hq, d).transpose(1, 0, 2)                           # (Hq, T, d)
                k = k.reshape(T, Hkv, d).transpose(1, 0, 2)                          # (Hkv, T, d)
                v = v.reshape(T, Hkv, d).transpose(1, 0, 2)                          # (Hkv, T, d)
                q = apply_rope(q, cos, sin, cfg.rope_style, cfg.rope_dim)            # (Hq, T, d)
                k = apply_rope(k, cos, sin, cfg.rope_style, cfg.rope_dim)            # (Hkv, T, d)
                rec(p + "q", q), rec(p + "k", k), rec(p + "v", v)
                K, Vv, k_pos = cache.update(l, k, v, pos, q=q)                    # (Hkv, >=S, d), (S,)
                sel = Dense() if (selector is None or l in dense_layers) else selector
                if T == 1:   # decode: indexed selectors (IVF, LSH, landmarks) keep a per-layer index
                    S = len(k_pos)   # in the cache, built at the first step and extended at each one
                    sel = sel.for_layer(l, getattr(cache, "selector_state", None), K[:, :S], Vv[:, :S])
                o, st = attend(q, K, Vv, sel, q_pos=pos, k_pos=k_pos, return_stats=True,
                               buffer=True)                                              # (Hq, T, d)
                if stats is not None:
                    stats.append({"layer": l, "q_pos": pos, "n_attended": st.n_attended,
                                  "n_causal": st.n_causal})
                o = o.transpose(1, 0, 2).reshape(T, Hq * d)                         # (T, Hq*d)
                rec(p + "attn_out", o)
                x = x + linear(o, w[p + "attn_output"])                              # (T, D)
                # ---- feed-forward
                h = rms_norm(x, w[p + "ffn_norm"], cfg.norm_eps)                     # (T, D)
                x = x + swiglu(h, w[p + "ffn_gate"], w[p + "ffn_up"], w[p + "ffn_down"])  # (T, D)
                rec(p + "out", x)
        cache.advance(T)
        if last_only:
            x = x[-1:]                                                               # (1, D)
        x = rms_norm(x, w["output_norm"], cfg.norm_eps)                             # (T, D)
        head = w["token_embd"] if cfg.tied_embeddings else w["output"]               # (V, D)
        logits = linear(x, head)                                                     # (T, V)
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


def load_model(path, dequant: bool = False) -> Model:
    """Load a GGUF model file: config, weights and tokenizer. Raises GGUFError on a bad file.

    Quantised matrices stay as their GGUF blocks (`QuantMatrix`: memory about the file size);
    dequant=True turns every weight into float32 at load, the readable reference path."""
    from .tokenizer import load_tokenizer
    cfg, weights, f = load_gguf(path, dequant=dequant)
    tok = load_tokenizer(f) if "tokenizer.ggml.tokens" in f.metadata else None
    return Model(cfg, weights, tok, path)
