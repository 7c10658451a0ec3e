"""minisparse: a small, exact, readable LLM inference engine with sparse attention you can test.

    >>> import minisparse
    >>> model = minisparse.load_model("default")      # or a GGUF path, or "smollm2"   # doctest: +SKIP
    >>> print("".join(model.generate("def ", max_new_tokens=20, temperature=0)))  # doctest: +SKIP
"""
from . import numba_cache as _numba_cache

_numba_cache.install()   # before any module below defines a kernel

from . import loader as _loader  # noqa: E402
from .errors import GGUFError, MinisparseError  # noqa: E402
from .model import KVCache, Model  # noqa: E402
from .registry import resolve as _resolve  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402

__all__ = ["GGUFError", "MinisparseError", "KVCache", "Model", "load_model", "load_tokenizer"]
__version__ = "0.1.0"


def load_model(model, dequant: bool = False, fast: bool | None = None) -> Model:
    """Load a model by GGUF path or by a registered name (`default`, `smollm2`), as `-m` does.

    A registered name works from any directory: it is looked up in the package (minisparse.registry).
    dequant=True turns every weight into float32 at load; fast=False runs the plain path
    (model.py) instead of minisparse/fast/, as MINISPARSE_FAST=0 does (None: that variable)."""
    return _loader.load_model(_resolve(model), dequant=dequant, fast=fast)
