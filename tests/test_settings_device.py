"""Settings are validated before any work; the device choice is explicit and explained."""

import os
from dataclasses import replace

import pytest
import torch

from lora_tutorial import MnistError, Settings, describe_device, pick_device
from lora_tutorial.pipeline import preflight
from lora_tutorial.settings import SettingsError, fingerprint, notebook_declared, papermill_parameters


@pytest.mark.parametrize("name, value, message", [
    ("rank", 0, r"rank=0 is not valid: expected an integer >= 1 \(the post uses 1\)\.$"),
    ("rank", "4", r"rank='4' is not valid: expected an integer >= 1"),
    ("target_digit", 10, r"target_digit=10 is not valid: expected an integer between 0 and 9 "
                         r"\(or 'worst', the default: the digit the pre-trained network gets wrong most\)"),
    ("target_digit", "best", r"target_digit='best' is not valid: expected an integer between 0 and 9"),
    ("alpha", -1, r"alpha=-1 is not valid: expected a number > 0 \(the post uses 1\.0\)"),
    ("alpha", float("inf"), r"alpha=inf is not valid"),
    ("seed", -1, r"seed=-1 is not valid: expected an integer >= 0"),
    ("batch_size", 2.5, r"batch_size=2.5 is not valid"),
    ("finetune_steps", True, r"finetune_steps=True is not valid"),
    ("pretrain_epochs", 0, r"pretrain_epochs=0 is not valid"),
    ("learning_rate", 0, r"learning_rate=0 is not valid: expected a number > 0 \(the post uses 0\.001\)"),
    ("train_samples", 0, r"train_samples=0 is not valid: .*\(or None for all 60,000"),
    ("device", "gpu0", r"device='gpu0' is not valid: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("device", "cuda:one", r"device='cuda:one' is not valid"),
    ("device", "cuda:", r"device='cuda:' is not valid"),
    ("device", None, r"device=None is not valid"),
    ("download", "yes", r"download='yes' is not valid: expected True or False"),
    ("output_dir", "", r"output_dir='' is not valid: expected a folder path, or None"),
    ("target_modules", ["linear4"], r"target_modules=\['linear4'\] is not valid: no layer called linear4; "
                                    r"expected a list of distinct layer names from \['linear1', 'linear2', "
                                    r"'linear3'\], or None for all"),
    ("target_modules", [], r"target_modules=\[\] is not valid"),
    ("target_modules", ["linear1", "linear1"], r"is not valid: expected a list of distinct layer names"),
    ("replay_share", 1, r"replay_share=1 is not valid: expected a number from 0 up to, not including, 1 "
                        r"\(0, as in the post, replays nothing; 0.3 puts 3 other-digit images"),
    ("replay_share", -0.1, r"replay_share=-0.1 is not valid"),
    ("replay_share", "0.3", r"replay_share='0.3' is not valid"),
    ("replay_share", 0.04, r"replay_share=0.04 puts 0 of every 10 images from other digits "
                           r"\(batch_size=10\): "
                           r"choose a share that gives between 1 and 9, or 0 for none"),
    ("replay_share", 0.97, r"replay_share=0.97 puts 10 of every 10 images"),
])
def test_bad_values_name_themselves_and_the_fix(name, value, message):
    with pytest.raises(SettingsError, match=message):
        Settings(**{name: value})


def test_rank_is_checked_against_every_targeted_layer():
    with pytest.raises(SettingsError, match=r"rank=11 is too large for layer linear3 \(10 x 2000 weight\): a "
                                            r"rank can be at most min\(out, in\) = 10\. Use rank <= 10 or "
                                            r"leave linear3 out \(target_modules=\['linear1', 'linear2'\]\)"):
        Settings(rank=11)
    assert Settings(rank=10).rank == 10
    assert Settings(rank=64, target_modules=["linear1", "linear2"]).target_modules == ("linear1", "linear2")
    with pytest.raises(SettingsError, match=r"rank=1001 is too large for layer linear2"):
        Settings(rank=1001, target_modules=["linear2"])


def test_one_layer_name_alone_and_lists_are_kept_as_json_lists():
    settings = Settings(target_modules="linear3", target_digit=9)
    assert settings.target_modules == ("linear3",)
    assert settings.as_dict()["target_modules"] == ["linear3"]
    assert settings.finetune_key()["target_modules"] == ["linear3"]
    assert Settings(target_digit=9).finetune_key()["target_modules"] is None


def test_settings_errors_are_value_errors_shown_as_one_line_in_jupyter():
    with pytest.raises(ValueError) as caught:
        Settings(rank=0)
    assert caught.value._render_traceback_() == [
        "SettingsError: rank=0 is not valid: expected an integer >= 1 (the post uses 1)."]


def test_unknown_names_list_the_valid_ones():
    message = r"Unknown setting\(s\) \['lr'\]: the valid names are .*'learning_rate'.*; check the spelling"
    with pytest.raises(SettingsError, match=message):
        Settings.from_mapping({"lr": 0.1})
    assert Settings.from_mapping({"rank": 2, "sweep_jobs": 3}, extra=("sweep_jobs",)).rank == 2


def test_from_globals_reads_only_setting_names():
    settings = Settings.from_globals({"rank": 4, "alpha": 8.0, "plt": object(), "__name__": "x", "digit": 3})
    assert (settings.rank, settings.alpha, settings.seed) == (4, 8.0, 0)


def test_a_parameter_papermill_injected_but_the_notebook_does_not_take_is_an_error():
    """papermill only warns about `-p rnak 4` and runs rank 1; the notebook refuses it, and so it
    does a real setting that its own parameters cell does not declare."""
    history = ["", "seed = 0\nrank = 1\nalpha = 1.0\n", "# Parameters\nrnak = 4\nalpha = 2.0\n", "x = 1"]
    namespace = {"In": history, "seed": 0, "rank": 1, "rnak": 4, "alpha": 2.0}
    assert papermill_parameters(namespace) == ["rnak", "alpha"]
    assert notebook_declared(namespace) == ["seed", "rank", "alpha"]
    with pytest.raises(SettingsError, match=r"This notebook does not take \['rnak'\]: its parameters are "
                                            r"\['seed', 'rank', 'alpha'\], besides \['device', "):
        Settings.from_globals(namespace)
    unused = {"In": ["", "seed = 0\n", "# Parameters\nreplay_share = 0.3\n"], "seed": 0, "replay_share": 0.3}
    with pytest.raises(SettingsError, match=r"does not take \['replay_share'\]"):
        Settings.from_globals(unused)  # a setting, but a knob of another notebook
    # where to run, the folders and 02's recipe are taken without the cell listing them
    injected = "# Parameters\ndevice = 'cpu'\noutput_dir = 'o'\npretrain_epochs = 2\n"
    shared = {"In": ["", "rank = 1\n", injected],
              "rank": 1, "device": "cpu", "output_dir": "o", "pretrain_epochs": 2}
    taken = Settings.from_globals(shared)
    assert (taken.device, taken.output_dir, taken.pretrain_epochs) == ("cpu", "o", 2)
    # our own parameters cell starts "# Parameters: ..." and is not papermill's
    own = {"In": ["", "# Parameters: papermill replaces these\nrank = 2\n"], "rank": 2}
    assert papermill_parameters(own) == [] and notebook_declared(own) is None
    assert Settings.from_globals(own).rank == 2
    extra = {"In": ["", "sweep_jobs = 2\n", "# Parameters\nsweep_jobs = 1\n"], "sweep_jobs": 1}
    assert Settings.from_globals(extra, extra=("sweep_jobs",)).rank == 1


def test_finetune_seed_and_pretrain_loop():
    assert Settings().lora_seed == 0 and Settings(seed=3).lora_seed == 3
    assert Settings(seed=3, finetune_seed=5).lora_seed == 5
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(SettingsError, match=r"finetune_seed=.* is not valid: expected an integer >= 0"):
            Settings(finetune_seed=bad)
    with pytest.raises(SettingsError, match=r"pretrain_loop='slow' is not valid: expected 'fast'"):
        Settings(pretrain_loop="slow")
    decided = Settings(target_digit=9)
    # another fine-tuning seed: another adapter, the same pre-trained network
    assert decided.pretrain_key() == replace(decided, finetune_seed=1).pretrain_key()
    assert decided.finetune_key() != replace(decided, finetune_seed=1).finetune_key()
    # the post's loop trains other weights: another checkpoint; the default key is unchanged
    assert "loop" not in decided.pretrain_key()
    assert decided.pretrain_key() != replace(decided, pretrain_loop="post").pretrain_key()


def test_fingerprints_separate_what_matters():
    base = Settings(target_digit=9)
    pre = fingerprint(base.pretrain_key(), "mnist:60000/10000")
    assert pre == fingerprint(Settings(rank=8, device="cpu").pretrain_key(), "mnist:60000/10000")
    assert pre == fingerprint(Settings(target_modules=["linear1"]).pretrain_key(), "mnist:60000/10000")
    assert pre != fingerprint(Settings(seed=1).pretrain_key(), "mnist:60000/10000")
    assert pre != fingerprint(base.pretrain_key(), "sample:4000/1000")
    fine = fingerprint(base.finetune_key(), "mnist:60000/10000")
    assert fine != fingerprint(Settings(rank=2, target_digit=9).finetune_key(), "mnist:60000/10000")
    assert fine != fingerprint(Settings(alpha=2, target_digit=9).finetune_key(), "mnist:60000/10000")
    last = Settings(target_modules=["linear3"], target_digit=9)
    assert fine != fingerprint(last.finetune_key(), "mnist:60000/10000")
    assert fine != fingerprint(Settings(replay_share=0.3, target_digit=9).finetune_key(), "mnist:60000/10000")
    assert fine == fingerprint(Settings(replay_share=0.0, target_digit=9).finetune_key(), "mnist:60000/10000")
    # 'worst' that turned out to be 9 is the same adapter as 9 given
    decided = Settings(target_digit=9, target_rule="worst")
    assert fine == fingerprint(decided.finetune_key(), "mnist:60000/10000")
    assert fine != fingerprint(Settings(target_digit=8).finetune_key(), "mnist:60000/10000")


def test_the_target_digit_is_a_digit_or_worst_and_must_be_decided_before_fine_tuning():
    assert Settings().target_digit == "worst" and Settings(target_digit=" Worst ").target_digit == "worst"
    assert Settings(target_digit=3).target_rule is None
    with pytest.raises(ValueError, match=r"target_digit='worst' is not decided yet: call "
                                         r"lora_tutorial.choose_target\(settings, pretrained\) first"):
        Settings().finetune_key()
    with pytest.raises(SettingsError, match=r"target_rule='best' is not valid: it is set by choose_target"):
        Settings(target_digit=9, target_rule="best")
    with pytest.raises(SettingsError, match=r"target_rule='worst' is not valid"):
        Settings(target_rule="worst")  # the rule is recorded only once the digit is known
    with pytest.raises(SettingsError, match=r"Unknown setting\(s\) \['target_rule'\]"):
        Settings.from_mapping({"target_rule": "worst"})  # the tutorial sets it, a user does not


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device(" CPU ").type == "cpu"
    line = describe_device(torch.device("cpu"))
    assert line.startswith("Device: cpu = ") and torch.__version__ in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match=r"device='cuda' was asked for, but PyTorch .* sees no GPU here: "
                                            r"use device='auto' or 'cpu', or install PyTorch's ROCm or CUDA"):
        pick_device("cuda")
    with pytest.raises(SettingsError, match=r"device='cuda:1' was asked for"):
        preflight(Settings(device="cuda:1", output_dir=str(tmp_path / "out")))


def test_nonsense_device_lists_the_choices():
    with pytest.raises(SettingsError, match=r"device='gpu0' is not valid: expected 'auto', 'cpu', 'cuda'"):
        pick_device("gpu0")


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SettingsError, match=r"output_dir='.*a-file/out' cannot be written to \(.*\): give "
                                            r"output_dir a folder you can write to"):
        preflight(Settings(output_dir=str(blocker / "out")))
    with pytest.raises(SettingsError, match=r"checkpoint_dir='.*a-file' cannot be written to"):
        preflight(Settings(output_dir=str(tmp_path / "out"), checkpoint_dir=str(blocker)))
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SettingsError, match=r"output_dir=.* cannot be written to"):
            preflight(Settings(output_dir=str(locked)))


def test_an_empty_or_missing_data_folder_is_refused_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = Settings(data_dir=str(empty), output_dir=str(tmp_path / "out"))
    with pytest.raises(MnistError, match=r"The MNIST folder .*empty \(data_dir\) holds no MNIST files: "
                                                    r"place MNIST's four files in .*empty/MNIST/raw"):
        preflight(settings)
    with pytest.raises(MnistError, match=r"The MNIST folder .*nowhere \(data_dir\) does not exist"):
        preflight(Settings(data_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "out")))
