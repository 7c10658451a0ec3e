"""Loading a model file: read the GGUF, build the tokenizer, and choose the path it runs on.

It sits above minisparse/fast/ because it picks between `model.PLAIN` and `fast.FAST`; model.py
itself knows nothing of the fast path.
"""
from __future__ import annotations

from . import fast as fast_path
from .gguf_io import load_gguf
from .model import PLAIN, Model


def load_model(path, dequant: bool = False, fast: bool | None = None) -> Model:
    """Load a GGUF model file: config, weights and tokenizer. Raises GGUFError on a bad file.

    Quantised matrices stay as their GGUF blocks (`QuantMatrix`: memory about the file size);
    dequant=True turns every weight into float32 at load. fast: run on the fast path
    (minisparse/fast/) or the plain one (model.py); None follows MINISPARSE_FAST (default 1)."""
    from .tokenizer import load_tokenizer
    use_fast = fast_path.enabled() if fast is None else bool(fast)
    cfg, weights, f = load_gguf(path, dequant=dequant)
    tok = load_tokenizer(f) if "tokenizer.ggml.tokens" in f.metadata else None
    return Model(cfg, weights, tok, path, ops=fast_path.FAST if use_fast else PLAIN)
