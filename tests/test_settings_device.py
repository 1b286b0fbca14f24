"""Settings are validated before any work; the device choice is explicit and explained."""

import os
from dataclasses import replace

import pytest
import torch

from lora_tutorial import MnistError, Settings, describe_device, pick_device
from lora_tutorial.pipeline import preflight
from lora_tutorial.settings import SettingsError, check_whole_numbers, fingerprint

# (setting, bad value, what the message names: the value, the limit, the fix)
BAD_VALUES = [
    ("rank", 0, ["rank=0", ">= 1", "the post uses 1"]),
    ("rank", "4", ["rank='4'", "an integer >= 1"]),
    ("target_digit", 10, ["target_digit=10", "between 0 and 9", "or 'worst'"]),
    ("target_digit", "best", ["target_digit='best'", "between 0 and 9"]),
    ("alpha", -1, ["alpha=-1", "> 0", "the post uses 1.0"]),
    ("alpha", float("inf"), ["alpha=inf", "> 0"]),
    ("seed", -1, ["seed=-1", ">= 0", "e.g. 0"]),
    ("batch_size", 2.5, ["batch_size=2.5", ">= 1", "the post uses 10"]),
    ("finetune_steps", True, ["finetune_steps=True", ">= 1", "the post uses 100"]),
    ("pretrain_epochs", 0, ["pretrain_epochs=0", ">= 1", "the post uses 1"]),
    ("learning_rate", 0, ["learning_rate=0", "> 0", "the post uses 0.001"]),
    ("finetune_learning_rate", 0, ["finetune_learning_rate=0", "> 0", "or None for learning_rate"]),
    ("train_samples", 0, ["train_samples=0", ">= 1", "or None for all 60,000"]),
    ("device", "gpu0", ["device='gpu0'", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"]),
    ("device", "cuda:one", ["device='cuda:one'", "'cuda:N'"]),
    ("device", "cuda:", ["device='cuda:'", "'cuda:N'"]),
    ("device", None, ["device=None", "'auto'"]),
    ("download", "yes", ["download='yes'", "True or False"]),
    ("output_dir", "", ["output_dir=''", "a folder path, or None"]),
    ("pretrain_loop", "slow", ["pretrain_loop='slow'", "'fast'", "'post'", "'graphed'"]),
    ("target_modules", ["linear4"], ["target_modules=['linear4']", "no layer called linear4",
                                     "['linear1', 'linear2', 'linear3'], or None"]),
    ("target_modules", [], ["target_modules=[]", "distinct layer names"]),
    ("target_modules", ["linear1", "linear1"], ["target_modules=['linear1', 'linear1']", "distinct"]),
    ("target_modules", 3, ["target_modules=3", "a list of distinct layer names"]),
    ("replay_share", 1, ["replay_share=1", "up to, not including, 1", "0.3 puts 3 other-digit images"]),
    ("replay_share", -0.1, ["replay_share=-0.1", "from 0 up to"]),
    ("replay_share", "0.3", ["replay_share='0.3'", "from 0 up to"]),
    ("replay_share", 0.04, ["replay_share=0.04", "puts 0 of every 10", "between 1 and 9, or 0 for none"]),
    ("replay_share", 0.97, ["replay_share=0.97", "puts 10 of every 10", "between 1 and 9"]),
    ("finetune_seed", -1, ["finetune_seed=-1", ">= 0", "or None to use seed"]),
    ("finetune_seed", 1.5, ["finetune_seed=1.5", ">= 0"]),
    ("finetune_seed", "1", ["finetune_seed='1'", ">= 0"]),
    ("finetune_seed", True, ["finetune_seed=True", ">= 0"]),
]


@pytest.mark.parametrize("name, value, named", BAD_VALUES)
def test_bad_values_name_themselves_the_limit_and_the_fix(name, value, named):
    with pytest.raises(SettingsError) as caught:
        Settings(**{name: value})
    message = str(caught.value)
    assert all(part in message for part in named), message


def test_rank_is_checked_against_every_targeted_layer():
    """The one place the rank-too-large message is checked: the value, the layer, the limit, the fix."""
    with pytest.raises(SettingsError) as caught:
        Settings(rank=11)
    message = str(caught.value)
    for part in ("rank=11", "linear3 (10 x 2000 weight)", "rank <= 10",
                 "leave linear3 out (target_modules=['linear1', 'linear2'])"):
        assert part in message, message
    assert Settings(rank=10).rank == 10
    assert Settings(rank=64, target_modules=["linear1", "linear2"]).target_modules == ("linear1", "linear2")
    with pytest.raises(SettingsError, match=r"rank=1001 .* linear2") as caught:
        Settings(rank=1001, target_modules=["linear2"])
    assert "leave" not in str(caught.value)  # the only layer: nothing to leave out


def test_a_notebook_that_takes_no_target_modules_is_not_told_to_change_them():
    """12 adapts every layer and takes `rank` alone: its fix is a smaller rank, not another setting."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_globals({"rank": 16})
    assert "Use rank <= 10." in str(caught.value) and "target_modules" not in str(caught.value)
    for takes in ({"rank": 16, "target_modules": None}, {"rank": 16, "In": ["", "rank = 1\n"]}):
        extra = ("target_modules",) if "In" in takes else ()
        with pytest.raises(SettingsError, match=r"leave linear3 out \(target_modules="):
            Settings.from_globals(takes, extra=extra)


def test_one_layer_name_alone_and_lists_are_kept_as_json_lists():
    settings = Settings(target_modules="linear3", target_digit=9)
    assert settings.target_modules == ("linear3",)
    assert settings.as_dict()["target_modules"] == ["linear3"]
    assert settings.finetune_key()["target_modules"] == ["linear3"]
    assert Settings(target_digit=9).finetune_key()["target_modules"] is None


def test_settings_errors_are_value_errors_shown_as_one_line_in_jupyter():
    with pytest.raises(ValueError) as caught:
        Settings(rank=0)
    assert caught.value._render_traceback_() == [f"SettingsError: {caught.value}"]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(SettingsError, match=r"\['lr'\].*'learning_rate'.*check the spelling"):
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
    with pytest.raises(SettingsError, match=r"does not take \['rnak'\]: its parameters are "
                                            r"\['seed', 'rank', 'alpha'\], besides \['device', "):
        Settings.from_globals(namespace)
    assert Settings.from_globals({**namespace, "In": history[:2] + history[3:]}).alpha == 2.0  # by hand
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
    assert Settings.from_globals({**own, "rnak": 4}).rank == 2  # nothing injected: nothing refused
    extra = {"In": ["", "sweep_jobs = 2\n", "# Parameters\nsweep_jobs = 1\n"], "sweep_jobs": 1}
    assert Settings.from_globals(extra, extra=("sweep_jobs",)).rank == 1


def test_finetune_seed_and_pretrain_loop():
    assert Settings().lora_seed == 0 and Settings(seed=3).lora_seed == 3
    assert Settings(seed=3, finetune_seed=5).lora_seed == 5
    decided = Settings(target_digit=9)
    # another fine-tuning seed: another adapter, the same pre-trained network
    assert decided.pretrain_key() == replace(decided, finetune_seed=1).pretrain_key()
    assert decided.finetune_key() != replace(decided, finetune_seed=1).finetune_key()
    # the post's loop trains other weights: another checkpoint; the default key is unchanged
    assert "loop" not in decided.pretrain_key()
    assert decided.pretrain_key() != replace(decided, pretrain_loop="post").pretrain_key()
    keys = {replace(decided, pretrain_loop=loop).pretrain_key()["loop"] for loop in ("post", "graphed")}
    assert keys == {"post", "graphed"}  # each its own checkpoint: a GPU's graphed run rounds its own way


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
    with pytest.raises(SettingsError, match=r"device='cuda'.* no GPU .*device='auto' or 'cpu'.*docs/gpus.md"):
        pick_device("cuda")
    with pytest.raises(SettingsError, match=r"device='cuda:1' was asked for"):
        preflight(Settings(device="cuda:1", output_dir=str(tmp_path / "out")))


def test_nonsense_device_is_refused_by_pick_device_too():
    with pytest.raises(SettingsError, match=r"device='gpu0'"):
        pick_device("gpu0")


def test_lists_of_whole_numbers():
    assert check_whole_numbers("ranks", (1, 4), "[1, 4]") == [1, 4]
    for bad in ([], [0], [1.5], [True], 4):
        with pytest.raises(SettingsError, match=r"ranks=.*whole numbers >= 1, e.g. \[1, 4\]"):
            check_whole_numbers("ranks", bad, "[1, 4]")
    with pytest.raises(SettingsError, match=r"ranks='1,4'.*give a list with -y '\{ranks: \[1, 4\]\}'"):
        check_whole_numbers("ranks", "1,4", "[1, 4]")  # papermill's -p passes text


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SettingsError, match=r"output_dir='.*a-file/out' cannot be written to \(.*a-file is a "
                                            r"file.*\): give output_dir a folder you can write to"):
        preflight(Settings(output_dir=str(blocker / "out")))
    with pytest.raises(SettingsError, match=r"checkpoint_dir='.*a-file' cannot be written to"):
        preflight(Settings(output_dir=str(tmp_path / "out"), checkpoint_dir=str(blocker)))
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SettingsError, match=r"output_dir=.* cannot be written to \(no permission"):
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


def test_a_gpu_index_beyond_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto").type == "cuda" and pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(SettingsError, match=r"device='cuda:2'.* only 2 GPU\(s\) .*cuda:0 to cuda:1"):
        pick_device("cuda:2")
