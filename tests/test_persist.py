"""Saved KV caches: identical logits after a reload, keys that change with what they depend on,
corruption detected, arrays memory-mapped rather than read up front."""
import json
import subprocess
import sys

import numpy as np
import pytest

import minisparse
from minisparse.persist import CacheError, cache_key, load_cache, save_cache


@pytest.fixture(scope="module")
def model(stories_path):
    return minisparse.load_model(stories_path)


def _cache_factories(model):
    """Every cache class that can be saved, built for this model (bounded ones when present)."""
    yield "dense", model.new_cache
    try:
        from minisparse.spec import parse_cache_spec
    except ImportError:
        return
    for spec in ("streaming=4+60", "recursive=B96", "recursive=B96/perhead", "press=0.5",
                 "pyramid=40/w4/beta4", "adakv=24/w4", "kivi2/g8/r16"):
        yield spec, lambda spec=spec: parse_cache_spec(spec, model)


def test_saved_and_reloaded_cache_gives_identical_logits(model, tmp_path):
    ids = [1] + list(np.random.default_rng(0).integers(3, 512, size=150))
    for name, make in _cache_factories(model):
        cache = make()
        model.forward(ids[:140], cache)
        folder = save_cache(cache, tmp_path / name.replace("=", "_").replace("+", "_").replace("/", "_"), key="k")
        again = load_cache(folder, model, key="k")
        assert len(again) == len(cache) and again.next_pos == cache.next_pos
        a = model.forward(ids[140:], cache)
        b = model.forward(ids[140:], again)
        assert np.abs(a - b).max() == 0, name          # same arrays, same arithmetic: bit-identical


def test_loaded_arrays_are_memory_mapped_and_the_file_is_never_written(model, tmp_path):
    cache = model.new_cache()
    model.forward([1, 5, 6, 7], cache)
    folder = save_cache(cache, tmp_path / "c", key="k")
    before = (folder / "k.npy").read_bytes()
    again = load_cache(folder, model)
    assert isinstance(again.k, np.memmap) and isinstance(again.v, np.memmap)
    model.forward([8, 9], again)                        # appends write copy-on-write pages only
    assert (folder / "k.npy").read_bytes() == before


def test_key_changes_with_context_model_and_policy(stories_path, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(stories_path.read_bytes() + b"\0")
    base = cache_key(stories_path, "doc", "dense", "dense")
    assert base == cache_key(stories_path, "doc", "dense", "dense")
    for changed in (cache_key(stories_path, "doc2", "dense", "dense"),
                    cache_key(other, "doc", "dense", "dense"),
                    cache_key(stories_path, "doc", "window=64", "dense"),
                    cache_key(stories_path, "doc", "dense", "streaming=4+60"),
                    cache_key(stories_path, "doc", "window=64", "dense", dense_layers=(0,)),
                    cache_key(stories_path, "doc", "dense", "dense", chunk=64)):
        assert changed != base


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_truncated_or_edited_cache_is_detected(model, tmp_path, damage):
    cache = model.new_cache()
    model.forward([1, 5, 6, 7, 8], cache)
    folder = save_cache(cache, tmp_path / "c", key="k")
    f = folder / "v.npy"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[-7] ^= 0x10
        f.write_bytes(bytes(data))
    else:
        h = json.loads((folder / "header.json").read_text())
        h["arrays"]["v"]["shape"][2] += 1
        (folder / "header.json").write_text(json.dumps(h))
    with pytest.raises(CacheError):
        load_cache(folder, model, key="k", verify=damage != "header")
    with pytest.raises(CacheError, match="key"):
        load_cache(folder, model, key="another")


def test_ask_reuses_the_cache_and_rebuilds_a_damaged_one(stories_path, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Lily had a red ball. She played in the park with her mom. " * 8)
    env = {"MINISPARSE_CACHE": str(tmp_path / "kv"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "minisparse", "ask", "-m", str(stories_path), "--context", str(doc),
           "-p", "What did Lily have?", "-n", "12", "--temp", "0"]
    run = lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # noqa: E731
    cold, warm = run(), run()
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    assert "prefill [" in cold.stderr and "no prefill" in warm.stderr
    assert cold.stdout == warm.stdout                  # the same answer from the saved cache
    (folder,) = (tmp_path / "kv").iterdir()
    (folder / "k.npy").write_bytes((folder / "k.npy").read_bytes()[:-100])
    again = run()
    assert again.returncode == 0 and "rebuilding" in again.stderr and again.stdout == cold.stdout


def test_ask_beyond_the_trained_context_needs_a_bounded_cache_and_says_so(stories_path, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text("Lily had a red ball. " * 450)          # ~2.3k tokens > stories260K's 2048
    env = {"MINISPARSE_CACHE": str(tmp_path / "kv"), "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "minisparse", "ask", "-m", str(stories_path), "--context", str(doc),
            "-p", "What did Lily have?", "-n", "4", "--temp", "0"]
    dense = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert dense.returncode == 2 and "--cache streaming=" in dense.stderr
    assert dense.stderr.count("\n") == 1 and "Traceback" not in dense.stderr
    bounded = subprocess.run(base + ["--cache", "streaming=4+60"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert bounded.returncode == 0, bounded.stderr
    assert "beyond the trained context" in bounded.stderr


def test_max_keys_is_the_bound_a_cache_keeps(model):
    # what `ask` and the lab report as a bounded cache's size: the recursive budget, sinks +
    # window for streaming, nothing for a ratio (press) or the dense cache
    from minisparse.cache import max_keys
    from minisparse.spec import parse_cache_spec
    assert max_keys(parse_cache_spec("recursive=B96", model)) == 96
    assert max_keys(parse_cache_spec("press=0.5", model)) is None
    assert max_keys(model.new_cache()) is None
    streaming = parse_cache_spec("streaming=4+60", model)
    assert max_keys(streaming) == 64
    model.forward([1] + list(np.random.default_rng(1).integers(3, 512, size=149)), streaming)
    assert len(streaming) == 64                                 # 150 tokens seen, 64 kept
