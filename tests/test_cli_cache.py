"""`cache ls` / `cache rm`: temporary folders left by a killed process are shown and removed by
`rm --all`, `rm` with nothing to remove is an error; the progress bar writes plain lines to a
log and ends its line when interrupted; `eval` without matplotlib still writes its tables."""
import io
import json
import os
import sys

import pytest

import minisparse
from minisparse.cli import main
from minisparse.persist import save_cache
from minisparse.progress import Progress

DEAD_PID = 2**22 + 1          # above Linux's pid_max limit (2**22): never a live process


@pytest.fixture
def kv(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISPARSE_CACHE", str(tmp_path / "kv"))
    model = minisparse.load_model("default")
    cache = model.new_cache()
    model.forward([1, 5, 6, 7], cache)
    save_cache(cache, tmp_path / "kv" / "a", key="a")
    save_cache(cache, tmp_path / "kv" / "b", key="b")
    stale = tmp_path / "kv" / f"c.tmp-{DEAD_PID}-x1y2"
    stale.mkdir()
    (stale / "k.npy").write_bytes(b"\0" * 1000)
    (tmp_path / "kv" / "d.tmp").mkdir()                  # the name an older version left
    live = tmp_path / "kv" / f"e.tmp-{os.getpid()}-z9"    # being written by a live process
    live.mkdir()
    return tmp_path / "kv"


def test_ls_shows_caches_and_stale_temporary_folders(kv, capsys):
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "a " in out and "b " in out
    assert f"c.tmp-{DEAD_PID}-x1y2" in out and "d.tmp" in out and "stale" in out
    assert f"being written by process {os.getpid()}" in out
    assert "2 cached documents, 3 temporary folders" in out


def test_rm_all_removes_caches_and_stale_temporary_folders_only(kv, capsys):
    assert main(["cache", "rm", "--all"]) == 0
    assert sorted(p.name for p in kv.iterdir()) == [f"e.tmp-{os.getpid()}-z9"]


def test_rm_by_key_removes_that_cache_and_refuses_unknown_keys_before_removing(kv, capsys):
    assert main(["cache", "rm", "a", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and (kv / "a").exists()
    assert main(["cache", "rm", "a"]) == 0
    assert not (kv / "a").exists() and (kv / "b").exists()


@pytest.mark.parametrize("argv", [["cache", "rm"], ["cache", "rm", "a", "--all"], ["cache", "ls", "a"]])
def test_rm_without_keys_or_all_is_an_error(kv, capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minisparse: error: cache") and err.count("\n") == 1
    assert (kv / "a").exists() and (kv / "b").exists()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_to_a_log_writes_a_few_plain_lines():
    log = io.StringIO()
    with Progress("prefill", stream=log) as bar:
        for done in range(0, 1001, 7):
            bar(min(done, 1000), 1000)
        bar(1000, 1000)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 1 <= len(lines) <= 5 and lines[-1].split("]")[1].split()[0] == "1000/1000"


def test_progress_on_a_terminal_redraws_one_line_and_ends_it_when_interrupted():
    term = Terminal()
    with pytest.raises(KeyboardInterrupt):
        with Progress("prefill", stream=term) as bar:
            bar(10, 100)
            bar(20, 100)
            raise KeyboardInterrupt
    text = term.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_eval_without_matplotlib_writes_the_tables_and_says_plots_were_skipped(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` now fails
    out = tmp_path / "out"
    rc = main(["eval", "-m", "default", "--variants", "dense;window=4", "--builtin", "pydoc",
               "-c", "24", "--analysis", "8", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "plots skipped" in err and "matplotlib" in err
    assert err.index("plots skipped") < err.index("eval text")        # said before the work
    assert json.loads((out / "results.json").read_text())["text"]["variants"]
    assert "window=4" in (out / "results.md").read_text()
    assert not list(out.glob("*.png"))
