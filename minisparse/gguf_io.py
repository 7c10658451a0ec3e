"""GGUF file -> Config + named float32 weights.

Follows the GGUF v3 format as written by llama.cpp's converters. Files are opened with
`gguf_check.GGUFFile`, minisparse's bounds-checked reader (a hostile file fails with a `GGUFError`
before anything is read from it); tensors are views of its memory map, dequantised with
`gguf.quants.dequantize`. Left out on purpose: architectures other than `llama` and `qwen2`, MoE,
and writing GGUF (tests and `models/export.py` use `gguf.GGUFWriter` directly).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from .errors import GGUFError
from .gguf_check import SUPPORTED_ARCHS, SUPPORTED_TYPES, GGUFFile, GGUFTensor, check_model_metadata


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


def _field(f: GGUFFile, key: str, path, default=None, required=True):
    if key not in f.metadata:
        if required and default is None:
            raise GGUFError(f"{path}: metadata key '{key}' is missing (required for this architecture)")
        return default
    return f.get(key)


def read_config(f: GGUFFile, path=None) -> Config:
    """The Config of an open model file (`open_gguf(path, model=True)` has checked its keys)."""
    path = f.path if path is None else path
    arch = _field(f, "general.architecture", path)
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: general.architecture is '{arch}'; supported: {', '.join(SUPPORTED_ARCHS)}")
    a = lambda k, **kw: _field(f, f"{arch}.{k}", path, **kw)   # noqa: E731
    dim, n_heads = int(a("embedding_length")), int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", default=n_heads))
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise GGUFError(f"{path}: {arch}.attention.head_count={n_heads} must be a positive multiple of "
                        f"head_count_kv={n_kv}")
    head_dim = int(a("attention.key_length", default=dim // n_heads))
    names = {t.name for t in f.tensors}
    tokens = f.metadata.get("tokenizer.ggml.tokens")     # a GGUFArray reference: counted, not read
    emb = f.tensor("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing (required for this architecture)")
    n_vocab = int(emb.shape[1])     # TensorInfo.shape is GGML order (in, out): reversed
    if tokens is not None and len(tokens) != n_vocab:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} entries but token_embd.weight "
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
        name=str(_field(f, "general.name", path, default="", required=False)),
    )


def tensor_to_float32(t: GGUFTensor, path=None) -> np.ndarray:
    """Dequantise one tensor of a `GGUFFile` to float32 shaped (out, in) (GGUF data order).
    An F32 tensor comes back as the read-only view of the file it already is (no copy)."""
    if t.ggml_type not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor '{t.name}' has type {t.ggml_type.name}; supported: "
                        f"{', '.join(q.name for q in SUPPORTED_TYPES)}")
    w = t.data if t.ggml_type == QT.F32 else dequantize(np.asarray(t.data), t.ggml_type)
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(t.data_shape))


def open_gguf(path, model: bool = False) -> GGUFFile:
    """Open a GGUF file with minisparse's bounds-checked reader (`GGUFFile`): the container is
    walked and checked before anything is read from it.

    With `model=True` also check the llama/qwen2 keys, tensors and shapes a model needs.

    >>> f = open_gguf("models/minisparse-pydoc.gguf", model=True)      # doctest: +SKIP
    >>> f.get("general.architecture"), f.tensors[0].name, f.tensors[0].ggml_type.name  # doctest: +SKIP
    ('llama', 'token_embd.weight', 'Q8_0')
    """
    f = GGUFFile(path)
    if model:
        check_model_metadata(f.layout, f.path)
    return f


def load_gguf(path, dequant: bool = True):
    """Read a model file. Returns (Config, weights, GGUFFile).

    `weights` maps GGUF tensor names without `.weight` (`token_embd`, `blk.0.attn_q`, and
    `blk.0.attn_q.bias` for biases) to float32 arrays shaped (out, in) or (n,).
    With `dequant=False`, matrices of a type in `quant.IN_PLACE_TYPES` stay as `QuantMatrix` (their
    raw blocks, a view of the file's memory map); other types and 1-D tensors are float32 as above.
    """
    from .quant import IN_PLACE_TYPES, QuantMatrix
    f = open_gguf(path, model=True)
    cfg = read_config(f, path)
    weights = {}
    for t in f.tensors:
        name = t.name[: -len(".weight")] if t.name.endswith(".weight") else t.name
        if not dequant and len(t.data_shape) == 2 and t.ggml_type in IN_PLACE_TYPES:
            weights[name] = QuantMatrix(t.data, t.data_shape, t.ggml_type)
        else:
            weights[name] = tensor_to_float32(t, path)
    return cfg, weights, f
