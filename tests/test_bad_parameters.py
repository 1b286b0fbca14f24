"""A reader's mistakes, passed through papermill's command line, each answered by one sentence.

papermill runs the notebook in a fresh kernel, as a user's `papermill ... -p rank 0` does; the
error must come from the cell that reads the parameters (before any data is loaded or any
training starts) and read as a single line, not a traceback through the package.
"""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# One case per way a mistake is found (a value, a value against the layers, a name, the machine,
# the data); every other bad value takes the first path and is tested without papermill in
# test_settings_device.py.
# What each message starts with: the error's class and the bad value (the wording is checked in
# test_settings_device.py and test_data.py).
CASES = {
    "rank 0": (["-p", "rank", "0"], "SettingsError: rank=0 "),  # 03_parametrize: the first to take a rank
    "rank 16": (["-p", "rank", "16"], "SettingsError: rank=16 "),
    "misspelt name": (["-p", "rnak", "4"], "SettingsError: This notebook does not take ['rnak']"),
    "a setting 01 does not use": (["-p", "rank", "4"], "SettingsError: This notebook does not take ['rank']"),
    "device cuda": (["-p", "device", "cuda"], "SettingsError: device='cuda' "),
    "empty data folder": (["-p", "data_dir", "{empty}"], "MnistError: The MNIST folder {empty} "),
}

pytestmark = pytest.mark.slow  # notebooks in kernels
# jupyter_client picks a kernel's ports by finding free ones and releasing them; the kernel binds
# them a moment later, and a process elsewhere (these six kernels starting at once, the other test
# process's kernels, the Ray test's cluster) can take one first. The kernel then dies before it
# replies (jupyter_client issues 154 and 487): the machine's doing, not the notebook's.
KERNEL_RACE = "Kernel died before replying to kernel_info"


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory):
    """Every case through `python -m papermill` on 01_data (the rank cases on 03_parametrize, which
    takes a rank), all at once."""
    root = tmp_path_factory.mktemp("bad")
    empty = root / "empty"
    empty.mkdir()

    def run(item):
        name, (arguments, _) = item
        out = root / f"{name.replace(' ', '_')}.ipynb"
        notebook = "03_parametrize" if name.startswith("rank ") else "01_data"
        command = [sys.executable, "-m", "papermill", str(NOTEBOOKS / f"{notebook}.ipynb"), str(out),
                   "--cwd", str(NOTEBOOKS), "-k", "python3", "--no-progress-bar",
                   *(["-p", "output_dir", str(root / "outputs")] if notebook != "01_data" else []),
                   *[a.format(empty=empty) for a in arguments]]
        for _ in range(3):  # a kernel lost to the port race (KERNEL_RACE) is started again, twice at most
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if KERNEL_RACE not in done.stderr:
                break
        return name, (done, out)

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        runs = dict(pool.map(run, CASES.items()))
    return runs, empty


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_sentence_from_the_parameters_cell(failed_runs, case):
    if case == "device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    runs, empty = failed_runs
    done, out = runs[case]
    expected = CASES[case][1].format(empty=empty)
    assert done.returncode != 0
    last_lines = done.stderr.strip().splitlines()[-1]
    assert last_lines.startswith(expected), done.stderr[-1500:]  # what papermill's user reads last
    nb = nbformat.read(out, as_version=4)
    failing = [c for c in nb.cells if c.cell_type == "code"
               and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failing) == 1 and "Settings.from_globals(globals())" in failing[0].source
    error = next(o for o in failing[0].outputs if o.output_type == "error")
    assert error.traceback == [expected.split(": ", 1)[0] + ": " + error.evalue]  # one line, no traceback
    assert error.evalue.startswith(expected.split(": ", 1)[1])
    later = nb.cells[nb.cells.index(failing[0]) + 1:]
    assert all(c.get("execution_count") is None for c in later if c.cell_type == "code"), "nothing ran after"
