"""`ask` refuses what would answer wrongly (a bad --chunk, a file that is not UTF-8, a saved cache
that holds fewer positions than the document), leaves nothing half-written when interrupted, and
two runs at once on one document both answer and leave one complete cache."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minisparse
from minisparse.cli import main
from minisparse.errors import MinisparseError
from minisparse.persist import CacheError, cache_dir, load_cache, save_cache, temp_folders

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def doc(tmp_path):
    d = tmp_path / "doc.txt"
    d.write_text("def add(a, b):\n    return a + b\n")
    return d


def _ask(doc, *extra):
    return ["ask", "-m", "default", "--context", str(doc), "-p", "What does add do?", "-n", "3",
            "--temp", "0", *extra]


@pytest.mark.parametrize("chunk", ["-3", "0"])
def test_a_chunk_that_is_not_positive_is_refused_and_nothing_is_saved(chunk, kv, doc, capsys):
    with pytest.raises(SystemExit) as e:
        main(_ask(doc, "--chunk", chunk))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--chunk" in err and "positive" in err and err.count("\n") == 1
    assert not kv.exists() or not any(kv.iterdir())


def test_answer_refuses_a_chunk_that_is_not_positive():
    # the library entry point checks too: its callers are not all argparse
    from minisparse.ask import answer
    model = minisparse.load_model("default")
    with pytest.raises(MinisparseError, match="--chunk"):
        next(answer(model, model.path, "text", "q", chunk=0))


def test_a_saved_cache_with_fewer_positions_than_the_document_is_rebuilt(kv, doc, capsys):
    assert main(_ask(doc)) == 0
    clean = capsys.readouterr().out
    (folder,) = kv.iterdir()
    key = json.loads((folder / "header.json").read_text())["key"]
    model = minisparse.load_model("default")
    save_cache(model.new_cache(), folder, key=key)          # as an `ask --chunk -3` once saved
    with pytest.raises(CacheError, match="0 positions"):
        load_cache(folder, model, key=key, next_pos=12)
    assert main(_ask(doc)) == 0
    out, err = capsys.readouterr()
    assert "rebuilding" in err and "has taken in 0 positions" in err and out == clean


def test_a_file_that_is_not_utf8_is_refused_naming_it(kv, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    rc = main(_ask(bad))
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "UTF-8" in err and err.count("\n") == 1


def test_an_interrupted_save_leaves_no_temporary_folder_and_keeps_the_old_cache(tmp_path, monkeypatch):
    model = minisparse.load_model("default")
    cache = model.new_cache()
    model.forward([1, 5, 6, 7], cache)
    folder = save_cache(cache, tmp_path / "c", key="k")
    real_save, calls = np.save, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt           # as Ctrl-C between two array files
        return real_save(*a, **kw)
    monkeypatch.setattr(np, "save", interrupted)
    model.forward([8, 9], cache)
    with pytest.raises(KeyboardInterrupt):
        save_cache(cache, folder, key="k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]     # no c.tmp-*
    assert load_cache(folder, model, key="k").next_pos == 4         # the old cache, whole
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        save_cache(cache, tmp_path / "new", key="k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_sigint_during_a_save_exits_130_and_leaves_no_temporary_folder(tmp_path):
    # a real Ctrl-C: the child saves in a loop and signals itself in the middle of one save
    script = f"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {str(ROOT)!r})
import minisparse
from minisparse.persist import save_cache
model = minisparse.load_model("default")
cache = model.new_cache()
model.forward([1, 5, 6, 7], cache)
real = np.save
def save(*a, **kw):
    real(*a, **kw)
    os.kill(os.getpid(), signal.SIGINT)
np.save = save
try:
    save_cache(cache, {str(tmp_path / "c")!r}, key="k")
except KeyboardInterrupt:
    sys.exit(130)
"""
    # the child starts with SIGINT at its default, as from a terminal: a test run started in the
    # background (`pytest &` in a script) passes SIGINT on ignored, and Python then never raises
    # KeyboardInterrupt for it
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 130, p.stderr
    assert list(tmp_path.iterdir()) == []


def test_two_asks_at_once_both_answer_and_leave_one_complete_cache(kv, doc):
    env = {**os.environ, "MINISPARSE_CACHE": str(kv), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "minisparse", "-t", "1", *_ask(doc)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
    assert results[0][0] == results[1][0] and results[0][0].strip()
    (folder,) = kv.iterdir()                          # one cache, no temporary folders
    assert temp_folders(kv) == []
    cache = load_cache(folder, minisparse.load_model("default"))      # complete: checksums pass
    assert len(cache) > 0
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "no prefill" in p.stderr and p.stdout == results[0][0]


def test_a_writer_replacing_a_cache_leaves_one_folder(tmp_path):
    model = minisparse.load_model("default")
    for n in (3, 5, 4):                    # save over an existing folder twice
        cache = model.new_cache()
        model.forward(list(range(1, n + 1)), cache)
        save_cache(cache, tmp_path / "c", key="k")
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert load_cache(tmp_path / "c", model, key="k").next_pos == 4
