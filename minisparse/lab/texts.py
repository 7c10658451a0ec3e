"""Built-in evaluation texts that need no network: Python's bundled documentation, stdlib source
files, and the synthetic pass-key text.

Leaves out any download or corpus building (models/corpus.py builds the training corpus). Note
for readers of results: the embedded pydoc model was trained on `pydoc_data.topics` and on most
stdlib files; `copy` (Lib/copy.py) is one of the 40 documents it never saw (models/README.md).
"""
from __future__ import annotations

import importlib
import inspect

from .needle import passkey_text

BUILTINS = {
    "pydoc": "every pydoc_data.topics entry, sorted by name (the text of `help('TOPIC')`)",
    "copy": "the source of the stdlib module copy (held out from the pydoc model's training)",
    "stdlib:MODULE": "the source of any stdlib module, e.g. stdlib:json.decoder",
    "needle": "a synthetic pass-key text (~1,500 filler words, needle at depth 0.5, seed 0)",
}


def builtin_text(name: str) -> str:
    """The text of a built-in (see BUILTINS); unknown names raise ValueError listing them.

    >>> builtin_text("pydoc").startswith('The "assert" statement')
    True
    """
    if name == "pydoc":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    if name == "copy" or name.startswith("stdlib:"):
        mod = "copy" if name == "copy" else name.split(":", 1)[1]
        try:
            return inspect.getsource(importlib.import_module(mod))
        except (ImportError, OSError, TypeError) as e:
            raise ValueError(f"--builtin {name}: cannot read the source of module {mod!r}: {e}") from None
    if name == "needle":
        return passkey_text(1500, 0.5, seed=0)[0]
    raise ValueError(f"--builtin: unknown text {name!r}; known: {', '.join(BUILTINS)}")
