"""Fuzz: mutated copies of real GGUF files either pass `check_gguf` or raise GGUFError, nothing else.

Mutations: bit/byte flips in the header, metadata and tensor infos; truncation at every section and
field boundary and at random points; counts and lengths inflated to u64 max, 2**63, file size + 1;
type ids replaced. Mutants that pass are read in full by minisparse's GGUFFile (every value, every
tensor dequantised), which must not raise; for the end-to-end originals every value and tensor must
also equal what gguf-py's GGUFReader reads, and the minisparse loader must load the file or raise
GGUFError when the model checks pass. Seeded: SEED.
`benchmarks/fuzz_gguf.py` runs these same mutators 10,000+ times and records the outcome counts.
"""
from __future__ import annotations

import random
import re
import struct
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT
from gguf.quants import dequantize

from minisparse import gguf_check
from minisparse.errors import GGUFError
from minisparse.gguf_check import SUPPORTED_TYPES, GGUFFile, check_gguf, check_model_metadata
from test_gguf_reader import assert_reads_like_ggufreader

SEED = 20261123
U64_MAX = 2**64 - 1
ORACLE = Path(__file__).resolve().parent / "fixtures" / "oracle"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


# ---- where the fields are (from the valid original's layout and a byte search) -------------------

def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def field_sites(buf: bytes, layout) -> dict:
    """Offsets in a *valid* file: u64 counts/lengths, u32 type ids, and section/field boundaries."""
    u64 = [8, 16]                     # tensor_count, kv_count
    u32 = [4]                         # version
    bounds = {0, 4, 8, 16, 24, layout.info_offset, layout.info_end, layout.data_offset, len(buf)}
    for key, vtype in layout.value_types.items():
        k = buf.index(gguf_str(key))
        bounds.add(k)
        u64.append(k)                                  # key length
        v = k + len(gguf_str(key))
        u32.append(v)                                  # value type
        if vtype == VT.STRING:
            u64.append(v + 4)
        elif vtype == VT.ARRAY:
            u32.append(v + 4)                          # element type
            u64.append(v + 8)                          # array length
            arr = layout.metadata[key]
            bounds.update((arr.offset, arr.offset + arr.nbytes))
    for t in layout.tensors:
        i = buf.index(gguf_str(t.name), layout.info_offset)
        bounds.add(i)
        nd = i + len(gguf_str(t.name))
        u64.append(i)                                  # name length
        u32.append(nd)                                 # n_dims
        u64.extend(nd + 4 + 8 * j for j in range(len(t.shape)))     # dims
        u32.append(nd + 4 + 8 * len(t.shape))          # ggml type
        u64.append(nd + 8 + 8 * len(t.shape))          # offset
        bounds.update((layout.data_offset + t.offset, layout.data_offset + t.offset + t.n_bytes))
    return {"u64": u64, "u32": u32, "bounds": sorted(bounds), "info": (layout.info_offset, layout.info_end),
            "data": layout.data_offset}


# ---- mutators: (rng, buf, sites) -> bytes -----------------------------------------------------------

def _flip(rng, buf, lo, hi, n_max=4):
    b = bytearray(buf)
    for _ in range(rng.randint(1, n_max)):
        i = rng.randrange(lo, max(lo + 1, hi))
        b[i] = b[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(b)


def m_flip_header(rng, buf, s):
    return _flip(rng, buf, 0, 24, 2)


def m_flip_metadata(rng, buf, s):
    return _flip(rng, buf, 24, s["info"][0])


def m_flip_tensor_info(rng, buf, s):
    lo, hi = s["info"]
    return _flip(rng, buf, lo, hi) if hi > lo else _flip(rng, buf, 24, lo)


def m_flip_anywhere(rng, buf, s):
    return _flip(rng, buf, 0, len(buf))


def m_truncate_boundary(rng, buf, s):
    cut = rng.choice(s["bounds"]) + rng.choice((-1, 0, 0, 1))
    return buf[:max(0, min(cut, len(buf) - 1))]


def m_truncate_random(rng, buf, s):
    return buf[:rng.randrange(len(buf))]


def m_inflate(rng, buf, s):
    at = rng.choice(s["u64"])
    (orig,) = struct.unpack_from("<Q", buf, at)
    n = len(buf)
    v = rng.choice((U64_MAX, 2**63, 2**63 - 1, 2**32, n, n + 1, orig + 1, 2 * orig + 1, max(orig - 1, 0), 0))
    b = bytearray(buf)
    struct.pack_into("<Q", b, at, v % 2**64)
    return bytes(b)


def m_retype(rng, buf, s):
    at = rng.choice(s["u32"])
    v = rng.choice((rng.randrange(0, 42), rng.randrange(0, 42), 2**32 - 1, rng.randrange(2**32)))
    b = bytearray(buf)
    struct.pack_into("<I", b, at, v)
    return bytes(b)


MUTATORS = {"flip_header": m_flip_header, "flip_metadata": m_flip_metadata,
            "flip_tensor_info": m_flip_tensor_info, "flip_anywhere": m_flip_anywhere,
            "truncate_boundary": m_truncate_boundary, "truncate_random": m_truncate_random,
            "inflate_length": m_inflate, "retype": m_retype}


# ---- running one mutant ----------------------------------------------------------------------------

def rejection_class(msg: str, path) -> str:
    """'tensor '*' data' style class of a GGUFError message: the field with names and numbers blanked."""
    rest = msg[len(f"{path}: "):]
    rest = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "'*'", rest)   # repr()-quoted names first
    return re.sub(r"\d+", "N", rest.split(": ")[0])


def read_everything(path, oracle: bool):
    """Read every value and tensor of a mutant that passed check_gguf with minisparse's GGUFFile;
    with `oracle`, also compare each with gguf-py's GGUFReader (which must open it too)."""
    f = assert_reads_like_ggufreader(path) if oracle else GGUFFile(path)
    for key in f.metadata:
        f.get(key)
    with np.errstate(all="ignore"):     # flipped data bytes may decode to inf/NaN scales: values, not errors
        for t in f.tensors:
            if t.ggml_type in SUPPORTED_TYPES:
                dequantize(np.asarray(t.data), t.ggml_type)


def _model_loader():
    """minisparse's loader when it is importable (the package is being built in parallel)."""
    try:
        from minisparse import load_model
        return load_model
    except Exception:
        try:
            from minisparse.gguf_io import load_gguf
            return load_gguf
        except Exception:
            return None


def run_mutant(path: Path, data: bytes, end_to_end: bool, loader=None, timing: list | None = None) -> str:
    """Write `data` to `path`, check it; 'pass+model', 'loaded', 'rejected: <class>' or 'pass; model|
    loader rejected: <class>'. Any exception other than GGUFError propagates (the test fails with it).
    `timing`, when given, receives the seconds check_gguf took."""
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        layout = check_gguf(path)
    except GGUFError as e:
        return "rejected: " + rejection_class(str(e), path)
    finally:
        if timing is not None:
            timing.append(time.perf_counter() - t0)
    read_everything(path, oracle=end_to_end)   # must not raise at all: check_gguf promised a readable container
    try:
        check_model_metadata(layout, path)
    except GGUFError as e:
        return "pass; model rejected: " + rejection_class(str(e), path)
    if end_to_end and loader is not None:
        try:
            with np.errstate(all="ignore"):     # retyped data may dequantise to NaN: a value, not a crash
                loader(path)
        except GGUFError as e:
            return "pass; loader rejected: " + rejection_class(str(e), path)
        return "loaded"
    return "pass+model"


SHARED_FILES = (("stories260K.gguf", True), ("vocab/ggml-vocab-llama-spm.gguf", False),
                ("vocab/ggml-vocab-phi-3.gguf", False), ("vocab/ggml-vocab-gpt-2.gguf", False))


def local_corpus(tmp_dir: Path) -> list[tuple[str, Path, bool]]:
    """(name, path, end_to_end) of the originals every checkout has: a tiny model generated here
    and the committed oracle fixtures, all end to end (GGUFReader as oracle, then the loader)."""
    from test_gguf_hostile import write_tiny_llama
    items = [("tiny", write_tiny_llama(tmp_dir / "tiny.gguf"), True)]
    return items + [(p.stem, p, True) for p in sorted(ORACLE.glob("*.gguf"))]


def shared_corpus() -> list[tuple[str, Path, bool]]:
    """The originals in ../shared/fixtures that are present. End to end only for stories260K:
    GGUFReader takes ~2 s on each vocab file."""
    return [(Path(name).stem, SHARED / name, e2e) for name, e2e in SHARED_FILES
            if (SHARED / name).exists()]


def corpus(tmp_dir: Path) -> list[tuple[str, Path, bool]]:
    """Every original present: local_corpus, then shared_corpus."""
    return local_corpus(tmp_dir) + shared_corpus()


class CountingCursor(gguf_check._Cursor):
    """Counts reads: each successful read consumes >= 1 byte, so reads <= file size bounds the work."""
    reads = 0

    def scalar(self, vtype, what):
        CountingCursor.reads += 1
        return super().scalar(vtype, what)

    def string(self, what):
        CountingCursor.reads += 1
        return super().string(what)

    def strings(self, n, what):
        CountingCursor.reads += n       # n strings of >= 8 bytes each (or it raises)
        return super().strings(n, what)


def fuzz(items, n_per_item: dict, seed: int, work_dir: Path, loader=None, bound_every: int = 0,
         on_result=None) -> Counter:
    """Run the mutators; every `bound_every`-th mutant also runs under tracemalloc + CountingCursor
    and must stay within the memory and read bounds (asserted). Returns outcome counts."""
    rng = random.Random(seed)
    counts = Counter()
    kinds = list(MUTATORS)
    k = 0
    for name, src, e2e in items:
        buf = src.read_bytes()
        sites = field_sites(buf, check_gguf(src))
        target = work_dir / f"mut-{name}.gguf"
        for i in range(n_per_item.get(name, n_per_item.get("*", 0))):
            kind = kinds[i % len(kinds)]
            data = MUTATORS[kind](rng, buf, sites)
            for _ in range(8):          # a flip or retype can write the byte that was there: redraw
                if data != buf:
                    break
                data = MUTATORS[kind](rng, buf, sites)
            k += 1
            bounded = bound_every and k % bound_every == 0
            t0 = time.perf_counter()
            try:
                if bounded:
                    outcome, peak, reads = bounded_check(target, data)
                    # memory: a string slice and its decoded str (each <= file size), plus per tensor
                    # info (>= 32 file bytes) a TensorInfo of < 512 B: 16 x size; + 1 MiB interpreter slack
                    assert peak <= 16 * len(data) + 2**20, (name, kind, i, peak, len(data))
                    assert reads <= len(data) + 1, (name, kind, i, reads, len(data))
                else:
                    outcome = run_mutant(target, data, e2e, loader, check_time := [])
            except Exception as e:
                raise AssertionError(f"seed={seed} file={name} mutant #{i} ({kind}): "
                                     f"{type(e).__name__}: {e}") from e
            counts[outcome] += 1
            if on_result:       # check_gguf's own time; None for the tracemalloc-slowed mutants
                on_result(name, kind, outcome, time.perf_counter() - t0,
                          None if bounded else check_time[0], len(data))
    return counts


def bounded_check(path: Path, data: bytes):
    path.write_bytes(data)
    CountingCursor.reads = 0
    saved, gguf_check._Cursor = gguf_check._Cursor, CountingCursor
    tracemalloc.start()
    try:
        try:
            check_gguf(path)
            outcome = "pass (container check only)"
        except GGUFError as e:
            outcome = "rejected: " + rejection_class(str(e), path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gguf_check._Cursor = saved
    return outcome, peak, CountingCursor.reads


# ---- the CI test -----------------------------------------------------------------------------------

# mutants per original: cheap files get more; the vocab files walk 30k-100k strings per check
N_CI = {"tiny": 1000, "stories260K": 700, "ggml-vocab-llama-spm": 100, "ggml-vocab-phi-3": 100,
        "ggml-vocab-gpt-2": 100, "*": 80}


def n_mutants(items) -> int:
    return sum(N_CI.get(name, N_CI["*"]) for name, _, _ in items)


@pytest.mark.parametrize("where", ["local", "shared"])
def test_fuzzed_gguf_files_pass_or_raise_gguf_error(tmp_path, where):
    if where == "local":
        items = local_corpus(tmp_path)
        assert [n for n, _, _ in items][:1] == ["tiny"] and len(items) >= 6, items   # + 5 oracle files
    else:
        items = shared_corpus()
        if not items:
            pytest.skip(f"{SHARED} is absent: the shared fixtures folder ../shared/fixtures is not "
                        f"beside this checkout (its GGUF files are fuzzed only where present)")
    t0 = time.perf_counter()
    counts = fuzz(items, N_CI, SEED, tmp_path, loader=_model_loader(), bound_every=7)
    elapsed = time.perf_counter() - t0
    total = sum(counts.values())
    print(f"\nseed={SEED} {where} mutants={total} in {elapsed:.1f} s")
    for outcome, n in counts.most_common():
        print(f"  {n:6d}  {outcome}")
    # every planned mutant ran and has an outcome (>= 1,400 locally: 1,000 of the tiny model and
    # 80 of each oracle file; 1,000 more from the shared files where they are present)
    assert total == n_mutants(items)
    # both outcomes must occur, or the mutators are not reaching the checks
    assert sum(n for o, n in counts.items() if o.startswith("rejected")) > total // 4
    assert sum(n for o, n in counts.items() if not o.startswith("rejected")) > 0
    # a hang guard, not a speed target: a linear parse of <= 2 MB takes ~0.1 s; 300 s would mean a loop
    assert elapsed < 300, elapsed
