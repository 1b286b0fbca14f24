"""Write the README's result tables and pictures from what the committed notebooks hold.

`python -m lora_tutorial.readme` rewrites every block between `<!-- begin generated: NAME -->` and
`<!-- end generated: NAME -->` in README.md from the notebooks' published results (see
`report.py`), and copies the figures the README shows (FIGURES) out of the notebooks' outputs
into docs/; `--check` only compares, and exits 1 when a table or a picture differs from what the
notebooks hold (a test runs it). Numbers and pictures in the README are therefore never made by
hand.
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

from .checkpoints import atomic_write
from .many_adapters import LOAD_NETWORK, SWITCH
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
    """'11.0 (8-13)': a mean over seeds and its range (in whole numbers when the values are counts)."""
    if not cell:
        return "-"
    low, high = (cell[k] * scale for k in ("low", "high"))
    whole = low == int(low) and high == int(high)  # counts: their range in whole numbers
    low, high = (f"{v:.0f}" if whole else f"{v:.{digits}f}" for v in (low, high))
    return f"{cell['mean'] * scale:.{digits}f} ({low}-{high})"


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


def _runs(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """Per-seed values as '11.0 (8-13)'."""
    cell = {"mean": sum(values) / len(values), "low": min(values), "high": max(values)}
    return _spread(cell, scale, digits)


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _rank_enough_rows(why: dict[str, Any], digit: int) -> list[str]:
    rank, lines, before = why["enough"]["rank"], [], why["before"]
    for name, runs in why["full"].items():
        cut = [next(c for c in run["cuts"] if c["rank"] == rank) for run in runs]
        verdict = "yes" if why["enough"].get(name) else "no"
        wrong = (f"{_runs([r['target_wrong'] for r in runs])} whole, "
                 f"{_runs([c['target_wrong'] for c in cut])} cut")
        others = (f"{_runs([r['others_accuracy'] for r in runs], 100)} % whole, "
                  f"{_runs([c['others_accuracy'] for c in cut], 100)} % cut")
        lines.append(f"| 08: full fine-tune ({name}): does its update cut to rank {rank} do the job? | "
                     f"{verdict}. Digit {digit} wrong: {wrong} (pre-trained {before['target_wrong']}); other "
                     f"digits: {others} (pre-trained {100 * before['others_accuracy']:.1f} %) |")
    return lines


def _cost_row(why: dict[str, Any]) -> list[str]:
    rank = why["enough"]["rank"]
    costs = {c["name"]: c for c in why["costs"]}
    full, lora = costs.get("every weight"), costs.get(f"LoRA, rank {rank}")
    if not (full and lora):
        return []
    trained = f"{full['trainable']:,} vs {lora['trainable']:,} trained numbers"
    state = f"Adam state {_size(full['optimizer_bytes'])} vs {_size(lora['optimizer_bytes'])}"
    files = f"saved tensors {_size(full['file_bytes'])} vs {_size(lora['file_bytes'])}"
    step = f"one step {sum(full['step_ms'].values()):.1f} vs {sum(lora['step_ms'].values()):.1f} ms"
    return [f"| 08: full fine-tune vs LoRA rank {rank}, what each costs | {trained}; {state}; {files}; "
            f"{step} (this CPU) |"]


def _forgetting_rows(forget: dict[str, Any], digit: int) -> list[str]:
    lost = _spread(forget["others_lose_points"], 1, 2)
    lines = [f"| 09: what fine-tuning on {digit} alone costs the other digits | {lost} points of mean "
             "accuracy |"]
    plain = forget["summaries"][0]["test"]
    chosen = next(e for e in forget["summaries"] if e["name"] == forget["chosen"])["test"]
    limit = forget["max_forgetting_points"]
    points = f"{limit:g} point" + ("" if limit == 1 else "s")
    lines.append(f"| 09: the remedy chosen on the validation images (the others may lose at most {points}) "
                 f"| {forget['chosen']}: digit {digit} wrong {_spread(chosen['target_wrong'])}, the "
                 f"others lose {_spread(chosen['points_lost'], 1, 2)} points (the plain run: "
                 f"{_spread(plain['target_wrong'])} and {_spread(plain['points_lost'], 1, 2)}) |")
    for batch, times in sorted(forget["latency_seconds"].items(), key=lambda kv: -int(kv[0])):
        ratios = ", ".join(f"{name} {seconds / times['merged']:.2f}x" for name, seconds in times.items()
                           if name != "merged")
        lines.append(f"| 09: serving in calls of {int(batch):,} images, time against merged | {ratios} "
                     "(one adapter, the median of a few passes, this CPU) |")
    return lines


def _many_adapters_rows(many: dict[str, Any]) -> list[str]:
    """10's rows: PEFT against the tutorial's LoRA; the adapters per digit, combined; the costs."""
    peft, digits, before = many["peft"], many["digits"], many["before"]
    chosen = ", ".join(map(str, digits))

    def gap(value: float) -> str:
        return "0 (bit for bit)" if value == 0 else f"at most {value:.1e}"

    lines = [f"| 10: PEFT's LoRA beside the tutorial's, same A and same batches | trained A and B differ by "
             f"{gap(peft['adapter_gap'])}; merged weights by {gap(peft['merge_gap'])}; `disable_adapter()` "
             "gives the pre-trained network exactly; to_peft / from_peft round trip exact |"]
    pre_wrong = ", ".join(str(before["wrong"][str(d)]) for d in digits)
    for e in many["summaries"]:
        wrong = ", ".join(f"{d}: {_spread(e['wrong'][str(d)])}" for d in digits)
        lines.append(f"| 10: {e['name']} (wrong on {chosen}; pre-trained {pre_wrong}) | {wrong}; other "
                     f"{10 - len(digits)} digits {_spread(e['others_accuracy'])} % (pre-trained "
                     f"{100 * before['others_accuracy']:.1f} %) |")
    n, size = len(digits), many["bytes"]["adapter (the tutorial's file)"]
    network = many["bytes"]["fine-tuned network"]
    ms = {name: value["mean"] * 1e3 for name, value in many["seconds"].items()}
    lines.append(f"| 10: what {n} tasks cost | {n} adapters {n * size / 1024:.1f} KiB vs {n} fine-tuned "
                 f"copies {n * network / 2**20:.1f} MiB; PEFT's set_adapter {ms[SWITCH]:.2f} ms "
                 f"({len(many['rows'])} adapters held) vs loading a network file {ms[LOAD_NETWORK]:.2f} ms "
                 "(medians, this CPU) |")
    return lines


def beyond_table(found: dict[str, dict[str, Any]]) -> str:
    """08's, 09's and 10's answers in one table: mean (min-max) over the seeds, on the test images."""
    why, forget = found["08_why_low_rank"]["why_low_rank"], found["09_forgetting"]["forgetting"]
    many = found["10_peft_and_many_adapters"]["many_adapters"]
    digit = why["settings"]["target_digit"]
    lines = [f"| question | answer measured (mean (min-max) over {len(why['seeds'])} seeds, test images) |",
             "|---|---|"]
    lines += _rank_enough_rows(why, digit) + _cost_row(why) + _forgetting_rows(forget, digit)
    lines += _many_adapters_rows(many)
    return "\n".join(lines)


def run_summary(found: dict[str, dict[str, Any]]) -> str:
    """The summary `python -m lora_tutorial.run` prints, for the committed run's results."""
    from .run import summary

    return f"```\n{summary(found['06_compare']['results'])}\n```"


TABLES: dict[str, Callable[[dict[str, dict[str, Any]]], str]] = {"results": results_table,
                                                                  "run-summary": run_summary,
                                                                  "rank-study": rank_table,
                                                                  "beyond": beyond_table}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.readme", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a table differs")
    args = parser.parse_args(argv)
    root = project_root()
    path = root / "README.md"
    text = path.read_text()
    new = render(text, notebook_results(root / "notebooks"))
    pictures = figures(root)
    if args.check:
        stale = [p.name for p, png in pictures.items() if not p.is_file() or p.read_bytes() != png]
        if new != text or stale:
            print("README.md's generated tables or pictures " + (f"({', '.join(stale)}) " if stale else "")
                  + "differ from the committed notebooks: run `python -m lora_tutorial.readme` and commit "
                  "README.md and docs/.", file=sys.stderr)
            return 1
        print("README.md's generated tables and pictures match the committed notebooks.")
        return 0
    path.write_text(new)
    for picture, png in pictures.items():
        atomic_write(picture, lambda tmp, png=png: tmp.write_bytes(png))
    print(f"Wrote {len(BLOCK.findall(new))} generated table(s) into README.md and {len(pictures)} "
          "picture(s) into docs/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
