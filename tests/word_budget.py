"""`python tests/word_budget.py`: words (as `wc -w`) per notebook and in the README against the budgets,
exit 1 when one is over. A notebook counts its markdown and the prose its cells display. The project's
check on its own prose, beside the test that applies it; not part of the tutorial's package."""

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_tutorial.settings import project_root

POST_PATH = ("01", "02", "03", "04", "05", "06")  # the post's steps
BUDGET_POST_EACH, BUDGET_POST_TOTAL, BUDGET_LATER, BUDGET_README = 900, 4_000, 1_500, 1_500
MEAN_SENTENCE = 20  # words, at most, on average
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]*]*\s+")

@dataclass(frozen=True)
class Count:
    name: str
    words: int
    sentences: int
    budget: int
    mean_sentence: float  # words

    @property
    def over(self) -> bool:
        return self.words > self.budget or self.mean_sentence > MEAN_SENTENCE

def notebook_prose(path: Path) -> str:
    """The markdown a notebook shows, and the prose its outputs display, one block a paragraph."""
    parts = []
    for cell in json.loads(Path(path).read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            if markdown := output.get("data", {}).get("text/markdown"):
                parts.append("".join(markdown))
            elif output.get("output_type") == "stream" and output.get("name") == "stdout":
                lines = [line.strip() for line in "".join(output["text"]).splitlines()]
                parts.append("\n".join(line for line in lines if line.endswith((".", "!", "?", ":"))  # prose
                                       and sum(bool(re.search(r"[A-Za-z]", w)) for w in line.split()) >= 4))
    return "\n\n".join(part for part in parts if part)

def sentences(text: str) -> list[str]:
    """Sentences of prose: code blocks out; paragraphs, headings, list items, rows split."""
    blocks = re.split(r"\n\s*\n|\n(?=\s*(?:[-*] |\d+\. |#|\|))", re.sub(r"(?s)```.*?```", "", text))
    return [s for block in blocks for s in SENTENCE_END.split(" ".join(block.split()))
            if re.search(r"[A-Za-z]", s)]

def count(name: str, text: str, budget: int) -> Count:
    said = sentences(text)
    return Count(name, len(text.split()), len(said), budget, len(" ".join(said).split()) / (len(said) or 1))

def counts(root: Path | None = None) -> list[Count]:
    """One row per notebook, then the README."""
    root = root or project_root()
    rows = [count(p.stem, notebook_prose(p), BUDGET_POST_EACH if p.name[:2] in POST_PATH else BUDGET_LATER)
            for p in sorted((root / "notebooks").glob("*.ipynb"))]
    return [*rows, count("README.md", (root / "README.md").read_text(), BUDGET_README)]

def post_path_total(rows: list[Count]) -> int:
    return sum(r.words for r in rows if r.name[:2] in POST_PATH)

def report(rows: list[Count]) -> str:
    together = Count("01-06 together", post_path_total(rows), 0, BUDGET_POST_TOTAL, 0.0)
    return "\n".join([f"{'document':28s} {'words':>6s} {'budget':>6s} {'sentences':>9s} {'mean':>5s}"] + [
        f"{r.name:28s} {r.words:6,d} {r.budget:6,d} {r.sentences:9d} {r.mean_sentence:5.1f}"
        + ("  OVER" if r.over else "") for r in [*rows, together]])

def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    rows = counts()
    print(report(rows))
    return 1 if any(r.over for r in rows) or post_path_total(rows) > BUDGET_POST_TOTAL else 0

if __name__ == "__main__":
    sys.exit(main())
