"""The README's result tables are generated from the committed notebooks, never typed."""

import re

import pytest

from lora_tutorial.readme import BLOCK, FIGURES, figures, main, notebook_figure, notebook_results, render
from lora_tutorial.settings import project_root


def test_the_readme_tables_match_the_committed_notebooks(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().err


def test_a_number_edited_by_hand_in_a_table_is_caught():
    root = project_root()
    readme = (root / "README.md").read_text()
    found = notebook_results(root / "notebooks")
    blocks = {m.group("name") for m in BLOCK.finditer(readme)}
    assert {"results", "rank-study", "beyond", "run-summary"} <= blocks
    edited = readme.replace("| pre-trained accuracy | 0.951 | ", "| pre-trained accuracy | 0.951 | 9", 1)
    assert edited != readme and render(edited, found) != edited  # the check would fail on it
    assert render(edited, found) == readme  # and regenerating restores the notebooks' figure


def test_the_readme_pictures_are_the_notebooks_own_and_a_stale_one_is_caught(tmp_path, capsys, monkeypatch):
    root = project_root()
    pictures = figures(root)
    assert [p.relative_to(root).as_posix() for p in pictures] == list(FIGURES)
    for path, png in pictures.items():
        assert png.startswith(b"\x89PNG") and path.read_bytes() == png
        assert f"]({path.relative_to(root).as_posix()})" in (root / "README.md").read_text()  # shown
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text('{"cells": [{"cell_type": "code", "metadata": {"tags": ["other"]}, "outputs": []}]}')
    with pytest.raises(KeyError, match="nb.ipynb has no cell tagged 'readme-figure' that shows a picture"):
        notebook_figure(notebook, "readme-figure")
    import lora_tutorial.readme as readme

    stale = tmp_path / "what-lora-learned.png"
    stale.write_bytes(b"an older picture")
    monkeypatch.setattr(readme, "figures", lambda root: {stale: next(iter(pictures.values()))})
    assert main(["--check"]) == 1
    assert "pictures (what-lora-learned.png) differ from the committed notebooks" in capsys.readouterr().err
    assert stale.read_bytes() == b"an older picture"  # --check only compares


def test_every_file_the_readme_links_or_shows_is_in_the_project():
    text = (project_root() / "README.md").read_text()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t}
    assert {"docs/explorer.png", "docs/what-lora-learned.png", "notebooks/11_explorer.ipynb"} <= targets
    missing = sorted(t for t in targets if t and not (project_root() / t).exists())
    assert not missing, f"README.md links files that are not in the project: {missing}"
