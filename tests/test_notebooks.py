"""The teaching notebooks run top to bottom, are committed without outputs, and match their
sources in notebooks/src/ (jupytext percent-format scripts, paired by notebooks/jupytext.toml).

Each notebook runs in a fresh `python3` kernel with cwd notebooks/ and MPLBACKEND=Agg, on the
embedded model (models/minisparse-pydoc.gguf); a cell that raises fails the test with the cell's
error. Timeout 120 s per notebook (the budget is 2 minutes each on 2 cores).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
SOURCES = sorted((NB_DIR / "src").glob("[0-9][0-9]_*.py"))
TIMEOUT = 120


def test_the_series_has_nine_notebooks_in_order():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 10)], \
        f"expected notebooks 01..09 in {NB_DIR}, found {[p.name for p in NOTEBOOKS]}"


# ---- minisparse.viz: the helpers the notebooks draw with ---------------------------------------
def test_keys_for_mass_is_the_smallest_prefix_of_sorted_mass():
    import numpy as np
    from minisparse.viz import keys_for_mass
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(50, 0.3), size=200)                      # (200, 50) rows sum to 1
    got = keys_for_mass(p, 0.9)
    for row, m in zip(p, got):
        srt = np.sort(row)[::-1]
        # m keys hold >= 90% and m - 1 do not (1e-12 as in viz: float64 sums of 50 terms)
        assert srt[:m].sum() >= 0.9 - 1e-12 and srt[:m - 1].sum() < 0.9 - 1e-12


def test_selection_image_and_to_dot_agree_with_the_mask():
    import re
    import numpy as np
    from minisparse.spec import parse_attention_spec
    from minisparse.viz import pattern, selection_image, to_dot
    T = 24
    for spec in ("sinks=2,window=3", "strided=4", "logstride", "random=20%x2"):
        sel = pattern(parse_attention_spec(spec), T)
        mask, _ = sel.to_mask(1, T, T)                                  # (1, T, T) real keys
        causal = np.tril(np.ones((T, T), bool))
        img = selection_image(sel)
        assert np.array_equal(img > 0, mask[0] & causal), spec
        edges = {(int(a), int(b)) for a, b in re.findall(r"p(\d+) -> p(\d+);", to_dot(sel))}
        want = {(j, t) for t in range(T) for j in range(t) if mask[0, t, j]}   # no self-reads
        assert edges == want, spec


def test_to_dot_draws_landmarks_as_boxes_fed_by_their_block():
    from minisparse.attention import Landmarks
    from minisparse.viz import pattern, to_dot
    dot = to_dot(pattern(Landmarks(4), 12))
    assert 'L0 [shape=box' in dot and "L0 -> p4" in dot                 # query 4 reads block 0's mean
    assert all(f"p{j} -> L0 [style=dotted" in dot for j in range(4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs or an execution_count; " \
                      f"rewrite it from its source with `jupytext --to ipynb " \
                      f"--output notebooks/{path.name} notebooks/src/{path.stem}.py`"


def test_every_notebook_has_a_source_and_every_source_a_notebook():
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in SOURCES], \
        f"notebooks {[p.name for p in NOTEBOOKS]} and sources {[p.name for p in SOURCES]} differ"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_its_source(path):
    import jupytext
    from jupytext.compare import NotebookDifference, compare_notebooks
    src = NB_DIR / "src" / (path.stem + ".py")
    text = jupytext.read(src)
    fmt = text.metadata.get("jupytext", {}).get("text_representation", {}).get("format_name")
    assert fmt == "percent", f"{src.name}: its jupytext header names format {fmt!r}, expected 'percent'"
    # cell by cell: kinds, sources and metadata, the ids that only the .ipynb carries aside;
    # raises with the first differing cell
    try:
        compare_notebooks(jupytext.read(path), text, fmt="py:percent", compare_outputs=False)
    except NotebookDifference as e:
        pytest.fail(f"{path.name} differs from its source {src.name}: {e}\n"
                    f"bring the older one up to date with `jupytext --sync notebooks/src/{src.name}`")


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
