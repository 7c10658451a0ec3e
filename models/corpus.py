"""Build the training corpus offline from the running Python: stdlib docs (pydoc_data) + stdlib source.

Leaves out third-party code (site-packages), machine-specific files (_sysconfigdata*, config-*),
the codec tables in encodings/ (charmap dumps teach nothing) and files that are not UTF-8.
Everything kept is under the PSF licence (see LICENSE.txt beside the stdlib). Deterministic:
the same Python version gives the same bytes; `python3 models/corpus.py` prints the manifest.
"""
from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
import zlib
from pathlib import Path

EOT = "<|endoftext|>"  # document separator; also the tokenizer's BOS/EOS token
SKIP_DIRS = {"site-packages", "encodings", "pydoc_data", "__pycache__"}
SKIP_PREFIXES = ("_sysconfigdata", "config-")
HELDOUT_EVERY = 50  # a file is held out when crc32(path) % 50 == 0 (~2% of files, stable across runs)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[Path]:
    """Sorted stdlib .py files kept in the corpus, as paths relative to the stdlib folder."""
    root = root or stdlib_dir()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith(SKIP_PREFIXES):
            continue
        if rel.name.startswith(SKIP_PREFIXES):
            continue
        out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


def is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


def documents() -> list[tuple[str, str]]:
    """(name, text) pairs: every pydoc topic, then every kept stdlib source file.

    Each text starts with a one-line header naming its origin, so the model sees
    whether it is reading documentation or code.
    """
    from pydoc_data import topics

    docs = [(f"pydoc:{k}", f"# pydoc topic: {k}\n{topics.topics[k]}") for k in sorted(topics.topics)]
    root = stdlib_dir()
    for rel in source_files(root):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of test files are deliberately in other encodings
        if EOT in text:
            continue  # would collide with the separator token
        docs.append((f"Lib/{rel.as_posix()}", f"# file: Lib/{rel.as_posix()}\n{text}"))
    return docs


def split(docs):
    """(train_docs, heldout_docs) by the stable crc32 rule above."""
    train = [d for d in docs if not is_heldout(d[0])]
    held = [d for d in docs if is_heldout(d[0])]
    return train, held


def manifest(docs) -> dict:
    """Python version, file list, byte count and sha256 of the joined corpus text."""
    joined = EOT.join(t for _, t in docs).encode("utf-8")
    train, held = split(docs)
    return {
        "python": sys.version.split()[0],
        "n_documents": len(docs),
        "n_heldout_documents": len(held),
        "heldout": [n for n, _ in held],
        "bytes": len(joined),
        "sha256": hashlib.sha256(joined).hexdigest(),
        "documents": [n for n, _ in docs],
    }


if __name__ == "__main__":
    m = manifest(documents())
    print(json.dumps({k: v for k, v in m.items() if k != "documents"}, indent=1))
