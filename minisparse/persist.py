"""Save a prefilled KV cache to disk and load it back memory-mapped: no pickle, no surprises.

A saved cache is a folder: `header.json` (format version, key, cache class, shapes, dtype,
scalars, and a SHA-256 per array file) and one `.npy` per array. Loading maps the arrays
copy-on-write (`np.load(mmap_mode="c")`), so nothing is read into memory up front and new tokens
write private pages, never the file. Before use every array file is hashed in 1 MiB chunks
(memory stays O(chunk)); any mismatch raises `CacheError`, which callers answer by rebuilding.
Left out on purpose: sharing one file between processes that write, compression, remote stores.

A cache class joins by offering `state() -> (meta: dict of JSON scalars, arrays: dict of ndarrays)`
and a classmethod `from_state(cfg, meta, arrays)`; the dense `KVCache` is the example.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import MinisparseError

FORMAT_VERSION = 1
RESERVE = 1024          # free slots saved after the cache so a loaded cache can grow without a copy


class CacheError(MinisparseError):
    """A saved cache is missing, truncated, edited or for another model/policy."""


def cache_classes() -> dict:
    """Every cache class that can be saved: the dense KVCache and the bounded caches of
    `minisparse.cache` that offer `from_state`."""
    from . import cache as bounded
    from .model import KVCache
    classes = {"KVCache": KVCache}
    for obj in vars(bounded).values():
        if isinstance(obj, type) and hasattr(obj, "from_state") and hasattr(obj, "state"):
            classes[obj.__name__] = obj
    return classes


def cache_dir() -> Path:
    """Where `minisparse ask` keeps documents: $MINISPARSE_CACHE or ~/.cache/minisparse/kv."""
    return Path(os.environ.get("MINISPARSE_CACHE", Path.home() / ".cache" / "minisparse" / "kv"))


def file_sha256(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(model_path, text_or_tokens, attention="dense", cache_policy="dense") -> str:
    """Hash of the model file's bytes, the context, the attention and cache policy, the format."""
    h = hashlib.sha256()
    h.update(f"minisparse-kv-v{FORMAT_VERSION}\0".encode())
    h.update(file_sha256(model_path).encode())
    ctx = text_or_tokens if isinstance(text_or_tokens, str) else " ".join(map(str, text_or_tokens))
    for part in (ctx, str(attention), str(cache_policy)):
        h.update(b"\0" + part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def save_cache(cache, path, key="", extra=None) -> Path:
    """Write `cache` to the folder `path` (replaced if present). Returns the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta, arrays = cache.state()
    files = {}
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                       "sha256": file_sha256(tmp / f"{name}.npy")}
    header = {"format": FORMAT_VERSION, "key": key, "class": type(cache).__name__, "meta": meta,
              "arrays": files, "extra": extra or {}}
    (tmp / "header.json").write_text(json.dumps(header, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def read_header(path) -> dict:
    path = Path(path)
    try:
        header = json.loads((path / "header.json").read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}/header.json: unreadable ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise CacheError(f"{path}/header.json: field 'format': expected {FORMAT_VERSION}, "
                         f"found {header.get('format') if isinstance(header, dict) else header!r}")
    return header


def load_cache(path, model, key=None, verify=True):
    """The cache saved at `path`, its arrays memory-mapped copy-on-write.

    key: when given, must equal the saved key (else CacheError). verify: hash every file first.
    """
    path = Path(path)
    header = read_header(path)
    if key is not None and header.get("key") != key:
        raise CacheError(f"{path}: field 'key': expected {key}, found {header.get('key')}")
    classes = cache_classes()
    cls = classes.get(header.get("class"))
    if cls is None:
        raise CacheError(f"{path}: field 'class': unknown cache class {header.get('class')!r}; "
                         f"expected one of {', '.join(classes)}")
    arrays = {}
    for name, info in header["arrays"].items():
        f = path / f"{name}.npy"
        if verify and (not f.is_file() or file_sha256(f) != info["sha256"]):
            raise CacheError(f"{f}: contents do not match the SHA-256 in header.json (truncated or edited)")
        try:
            arr = np.load(f, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"{f}: not a readable .npy file ({e})") from None
        if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
            raise CacheError(f"{f}: shape {arr.shape} {arr.dtype}; header says {info['shape']} {info['dtype']}")
        arrays[name] = arr
    cfg = model.config
    k = arrays.get("k")
    if k is None or k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim):
        raise CacheError(f"{path}: k is shaped {None if k is None else k.shape}; this model needs "
                         f"({cfg.n_layers}, {cfg.n_kv_heads}, S, {cfg.head_dim})")
    kw = {"cfg": cfg} if cls.__name__ == "KVCache" else \
        ({"model": model} if "model" in inspect.signature(cls.__init__).parameters else {})
    try:
        return cls.from_state(header["meta"], arrays, **kw)
    except (KeyError, ValueError, TypeError) as e:
        raise CacheError(f"{path}: header does not describe a valid {cls.__name__} ({e})") from None


def list_caches(root=None):
    """[(folder, header or None, bytes)] for every saved cache under root."""
    root = Path(root) if root else cache_dir()
    out = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if d.is_dir() and not d.name.endswith(".tmp"):
            try:
                header = read_header(d)
            except CacheError:
                header = None
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append((d, header, size))
    return out
