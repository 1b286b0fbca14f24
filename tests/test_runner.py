"""The runner hands each notebook the parameters its own parameters cell declares, and the settings
every notebook takes (where to run, the folders, 02's recipe)."""

import pytest

import lora_tutorial.tools.run as run_module
from lora_tutorial.settings import SettingsError
from lora_tutorial.tools.run import notebook_parameters, notebooks_dir, split_parameters


def test_each_notebook_declares_only_what_it_uses():
    taken = {p.stem: notebook_parameters(p) for p in sorted(notebooks_dir().glob("[01]*.ipynb"))}
    assert not {"rank", "alpha", "finetune_steps"} & set(taken["01_data"])  # no LoRA before LoRA
    assert not {"rank", "alpha", "finetune_steps", "replay_share"} & set(taken["02_pretrain"])
    assert "rank" in taken["03_parametrize"] and "finetune_steps" not in taken["03_parametrize"]
    assert {"rank", "finetune_steps", "finetune_seed", "replay_share"} <= set(taken["06_compare"])
    for name, names in taken.items():
        assert len(names) == len(set(names)), f"{name} declares a parameter twice"


def test_the_runner_passes_each_notebook_its_own_share_and_refuses_what_none_takes():
    steps = ("01_data", "02_pretrain", "06_compare")
    shares = split_parameters({"rank": 4, "train_samples": 500, "seed": 1}, steps)
    assert shares["01_data"] == {"train_samples": 500, "seed": 1}  # taken everywhere
    assert shares["02_pretrain"] == {"train_samples": 500, "seed": 1}
    assert shares["06_compare"] == {"rank": 4, "train_samples": 500, "seed": 1}
    with pytest.raises(SettingsError, match=r"No notebook run here takes \['rnak'\]: check the spelling"):
        split_parameters({"rnak": 4}, steps)
    with pytest.raises(SettingsError, match=r"\['rank'\]"):
        split_parameters({"rank": 4}, ("01_data", "02_pretrain"))  # a real name, but not used here


def test_a_name_no_notebook_takes_stops_the_command_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr(run_module, "_start_kernel", lambda cwd: pytest.fail("a kernel was started"))
    assert run_module.main(["-p", "rnak", "4", "--only", "01_data"]) == 2
    assert "'rnak'" in capsys.readouterr().err  # the message itself: the test above


def test_the_runner_times_02s_pretraining_cell_apart(tmp_path):
    """The runner's last line splits the time into the pre-training cell and the rest: 02's cell that calls
    `pretrained_model` carries the tag it looks for (an untagged cell made it report 0.0 s)."""
    import json
    import shutil

    copy = shutil.copy(notebooks_dir() / "02_pretrain.ipynb", tmp_path / "02_pretrain.ipynb")
    cells = json.loads(copy.read_text())["cells"]
    timed = [c for c in cells if "pretrained_model(" in "".join(c["source"]) and c["cell_type"] == "code"]
    total, pretraining = run_module._tidy(copy)
    assert len(timed) == 1 and pretraining == timed[0]["metadata"]["papermill"]["duration"] > 0
    assert total > pretraining


def test_the_runners_kernels_draw_text_bars_and_the_callers_environment_stays_as_it_was(monkeypatch):
    """Its executed copies hold plain-text bars (no widgets), and the process that runs it keeps its own."""
    from jupyter_client.blocking import BlockingKernelClient
    from jupyter_core.utils import run_sync

    from lora_tutorial.train import PROGRESS_ENV

    monkeypatch.setenv(PROGRESS_ENV, "widgets")
    kernel = run_module._start_kernel(notebooks_dir())
    try:
        client = BlockingKernelClient(connection_file=kernel.connection_file)
        client.load_connection_file()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        printed = []
        client.execute_interactive(f"import os; print(os.environ.get({PROGRESS_ENV!r}))", timeout=60,
                                   output_hook=lambda m: printed.append(m["content"].get("text")))
        client.stop_channels()
    finally:
        run_sync(kernel.shutdown_kernel)(now=True)
    assert "text\n" in printed
    assert run_module.os.environ[PROGRESS_ENV] == "widgets"
