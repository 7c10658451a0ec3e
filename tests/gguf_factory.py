"""Write tiny random-weight GGUF models with gguf.GGUFWriter, for tests that need a model file.

Only what a test needs: llama/qwen2 metadata, random weights in a chosen type, no tokenizer
unless asked (the engine then runs on token ids alone).
"""
from __future__ import annotations

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize


def write_tensor(w: gguf.GGUFWriter, name, x, qtype=QT.F32):
    """Add x (out, in) float32 as `qtype`; 1-D tensors, and rows that are not a whole number of
    quant blocks, stay F32 like llama.cpp's converters fall back."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim == 1 or qtype == QT.F32 or x.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        w.add_tensor(name, x)
    elif qtype == QT.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)


def tiny_weights(arch="llama", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48, vocab=300,
                 head_dim=None, tied=False, seed=0, scale=0.3):
    """Random weights named after GGUF tensors, (out, in) float32."""
    rng = np.random.default_rng(seed)
    d = head_dim or dim // n_heads
    r = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)   # noqa: E731
    ws = {"token_embd.weight": r(vocab, dim), "output_norm.weight": 1 + r(dim) * 0.1}
    if not tied:
        ws["output.weight"] = r(vocab, dim)
    for l in range(n_layers):
        p = f"blk.{l}."
        ws.update({p + "attn_norm.weight": 1 + r(dim) * 0.1, p + "ffn_norm.weight": 1 + r(dim) * 0.1,
                   p + "attn_q.weight": r(n_heads * d, dim), p + "attn_k.weight": r(n_kv_heads * d, dim),
                   p + "attn_v.weight": r(n_kv_heads * d, dim), p + "attn_output.weight": r(dim, n_heads * d),
                   p + "ffn_gate.weight": r(ffn, dim), p + "ffn_up.weight": r(ffn, dim),
                   p + "ffn_down.weight": r(dim, ffn)})
        if arch == "qwen2":
            ws.update({p + "attn_q.bias": r(n_heads * d), p + "attn_k.bias": r(n_kv_heads * d),
                       p + "attn_v.bias": r(n_kv_heads * d)})
    return ws


def add_tiny_vocab(w: gguf.GGUFWriter, n: int):
    """A SentencePiece-style vocabulary of n >= 259 tokens: <unk> <s> </s>, the 256 byte tokens
    (byte fallback needs them all), then filler pieces."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks = (toks + [f"\u2581t{i}" for i in range(n)])[:n]
    types = [2, 3, 3] + [6] * 256 + [1] * n
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n)
    w.add_token_types(types[:n])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_model(path, weights, arch="llama", n_heads=4, n_kv_heads=2, ctx=256, rope_base=None,
                qtype=QT.F32, head_dim=None, eps=1e-5):
    """Write `weights` (from tiny_weights or a real model) as a GGUF file at path."""
    dim = weights["token_embd.weight"].shape[1]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(ctx)
    w.add_embedding_length(dim)
    w.add_block_count(sum(1 for k in weights if k.endswith("attn_norm.weight")))
    w.add_feed_forward_length(weights["blk.0.ffn_gate.weight"].shape[0])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(eps)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_base is not None:
        w.add_rope_freq_base(rope_base)
    add_tiny_vocab(w, weights["token_embd.weight"].shape[0])
    for name, x in weights.items():
        write_tensor(w, name, x, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
