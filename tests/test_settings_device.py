"""Settings are validated before any work; the device choice is explicit and explained."""

import pytest
import torch

from lora_tutorial import Settings, describe_device, pick_device
from lora_tutorial.settings import fingerprint


@pytest.mark.parametrize("name, value, message", [
    ("rank", 0, r"rank=0 is not valid: expected an integer >= 1"),
    ("target_digit", 10, r"target_digit=10 is not valid: expected an integer between 0 and 9"),
    ("alpha", -1, r"alpha=-1 is not valid: expected a number > 0"),
    ("batch_size", 2.5, r"batch_size=2.5 is not valid"),
    ("finetune_steps", True, r"finetune_steps=True is not valid"),
    ("learning_rate", 0, r"learning_rate=0 is not valid"),
    ("train_samples", 0, r"train_samples=0 is not valid"),
])
def test_bad_values_name_themselves(name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings(**{name: value})


def test_unknown_names_list_the_valid_ones():
    message = r"Unknown setting\(s\) \['lr'\]: the valid names are .*'learning_rate'"
    with pytest.raises(ValueError, match=message):
        Settings.from_mapping({"lr": 0.1})


def test_from_globals_reads_only_setting_names():
    settings = Settings.from_globals({"rank": 4, "alpha": 8.0, "plt": object(), "__name__": "x"})
    assert (settings.rank, settings.alpha, settings.seed) == (4, 8.0, 0)


def test_fingerprints_separate_what_matters():
    base = Settings()
    pre = fingerprint(base.pretrain_key(), "mnist:60000/10000")
    assert pre == fingerprint(Settings(rank=8, device="cpu").pretrain_key(), "mnist:60000/10000")
    assert pre != fingerprint(Settings(seed=1).pretrain_key(), "mnist:60000/10000")
    assert pre != fingerprint(base.pretrain_key(), "sample:4000/1000")
    fine = fingerprint(base.finetune_key(), "mnist:60000/10000")
    assert fine != fingerprint(Settings(rank=2).finetune_key(), "mnist:60000/10000")
    assert fine != fingerprint(Settings(alpha=2).finetune_key(), "mnist:60000/10000")


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device(" CPU ").type == "cpu"
    line = describe_device(torch.device("cpu"))
    assert line.startswith("Device: cpu = ") and torch.__version__ in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device='cuda' was asked for, but PyTorch sees no GPU here"):
        pick_device("cuda")
    with pytest.raises(ValueError, match=r"device='cuda:1' was asked for"):
        pick_device("cuda:1")


def test_nonsense_device_lists_the_choices():
    with pytest.raises(ValueError, match=r"device='gpu0' is not valid: expected 'auto', 'cpu', 'cuda'"):
        pick_device("gpu0")
