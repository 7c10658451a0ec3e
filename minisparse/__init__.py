"""minisparse: a small, exact, readable LLM inference engine with sparse attention you can test.

    >>> import minisparse
    >>> model = minisparse.load_model("models/minisparse-pydoc.gguf")      # doctest: +SKIP
    >>> print("".join(model.generate("def ", max_new_tokens=20, temperature=0)))  # doctest: +SKIP
"""
from .errors import GGUFError, MinisparseError
from .loader import load_model
from .model import KVCache, Model
from .tokenizer import load_tokenizer

__all__ = ["GGUFError", "MinisparseError", "KVCache", "Model", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
