"""minisparse's exceptions: one base class, and GGUFError for files that cannot be used.

Deliberately small: callers catch `MinisparseError` for anything raised on purpose by this package.
"""


class MinisparseError(Exception):
    """Base class of every error minisparse raises on purpose."""


class GGUFError(MinisparseError, ValueError):
    """A GGUF file cannot be used: the message names the file, the field (metadata key or tensor)
    and what was expected, e.g. ``model.gguf: field 'tokenizer.ggml.tokens': missing; expected an
    array of strings``."""
