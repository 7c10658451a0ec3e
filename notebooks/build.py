"""Build the teaching notebooks (notebooks/NN_*.ipynb) from their sources, notebooks/src/NN_*.txt.

Leaves out running them (tests/test_notebooks.py executes every notebook with nbclient). A source
file is the notebook's cells in the percent format of jupytext, without comment prefixes:
a line `# %% [markdown]` starts a Markdown cell, a line `# %%` a code cell. The .ipynb files are
written with no outputs and execution_count null, which is how they are committed.

    python3 notebooks/build.py            # rewrite every notebook from its source
    python3 notebooks/build.py --check    # exit 1 if a committed notebook differs from its source
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def parse(text: str):
    """Cells of a source file: [(kind, source)], kind "markdown" or "code"."""
    cells, kind, buf = [], None, []
    for line in text.splitlines():
        if line.strip() in ("# %% [markdown]", "# %%"):
            if kind is not None:
                cells.append((kind, "\n".join(buf).strip("\n")))
            kind, buf = ("markdown" if "markdown" in line else "code"), []
        elif kind is None:
            if line.strip():
                raise ValueError(f"text before the first '# %%' marker: {line!r}")
        else:
            buf.append(line)
    if kind is not None:
        cells.append((kind, "\n".join(buf).strip("\n")))
    return cells


def build(src: Path):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for kind, source in parse(src.read_text()):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell.pop("id", None)          # ids change on every build; without them the files are stable
        nb.cells.append(cell)
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nbformat.writes(nb) + "\n"


def main(argv):
    check = "--check" in argv
    stale = []
    for src in sorted(SRC.glob("*.txt")):
        out = HERE / (src.stem + ".ipynb")
        text = build(src)
        if check:
            if not out.is_file() or out.read_text() != text:
                stale.append(out.name)
        else:
            out.write_text(text)
            print(f"wrote {out.relative_to(HERE.parent)}")
    if stale:
        print("out of date (run python3 notebooks/build.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
