"""What fine-tuning on one digit costs the other nine, which remedy to use, and how to serve it.

Every remedy is a change to the fine-tuning settings (`replay_share`, `finetune_steps`, `alpha`,
`rank`, `target_modules`), run from the one frozen pre-trained network for several fine-tuning
seeds through the same pipeline as the tutorial's own fine-tuning (its adapters are saved and
reused when the notebook runs again). Each run is measured on the validation images, where the
remedy is chosen, and on the test images, which only report. How to serve the chosen adapter is
`serving.py`'s job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .data import SPLITS, Mnist, split_images
from .evaluate import Evaluation, evaluate
from .pipeline import adapter_path, finetuned_model
from .settings import Settings, SettingsError
from .stats import Spread, check_seeds, spread

# What a remedy may change: the fine-tuning step only. The pre-trained network, the target digit
# and the data stay those of the notebook (one thing varied at a time); `seeds` sets finetune_seed.
REMEDY_SETTINGS = ("rank", "alpha", "target_modules", "finetune_steps", "replay_share")
MEASURES = ("target_wrong", "points_lost", "accuracy")
# Images per forward call when evaluating a run: large enough for fast matrix products, small enough
# that the memory of one call is reused by the next (10,000 at once costs a fifth more on a CPU,
# mostly in fresh memory pages). The predictions came out the same both ways in every run checked.
EVAL_BATCH = 1000


# Checking the notebook's own parameters -----------------------------------------------------

def check_remedies(settings: Settings, variants: object) -> dict[str, Settings]:
    """Each remedy's settings (the notebook's settings with its changes), all checked before any
    of them trains: a name that is not a fine-tuning setting, or a value a setting refuses, is one
    clear error."""
    if not isinstance(variants, dict) or not variants:
        raise SettingsError(f"remedies={variants!r} is not valid: expected a dict of name: {{setting: "
                            "value}, e.g. {'replay 0.3': {'replay_share': 0.3}}.")
    for name, changes in variants.items():
        unknown = sorted(set(changes) - set(REMEDY_SETTINGS)) if isinstance(changes, dict) else None
        if unknown is None or unknown:
            raise SettingsError(f"The remedy {name!r} changes {changes!r}: expected a dict of fine-tuning "
                                f"settings to change, from {list(REMEDY_SETTINGS)} (the seeds come from "
                                "`seeds`; the pre-trained network and the target digit stay the notebook's).")
    return {name: dataclasses.replace(settings, **changes) for name, changes in variants.items()}


def check_limit(points: object) -> float:
    """max_forgetting_points, checked before any work: a number of points >= 0."""
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not 0 <= points < float("inf"):
        raise SettingsError(f"max_forgetting_points={points!r} is not valid: expected a number of "
                            "percentage points >= 0, e.g. 1.0.")
    return float(points)


# Per-digit changes ----------------------------------------------------------------------------

def per_digit_change(before: Evaluation, after: Evaluation) -> list[float]:
    """Each digit's accuracy after minus before, in percentage points."""
    return [100 * (a - b) for b, a in zip(before.per_digit_accuracy(), after.per_digit_accuracy(),
                                          strict=True)]


def others_lose_points(before: Evaluation, after: Evaluation, digit: int) -> float:
    """How many percentage points the other nine digits lose on average (negative: they gain)."""
    return 100 * (before.mean_accuracy_except(digit) - after.mean_accuracy_except(digit))


def share_answering(evaluation: Evaluation, digit: int) -> float:
    """Of the other digits' wrong answers, the share that answer `digit` (0 when there are none)."""
    others = [d for d in range(10) if d != digit]
    wrong = sum(evaluation.wrong_counts[d] for d in others)
    return sum(evaluation.confusion[d][digit] for d in others) / wrong if wrong else 0.0


def span(values: Spread, digits: int = 1) -> str:
    """'4.6 (4.1-5.0)': the mean and the range; '-1.7 (-2.9 to -0.8)' when a bound is negative."""
    return values.text(digits)


# Running the remedies over seeds ---------------------------------------------------------------

def reference(evaluations: dict[str, Evaluation], digit: int) -> dict[str, dict]:
    """The pre-trained network's figures per split: what every 'points lost' is measured from."""
    return {split: evaluations[split].digit_summary(digit) for split in SPLITS}


def remedy_runs(settings: Settings, data: Mnist, base: nn.Module, variants: dict[str, dict[str, Any]],
                seeds: Sequence[int], splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                verbose: bool = True) -> list[dict]:
    """Fine-tune LoRA once per remedy and seed (`finetune_seed`) from `base`; evaluate each run on
    the validation and the test images. Returns one row per run, remedies in order.

    Every remedy and seed is checked before any trains. Adapters already saved for the same
    settings are loaded instead of trained again.
    """
    chosen = check_remedies(settings, variants)
    seeds = check_seeds(seeds)
    splits = splits or split_images(data)
    rows = []
    for name, variant in chosen.items():
        trained = 0
        for seed in seeds:
            run = dataclasses.replace(variant, finetune_seed=seed)
            trained += not adapter_path(run, data).exists()
            model = finetuned_model(run, data, base, verbose=False)
            evaluations = {split: evaluate(model, *splits[split], batch_size=EVAL_BATCH) for split in SPLITS}
            rows.append({"name": name, "changes": variants[name], "seed": seed,
                         "finetune_steps": run.finetune_steps, "replay_share": run.replay_share,
                         **{split: evaluations[split].digit_summary(run.target_digit) for split in SPLITS},
                         "evaluations": evaluations})
        if verbose:
            print(f"{name}: seeds {', '.join(map(str, seeds))} ({trained} fine-tuned now, "
                  f"{len(seeds) - trained} loaded)")
    return rows


def summarize(rows: Sequence[dict], before: dict[str, dict]) -> list[dict]:
    """One entry per remedy (in the rows' order): for each split, the mean and min-max over its
    seeds of the target digit's wrong answers, the points the other digits lose, the accuracy."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    out = []
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        entry = {"name": name, "changes": mine[0]["changes"], "seeds": [r["seed"] for r in mine],
                 "finetune_steps": mine[0]["finetune_steps"], "replay_share": mine[0]["replay_share"]}
        for split in SPLITS:
            floor = before[split]["others_accuracy"]
            values = {"target_wrong": [r[split]["target_wrong"] for r in mine],
                      "points_lost": [100 * (floor - r[split]["others_accuracy"]) for r in mine],
                      "accuracy": [100 * r[split]["accuracy"] for r in mine]}
            entry[split] = {m: dataclasses.asdict(spread(values[m])) for m in MEASURES}
        out.append(entry)
    return out


def cell(entry: dict, split: str, measure: str) -> Spread:
    """One summary figure back as a `Spread` (the summaries hold plain dicts, for the JSON)."""
    return Spread(**entry[split][measure])


def verdict(spread_: Spread, reference_: Spread) -> str:
    """'tie' when the two ranges overlap (the seeds alone move them that far), else 'fewer' or
    'more': whether `spread_` lies below or above `reference_`."""
    return {"better": "fewer", "worse": "more"}.get(spread_.versus(reference_, higher_is_better=False), "tie")


# Choosing, on the validation images ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """The remedy to use and how it was decided (all on one split, the validation images)."""

    name: str  # the setting to use
    best: str  # among the allowed, the fewest target errors by the mean
    allowed: list[str]  # the settings whose other digits lose at most the limit (mean)
    tied: list[str]  # allowed settings whose range of target errors overlaps the best's
    within_limit: bool  # False: none was allowed; `name` is the one that lost least


def training_cost(entry: dict) -> tuple[int, bool]:
    """What a setting costs to train: its fine-tuning steps, then whether it needs old data."""
    return entry["finetune_steps"], entry["replay_share"] > 0


def choose_setting(summaries: Sequence[dict], max_loss_points: float = 1.0,
                   split: str = "validation") -> Choice:
    """The setting to use, decided on `split` (the validation images) alone.

    Allowed: those whose other digits lose at most `max_loss_points` on average (the mean over
    seeds). The best is the allowed one with the fewest target-digit errors (mean). Settings whose
    range of target errors overlaps the best's are tied with it: the seeds cannot tell them apart,
    so the cheapest of them (fewest fine-tuning steps, then no old data, then the mean) is chosen.
    When none is allowed, the one whose other digits lose least is returned, `within_limit` False.
    """
    if not summaries:
        raise ValueError("choose_setting needs at least one setting's summary.")

    def lost(entry: dict) -> float:
        return cell(entry, split, "points_lost").mean

    def wrong(entry: dict) -> float:
        return cell(entry, split, "target_wrong").mean

    allowed = [e for e in summaries if lost(e) <= max_loss_points]
    if not allowed:
        least = min(summaries, key=lost)
        return Choice(least["name"], least["name"], [], [], False)
    best = min(allowed, key=lambda e: (wrong(e), lost(e)))
    tied = [e for e in allowed if cell(e, split, "target_wrong").overlaps(cell(best, split, "target_wrong"))]
    chosen = min(tied, key=lambda e: (*training_cost(e), wrong(e), lost(e)))
    return Choice(chosen["name"], best["name"], [e["name"] for e in allowed], [e["name"] for e in tied], True)


def describe_choice(choice: Choice, summaries: Sequence[dict], max_loss_points: float, digit: int,
                    split: str = "validation") -> str:
    """A few sentences: which setting was chosen on `split` and why, ties and the limit included."""
    by_name = {e["name"]: e for e in summaries}
    chosen = by_name[choice.name]
    wrong, lost = cell(chosen, split, "target_wrong"), cell(chosen, split, "points_lost")
    limit = f"{max_loss_points:g} point{'' if max_loss_points == 1 else 's'}"
    figures = (f"{span(wrong)} wrong on digit {digit}, the other digits lose {span(lost, 2)} points "
               f"(mean (min-max) over {wrong.count} seeds, {split} images)")
    if not choice.within_limit:
        return (f"No setting keeps the other digits within {limit} on average; the one that loses least is "
                f"{choice.name}: {figures}. Raise max_forgetting_points, or try more replay.")
    text = (f"Chosen: {choice.name} ({chosen['changes']}): {figures}. Allowed (losing at most {limit} "
            f"on average): {', '.join(choice.allowed)}.")
    others = [n for n in choice.tied if n != choice.name]
    if choice.name == choice.best and not others:
        return text + " It has the fewest target errors among them, and no other one's range overlaps it."
    if choice.name == choice.best:
        as_cheap = any(training_cost(by_name[n]) == training_cost(chosen) for n in others)
        return (text + f" It has the fewest target errors by the mean, but its range overlaps "
                f"{', '.join(others)}: a tie the seeds cannot separate. "
                + ("By the rule's measure of cost (fine-tuning steps, then old data) none of them is "
                   "cheaper, so the fewest errors by the mean decide." if as_cheap
                   else "It is also the cheapest of them to train, so it stays."))
    return (text + f" {choice.best} has the fewest target errors by the mean, but the ranges of "
            f"{', '.join(choice.tied)} overlap: a tie, and {choice.name} is the cheapest of them to train "
            "(fewest steps, then no old data).")


def remedy_table(summaries: Sequence[dict], before: dict[str, dict], split: str, digit: int,
                 reference_name: str) -> str:
    """A text table on one split: target errors, points lost and accuracy as mean (min-max) over
    the seeds, and the first two against `reference_name` ('tie' when the ranges overlap)."""
    ref = next(e for e in summaries if e["name"] == reference_name)
    head = (f"{'setting':<24}{f'wrong on {digit}':>20}{'points lost':>24}{'accuracy %':>24}"
            f"{f'vs plain: {digit}':>14}{'vs plain: others':>18}")
    lines = [head, "-" * len(head)]
    pre = before[split]
    lines.append(f"{'pre-trained':<24}{pre['target_wrong']:>20}{'0':>24}{100 * pre['accuracy']:>24.2f}")
    for e in summaries:
        wrong, lost = cell(e, split, "target_wrong"), cell(e, split, "points_lost")
        against = ("", "")
        if e is not ref:
            against = (verdict(wrong, cell(ref, split, "target_wrong")),
                       {"fewer": "loses less", "more": "loses more", "tie": "tie"}[
                           verdict(lost, cell(ref, split, "points_lost"))])
        lines.append(f"{e['name']:<24}{span(wrong, 1):>20}{span(lost, 2):>24}"
                     f"{span(cell(e, split, 'accuracy'), 2):>24}{against[0]:>14}{against[1]:>18}")
    return "\n".join(lines)


def uneven_loss_text(per_digit: Sequence[Spread], lost: Spread, answering: tuple[float, Spread],
                     digit: int) -> str:
    """What the plain run costs each digit, in a few sentences: the average loss; the digits that
    lose more than that average (largest first) and the most the rest lose; and the share of the
    other digits' mistakes that answer `digit`, before and after (`answering`)."""
    others = [d for d in range(10) if d != digit]
    above = sorted((d for d in others if -per_digit[d].mean > lost.mean), key=lambda d: per_digit[d].mean)
    rest = [d for d in others if d not in above]
    text = (f"Digit {digit} gains {span(per_digit[digit])} points; the other nine lose {span(lost, 2)} "
            f"points on average (mean (min-max) over {lost.count} seeds).")
    if above:
        losses = ", ".join(f"digit {d} loses {span(Spread(-s.mean, -s.high, -s.low, s.count))}"
                           for d, s in ((d, per_digit[d]) for d in above))
        text += f" The loss is uneven: {losses}"
        if rest:
            worst_rest = max(-per_digit[d].mean for d in rest)
            text += (f"; each of the other {len(rest)} digits loses at most {worst_rest:.1f} on average"
                     if worst_rest > 0 else f"; the other {len(rest)} digits lose nothing on average")
        text += "."
    share_before, share_after = answering
    text += (f" Of the other digits' wrong answers, {span(share_after, 0)} % are a {digit} after "
             f"fine-tuning, against {share_before:.0f} % before.")
    return text


def agreement(chosen: dict, reference_: dict, reference_name: str) -> str:
    """Whether the test images tell the same story as the validation images about the chosen
    setting against the reference: the verdicts on both measures, split by split."""
    target = {"fewer": "fewer errors on the target digit", "more": "more errors on the target digit",
              "tie": "a tie on the target digit"}
    others = {"fewer": "less lost on the others", "more": "more lost on the others",
              "tie": "a tie on the others"}

    def said(split: str) -> str:
        on_target = verdict(cell(chosen, split, "target_wrong"), cell(reference_, split, "target_wrong"))
        on_others = verdict(cell(chosen, split, "points_lost"), cell(reference_, split, "points_lost"))
        return f"{target[on_target]}, {others[on_others]}"

    story = {split: said(split) for split in SPLITS}
    name = chosen["name"]
    if story["validation"] == story["test"]:
        return (f"Against {reference_name}, the test images tell the same story about {name} as the "
                f"validation images: {story['test']}.")
    return (f"Against {reference_name}, the validation images say {story['validation']} for {name}; the test "
            f"images say {story['test']}. Where they differ, the test images are the ones to quote.")


def remedy_findings(summaries: Sequence[dict], reference_name: str, max_loss_points: float,
                    split: str = "validation") -> list[str]:
    """One sentence per setting against the reference (the plain run) on `split`: fewer, more or a
    tie on the target digit and on the other digits' loss, and whether it keeps within the limit."""
    ref = next(e for e in summaries if e["name"] == reference_name)
    lines = []
    for e in summaries:
        if e is ref:
            continue
        wrong, lost = cell(e, split, "target_wrong"), cell(e, split, "points_lost")
        on_target = verdict(wrong, cell(ref, split, "target_wrong"))
        on_others = verdict(lost, cell(ref, split, "points_lost"))
        target_text = {"fewer": "fewer wrong answers on the target digit than",
                       "more": "more wrong answers on the target digit than",
                       "tie": "a tie on the target digit with"}[on_target]
        others_text = {"fewer": "the other digits lose less", "more": "the other digits lose more",
                       "tie": "a tie on the other digits' loss"}[on_others]
        within = "within" if lost.mean <= max_loss_points else "outside"
        lines.append(f"**{e['name']}**: {target_text} {reference_name} ({span(wrong)} against "
                     f"{span(cell(ref, split, 'target_wrong'))}); {others_text} ({span(lost, 2)} points "
                     f"against {span(cell(ref, split, 'points_lost'), 2)}), {within} the limit of "
                     f"{max_loss_points:g}.")
    return lines
