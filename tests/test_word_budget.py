"""The word budgets: what a reader reads, counted by `word_budget.py` beside this file."""

import json

import nbformat
from word_budget import (
    BUDGET_POST_TOTAL,
    MEAN_SENTENCE,
    counts,
    main,
    notebook_prose,
    post_path_total,
    report,
    sentences,
)


def test_every_document_is_within_its_budget(capsys):
    rows = counts()
    print(report(rows))  # each notebook's count, shown with -s or -rP
    over = [f"{r.name}: {r.words} words (budget {r.budget}), mean sentence {r.mean_sentence:.1f}"
            for r in rows if r.over]
    assert not over, "over budget:\n" + "\n".join(over)
    assert post_path_total(rows) <= BUDGET_POST_TOTAL
    assert {r.name[:2] for r in rows} >= {"01", "06", "11"} and rows[-1].name == "README.md"


def test_the_count_takes_markdown_and_printed_prose_but_not_tables_or_code(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title\n\nOne short sentence here. And a second one.\n\n"
                                              "```python\nx = 1  # not counted as a sentence\n```"),
                nbformat.v4.new_code_cell("print()")]
    nb.cells[1].outputs = [
        nbformat.v4.new_output("stream", name="stdout",
                               text="The frozen weights did not move at all.\n 0.1  0.2  0.3  0.4  0.5\n"
                                    "Fine-tuning: 100%|#####| 100/100\n"),
        nbformat.v4.new_output("display_data", data={"text/markdown": "Digit **9** got better."})]
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    prose = notebook_prose(path)
    assert "frozen weights" in prose and "Digit **9**" in prose
    assert "0.3" not in prose and "100/100" not in prose
    said = sentences(prose)
    assert "One short sentence here." in said and "And a second one." in said
    assert not any("x = 1" in s for s in said) and "# Title" in said


def test_a_long_winded_readme_fails_the_check(tmp_path, monkeypatch, capsys):
    (tmp_path / "notebooks").mkdir()
    sentence = " ".join(["word"] * (MEAN_SENTENCE + 5)) + ". "
    (tmp_path / "README.md").write_text(sentence * 10)
    monkeypatch.setattr("word_budget.project_root", lambda: tmp_path)
    assert main([]) == 1
    assert "README.md" in capsys.readouterr().out and "OVER" in report(counts(tmp_path))
    (tmp_path / "README.md").write_text("A short README. It says what it is.\n")
    assert main([]) == 0
