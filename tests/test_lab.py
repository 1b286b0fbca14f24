"""`python -m lora_tutorial.tools.lab`: what it starts, and what it refuses (no browser needed)."""

import os
from pathlib import Path

import pytest

from lora_tutorial.tools import lab


def test_jupyterlab_listens_on_localhost_with_its_token_in_the_notebooks_folder(tmp_path):
    command = lab.lab_command("127.0.0.1", 8890, tmp_path, ["--ServerApp.log_level=WARN"])
    assert command[1:4] == ["-m", "jupyter", "lab"]
    assert "--ip=127.0.0.1" in command and "--port=8890" in command and "--no-browser" in command
    assert f"--ServerApp.root_dir={tmp_path}" in command and command[-1] == "--ServerApp.log_level=WARN"
    assert not any("token" in part for part in command), "the token is left to JupyterLab: on, random"
    assert ("--allow-root" in command) == (os.geteuid() == 0)


@pytest.mark.parametrize("arguments, message", [
    (["--IdentityProvider.token="], "keep the token on"),
    (["--ServerApp.token=''"], "keep the token on"),
    (["--port", "0"], "--port=0"),
    (["--port", "0"], "1 to 65535"),
    (["--notebooks", "no/such/folder"], "no/such/folder"),
])
def test_refusals_come_before_anything_starts(arguments, message, capsys, monkeypatch):
    monkeypatch.setattr(lab, "register_kernel", lambda: pytest.fail("registered before refusing"))
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("started JupyterLab"))
    with pytest.raises(SystemExit) as stopped:
        lab.main(arguments)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_default_folder_is_the_projects_notebooks(monkeypatch, capsys):
    started = []
    monkeypatch.setattr(lab, "register_kernel", lambda: started.append("kernel"))
    monkeypatch.setattr(os, "execv", lambda path, command: started.append(command))
    lab.main(["--port", "8891"])
    assert started[0] == "kernel"
    root = next(p for p in started[1] if p.startswith("--ServerApp.root_dir="))
    assert Path(root.split("=", 1)[1]).name == "notebooks"
    assert "ssh -N -L 8891:localhost:8891" in capsys.readouterr().out
