"""minisparse: a small, exact, readable LLM inference engine with sparse attention you can test.

    >>> import minisparse
    >>> model = minisparse.load_model("default")      # or a GGUF path, or "smollm2"   # doctest: +SKIP
    >>> print("".join(model.generate("def ", max_new_tokens=20, temperature=0)))  # doctest: +SKIP
"""
from . import loader as _loader
from .errors import GGUFError, MinisparseError
from .model import KVCache, Model
from .registry import resolve as _resolve
from .tokenizer import load_tokenizer

__all__ = ["GGUFError", "MinisparseError", "KVCache", "Model", "load_model", "load_tokenizer"]
__version__ = "0.1.0"


def load_model(model, dequant: bool = False, fast: bool | None = None) -> Model:
    """Load a model by GGUF path or by a registered name (`default`, `smollm2`), as `-m` does.

    A registered name works from any directory: it is looked up in the package (minisparse.registry).
    dequant=True turns every weight into float32 at load; fast=False runs the plain path
    (model.py) instead of minisparse/fast/, as MINISPARSE_FAST=0 does (None: that variable)."""
    return _loader.load_model(_resolve(model), dequant=dequant, fast=fast)
