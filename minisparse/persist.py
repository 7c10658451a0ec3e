"""Save a prefilled KV cache to disk and load it back memory-mapped: no pickle, no surprises.

A saved cache is a folder: `header.json` (format version, key, cache class, shapes, dtype,
scalars, a SHA-256 per array file, and a SHA-256 of the header's own fields) and one `.npy` per
array. Loading maps the arrays copy-on-write (`np.load(mmap_mode="c")`), so nothing is read into
memory up front and new tokens write private pages, never the file. Before use the header and
every array file are hashed (files in 1 MiB chunks, memory O(chunk)); any mismatch raises
`CacheError`, which callers answer by rebuilding: an edited scalar (`n`, `next_pos`) would
otherwise answer from arrays the header misdescribes.

Writers never lock. Each writes its own temporary folder `<key>.tmp-<pid>-<random>` beside the
target and renames it into place, an atomic step on one file system: a reader sees a complete
folder or none. When the folder exists already (a rebuild) the old one is first renamed aside to
`<key>.old-<pid>-<random>` and removed after; if another writer's folder lands in between, ours is
dropped (the key names the same model, text and policies, so either copy serves). The checksums
catch a reader that reads a header from one copy and arrays from the next. An interrupted write
removes its temporary folder; a killed process leaves one that `temp_folders` reports.
Left out on purpose: sharing one file between processes that write, compression, remote stores.

A cache class joins by offering `state() -> (meta: dict of JSON scalars, arrays: dict of ndarrays)`
and a classmethod `from_state(cfg, meta, arrays)`; the dense `KVCache` is the example.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import MinisparseError

FORMAT_VERSION = 2      # 2: header checksum; folders of version 1 are rejected and rebuilt
TEMP_MARKS = (".tmp", ".old-")   # name parts of folders that are not (or no longer) a saved cache
ARRAY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")   # a header cannot name a file outside its folder
RESERVE = 1024          # free slots saved after the cache so a loaded cache can grow without a copy


class CacheError(MinisparseError):
    """A saved cache is missing, truncated, edited or for another model/policy."""


def cache_classes() -> dict:
    """Every cache class that can be saved: each subclass of the Cache contract (the dense
    KVCache and the bounded caches) whose `from_state` is not the contract's, which refuses."""
    from .cache import Cache

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    return {c.__name__: c for c in subclasses(Cache)
            if c.from_state.__func__ is not Cache.from_state.__func__}


def cache_dir() -> Path:
    """Where `minisparse ask` keeps documents: $MINISPARSE_CACHE or ~/.cache/minisparse/kv."""
    return Path(os.environ.get("MINISPARSE_CACHE", Path.home() / ".cache" / "minisparse" / "kv"))


def file_sha256(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(model_path, text_or_tokens, attention="dense", cache_policy="dense", dense_layers=(),
              chunk=None) -> str:
    """Hash of what the saved K/V depend on: the model file's bytes, the context, the attention
    spec and the layers it leaves dense (a layer's K/V come from the earlier layers' attention
    outputs), the cache policy, the prefill's chunk (a bounded cache compresses between chunks,
    and the matrix products round differently by chunk), and the format."""
    h = hashlib.sha256()
    h.update(f"minisparse-kv-v{FORMAT_VERSION}\0".encode())
    h.update(file_sha256(model_path).encode())
    ctx = text_or_tokens if isinstance(text_or_tokens, str) else " ".join(map(str, text_or_tokens))
    layers = ",".join(map(str, sorted(set(dense_layers))))
    for part in (ctx, str(attention), str(cache_policy), layers, str(chunk)):
        h.update(b"\0" + part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def header_sha256(header: dict) -> str:
    """SHA-256 of the header's fields except its own checksum, in a canonical JSON form."""
    fields = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def save_cache(cache, path, key="", extra=None) -> Path:
    """Write `cache` to the folder `path` (replaced if present), atomically. Returns the folder.

    The files go to a temporary folder of this call's own, renamed into place when complete (see
    the module docstring); on any exception, Ctrl-C included, that folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        meta, arrays = cache.state()
        files = {}
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                           "sha256": file_sha256(tmp / f"{name}.npy")}
        header = {"format": FORMAT_VERSION, "key": key, "class": type(cache).__name__, "meta": meta,
                  "arrays": files, "extra": extra or {}}
        header["header_sha256"] = header_sha256(header)
        (tmp / "header.json").write_text(json.dumps(header, indent=1))
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # absent once published
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Rename the complete folder tmp to path; a rename onto an existing folder fails, so an old
    one is renamed aside first. Another writer landing in between wins (ours is removed)."""
    try:
        os.rename(tmp, path)
        return
    except OSError:
        if not path.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-{os.getpid()}-", dir=path.parent))
    try:
        os.replace(path, old)               # an empty folder is replaced by a rename
    except FileNotFoundError:
        pass                                # another writer moved it aside already
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def read_header(path, key=None) -> dict:
    """header.json of the folder `path`, checked: a JSON object of this format (and of `key`,
    when given) whose checksum matches its fields. Raises CacheError naming the file and what
    was expected."""
    path = Path(path)
    try:
        header = json.loads((path / "header.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CacheError(f"{path}/header.json: unreadable ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise CacheError(f"{path}/header.json: field 'format': expected {FORMAT_VERSION}, "
                         f"found {header.get('format') if isinstance(header, dict) else header!r}")
    if key is not None and header.get("key") != key:
        raise CacheError(f"{path}: field 'key': expected {key}, found {header.get('key')!r:.60}")
    if header.get("header_sha256") != header_sha256(header):
        raise CacheError(f"{path}/header.json: field 'header_sha256': does not match the header's "
                         f"fields (edited or damaged)")
    return header


def _array_entries(path, header) -> dict:
    """header['arrays'] checked: {name: {"shape": [int, ...], "dtype": str, "sha256": str}}."""
    entries = header.get("arrays")
    if not isinstance(entries, dict):
        raise CacheError(f"{path}/header.json: field 'arrays': expected an object, found {entries!r:.60}")
    for name, info in entries.items():
        ok = (ARRAY_NAME.fullmatch(name) and isinstance(info, dict)
              and isinstance(info.get("shape"), list)
              and all(type(n) is int and n >= 0 for n in info["shape"])
              and isinstance(info.get("dtype"), str) and isinstance(info.get("sha256"), str))
        if not ok:
            raise CacheError(f"{path}/header.json: field 'arrays.{name}': expected a name of letters, "
                             f"digits and _ with shape (list of ints), dtype and sha256")
    return entries


def load_cache(path, model, key=None, verify=True, next_pos=None):
    """The cache saved at `path`, its arrays memory-mapped copy-on-write.

    key: when given, must equal the saved key (else CacheError). verify: hash every file first.
    next_pos: when given, the number of positions the cache must have taken in (a cache saved
    empty for a non-empty document is refused).
    """
    path = Path(path)
    header = read_header(path, key)
    classes = cache_classes()
    cls = classes.get(header.get("class")) if isinstance(header.get("class"), str) else None
    if cls is None:
        raise CacheError(f"{path}: field 'class': unknown cache class {header.get('class')!r:.60}; "
                         f"expected one of {', '.join(classes)}")
    arrays = {}
    for name, info in _array_entries(path, header).items():
        f = path / f"{name}.npy"
        try:
            if verify and file_sha256(f) != info["sha256"]:
                raise CacheError(f"{f}: contents do not match the SHA-256 in header.json (truncated or edited)")
            arr = np.load(f, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
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
    if not isinstance(header.get("meta"), dict):
        raise CacheError(f"{path}/header.json: field 'meta': expected an object")
    try:
        cache = cls.from_state(header["meta"], arrays, **kw)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, ArithmeticError) as e:
        # what a header edited under a valid checksum can make from_state raise
        raise CacheError(f"{path}: header does not describe a valid {cls.__name__} ({e!r})") from None
    if next_pos is not None and cache.next_pos != next_pos:
        raise CacheError(f"{path}: the cache has taken in {cache.next_pos} positions; the document "
                         f"has {next_pos} tokens")
    return cache


def _folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def list_caches(root=None):
    """[(folder, header or None, bytes)] for every saved cache under root (temporary folders are
    listed by `temp_folders`)."""
    root = Path(root) if root else cache_dir()
    out = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if d.is_dir() and not any(m in d.name for m in TEMP_MARKS):
            try:
                header = read_header(d)
            except CacheError:
                header = None
            out.append((d, header, _folder_bytes(d)))
    return out


def temp_folders(root=None):
    """[(folder, pid or None, stale, bytes)]: folders being written (or being removed) by process
    pid, and stale ones whose process is gone (killed mid-write: they are never loaded)."""
    root = Path(root) if root else cache_dir()
    out = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if d.is_dir() and any(m in d.name for m in TEMP_MARKS):
            m = re.search(r"\.(?:tmp|old)-(\d+)-", d.name)
            pid = int(m.group(1)) if m else None
            out.append((d, pid, pid is None or not _alive(pid), _folder_bytes(d)))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                 # someone else's live process
    return True
