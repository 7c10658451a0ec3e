"""The teaching notebooks run top to bottom, are committed without outputs, and match their
sources in notebooks/src/ (built by notebooks/build.py).

Each notebook runs in a fresh `python3` kernel with cwd notebooks/ and MPLBACKEND=Agg, on the
embedded model (models/minisparse-pydoc.gguf); a cell that raises fails the test with the cell's
error. Timeout 120 s per notebook (the budget is 2 minutes each on 2 cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
TIMEOUT = 120


def test_the_series_is_there():
    assert len(NOTEBOOKS) >= 1, f"no notebooks found in {NB_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs or an execution_count; " \
                      f"rebuild with `python3 notebooks/build.py`"


def test_notebooks_match_their_sources():
    r = subprocess.run([sys.executable, str(NB_DIR / "build.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel imports minisparse from this checkout even when it is not pip-installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    # the 120 s budget is for the whole notebook: each cell gets what the earlier ones left
    # (at least 1 s, so the timeout names the cell that ran out)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}},
        timeout_func=lambda cell: max(1, int(TIMEOUT - (time.perf_counter() - t0))))
    client.execute()
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
