"""Write the README's results table and pictures from what the committed notebooks hold.

`python -m lora_tutorial.tools.readme` rewrites every block between `<!-- begin generated: NAME -->` and
`<!-- end generated: NAME -->` in README.md and in the pages under docs/ from the notebooks'
published results (see `report.py`). It copies the figures the README shows (FIGURES) out of the
notebooks' outputs into docs/. `--check` only compares, and exits 1 when a block or a picture
differs from what the notebooks hold (a test runs it). So numbers and pictures in the README and
the docs are never made by hand.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoints import atomic_write
from ..report import published
from ..settings import project_root

BLOCK = re.compile(r"(<!-- begin generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- end generated: (?P=name) -->)", re.DOTALL)


def _pct(part: float, whole: float) -> str:
    return f"{100 * (1 - part / whole):.0f} %" if whole else "n/a"


def results_table(found: dict[str, dict[str, Any]]) -> str:
    """The post's figures beside this run's (06_compare's results)."""
    r = found["06_compare"]["results"]
    pre, on, off = r["pretrained"], r["lora_on"], r["lora_off"]
    others = f"{r['other_digits_accuracy_before']:.3f} -> {r['other_digits_accuracy_after']:.3f}"
    same = "identical confusion matrix" if r["lora_off_equals_pretrained"] else "NOT identical"
    right = round(pre["accuracy"] * r["data"]["test_images"])
    digit, before, after = r["target_digit"], r["target_wrong_before"], r["target_wrong_after"]
    test_images = r["data"]["test_images"]
    how = "the worst on the training images" if r.get("target_rule") == "worst" else "given"
    return "\n".join([
        "| | the post (AMD GPU) | this tutorial (CPU) |",
        "|---|---|---|",
        f"| pre-trained accuracy | 0.951 | {pre['accuracy']:.3f} ({right:,} of {test_images:,}) |",
        f"| the digit fine-tuned on | 9, its worst on the test images (116 wrong) | {digit}, {how} |",
        f"| wrong answers on that digit, before -> with LoRA | 116 -> 6 | {before} -> {after} "
        f"({_pct(after, before)} fewer) |",
        f"| accuracy with LoRA on | 0.905 | {on['accuracy']:.3f} |",
        f"| mean accuracy of the other nine digits | (not reported) | {others} |",
        f"| accuracy with LoRA off | 0.951, same wrong counts | {off['accuracy']:.3f}, {same} |",
        f"| parameters LoRA trains | 6,794 (0.242 %) | {r['lora_parameters']:,} "
        f"({r['lora_share_percent']:.3f} %) |",
    ])


def shown_location(location: str, root: Path) -> str:
    """A data folder as the docs may show it: relative to the project, or, when it lies outside,
    only its last two parts after a placeholder (a machine's own paths never reach the docs)."""
    path = Path(location)
    if not path.is_absolute():
        return location
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return "<your data folder>/" + "/".join(path.parts[-2:])


def run_summary(found: dict[str, dict[str, Any]]) -> str:
    """The summary `python -m lora_tutorial.tools.run` prints, for the committed run's results."""
    from .run import summary

    results = found["06_compare"]["results"]
    data = {**results["data"], "location": shown_location(results["data"]["location"], project_root())}
    return f"```\n{summary({**results, 'data': data})}\n```"


TABLES: dict[str, Callable[[dict[str, dict[str, Any]]], str]] = {"results": results_table,
                                                                  "run-summary": run_summary}


# The pictures the README shows: file -> (notebook, tag of the cell whose first picture it is)
FIGURES = {"docs/what-lora-learned.png": ("08_why_low_rank", "readme-figure")}


def notebook_figure(path: Path, tag: str) -> bytes:
    """The first PNG that the cell tagged `tag` shows in a committed notebook."""
    for cell in json.loads(Path(path).read_text())["cells"]:
        if tag in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    return base64.b64decode(output["data"]["image/png"])
    raise KeyError(f"{Path(path).name} has no cell tagged {tag!r} that shows a picture.")


def figures(root: Path) -> dict[Path, bytes]:
    """Each README picture's file and the bytes the notebooks hold for it."""
    return {root / name: notebook_figure(root / "notebooks" / f"{notebook}.ipynb", tag)
            for name, (notebook, tag) in FIGURES.items()}


def notebook_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Every committed notebook's published results, by notebook name."""
    return {path.stem: published(path) for path in sorted(folder.glob("*.ipynb"))}


def render(readme: str, found: dict[str, dict[str, Any]]) -> str:
    """The README with every generated block rewritten."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise KeyError(f"README.md has a generated block {name!r} that readme.py does not know.")
        return f"{match.group(1)}{TABLES[name](found)}\n{match.group(4)}"

    return BLOCK.sub(replace, readme)


def documents(root: Path) -> list[Path]:
    """The files that may hold generated blocks: README.md, then every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.tools.readme", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a block differs")
    args = parser.parse_args(argv)
    root = project_root()
    found = notebook_results(root / "notebooks")
    texts = {path: path.read_text() for path in documents(root)}
    new = {path: render(text, found) for path, text in texts.items()}
    pictures = figures(root)
    if args.check:
        stale = [p.relative_to(root).as_posix() for p in texts if new[p] != texts[p]]
        stale += [p.name for p, png in pictures.items() if not p.is_file() or p.read_bytes() != png]
        if stale:
            print(f"Generated tables or pictures ({', '.join(stale)}) differ from the committed notebooks: "
                  "run `python -m lora_tutorial.tools.readme` and commit README.md and docs/.",
                  file=sys.stderr)
            return 1
        print("The generated tables and pictures in README.md and docs/ match the committed notebooks.")
        return 0
    for path, text in new.items():
        if text != texts[path]:
            path.write_text(text)
    for picture, png in pictures.items():
        atomic_write(picture, lambda tmp, png=png: tmp.write_bytes(png))
    blocks = sum(len(BLOCK.findall(text)) for text in new.values())
    print(f"Wrote {blocks} generated block(s) into README.md and docs/, and {len(pictures)} picture(s) "
          "into docs/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
