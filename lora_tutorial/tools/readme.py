"""`python -m lora_tutorial.tools.readme`: README.md's and docs/'s generated blocks (BLOCK) rewritten
from the results the notebooks publish (TABLES), FIGURES copied from them. `--check` only compares."""

import argparse
import base64
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..checkpoints import atomic_write
from ..report import published
from ..settings import project_root
from ..studies.stats import spread
from .run import summary

BLOCK = re.compile(r"(<!-- begin generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- end generated: (?P=name) -->)", re.DOTALL)
# The pictures the README shows: file -> (notebook, tag of the cell whose first picture it is)
FIGURES = {"docs/what-lora-learned.png": ("08_why_low_rank", "readme-figure")}

def results_table(r: dict[str, Any]) -> str:
    """The post's figures beside this run's (06_compare's results)."""
    before, after, images = r["target_wrong_before"], r["target_wrong_after"], r["data"]["test_images"]
    fewer = f"{100 * (1 - after / before):.0f} %" if before else "n/a"
    how = "the worst on the training images" if r.get("target_rule") == "worst" else "given"
    same = "identical confusion matrix" if r["lora_off_equals_pretrained"] else "NOT identical"
    pre, right = r["pretrained"]["accuracy"], round(r["pretrained"]["accuracy"] * images)
    return "\n".join([
        "| | the post (AMD GPU) | this tutorial (CPU) |", "|---|---|---|",
        f"| pre-trained accuracy | 0.951 | {pre:.3f} ({right:,} of {images:,}) |",
        f"| the digit fine-tuned on | 9, its worst on the test images (116 wrong) | {r['target_digit']}, "
        f"{how} |", f"| wrong answers on that digit, before -> with LoRA | 116 -> 6 | {before} -> {after} "
        f"({fewer} fewer) |",
        f"| accuracy with LoRA on | 0.905 | {r['lora_on']['accuracy']:.3f} |",
        f"| mean accuracy of the other nine digits | (not reported) | "
        f"{r['other_digits_accuracy_before']:.3f} -> {r['other_digits_accuracy_after']:.3f} |",
        f"| accuracy with LoRA off | 0.951, same wrong counts | {r['lora_off']['accuracy']:.3f}, {same} |",
        f"| parameters LoRA trains | 6,794 (0.242 %) | {r['lora_parameters']:,} "
        f"({r['lora_share_percent']:.3f} %) |"])

def shown_location(location: str, root: Path) -> str:
    """A data folder relative to the project, or only its last two parts (no machine paths in the docs)."""
    if not (path := Path(location)).is_absolute():
        return location
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else \
        "<your data folder>/" + "/".join(path.parts[-2:])

def run_summary(r: dict[str, Any]) -> str:
    """The summary `python -m lora_tutorial.tools.run` prints, for the committed run's results."""
    data = {**r["data"], "location": shown_location(r["data"]["location"], project_root())}
    return f"```\n{summary({**r, 'data': data})}\n```"

def family_table(r: dict[str, Any]) -> str:
    """12_lora_family's methods at their tuned rates, on the test images, with the rule it tested."""
    digit, rates = r["settings"]["target_digit"], r["chosen_rates"]
    lines = [f"| method | numbers trained | tuned rate | digit {digit} wrong | other digits % |",
             "|---|---|---|---|---|"]
    for method in r["methods"]:
        runs = [row for row in r["tuned"] if row["method"] == method]
        wrong = spread([x["target_wrong"] for x in runs])
        others = spread([x["others_accuracy"] for x in runs])
        lines.append(f"| {method} | {r['trained'][method]:,} | {rates[method]:.2g} | {wrong.text(1)} | "
                     f"{others.text(1, 100)} |")
    ratios = ", ".join(f"{x:.3g}" for x in r["rate_ratio_per_seed"])
    gap = max(row[k] for row in r["peft_check"] for k in row if k.startswith("logit gap"))
    return "\n".join([*lines, "", f"Mean (min-max) of {len(r['seeds'])} seeds; rates tuned on the validation "
                      f"images.", f"LoRA's best rate over full fine-tuning's, per tuning seed: {ratios}.",
                      f"Largest logit gap to PEFT's version of each method: {gap:.1e}."])

# Each block: the notebook, the name of the result it publishes, and what writes the block from it.
TABLES = {"results": ("06_compare", "results", results_table),
          "run-summary": ("06_compare", "results", run_summary),
          "lora-family": ("12_lora_family", "lora_family", family_table),
          "memory-and-qlora": ("13_memory_and_qlora", "memory_and_qlora", lambda r: r["readme"])}  # its own

def block_data(root: Path) -> dict[str, dict[str, Any]]:
    """Each block's data, as its committed notebook published it."""
    found = {notebook: published(root / "notebooks" / f"{notebook}.ipynb")
             for notebook, _, _ in TABLES.values()}
    return {block: found[notebook][name] for block, (notebook, name, _) in TABLES.items()}

def notebook_figure(path: Path, tag: str) -> bytes:
    """The first PNG that the cell tagged `tag` shows in a committed notebook."""
    for cell in json.loads(Path(path).read_text())["cells"]:
        for output in cell.get("outputs", []) if tag in cell.get("metadata", {}).get("tags", []) else []:
            if "image/png" in output.get("data", {}):
                return base64.b64decode(output["data"]["image/png"])
    raise KeyError(f"{Path(path).name} has no cell tagged {tag!r} that shows a picture.")

def figures(root: Path) -> dict[Path, bytes]:
    return {root / name: notebook_figure(root / "notebooks" / f"{notebook}.ipynb", tag)
            for name, (notebook, tag) in FIGURES.items()}

def render(text: str, data: dict[str, dict[str, Any]]) -> str:
    """The document with every generated block rewritten from its data (`block_data`)."""
    if unknown := {match["name"] for match in BLOCK.finditer(text)} - set(TABLES):
        raise KeyError(f"Generated blocks {sorted(unknown)} that readme.py does not know.")
    def block(match: re.Match) -> str:
        return f"{match[1]}{TABLES[match['name']][2](data[match['name']])}\n{match[4]}"
    return BLOCK.sub(block, text)

def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.tools.readme", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a block differs")
    check, root = parser.parse_args(argv).check, project_root()
    data, texts = block_data(root), {path: path.read_text() for path in documents(root)}
    changed = {path: new for path, text in texts.items() if (new := render(text, data)) != text}
    pictures = figures(root)
    stale = [p.relative_to(root).as_posix() for p in changed]
    stale += [p.name for p, png in pictures.items() if not p.is_file() or p.read_bytes() != png]
    if check and stale:
        print(f"Generated tables or pictures ({', '.join(stale)}) differ from the committed notebooks: "
              "run `python -m lora_tutorial.tools.readme` and commit README.md and docs/.", file=sys.stderr)
        return 1
    if check:
        print("The generated tables and pictures in README.md and docs/ match the committed notebooks.")
        return 0
    for path, text in changed.items():
        path.write_text(text)
    for picture, png in pictures.items():
        atomic_write(picture, lambda tmp, png=png: tmp.write_bytes(png))
    print(f"Wrote {sum(len(BLOCK.findall(t)) for t in texts.values())} block(s), {len(pictures)} picture(s).")
    return 0

if __name__ == "__main__":
    sys.exit(main())
