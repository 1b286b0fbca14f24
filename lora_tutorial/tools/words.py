"""How much a reader reads: words per notebook and in the README, against the budgets.

`python -m lora_tutorial.tools.words` prints one row per document and exits 1 when one is over its
budget (a test runs it). A notebook's words are its markdown cells plus the prose its cells
display: Markdown outputs, and printed lines that read as sentences (tables of numbers and
progress bars do not count). Words are whitespace-separated tokens, as `wc -w` counts them.
The README counts whole. Sentences end at '.', '!' or '?' and at the end of a paragraph,
heading, list item or table row; code blocks are left out of the sentence lengths.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..settings import project_root

POST_PATH = ("01", "02", "03", "04", "05", "06")  # the post's six steps
BUDGET_POST_EACH, BUDGET_POST_TOTAL = 900, 4_000
BUDGET_LATER, BUDGET_README = 1_500, 1_500
MEAN_SENTENCE = 20  # words, at most, on average

FENCE = re.compile(r"```.*?```", re.DOTALL)
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]*]*\s+")


@dataclass(frozen=True)
class Count:
    name: str
    words: int
    sentences: int
    budget: int
    words_in_sentences: int = 0

    @property
    def mean_sentence(self) -> float:
        return self.words_in_sentences / self.sentences if self.sentences else 0.0

    @property
    def over(self) -> bool:
        return self.words > self.budget or self.mean_sentence > MEAN_SENTENCE


def printed_prose(text: str) -> str:
    """The lines of printed output that read as sentences: at least four words with letters in
    them, ending like a sentence."""
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line.endswith((".", "!", "?", ":"))
                     and sum(bool(re.search(r"[A-Za-z]", w)) for w in line.split()) >= 4)


def notebook_prose(path: Path) -> str:
    """The markdown a notebook shows, and the prose its outputs display, one block a paragraph."""
    cells = json.loads(Path(path).read_text())["cells"]
    parts = []
    for cell in cells:
        if cell["cell_type"] == "markdown":
            parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            markdown = output.get("data", {}).get("text/markdown")
            if markdown:
                parts.append("".join(markdown))
            elif output.get("output_type") == "stream" and output.get("name") == "stdout":
                prose = printed_prose("".join(output["text"]))
                if prose:
                    parts.append(prose)
    return "\n\n".join(parts)


def sentences(text: str) -> list[str]:
    """Sentences of prose: code blocks out; paragraphs, headings, list items, rows split."""
    found = []
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*] |\d+\. |#|\|))", FENCE.sub("", text)):
        block = " ".join(block.split())
        found += [s for s in SENTENCE_END.split(block) if re.search(r"[A-Za-z]", s)]
    return found


def count(name: str, text: str, budget: int, words: int | None = None) -> Count:
    said = sentences(text)
    return Count(name, len(text.split()) if words is None else words, len(said), budget,
                 sum(len(s.split()) for s in said))


def counts(root: Path | None = None) -> list[Count]:
    """One row per notebook, then the README."""
    root = root or project_root()
    rows = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        key = path.name[:2]
        rows.append(count(path.stem, notebook_prose(path),
                          BUDGET_POST_EACH if key in POST_PATH else BUDGET_LATER))
    readme = (root / "README.md").read_text()
    rows.append(count("README.md", readme, BUDGET_README))
    return rows


def post_path_total(rows: list[Count]) -> int:
    return sum(r.words for r in rows if r.name[:2] in POST_PATH)


def report(rows: list[Count]) -> str:
    lines = [f"{'document':28s} {'words':>6s} {'budget':>6s} {'sentences':>9s} {'mean':>5s}"]
    for r in rows:
        mark = "  OVER" if r.over else ""
        lines.append(f"{r.name:28s} {r.words:6,d} {r.budget:6,d} {r.sentences:9d} "
                     f"{r.mean_sentence:5.1f}{mark}")
    total = post_path_total(rows)
    lines.append(f"{'01-06 together':28s} {total:6,d} {BUDGET_POST_TOTAL:6,d}"
                 + ("  OVER" if total > BUDGET_POST_TOTAL else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    rows = counts()
    print(report(rows))
    over = any(r.over for r in rows) or post_path_total(rows) > BUDGET_POST_TOTAL
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
