"""No stale numbers: a number quoted in a notebook's prose is a fact or comes from its own outputs.

Numbers from a run are written into the notebooks by code (printed, or shown as Markdown built from
the results), so they change when the run does. A number typed into a markdown cell must either
appear in that notebook's own outputs or code, or be a fixed fact listed below (the post's published
figures, the network's shape, MNIST's sizes). Editing a quoted result by hand, or re-running a
notebook so that its prose no longer matches, fails here.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])\d+(?:\.\d+)?")
# Facts that no run changes: MNIST and the network's shape, the post's and the paper's published
# figures, a measurement of the post's own code on a 2-core CPU (benchmarks/bench_tutorial.py),
# years, versions and section numbers of papers.
FACTS = {
    "28", "784", "1,000", "2,000", "60,000", "10,000", "70,000", "5,000", "500", "400", "100",
    "0.1307", "0.3081", "255", "2,807,010", "6,794", "3,000", "2,000,000", "32", "64",
    "0.951", "116", "0.905", "300", "0.962", "0.964",  # the post's figures; its code on CPUs
    "175", "3", "4.1", "7", "1.9", "1.7", "2021", "2020", "2023", "2024", "0.001",
    "0.17", "0.19",  # PEFT versions: target_parameters; set_adapter(..., inference_mode=True)
    "2.3",  # ln 10, the loss of a guess among ten digits
    "664", "1514",  # PEFT's issues on what LoRA saves (13)
    "0.036", "0.022", "0.021", "0.013", "50", "80",  # Kaiming's bounds 1/sqrt(784), 1/sqrt(2000),
    # their standard deviations (bound / sqrt(3)); N(0, 1)'s is 50-80 times those
}
SMALL = 16  # small whole numbers (digits, ranks, layers, steps of an example) are never results


def numbers(text: str) -> set[str]:
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets: file names such as 02_pretrain
    text = re.sub(r"https?://\S+|arXiv:\S+", "", text)  # addresses and paper numbers
    text = re.sub(r"`[^`]*`", "", text)  # code spans: parameter values and names
    return {n for n in NUMBER.findall(text) if not (n.isdigit() and int(n) <= SMALL)}


def quoted_but_unsupported(notebook: dict) -> dict[str, list[str]]:
    """Numbers in markdown cells found neither in the notebook's outputs or code nor among FACTS."""
    support = []
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            support.append("".join(cell["source"]))
            for output in cell.get("outputs", []):
                support.append("".join(output.get("text", "")))
                for value in output.get("data", {}).values():
                    support.append(value if isinstance(value, str) else json.dumps(value))
    found = set().union(*(numbers(text) for text in support)) | {
        n.replace(",", "") for text in support for n in NUMBER.findall(text)}
    stale = {}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "markdown":
            missing = sorted(n for n in numbers("".join(cell["source"]))
                             if n not in FACTS and n not in found and n.replace(",", "") not in found)
            if missing:
                stale[f"cell {index}"] = missing
    return stale


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_number_in_the_prose_is_a_fact_or_in_the_notebooks_own_outputs(path):
    stale = quoted_but_unsupported(json.loads(path.read_text()))
    assert not stale, (f"{path.name}: numbers in the prose that no output shows (write them by code, "
                       f"or list a fixed fact in FACTS): {stale}")


def test_a_number_edited_by_hand_is_caught():
    notebook = {"cells": [
        {"cell_type": "code", "source": ["print(97)"], "outputs": [{"text": ["97 wrong answers\n"]}]},
        {"cell_type": "markdown", "source": ["The digit had 97 wrong answers."]},
    ]}
    assert quoted_but_unsupported(notebook) == {}
    notebook["cells"][1]["source"] = ["The digit had 93 wrong answers."]
    assert quoted_but_unsupported(notebook) == {"cell 1": ["93"]}
