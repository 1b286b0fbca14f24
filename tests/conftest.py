"""The tests' shared fixtures: MNIST, one pre-trained small network, small settings.

How the suite runs (which MNIST, two processes, the notebooks kept together) is in the project's
root conftest.py, which every pytest run of the project loads, tests/ collected or not.
"""

from __future__ import annotations

import pytest

from lora_tutorial.data import Mnist, load_mnist


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
