"""Fuzz: mutated copies of saved KV caches either load a cache equal to the original or raise
CacheError naming the folder, nothing else; `ask` answers a damaged cache by rebuilding it.

Originals: a dense KVCache and two bounded caches (streaming, recursive) of the embedded model,
saved by `save_cache`. Mutations: bit flips and truncation of `header.json` and of each `.npy`
(its NumPy header and its data), bytes appended, files swapped, emptied or deleted, a JSON field
replaced, deleted or added, whitespace changed (harmless: must load). "Re-signed" mutants edit a
field and recompute the header's checksum, as a forger would: they must still raise CacheError or
load, never crash (the checks under the checksum hold on their own). Seeded: SEED.
`benchmarks/fuzz_cache.py` runs these same mutators 10,000 times and records the outcome counts.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from minisparse.persist import CacheError, header_sha256, load_cache, save_cache

SEED = 20261205
ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "minisparse-pydoc.gguf"
SPECS = ("dense", "streaming=4+28", "recursive=B32")

ODD_VALUES = [None, True, False, 0, -1, 1, 7, 2**31, 2**63, 2**64, -2**63, 1e308, float("inf"),
              float("nan"), 0.5, "", "x", "float64", "int8", "../../etc/passwd", "KVCache", [],
              [1], [0, 0, 0, 0], [-1, 2, 3, 4], [2**40, 2, 2, 2], {}, {"a": 1}]


# ---- originals ----------------------------------------------------------------------------------

def make_original(model, spec, folder) -> Path:
    """A saved cache of `spec` holding 40 positions of the embedded model."""
    from minisparse.spec import parse_cache_spec
    cache = model.new_cache() if spec == "dense" else parse_cache_spec(spec, model)
    model.forward(list(range(1, 41)), cache)
    return save_cache(cache, folder, key="k")


def state_bytes(cache):
    """What a cache is: its meta and its arrays' bytes (as `save_cache` would write them)."""
    meta, arrays = cache.state()
    return json.dumps(meta, sort_keys=True), {k: (a.shape, str(a.dtype), np.ascontiguousarray(a).tobytes())
                                              for k, a in arrays.items()}


# ---- mutators: each returns (description, {file name: new bytes, or None to delete}, resigned) ----

def _flip(data: bytes, rng, n_bits, region=None) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(b)
    lo, hi = region or (0, len(b))
    lo, hi = (lo, min(hi, len(b))) if lo < len(b) else (0, len(b))
    for _ in range(n_bits):
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _paths(node, prefix=()):
    """Every path into a JSON tree (dict keys and list indices), leaves and inner nodes."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _edit(header: dict, rng) -> tuple[str, dict]:
    """A copy of header with one field replaced, deleted or added."""
    h = json.loads(json.dumps(header))
    path = rng.choice([p for p in _paths(h) if p])
    parent = h
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    op = rng.choice(["replace", "replace", "nudge", "delete", "add"])
    old = parent[last]
    if op == "nudge" and type(old) is int:
        parent[last] = old + rng.choice([-1, 1, 1024, -old - 1])
    elif op == "delete":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    elif op == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra_field", "n", "sha256", "k2"])] = rng.choice(ODD_VALUES)
    else:
        op = "replace"
        parent[last] = rng.choice(ODD_VALUES)
    return f"{op} {'.'.join(map(str, path))}", h


def mutate(files: dict, rng: random.Random):
    """One mutant of the saved folder whose files (name -> bytes) are `files`."""
    header = json.loads(files["header.json"])
    npys = sorted(f for f in files if f.endswith(".npy"))
    kind = rng.choice(["header-bits", "header-truncate", "header-field", "header-field-resigned",
                       "header-whitespace", "npy-header-bits", "npy-data-bits", "npy-truncate",
                       "npy-append", "npy-swap", "npy-delete", "npy-empty", "header-delete"])
    f = rng.choice(npys)
    if kind == "header-bits":
        return kind, {"header.json": _flip(files["header.json"], rng, rng.randint(1, 3))}, False
    if kind == "header-truncate":
        return kind, {"header.json": files["header.json"][: rng.randrange(len(files["header.json"]))]}, False
    if kind in ("header-field", "header-field-resigned"):
        what, h = _edit(header, rng)
        if kind.endswith("resigned"):
            h["header_sha256"] = header_sha256(h)
        return f"{kind}: {what}", {"header.json": json.dumps(h, indent=1).encode()}, kind.endswith("resigned")
    if kind == "header-whitespace":
        return kind, {"header.json": json.dumps(header, indent=rng.choice([None, 2, 4])).encode()}, False
    if kind == "npy-header-bits":        # the .npy format's own header: magic, version, dict
        return f"{kind} {f}", {f: _flip(files[f], rng, rng.randint(1, 2), (0, 128))}, False
    if kind == "npy-data-bits":
        return f"{kind} {f}", {f: _flip(files[f], rng, rng.randint(1, 4), (128, len(files[f])))}, False
    if kind == "npy-truncate":
        return f"{kind} {f}", {f: files[f][: rng.randrange(len(files[f]))]}, False
    if kind == "npy-append":
        return f"{kind} {f}", {f: files[f] + bytes(rng.randint(1, 64))}, False
    if kind == "npy-swap":
        g = rng.choice([x for x in npys if x != f])
        return f"{kind} {f} {g}", {f: files[g], g: files[f]}, False
    if kind == "npy-delete":
        return f"{kind} {f}", {f: None}, False
    if kind == "npy-empty":
        return f"{kind} {f}", {f: b""}, False
    return kind, {"header.json": None}, False


def materialise(original: Path, changes: dict, dest: Path) -> Path:
    """dest = original with `changes` applied; unchanged files are hard links (never written)."""
    dest.mkdir()
    for src in original.iterdir():
        if src.name not in changes:
            os.link(src, dest / src.name)
    for name, data in changes.items():
        if data is not None:
            (dest / name).write_bytes(data)
    return dest


def fuzz(model, original: Path, expected, rng, workdir: Path, i: int) -> str:
    """Build one mutant and check it; returns the outcome ("loaded" or "rejected: <check>")."""
    files = {f.name: f.read_bytes() for f in original.iterdir()}
    what, changes, resigned = mutate(files, rng)
    folder = materialise(original, changes, workdir / f"m{i}")
    try:
        cache = load_cache(folder, model, key="k")
    except CacheError as e:
        assert str(folder) in str(e), f"{what}: the message names no folder: {e}"
        outcome = "rejected: " + outcome_class(str(e)[len(str(folder)):])
    except Exception as e:  # noqa: BLE001 - the property under test is "nothing else"
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from None
    else:
        # a re-signed header may describe the same files differently (that is what a forger
        # can do); the property for it is only that the checks below the checksum hold
        if not resigned:
            assert state_bytes(cache) == expected, f"{what}: loaded a cache that differs from the original"
        outcome = "loaded"
        del cache
    shutil.rmtree(folder)
    return outcome


def outcome_class(message: str) -> str:
    """A short name of the check that rejected a mutant, for the counts: the file and field."""
    import re
    message = message.lstrip(": /")
    m = re.match(r"([\w.]+\.(?:json|npy))?:? ?(field '[\w.]+')?", message)
    return " ".join(x for x in m.groups() if x) or message.split(" (")[0][:40]


@pytest.fixture(scope="module")
def model():
    import minisparse
    return minisparse.load_model(MODEL)


@pytest.mark.parametrize("spec", SPECS)
def test_mutated_saved_caches_load_identical_or_raise_cache_error(model, spec, tmp_path):
    original = make_original(model, spec, tmp_path / "original")
    expected = state_bytes(load_cache(original, model, key="k"))
    rng = random.Random(f"{SEED}-{spec}")
    outcomes = [fuzz(model, original, expected, rng, tmp_path, i) for i in range(120)]
    # the mutators must reach both outcomes, or the test checks less than it claims
    assert outcomes.count("loaded") >= 3, outcomes
    assert sum(o.startswith("rejected") for o in outcomes) >= 100, outcomes


def test_ask_rebuilds_a_damaged_cache_and_answers_as_from_a_clean_one(model, tmp_path, monkeypatch, capsys):
    from minisparse.cli import main
    from minisparse.persist import cache_dir
    monkeypatch.setenv("MINISPARSE_CACHE", str(tmp_path / "kv"))
    doc = tmp_path / "doc.txt"
    doc.write_text("def add(a, b):\n    return a + b\n")
    argv = ["ask", "-m", "default", "--context", str(doc), "-p", "What does add do?", "-n", "4", "--temp", "0"]
    assert main(argv) == 0
    clean = capsys.readouterr().out
    (folder,) = cache_dir().iterdir()
    files = {f.name: f.read_bytes() for f in folder.iterdir()}
    rng = random.Random(SEED)
    seen = set()
    pristine = shutil.copytree(folder, tmp_path / "pristine")
    while len(seen) < 4:                      # four kinds of damage, each rejected and rebuilt
        what, changes, resigned = mutate(files, rng)
        kind = what.split()[0].rstrip(":")
        if resigned or kind in seen or kind == "header-whitespace":
            continue
        seen.add(kind)
        shutil.rmtree(folder)
        materialise(pristine, changes, folder)
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert out == clean, what
        assert "saved cache rejected, rebuilding" in err and "prefill [" in err, what
