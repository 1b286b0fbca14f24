"""How every pytest run of this project runs, whatever it collects: `python -m pytest`,
`pytest --nbval notebooks/`, `pytest --nbval-lax notebooks/05_finetune.ipynb`.

Here, not in tests/, because pytest loads a conftest.py only beside or above what it collects, and
a run of notebooks/ alone must get the same rules:

- which MNIST the kernels and tests read ($LORA_TUTORIAL_DATA; LORA_TUTORIAL_OFFLINE=1 hides it);
- with pytest-xdist (`-n 2` in pyproject.toml), each notebook runs whole in one process (its cells
  share one kernel), and each test file too. The committed notebooks run together, in order, in one
  process (02_pretrain trains the network the later ones load, 05 the adapter), except the studies
  that need only 02's network (ALONE): each is a unit of its own that another process can take, and
  it waits until 02 has finished. xdist's own `xdist_group` marks cannot do this on every pytest:
  from pytest 9.2 the group no longer reaches xdist's scheduler. So the scheduler is ours, and a
  notebook cell whose earlier cells ran in another process fails with the fix, rather than with a
  NameError deep in the notebook;
- the longest parts first, everything that runs a notebook marked slow, nbval blind to stderr.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

OFFLINE_ENV = "LORA_TUTORIAL_OFFLINE"
DATA_ENV = "LORA_TUTORIAL_DATA"  # lora_tutorial.data.DATA_ENV (not imported: torch takes seconds)
BESIDE = Path(__file__).resolve().parent.parent / "shared" / "data"  # where CI lays full MNIST
if os.environ.get(OFFLINE_ENV) == "1":
    os.environ.pop(DATA_ENV, None)
elif not os.environ.get(DATA_ENV) and (BESIDE / "MNIST" / "raw").is_dir():
    os.environ[DATA_ENV] = str(BESIDE)  # kernels started by papermill and nbval inherit it

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # two processes with two threads each on two cores only get in each other's way
    threads = str(max(1, (os.cpu_count() or 1) // WORKERS))
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)  # kernels started from here
    import torch

    torch.set_num_threads(int(threads))

try:
    from nbval.plugin import IPyNbCell, IPyNbFile
except ImportError:  # nbval not installed: no notebook is ever collected
    IPyNbCell = IPyNbFile = None

NOTEBOOKS = "committed-notebooks"  # the part every notebook belongs to, except ALONE's
PRETRAIN = "02_pretrain.ipynb"  # trains the network every later notebook loads
ALONE = ("07_rank_sweep.ipynb", "08_why_low_rank.ipynb", "12_lora_family.ipynb",  # need 02's network only
         "13_memory_and_qlora.ipynb")
# The order parts are handed out in (pyproject: --no-loadscope-reorder keeps it): the longest
# first, so that no process is left with one at the end; a process takes the next part as it
# finishes one. The sweep's file comes second, so that its Ray cluster boots while the other process
# is in the first notebooks (Ray gives a booting node 30 s, which a machine busy everywhere can
# miss), and the ALONE studies find 02 finished when that file is done.
LONGEST_FIRST = (NOTEBOOKS, "test_sweep.py", "08_why_low_rank.ipynb", "07_rank_sweep.ipynb",
                 "12_lora_family.ipynb", "13_memory_and_qlora.ipynb", "test_notebooks.py", "test_lab.py",
                 "test_jupyterlab.py")
READY_ENV = "LORA_TUTORIAL_PRETRAINED_MARK"  # a file that exists once 02 has run (processes inherit it)


def is_notebook_cell(item: pytest.Item) -> bool:
    """By what the item is (nbval's cell, or a test read from an .ipynb file), not by its id."""
    return (IPyNbCell is not None and isinstance(item, IPyNbCell)) or item.path.suffix == ".ipynb"


def notebook_part(path: Path) -> str:
    return path.name if path.name in ALONE else NOTEBOOKS


def part(item: pytest.Item) -> str:
    return notebook_part(item.path) if is_notebook_cell(item) else item.path.name


def pytest_configure(config):
    """Before xdist starts its processes: where 02 leaves its mark (a folder removed at the end)."""
    if not hasattr(config, "workerinput"):
        config._pretrained_mark = Path(tempfile.mkdtemp(prefix="lora-tutorial-pytest-")) / "02-ran"
        os.environ[READY_ENV] = str(config._pretrained_mark)


def pytest_unconfigure(config):
    if (mark := getattr(config, "_pretrained_mark", None)) is not None:
        shutil.rmtree(mark.parent, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The longest parts first (a stable sort: each file keeps its own order, each notebook its
    cells'); everything that runs notebooks is slow (`-m "not slow"` leaves the quick tests)."""
    items.sort(key=lambda item: LONGEST_FIRST.index(part(item)) if part(item) in LONGEST_FIRST
               else len(LONGEST_FIRST))
    for item in items:
        if is_notebook_cell(item):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup (pyproject.toml's): the notebooks in one unit of work (ALONE's in one each),
    each test file in one, explicit `xdist_group` marks honoured. Other --dist modes are xdist's
    own; the check in pytest_runtest_setup stops a notebook they split."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    root = config.rootpath

    class NotebooksTogether(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = root / nodeid.split("::", 1)[0].split("@", 1)[0]
            if path.suffix == ".ipynb":
                return notebook_part(path)
            group = super()._split_scope(nodeid)  # an xdist_group mark's name, else the whole id
            return group if group != nodeid else str(path)

    return NotebooksTogether(config, log)


def pytest_collectstart(collector):
    """nbval: tqdm bars and warnings go to stderr, which differs run to run; compare stdout only."""
    if IPyNbFile is not None and isinstance(collector, IPyNbFile):
        collector.skip_compare += ("stderr",)


_started: set[str] = set()  # the ids of the tests this process has started


def pytest_runtest_logstart(nodeid, location):
    _started.add(nodeid)


def pytest_runtest_setup(item):
    """A notebook's cells share one kernel: a cell whose earlier cells ran in another process
    would fail with a NameError that hides the cause. Say the cause instead. An ALONE notebook
    waits for 02 when 02 runs in this session (else it would train 02's network a second time)."""
    if not is_notebook_cell(item):
        return
    if (READY_ENV in os.environ and item.path.name in ALONE
            and any(other.path.name == PRETRAIN for other in item.session.items)):
        mark, deadline = Path(os.environ[READY_ENV]), time.monotonic() + 3600
        while not mark.is_file() and time.monotonic() < deadline:  # 02's process died: go on after an hour
            time.sleep(1)
    elsewhere = [other.name for other in item.session.items
                 if other.path == item.path and is_notebook_cell(other)
                 and _index(other) < _index(item) and other.nodeid not in _started]
    if elsewhere:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "this process")
        pytest.fail(
            f"{item.path.name}: {item.name} runs in {worker} without {', '.join(elsewhere)} before "
            f"it: the notebook's cells were handed to more than one process, and they share one "
            f"kernel. Run with --dist loadgroup (the default in pyproject.toml, which keeps the "
            f"notebooks whole) or with -n 0.", pytrace=False)


def _index(item: pytest.Item) -> int:
    return getattr(item, "cell_num", 0)


def pytest_runtest_teardown(item, nextitem):
    """02's last cell has run (passed or not): the ALONE notebooks may start."""
    if (is_notebook_cell(item) and item.path.name == PRETRAIN and READY_ENV in os.environ
            and (nextitem is None or nextitem.path != item.path)):
        Path(os.environ[READY_ENV]).touch()
