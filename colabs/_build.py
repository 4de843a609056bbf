"""Builds each colabs/NAME.ipynb from its paired percent-format source colabs/NAME.py.

    python colabs/_build.py          # rewrite the notebooks (outputs cleared)
    python colabs/_build.py --check  # fail if a notebook is out of date
"""

import glob
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))


def cells(source: str):
    blocks, kind, lines = [], None, []
    for line in source.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                blocks.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
            continue
        if kind == "markdown":
            line = line[2:] if line.startswith("# ") else line.lstrip("#")
        lines.append(line)
    if kind is not None:
        blocks.append((kind, "\n".join(lines).strip("\n")))
    return [nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
            for kind, text in blocks]


def build(path: str) -> str:
    nb = nbformat.v4.new_notebook(cells=cells(open(path).read()))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nbformat.writes(nb) + "\n"


def main(check: bool) -> int:
    stale = []
    for path in sorted(glob.glob(os.path.join(HERE, "[!_]*.py"))):
        target = path[:-3] + ".ipynb"
        text = build(path)
        current = open(target).read() if os.path.exists(target) else None
        if current != text:
            stale.append(target)
            if not check:
                with open(target, "w") as f:
                    f.write(text)
    if check and stale:
        print("out of date (run python colabs/_build.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
