"""Write tiny random-weight GGUF models and the logits two independent engines compute for them.

Leaves out: tokenisation (a fixed id sequence is evaluated) and sampling; only forward logits.
Follows the GGUF format as `gguf.GGUFWriter` writes it and llama.cpp's `convert_hf_to_gguf.py`
layout (q/k rows of `llama` in interleaved-RoPE order, `qwen2` left in HF half-split order).

Oracles (each runs only where its package is installed):
  llamacpp  llama.cpp through `llama-cpp-python`: F32 KV cache, logits for every position.
  hf        HF `transformers` LlamaForCausalLM / Qwen2ForCausalLM in float64 on CPU, built from the
            weights read back out of the written file (so F16/Q8_0 files give it the exact
            dequantised values the file stores).

Usage:  python tests/oracle/make_oracle_fixtures.py [--out tests/fixtures/oracle] [--only NAME]
Writes  <out>/<name>.gguf and <out>/<name>.npz (ids, logits_<oracle>, versions) per model.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "oracle"
N_IDS = 24          # positions evaluated per model
N_LAYERS = 2


@dataclass(frozen=True)
class Spec:
    name: str
    arch: str            # "llama" | "qwen2"
    D: int               # model width
    Hq: int
    Hkv: int
    d: int               # head width (written as attention.key_length/value_length)
    F: int               # FFN width
    tied: bool           # output head = token_embd
    rope_base: float | None   # None: key absent, llama.cpp and HF default to 10000
    wtype: str           # "F32" | "F16" | "Q8_0" for the 2-D matrices; norms/biases stay F32
    eps: float
    seed: int


SPECS = [
    # G = 1, d = 32, tied head, no rope.freq_base key (default 10000).
    Spec("llama_g1_hd32_tied_f32", "llama", D=64, Hq=2, Hkv=2, d=32, F=64, tied=True,
         rope_base=None, wtype="F32", eps=1e-5, seed=1),
    # G = 2, d = 64 with Hq*d = 128 != D = 64 (head width from attention.key_length, as in
    # Mistral-Nemo), separate head, rope base 500000 (Llama 3).
    Spec("llama_g2_hd64_wide_f32", "llama", D=64, Hq=2, Hkv=1, d=64, F=64, tied=False,
         rope_base=500000.0, wtype="F32", eps=1e-5, seed=2),
    # G = 3, odd head width 40 (20 RoPE pairs), F16 weights.
    Spec("llama_g3_hd40_f16", "llama", D=120, Hq=3, Hkv=1, d=40, F=64, tied=True,
         rope_base=500000.0, wtype="F16", eps=1e-5, seed=3),
    # G = 2, d = 64 with D = Hq*d, Q8_0 weights (rows of 128 = 4 blocks of 32), separate head.
    Spec("llama_g2_hd64_q8_0", "llama", D=128, Hq=2, Hkv=1, d=64, F=128, tied=False,
         rope_base=None, wtype="Q8_0", eps=1e-5, seed=4),
    # qwen2: q/k/v biases, NEOX (half-split) RoPE, gpt2 byte-level vocabulary, base 1e6,
    # tied head (as Qwen2.5-0.5B).
    Spec("qwen2_g2_hd32_bias_tied_f32", "qwen2", D=64, Hq=2, Hkv=1, d=32, F=64, tied=True,
         rope_base=1000000.0, wtype="F32", eps=1e-6, seed=5),
]


# ----------------------------------------------------------------------------- vocabularies

SPM_PIECES = ["▁", "e", "t", "a", "▁t", "he", "▁a", "in", "▁the", "er", "on", "re", "▁s"]
BPE_MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "r e", "Ġ s", "a n", "o r", "Ġ w", "e n"]
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable-unicode map, in byte order (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def add_spm_vocab(w: gguf.GGUFWriter) -> int:
    """SentencePiece-style vocabulary: <unk> <s> </s>, 256 <0xXX> byte tokens, a few pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)     # UNKNOWN, CONTROL, BYTE, NORMAL
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return len(tokens)


def add_bpe_vocab(w: gguf.GGUFWriter) -> int:
    """Byte-level BPE vocabulary (Qwen2 style): 256 byte chars, merge results, 3 specials."""
    merged = [m.replace(" ", "") for m in BPE_MERGES]
    tokens = gpt2_byte_chars() + merged + BPE_SPECIALS
    types = [1] * (256 + len(merged)) + [3] * len(BPE_SPECIALS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(BPE_MERGES)
    eot = tokens.index("<|endoftext|>")
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)
    return len(tokens)


# ----------------------------------------------------------------------------- weights

def random_weights(s: Spec, V: int) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights, matrices (out, in). Scales keep activations O(1) so logits
    spread over a few units: matrices ~ N(0, 1/in), embeddings ~ N(0, 0.25^2), norms ~ 1 ± 0.1."""
    rng = np.random.default_rng(s.seed)

    def mat(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd": (0.25 * rng.standard_normal((V, s.D))).astype(np.float32)}
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        w[p + "attn_norm"] = norm(s.D)
        w[p + "attn_q"] = mat(s.Hq * s.d, s.D)
        w[p + "attn_k"] = mat(s.Hkv * s.d, s.D)
        w[p + "attn_v"] = mat(s.Hkv * s.d, s.D)
        if s.arch == "qwen2":   # biases large enough to move logits visibly
            w[p + "attn_q.bias"] = (0.5 * rng.standard_normal(s.Hq * s.d)).astype(np.float32)
            w[p + "attn_k.bias"] = (0.5 * rng.standard_normal(s.Hkv * s.d)).astype(np.float32)
            w[p + "attn_v.bias"] = (0.5 * rng.standard_normal(s.Hkv * s.d)).astype(np.float32)
        w[p + "attn_output"] = mat(s.D, s.Hq * s.d)
        w[p + "ffn_norm"] = norm(s.D)
        w[p + "ffn_gate"] = mat(s.F, s.D)
        w[p + "ffn_up"] = mat(s.F, s.D)
        w[p + "ffn_down"] = mat(s.D, s.F)
    w["output_norm"] = norm(s.D)
    if not s.tied:
        w["output"] = mat(V, s.D)
    return w


def write_gguf(s: Spec, path: Path) -> int:
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(s.name)
    V = add_spm_vocab(w) if s.arch == "llama" else add_bpe_vocab(w)
    w.add_vocab_size(V)
    w.add_context_length(256)
    w.add_embedding_length(s.D)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(s.F)
    w.add_head_count(s.Hq)
    w.add_head_count_kv(s.Hkv)
    w.add_key_length(s.d)
    w.add_value_length(s.d)
    w.add_rope_dimension_count(s.d)
    w.add_layer_norm_rms_eps(s.eps)
    if s.rope_base is not None:
        w.add_rope_freq_base(s.rope_base)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[s.wtype])   # llama_ftype ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0

    for name, t in random_weights(s, V).items():
        key = name if name.endswith(".bias") else name + ".weight"
        if t.ndim == 1 or s.wtype == "F32":
            w.add_tensor(key, t)
        elif s.wtype == "F16":
            w.add_tensor(key, t.astype(np.float16))
        else:   # Q8_0: blocks of 32 along the input dimension
            w.add_tensor(key, gguf.quants.quantize(t, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return V


def read_back(path: Path) -> dict[str, np.ndarray]:
    """The stored weights, dequantised to float32 (out, in), keyed like `Model.weights`."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(n) for n in reversed(t.shape))     # GGML order is reversed
        out[t.name.removesuffix(".weight")] = a.reshape(shape)
    return out


def fixed_ids(s: Spec, V: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + s.seed)
    ids = rng.integers(3, V - 3, size=N_IDS)
    if s.arch == "llama":
        ids[0] = 1      # BOS first, as llama.cpp would prepend it
    return ids.astype(np.int64)


# ----------------------------------------------------------------------------- oracles

def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF `llama` q/k rows (adjacent RoPE pairs) -> HF rows (pair i = rows i and i + d/2).

    Inverse of convert_hf_to_gguf's `permute`, which maps HF -> GGUF by
    reshape(n_head, 2, d/2, ...) -> swap axes 1,2.  Here: reshape(n_head, d/2, 2, ...) -> swap back.
    """
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def oracle_hf(s: Spec, path: Path, ids: np.ndarray) -> tuple[np.ndarray, str]:
    import torch
    import transformers

    w = read_back(path)
    V = w["token_embd"].shape[0]
    common = dict(vocab_size=V, hidden_size=s.D, intermediate_size=s.F, num_hidden_layers=N_LAYERS,
                  num_attention_heads=s.Hq, num_key_value_heads=s.Hkv, head_dim=s.d,
                  rms_norm_eps=s.eps, max_position_embeddings=256, tie_word_embeddings=s.tied,
                  rope_parameters={"rope_type": "default", "rope_theta": s.rope_base or 10000.0})
    if s.arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    cfg._attn_implementation = "eager"

    def qk(name, n_head):
        # llama.cpp rotates `llama` q/k with interleaved (NORM) RoPE; `qwen2` with NEOX (half-split),
        # the same as HF, so its rows are stored unpermuted (llama_model_rope_type in llama-model.cpp).
        return unpermute_rope_rows(w[name], n_head) if s.arch == "llama" else w[name]

    sd = {"model.embed_tokens.weight": w["token_embd"], "model.norm.weight": w["output_norm"],
          "lm_head.weight": w["token_embd"] if s.tied else w["output"]}
    for i in range(N_LAYERS):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = w[p + "attn_norm"]
        sd[h + "self_attn.q_proj.weight"] = qk(p + "attn_q", s.Hq)
        sd[h + "self_attn.k_proj.weight"] = qk(p + "attn_k", s.Hkv)
        sd[h + "self_attn.v_proj.weight"] = w[p + "attn_v"]
        sd[h + "self_attn.o_proj.weight"] = w[p + "attn_output"]
        if s.arch == "qwen2":
            for x in "qkv":
                sd[h + f"self_attn.{x}_proj.bias"] = w[p + f"attn_{x}.bias"]
        sd[h + "post_attention_layernorm.weight"] = w[p + "ffn_norm"]
        sd[h + "mlp.gate_proj.weight"] = w[p + "ffn_gate"]
        sd[h + "mlp.up_proj.weight"] = w[p + "ffn_up"]
        sd[h + "mlp.down_proj.weight"] = w[p + "ffn_down"]
    model = model.double().eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v.astype(np.float64)) for k, v in sd.items()}, strict=False)
    # a tied lm_head is a view of embed_tokens and may be reported missing; nothing else may be
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].numpy()   # (T, V) float64
    # stored as float32: its rounding (|logit| < 16 -> < 1e-6) is far below every test bound
    logits = logits.astype(np.float32)
    return logits, f"transformers {transformers.__version__}, torch {torch.__version__}, float64 CPU eager"


def oracle_llamacpp(s: Spec, path: Path, ids: np.ndarray) -> tuple[np.ndarray, str]:
    import llama_cpp
    import llama_cpp.llama as llama_mod

    # Plain CPU buffers only: with the "extra" buffer types (weight repacking, AMX on this CPU)
    # llama.cpp 0.3.36 segfaults evaluating the Q8_0 file; the plain path is also the reference one.
    # `Llama` reads llama_model_default_params() from its module namespace, so wrap it there.
    default_params = llama_cpp.llama_model_default_params

    def plain_params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = plain_params
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1,
                          n_threads_batch=1, logits_all=True, type_k=0, type_v=0,   # GGML_TYPE_F32
                          flash_attn=False, n_gpu_layers=0, verbose=False)
    llm.eval([int(i) for i in ids])
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)                     # (T, V)
    return logits, f"llama-cpp-python {llama_cpp.__version__}, F32 KV cache, 1 thread, CPU"


ORACLES = {"hf": oracle_hf, "llamacpp": oracle_llamacpp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", default=None, help="generate just this model name")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for s in SPECS:
        if args.only and s.name != args.only:
            continue
        path = args.out / f"{s.name}.gguf"
        V = write_gguf(s, path)
        ids = fixed_ids(s, V)
        arrays, versions = {"ids": ids}, {}
        for oname, fn in ORACLES.items():
            try:
                logits, ver = fn(s, path, ids)
            except ImportError as e:
                print(f"{s.name}: oracle {oname} skipped ({e})")
                continue
            arrays[f"logits_{oname}"] = logits
            versions[oname] = ver
        got = [k for k in arrays if k.startswith("logits_")]
        line = f"{s.name:26s} V={V} {path.stat().st_size / 1024:6.1f} KiB  oracles={got}"
        if len(got) == 2:
            line += f"  max|llamacpp - hf| = {np.abs(arrays['logits_llamacpp'] - arrays['logits_hf']).max():.3g}"
        print(line)
        arrays["meta"] = np.array(json.dumps({"spec": asdict(s), "versions": versions}))
        np.savez_compressed(args.out / f"{s.name}.npz", **arrays)


if __name__ == "__main__":
    main()
