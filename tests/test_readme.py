"""The README's result tables are generated from the committed notebooks, never typed."""

from lora_tutorial.readme import BLOCK, main, notebook_results, render
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
