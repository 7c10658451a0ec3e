"""Numba's disk cache (`cache=True`) keyed on all of minisparse's compiled source, not one file.

Why: Numba stamps a cached function with the hash of its own source file only, but a kernel
compiles into itself the njit functions it calls from other files (fast/step.py calls q8.py's
products, decode.py's attention step, ...). After one of those files changes (a `git pull`, a
branch switch, an upgrade that keeps `__pycache__`), the caller's cached machine code would still
run the old callee: a silent wrong answer, or an unpickling error when a type it names is gone.
Here every cached function of the package carries one stamp, the hash of every package file that
defines compiled code, in its cache file's name: a change to any of them makes every kernel
compile afresh once, and old cache files are never read.

Installed by `minisparse/__init__.py` before any module defines a kernel; functions outside the
package keep Numba's own rule.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from numba.core import caching

ROOT = Path(__file__).resolve().parent
# what marks a file as defining compiled code (decorators and LLVM intrinsics)
_MARKERS = (b"@njit", b"@jit", b"@intrinsic", b"@vectorize", b"@generated_jit")


def stamp_of(root: Path) -> str:
    """sha256 (hex, 16 digits) over the relative path and bytes of every file under `root` that
    defines compiled code."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        if any(m in data for m in _MARKERS):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def package_stamp() -> str:
    """minisparse's stamp, computed once a process (the files a running process compiled from)."""
    return stamp_of(ROOT)


def _in_package(py_file) -> bool:
    try:
        return Path(py_file).resolve().is_relative_to(ROOT)
    except (OSError, ValueError):
        return False


class _PackageStamp:
    """Mixin for Numba's source-file locators: the package's stamp in the cache files' names and
    in the index's freshness check."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if not _in_package(py_file):
            return None                                   # not ours: Numba's next locator
        return super().from_function(py_func, py_file)

    def get_disambiguator(self):
        return f"{super().get_disambiguator()}-{package_stamp()}"

    def get_source_stamp(self):
        return package_stamp()


# the same three places Numba looks, in its order: NUMBA_CACHE_DIR, the package's __pycache__,
# the user-wide cache directory
_OURS = [type(f"Package{base.__name__}", (_PackageStamp, base), {})
         for base in (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                      caching.UserWideCacheLocator)]


def install() -> None:
    """Put the package's locators first in Numba's list (idempotent)."""
    locators = caching.CacheImpl._locator_classes
    for cls in reversed(_OURS):
        if cls not in locators:
            locators.insert(0, cls)
