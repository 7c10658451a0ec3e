"""GGUF file -> Config + named float32 weights.

Follows the GGUF v3 format as written by llama.cpp's converters and read by the `gguf` package
(`GGUFReader`, `gguf.quants.dequantize`). Every file is first walked by `gguf_check.check_gguf`, a
bounds-checked parser, so a hostile file fails with a `GGUFError` before `GGUFReader` touches it.
Left out on purpose: architectures other than `llama` and `qwen2`, MoE, and writing GGUF (tests
and `models/export.py` use `gguf.GGUFWriter` directly).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from .errors import GGUFError
from .gguf_check import check_gguf, check_model_metadata

SUPPORTED_ARCHS = ("llama", "qwen2")
SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                   QT.Q4_K, QT.Q5_K, QT.Q6_K)


@dataclass(frozen=True)
class Config:
    """Hyper-parameters read from GGUF metadata (keys `{arch}.*`)."""
    arch: str                 # "llama" | "qwen2"
    n_vocab: int              # V
    dim: int                  # D
    n_layers: int             # L
    n_heads: int              # Hq
    n_kv_heads: int           # Hkv
    head_dim: int             # d
    ffn_dim: int              # F
    context_length: int       # trained context (metadata; may be a converter default)
    norm_eps: float
    rope_base: float          # 10000 when the key is absent (llama2.c exports have none)
    rope_dim: int             # dims rotated per head (= d unless partial rotary)
    rope_style: str           # "interleaved" (GGUF llama: adjacent pairs) | "neox" (qwen2: halves)
    rope_scale: float         # linear position scaling factor (1.0 = none)
    tied_embeddings: bool     # output head reuses token_embd
    qkv_bias: bool            # qwen2 adds biases to q, k, v
    name: str = ""

    @property
    def group(self) -> int:   # G: query heads per KV head
        return self.n_heads // self.n_kv_heads


def _field(reader: gguf.GGUFReader, key: str, path, default=None, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise GGUFError(f"{path}: metadata key '{key}' is missing (required for this architecture)")
        return default
    try:
        return f.contents()
    except Exception as e:  # gguf raises assorted errors on odd types
        raise GGUFError(f"{path}: metadata key '{key}': could not be read ({e})") from None


def read_config(reader: gguf.GGUFReader, path) -> Config:
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: general.architecture is '{arch}'; supported: {', '.join(SUPPORTED_ARCHS)}")
    a = lambda k, **kw: _field(reader, f"{arch}.{k}", path, **kw)   # noqa: E731
    dim, n_heads = int(a("embedding_length")), int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", default=n_heads))
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise GGUFError(f"{path}: {arch}.attention.head_count={n_heads} must be a positive multiple of "
                        f"head_count_kv={n_kv}")
    head_dim = int(a("attention.key_length", default=dim // n_heads))
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_vocab = int(emb.shape[1])     # ReaderTensor.shape is GGML order (in, out): reversed
    if tokens is not None and len(tokens.data) != n_vocab:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has {len(tokens.data)} entries but token_embd.weight "
                        f"has {n_vocab} rows; expected them equal")
    scaling = a("rope.scaling.type", required=False)
    factor = float(a("rope.scaling.factor", default=1.0)) if scaling == "linear" else 1.0
    return Config(
        arch=arch, n_vocab=n_vocab, dim=dim, n_layers=int(a("block_count")), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=int(a("feed_forward_length")),
        context_length=int(a("context_length", default=2048)),
        norm_eps=float(a("attention.layer_norm_rms_epsilon", default=1e-5)),
        rope_base=float(a("rope.freq_base", default=10000.0)),
        rope_dim=int(a("rope.dimension_count", default=head_dim)),
        rope_style="neox" if arch == "qwen2" else "interleaved",
        rope_scale=factor,
        tied_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        name=str(_field(reader, "general.name", path, default="", required=False)),
    )


def tensor_to_float32(t, path) -> np.ndarray:
    """Dequantise one ReaderTensor to float32 shaped (out, in) (GGUF data order)."""
    if t.tensor_type not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}; supported: "
                        f"{', '.join(q.name for q in SUPPORTED_TYPES)}")
    shape = tuple(int(s) for s in reversed(t.shape))            # GGML (in, out) -> (out, in)
    w = t.data if t.tensor_type == QT.F32 else dequantize(np.asarray(t.data), t.tensor_type)
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(shape))


def open_gguf(path, model: bool = False) -> gguf.GGUFReader:
    """Validate the container with our bounds-checked parser, then open it with GGUFReader.

    With `model=True` also check the llama/qwen2 keys, tensors and shapes a model needs.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    layout = check_gguf(path)
    if model:
        check_model_metadata(layout, path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # check_gguf should have caught it; never let a raw error through
        raise GGUFError(f"{path}: gguf.GGUFReader failed: {e}") from None


def load_gguf(path, dequant: bool = True):
    """Read a model file. Returns (Config, weights, reader).

    `weights` maps GGUF tensor names without `.weight` (`token_embd`, `blk.0.attn_q`, and
    `blk.0.attn_q.bias` for biases) to float32 arrays shaped (out, in) or (n,).
    With `dequant=False`, matrices of a type in `quant.IN_PLACE_TYPES` stay as `QuantMatrix` (their
    raw blocks, a view of the file's memory map); other types and 1-D tensors are float32 as above.
    """
    from .quant import IN_PLACE_TYPES, QuantMatrix
    reader = open_gguf(path, model=True)
    cfg = read_config(reader, path)
    weights = {}
    for t in reader.tensors:
        name = t.name[: -len(".weight")] if t.name.endswith(".weight") else t.name
        shape = tuple(int(s) for s in reversed(t.shape))        # GGML (in, out) -> (out, in)
        if not dequant and len(shape) == 2 and t.tensor_type in IN_PLACE_TYPES:
            weights[name] = QuantMatrix(t.data, shape, t.tensor_type)
        else:
            weights[name] = tensor_to_float32(t, path)
    return cfg, weights, reader
