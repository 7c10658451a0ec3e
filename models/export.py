"""Export a trained model (GGUF-named .npz weights from train.py) to GGUF with gguf.GGUFWriter,
and record torch's float32 logits on held-out text as a test fixture.

Leaves out training and any quantisation beyond F32/F16/Q8_0 (norms always stay F32).
Follows the GGUF spec for arch `llama` and llama.cpp's `tokenizer.ggml.*` keys for a gpt2 BPE;
the torch reference is computed from the *dequantised* exported weights, so the fixture compares
two float32 computations of one function and its tolerance stays float32-tight.

    python3 models/export.py --model pydoc   --weights .device_carry/run1 --dtype q8_0
    python3 models/export.py --model passkey --weights .device_carry/run1 --dtype f16
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import needle  # noqa: E402
import train  # noqa: E402

HERE = Path(__file__).resolve().parent
NAMES = {"pydoc": "minisparse-pydoc", "passkey": "minisparse-passkey"}
DESCRIPTIONS = {
    "pydoc": "Tiny Llama trained by minisparse on the Python 3.11 standard library source and pydoc "
             "topics (PSF licence); see models/README.md",
    "passkey": "Tiny Llama trained by minisparse on synthetic pass-key retrieval (models/needle.py) "
               "at 512-8192 tokens; see models/README.md",
}
DTYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
N_FULL = 8  # positions whose full (V,) logits go in the fixture (8 x 4096 x 4 B = 128 KB)


def encode_tensor(w: np.ndarray, dtype: str):
    """(bytes-like array to write, its GGML type, the float32 values an engine will read back)."""
    if w.ndim == 1 or dtype == "f32":
        return w.astype(np.float32), Q.F32, w.astype(np.float32)
    if dtype == "f16":
        h = w.astype(np.float16)
        return h, Q.F16, h.astype(np.float32)
    raw = gguf.quants.quantize(w.astype(np.float32), Q.Q8_0)
    return raw, Q.Q8_0, gguf.quants.dequantize(raw, Q.Q8_0).reshape(w.shape).astype(np.float32)


def tokenizer_vocab(tok_json: Path):
    j = json.loads(tok_json.read_text())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in j["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]  # 3 = CONTROL, 1 = NORMAL (llama_token_type)
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return tokens, types, merges


def write_gguf(path: Path, model: str, c: train.Config, sd: dict, dtype: str, tok_json: Path) -> dict:
    """Write the GGUF; return the float32 weights as an engine dequantises them."""
    tokens, types, merges = tokenizer_vocab(tok_json)
    eot = tokens.index(corpus.EOT)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(NAMES[model])
    w.add_description(DESCRIPTIONS[model])
    w.add_license("MIT")
    w.add_file_type(FILE_TYPES[dtype])
    w.add_context_length(c.ctx)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_base)
    w.add_rope_dimension_count(c.dim // c.n_heads)
    w.add_layer_norm_rms_eps(c.eps)
    w.add_vocab_size(c.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp spelling (LLAMA_VOCAB_PRE_TYPE_GPT2); trained with that regex + ByteLevel
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(True)   # training documents start with <|endoftext|>
    w.add_add_eos_token(False)
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    back = {}
    for name in sorted(sd, key=_order):
        raw, ty, back[name] = encode_tensor(sd[name], dtype)
        w.add_tensor(f"{name}.weight", raw, raw_dtype=Q.Q8_0 if ty == Q.Q8_0 else None)  # F32/F16 typed by numpy dtype
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return back


def _order(name: str):
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name == "token_embd" else 2, 0, name)


def reference_tokens(model: str, tok_json: Path) -> tuple[str, np.ndarray]:
    """Held-out text and its ids (BOS first). pydoc: the opening of a held-out stdlib file."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_json))
    if model == "pydoc":
        name, text = next(d for d in corpus.documents() if d[0] == "Lib/copy.py")
        assert corpus.is_heldout(name)
        # whole lines only, up to 127 tokens: cutting the ids mid-word would give a text that
        # re-tokenises differently, and the fixture's text must round-trip to its ids
        lines, ids = text.splitlines(keepends=True), []
        for k in range(1, len(lines)):
            longer = tok.encode("".join(lines[:k]), add_special_tokens=False).ids
            if len(longer) > 127:
                break
            ids, text_k = longer, "".join(lines[:k])
        return text_k, np.asarray([0] + ids, dtype=np.int64)
    kit = needle.build_kit(tok)
    ex = needle.make_passkey_example(kit, 1024, 0.3, seed=2026)
    return tok.decode(ex["tokens"][1:].tolist(), skip_special_tokens=False), ex["tokens"]


def torch_logits(c: train.Config, sd: dict, tokens: np.ndarray, dtype) -> np.ndarray:
    import torch
    m = train.Llama(c).to(dtype).load_gguf_state({k: v.astype(np.float32) for k, v in sd.items()}).eval()
    with torch.no_grad():
        return m(torch.from_numpy(tokens)[None])[0].double().numpy()           # (T, V)


def heldout_loss(c: train.Config, sd: dict, folder: Path, windows: int) -> float:
    """Mean next-token cross-entropy (nats) of the exported weights on held-out windows of c.ctx."""
    import torch
    import torch.nn.functional as F
    m = train.Llama(c).load_gguf_state(sd).eval()
    val = np.load(folder / "pydoc_val.npy").astype(np.int64)
    n = min(windows, (len(val) - 1) // c.ctx)
    tot = 0.0
    with torch.no_grad():
        for i in range(n):
            w = torch.from_numpy(val[i * c.ctx:(i + 1) * c.ctx + 1])[None]
            tot += F.cross_entropy(m(w[:, :-1])[0], w[0, 1:], reduction="sum").item()
    return tot / (n * c.ctx)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(NAMES), required=True)
    ap.add_argument("--weights", default=".device_carry/run1", help="folder with <model>_w*.npz")
    ap.add_argument("--data", default=".device_carry", help="folder with tokenizer.json, pydoc_val.npy")
    ap.add_argument("--dtype", choices=list(DTYPES), default="q8_0")
    ap.add_argument("--val-windows", type=int, default=0, help="pydoc: held-out windows to score (0 = skip)")
    ap.add_argument("--out", default=None, help="GGUF path (default models/<name>.gguf)")
    ap.add_argument("--no-fixture", action="store_true", help="write only the GGUF (e.g. an F32 copy to compare)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)

    c = train.CONFIGS[args.model]
    sd = train.load_state(Path(args.weights), args.model)
    tok_json = Path(args.data) / "tokenizer.json"
    out = Path(args.out) if args.out else HERE / f"{NAMES[args.model]}.gguf"
    back = write_gguf(out, args.model, c, sd, args.dtype, tok_json)
    if args.no_fixture:
        return print(out, out.stat().st_size, hashlib.sha256(out.read_bytes()).hexdigest())

    text, tokens = reference_tokens(args.model, tok_json)
    l32 = torch_logits(c, back, tokens, torch.float32)                            # (T, V)
    l64 = torch_logits(c, back, tokens, torch.float64)                            # (T, V)
    fixture = HERE.parent / "tests" / "fixtures" / f"{NAMES[args.model].replace('-', '_')}_torch_logits.npz"
    fixture.parent.mkdir(exist_ok=True)
    T = len(tokens)
    np.savez_compressed(
        fixture, tokens=tokens, text=np.asarray(text),
        logits_last=l32[-N_FULL:].astype(np.float32),                              # (N_FULL, V)
        next_logit=l32[np.arange(T - 1), tokens[1:]].astype(np.float32),           # (T-1,) logit of the true next token
        argmax=l32.argmax(-1).astype(np.int32),                                    # (T,)
        torch_f32_vs_f64=np.float32(np.abs(l32 - l64).max()),
        gguf_sha256=np.asarray(hashlib.sha256(out.read_bytes()).hexdigest()),
    )
    summary = {
        "file": str(out), "bytes": out.stat().st_size,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "dtype": args.dtype,
        "params": int(sum(v.size for v in sd.values())), "fixture": str(fixture.relative_to(HERE.parent)),
        "fixture_bytes": fixture.stat().st_size, "torch_f32_vs_f64_max_abs": float(np.abs(l32 - l64).max()),
        "max_abs_logit": float(np.abs(l32).max()),
    }
    if args.val_windows and args.model == "pydoc":
        summary["heldout_loss_exported"] = heldout_loss(c, back, Path(args.data), args.val_windows)
        summary["heldout_loss_fp32_trained"] = heldout_loss(c, sd, Path(args.data), args.val_windows)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
