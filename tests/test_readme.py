"""The README's results table and the docs' run summary are generated from the committed notebooks,
never typed; every link in the README and the docs leads somewhere in the project."""

import re
from pathlib import Path

import pytest

from lora_tutorial.report import published
from lora_tutorial.settings import project_root
from lora_tutorial.tools import readme
from lora_tutorial.tools.readme import (
    BLOCK,
    FIGURES,
    block_data,
    documents,
    figures,
    main,
    notebook_figure,
    render,
)


def test_the_readme_tables_match_the_committed_notebooks(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().err


def test_a_number_edited_by_hand_in_a_table_is_caught():
    root = project_root()
    readme = (root / "README.md").read_text()
    found = block_data(root)
    assert found["results"] == published(root / "notebooks" / "06_compare.ipynb")["results"]
    assert found["lora-family"] == published(root / "notebooks" / "12_lora_family.ipynb")["lora_family"]
    memory = published(root / "notebooks" / "13_memory_and_qlora.ipynb")["memory_and_qlora"]
    assert found["memory-and-qlora"] == memory and memory["readme"] in readme  # 13 writes its own block
    blocks = {m.group("name") for m in BLOCK.finditer(readme)}
    assert blocks == {"results", "lora-family", "memory-and-qlora"}
    assert {m.group("name") for m in BLOCK.finditer((root / "docs" / "running.md").read_text())} == {
        "run-summary"}
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
    with pytest.raises(KeyError, match="nb.ipynb .*'readme-figure'"):
        notebook_figure(notebook, "readme-figure")
    stale = tmp_path / "what-lora-learned.png"
    stale.write_bytes(b"an older picture")
    monkeypatch.setattr(readme, "figures", lambda root: {stale: next(iter(pictures.values()))})
    assert main(["--check"]) == 1
    error = capsys.readouterr().err
    assert "what-lora-learned.png" in error and "python -m lora_tutorial.tools.readme" in error  # the fix
    assert stale.read_bytes() == b"an older picture"  # --check only compares


def test_the_run_summary_shows_no_path_of_the_machine_that_ran_it(tmp_path):
    root = tmp_path / "project"
    shown = readme.shown_location
    assert shown("data/MNIST/raw", root) == "data/MNIST/raw"
    assert shown(str(root / "data" / "MNIST" / "raw"), root) == "data/MNIST/raw"
    assert shown(str(tmp_path / "elsewhere" / "MNIST" / "raw"), root) == "<your data folder>/MNIST/raw"
    summary = (project_root() / "docs" / "running.md").read_text()
    location = summary.split("Data: ", 1)[1].split(" (", 1)[0]
    assert location.endswith("MNIST/raw") and not Path(location).is_absolute(), location


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_link_in_the_readme_and_the_docs_leads_to_a_file_in_the_project():
    root = project_root().resolve()
    checked = 0
    for document in documents(root):
        text = document.read_text()
        assert "../shared" not in text, f"{document.name} points at a folder outside the project"
        for target in LINK.findall(text):
            checked += 1
            if target.startswith(("http://", "https://")):
                continue
            assert "://" not in target, f"{document.name} links {target!r}: only http(s) addresses"
            path = (document.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(root) and path.is_file(), \
                f"{document.relative_to(root)} links {target!r}, which is not a file in the project"
    assert checked > 20


def test_the_readme_shows_its_pictures_and_links_every_notebook_and_every_docs_page():
    root = project_root()
    targets = {t.split("#")[0] for t in LINK.findall((root / "README.md").read_text())}
    assert {"docs/explorer.png", "docs/what-lora-learned.png"} <= targets
    notebooks = {p.relative_to(root).as_posix() for p in (root / "notebooks").glob("*.ipynb")}
    pages = {p.relative_to(root).as_posix() for p in (root / "docs").glob("*.md")}
    assert pages, "docs/ holds no pages"
    assert not notebooks - targets, f"README.md does not link {sorted(notebooks - targets)}"
    assert not pages - targets, f"README.md does not link {sorted(pages - targets)}"
