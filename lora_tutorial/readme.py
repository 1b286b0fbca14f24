"""Write the README's result tables from the results the committed notebooks published.

`python -m lora_tutorial.readme` rewrites every block between `<!-- begin generated: NAME -->` and
`<!-- end generated: NAME -->` in README.md from the notebooks' published results (see
`report.py`); `--check` only compares, and exits 1 when a table differs from what the notebooks
say (a test runs it). Numbers in those tables are therefore never typed by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import published
from .settings import project_root

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


def _spread(cell: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    """'11.0 (8.0-13.0)': a mean over seeds and its range."""
    if not cell:
        return "-"
    mean, low, high = (f"{cell[k] * scale:.{digits}f}" for k in ("mean", "low", "high"))
    return mean if low == high else f"{mean} ({low}-{high})"


def rank_table(found: dict[str, dict[str, Any]]) -> str:
    """07's main sweep (alpha fixed): validation and test figures per rank, and the chosen rank."""
    study = found["07_rank_sweep"]["rank_study"]
    before, digit = study["pretrained"], study["settings"]["target_digit"]
    seeds = len(study["seeds"])
    lines = [f"| rank (alpha = 1) | digit {digit} wrong, validation | other digits %, validation | "
             f"digit {digit} wrong, test | other digits %, test |",
             "|---|---|---|---|---|",
             f"| pre-trained | {before['validation_target_wrong']} | "
             f"{100 * before['validation_others_accuracy']:.1f} | {before['test_target_wrong']} | "
             f"{100 * before['test_others_accuracy']:.1f} |"]
    for e in study["summary"]["main"]:
        mark = " (chosen)" if e["rank"] == study["choice"]["rank"] else ""
        lines.append(f"| {e['rank']}{mark} | {_spread(e.get('validation_target_wrong'))} | "
                     f"{_spread(e.get('validation_others_accuracy'), 100)} | "
                     f"{_spread(e.get('test_target_wrong'))} | "
                     f"{_spread(e.get('test_others_accuracy'), 100)} |")
    lines.append("")
    lines.append(f"Mean (min-max) over {seeds} fine-tuning seeds. Chosen on the validation images: rank "
                 f"{study['choice']['rank']}, {study['choice']['reason']}.")
    return "\n".join(lines)


TABLES: dict[str, Callable[[dict[str, dict[str, Any]]], str]] = {"results": results_table,
                                                                  "rank-study": rank_table}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.readme", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a table differs")
    args = parser.parse_args(argv)
    root = project_root()
    path = root / "README.md"
    text = path.read_text()
    new = render(text, notebook_results(root / "notebooks"))
    if args.check:
        if new != text:
            print("README.md's generated tables differ from the committed notebooks' results: run "
                  "`python -m lora_tutorial.readme` and commit README.md.", file=sys.stderr)
            return 1
        print("README.md's generated tables match the committed notebooks.")
        return 0
    path.write_text(new)
    print(f"Wrote {len(BLOCK.findall(new))} generated table(s) into README.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
