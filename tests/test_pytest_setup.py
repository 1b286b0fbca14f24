"""The ways users run pytest on the notebooks, tried on a copy of the project's pytest setup (its
root conftest.py and pyproject.toml) with two tiny notebooks whose cells need the cells before
them: every way keeps a notebook whole in one process, and a run that splits one fails loudly.
They are named as 02 and 08 are: 08 (conftest.ALONE) may run in the other process, once 02 has run."""

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CELLS = 8  # enough cells that xdist's plain --dist load hands some to each process
PRETRAIN, STUDY = "02_pretrain", "08_why_low_rank"


def notebook(name: str) -> nbformat.NotebookNode:
    """Each cell needs the one before it and records which pytest process ran it."""
    cells = [nbformat.v4.new_code_cell("import os, pathlib\nstep = 0")]
    for i in range(1, CELLS):
        cells.append(nbformat.v4.new_code_cell(
            f"assert step == {i - 1}\nstep = {i}\n"
            f"pathlib.Path('ran', '{name}-{i}').write_text(os.environ.get('PYTEST_XDIST_WORKER', 'main'))"))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture
def project(tmp_path):
    shutil.copy(ROOT / "conftest.py", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "notebooks" / "ran").mkdir(parents=True)
    first, study = notebook(PRETRAIN), notebook(STUDY)
    first.cells.append(nbformat.v4.new_code_cell(  # 02 trains the network 08 loads: it takes a while
        "import time\ntime.sleep(3)\npathlib.Path('trained').write_text('yes')"))
    study.cells.insert(0, nbformat.v4.new_code_cell("assert __import__('pathlib').Path('trained').exists()"))
    for name, nb in ((PRETRAIN, first), (STUDY, study)):
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_other.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('n', range(6))\ndef test_n(n):\n    assert n >= 0\n")
    return tmp_path


def pytest_in(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=project, capture_output=True,
                          text=True, timeout=300)


def workers(project: Path) -> dict[str, set[str]]:
    """Notebook -> the pytest processes its cells ran in."""
    ran: dict[str, set[str]] = {}
    for f in (project / "notebooks" / "ran").iterdir():
        ran.setdefault(f.name.split("-")[0], set()).add(f.read_text())
        f.unlink()
    return ran


@pytest.mark.slow
@pytest.mark.parametrize("args, notebooks", [
    ((), [PRETRAIN, STUDY]),  # python -m pytest: notebooks/ and tests/, as CI runs it
    (("--nbval", "notebooks/"), [PRETRAIN, STUDY]),  # nbval's own documented way
    (("--nbval-lax", f"notebooks/{PRETRAIN}.ipynb"), [PRETRAIN]),  # one notebook
], ids=["plain", "nbval-folder", "one-notebook"])
def test_every_way_of_running_keeps_each_notebook_in_one_process(project, args, notebooks):
    done = pytest_in(project, *args)
    assert done.returncode == 0, done.stdout[-3000:]  # 08's first cell found what 02 wrote
    expected = (CELLS + 1) * len(notebooks) + (6 if not args else 0)
    assert f"{expected} passed" in done.stdout
    ran = workers(project)
    assert sorted(ran) == notebooks
    assert all(len(where) == 1 for where in ran.values()), f"a notebook split across processes: {ran}"
    assert ran[PRETRAIN] != {"main"}, "the run was not in two processes (-n 2 in pyproject.toml)"
    if STUDY in ran:  # a unit of its own: the other process took it, and waited for 02
        assert ran[STUDY] != ran[PRETRAIN], ran


@pytest.mark.slow
def test_a_run_that_splits_a_notebook_fails_and_says_why(project):
    done = pytest_in(project, "--nbval", f"notebooks/{PRETRAIN}.ipynb", "--dist", "load")
    assert done.returncode == 1
    assert "the notebook's cells were handed to more than one process" in done.stdout
    assert "Run with --dist loadgroup" in done.stdout
    assert "NameError" not in done.stdout and "AssertionError" not in done.stdout


