"""The class exercises at the end of notebooks 03-07 are real: each notebook's shipped starter
(its cell tagged "exercise") fails the kit's check, and each solution in notebooks/solutions/
passes it, with the same settings as the notebook's check cell."""
import importlib.util
from pathlib import Path

import pytest

from minisparse.testing import check_selector, report

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.py"))
CHECK = dict(max_examples=25, max_tk=12)               # what the notebooks' check cells run


def _solution(path):
    # the file names start with digits, so they are loaded by path, not imported by name
    spec = importlib.util.spec_from_file_location(f"solution_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _starter(path):
    """The object the notebook's exercise cell defines, under the solution's NAME."""
    import jupytext
    nb = jupytext.read(ROOT / "notebooks" / "src" / path.name)
    cells = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one cell tagged 'exercise', found {len(cells)}"
    ns = {}
    exec(cells[0].source, ns)
    return ns[_solution(path).NAME]


def test_notebooks_03_to_07_each_have_a_solution():
    assert [p.name[:2] for p in SOLUTIONS] == ["03", "04", "05", "06", "07"], \
        f"expected solutions 03..07 in notebooks/solutions, found {[p.name for p in SOLUTIONS]}"
    for p in SOLUTIONS:
        assert (ROOT / "notebooks" / "src" / p.name).exists(), f"{p.name}: no notebook source"


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_the_solution_passes_the_kit(path):
    check_selector(_solution(path).SOLUTION, **CHECK)


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_the_shipped_starter_fails_the_kit(path):
    starter = _starter(path)
    with pytest.raises(AssertionError, match=r"invariant '\w+' fails"):
        check_selector(starter, **CHECK)


def test_report_prints_the_counterexample_instead_of_raising(capsys):
    starter = _starter(SOLUTIONS[2])                    # the dilated window counting from the newest key
    assert report(starter, **CHECK) is False
    out = capsys.readouterr().out
    assert "invariant 'decode_equals_prefill' fails" in out and "make_problem(" in out


def test_report_says_all_invariants_hold_for_a_correct_selector(capsys):
    assert report(_solution(SOLUTIONS[2]).SOLUTION, **CHECK) is True
    assert capsys.readouterr().out.startswith("all invariants hold")
