"""What fine-tuning on one digit costs the other nine, and the trade-off each remedy makes.

Every remedy is a change to the fine-tuning settings (`replay_share`, `finetune_steps`, `alpha`,
`rank`, `target_modules`), run from the one frozen pre-trained network once per fine-tuning seed
through the tutorial's own fine-tuning (saved adapters are reused on the next run). Each run is
measured on the validation images, where a winner may be named, and on the test images, which
only report. How to serve the adapter is `serving.py`'s job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data import SPLITS, Mnist, split_images
from ..evaluate import Evaluation, evaluate
from ..pipeline import adapter_path, finetuned_model
from ..plots import new_figure
from ..settings import Settings, SettingsError
from .stats import Spread, check_seeds, spread

# What a remedy may change: the fine-tuning step only. The pre-trained network, the target digit
# and the data stay those of the notebook (one thing varied at a time); `seeds` sets finetune_seed.
REMEDY_SETTINGS = ("rank", "alpha", "target_modules", "finetune_steps", "replay_share")
MEASURES = ("target_wrong", "points_lost", "accuracy")
# Images per forward call when evaluating a run: large enough for fast matrix products, small enough
# that the memory of one call is reused by the next (10,000 at once costs a fifth more on a CPU).
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


def _points(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < float("inf")


def check_limit(points: object) -> float | None:
    """max_forgetting_points, checked before any work: None (the break-even budget, computed from
    the pre-trained network) or a number of points >= 0."""
    if points is None:
        return None
    if not _points(points):
        raise SettingsError(f"max_forgetting_points={points!r} is not valid: expected None for the "
                            "break-even budget, or a number of percentage points >= 0, e.g. 1.0.")
    return float(points)


def check_budgets(budgets: object) -> list[float]:
    """The budgets the sensitivity table tries: a non-empty list of numbers of points >= 0."""
    if not isinstance(budgets, (list, tuple)) or not budgets or not all(_points(b) for b in budgets):
        raise SettingsError(f"budgets={budgets!r} is not valid: expected a list of numbers of percentage "
                            "points >= 0, e.g. [0.5, 1, 2, 5].")
    return sorted({float(b) for b in budgets})


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


def uneven_loss_text(per_digit: Sequence[Spread], lost: Spread, answering: tuple[float, Spread],
                     digit: int) -> str:
    """What the plain run costs, in three sentences: the target digit's gain and the others' mean
    loss; the digit that loses most; the share of the others' mistakes that answer `digit`."""
    others = [d for d in range(10) if d != digit]
    worst = min(others, key=lambda d: per_digit[d].mean)
    share_before, share_after = answering
    most = per_digit[worst]
    return (f"Digit {digit} gains {span(per_digit[digit])} points; the other nine lose {span(lost, 2)} "
            f"on average (mean (min-max) over {lost.count} seeds). Digit {worst} loses most, "
            f"{span(Spread(-most.mean, -most.high, -most.low, most.count))}. "
            f"Of the other digits' wrong answers, {span(share_after, 0)} % are a {digit} after fine-tuning, "
            f"against {share_before:.0f} % before.")


# Running the remedies over seeds ---------------------------------------------------------------

def reference(evaluations: dict[str, Evaluation], digit: int) -> dict[str, dict]:
    """The pre-trained network's figures per split: what every 'points lost' is measured from.
    `other_images` (the images of the other digits) sets the break-even budget."""
    return {split: {**evaluations[split].digit_summary(digit),
                    "other_images": evaluations[split].total - evaluations[split].per_digit_totals()[digit]}
            for split in SPLITS}


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
            with parametrize.cached():  # W' built once per run, not at every batch: the same predictions
                evaluations = {split: evaluate(model, *splits[split], batch_size=EVAL_BATCH)
                               for split in SPLITS}
            rows.append({"name": name, "changes": variants[name], "seed": seed,
                         "finetune_steps": run.finetune_steps, "replay_share": run.replay_share,
                         **{split: evaluations[split].digit_summary(run.target_digit) for split in SPLITS},
                         "evaluations": evaluations})
        if verbose:
            print(f"{name}: seeds {', '.join(map(str, seeds))} ({trained} fine-tuned now, "
                  f"{len(seeds) - trained} loaded)")
    return rows


def seed_points(rows: Sequence[dict], before: dict[str, dict], split: str
                ) -> dict[str, list[tuple[float, int]]]:
    """Per setting, one (points the other digits lose, target wrong) pair per seed on `split`."""
    floor = before[split]["others_accuracy"]
    out: dict[str, list[tuple[float, int]]] = {}
    for r in rows:
        out.setdefault(r["name"], []).append((100 * (floor - r[split]["others_accuracy"]),
                                              r[split]["target_wrong"]))
    return out


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


# The trade-off front --------------------------------------------------------------------------

def front(summaries: Sequence[dict], split: str = "validation") -> dict[str, str | None]:
    """Per setting, None when it is on the front of the means (no other setting has both fewer
    target errors and a smaller loss on the others, one of them strictly), else the name of the
    setting that beats it on both with the fewest target errors."""
    def point(e: dict) -> tuple[float, float]:
        return cell(e, split, "points_lost").mean, cell(e, split, "target_wrong").mean

    out: dict[str, str | None] = {}
    for e in summaries:
        lost, wrong = point(e)
        better = [o for o in summaries if o is not e and point(o)[0] <= lost and point(o)[1] <= wrong
                  and point(o) != (lost, wrong)]
        out[e["name"]] = min(better, key=lambda o: point(o)[1])["name"] if better else None
    return out


def break_even_points(before: dict, digit: int) -> float:
    """The budget past which no fix of `digit` could pay for the loss: the other digits' mean
    accuracy falling by this many points costs them about as many images as `digit` had wrong
    before fine-tuning (`before`: one split of `reference`)."""
    if before["other_images"] < 1:
        raise ValueError(f"No images of digits other than {digit}: the break-even budget needs some.")
    return 100 * before["target_wrong"] / before["other_images"]


# Naming a winner, on the validation images ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """The winner at one budget and how it was decided (all on one split, the validation images)."""

    budget: float  # the most the other digits may lose, in points (mean over seeds)
    name: str  # the allowed setting with the fewest target errors by the mean
    allowed: list[str]  # the settings whose other digits lose at most the budget (mean)
    tied: list[str]  # other allowed settings whose range of target errors overlaps the winner's
    within_limit: bool  # False: none was allowed; `name` is the one that lost least


def choose_setting(summaries: Sequence[dict], max_loss_points: float, split: str = "validation") -> Choice:
    """The winner at a budget, decided on `split` (the validation images) alone.

    Allowed: the settings whose other digits lose at most `max_loss_points` (mean over seeds). The
    winner is the allowed one with the fewest target errors by the mean (then the smaller loss).
    Allowed settings whose range of target errors overlaps the winner's are listed as tied: the
    seeds do not separate them. With none allowed, the one that loses least, `within_limit` False.
    """
    if not summaries:
        raise ValueError("choose_setting needs at least one setting's summary.")

    def lost(entry: dict) -> float:
        return cell(entry, split, "points_lost").mean

    allowed = [e for e in summaries if lost(e) <= max_loss_points]
    if not allowed:
        least = min(summaries, key=lost)
        return Choice(max_loss_points, least["name"], [], [], False)
    best = min(allowed, key=lambda e: (cell(e, split, "target_wrong").mean, lost(e)))
    wrong = cell(best, split, "target_wrong")
    tied = [e["name"] for e in allowed if e is not best and cell(e, split, "target_wrong").overlaps(wrong)]
    return Choice(max_loss_points, best["name"], [e["name"] for e in allowed], tied, True)


def winner_ranges(summaries: Sequence[dict], split: str = "validation"
                  ) -> list[tuple[float, float | None, str]]:
    """Every budget at once: (from, to, winner) for each stretch of budgets with the same winner,
    `to` None for the last (the winner can change only where a setting's mean loss lies). Budgets
    below the first `from` allow no setting."""
    cuts = sorted({max(0.0, cell(e, split, "points_lost").mean) for e in summaries})
    stretches: list[tuple[float, float | None, str]] = []
    for low, high in zip(cuts, [*cuts[1:], None], strict=True):
        name = choose_setting(summaries, low, split).name
        if stretches and stretches[-1][2] == name:
            stretches[-1] = (stretches[-1][0], high, name)
        else:
            stretches.append((low, high, name))
    return stretches


def sensitivity(summaries: Sequence[dict], budgets: Sequence[float], split: str = "validation"
                ) -> list[Choice]:
    """The winner at each budget, chosen on `split`."""
    return [choose_setting(summaries, b, split) for b in budgets]


# Tables (plain text: the notebook prints them) ---------------------------------------------------

def remedy_table(summaries: Sequence[dict], before: dict[str, dict], digit: int,
                 on_front: dict[str, str | None]) -> str:
    """Both splits side by side: target errors and points lost as mean (min-max) over the seeds,
    and whether the setting is on the validation front (else the setting that beats it)."""
    head = (f"{'setting':<18}{f'val: wrong on {digit}':>22}{'val: points lost':>24}"
            f"{f'test: wrong on {digit}':>22}{'test: points lost':>24}   validation front")
    lines = [head, "-" * len(head)]
    lines.append(f"{'pre-trained':<18}{before['validation']['target_wrong']:>22}{'0':>24}"
                 f"{before['test']['target_wrong']:>22}{'0':>24}")
    for e in summaries:
        figures = "".join(f"{span(cell(e, s, 'target_wrong')):>22}{span(cell(e, s, 'points_lost'), 2):>24}"
                          for s in SPLITS)
        beaten = on_front.get(e["name"])
        lines.append(f"{e['name']:<18}{figures}   {'on it' if beaten is None else 'beaten by ' + beaten}")
    return "\n".join(lines)


def sensitivity_table(choices: Sequence[Choice], summaries: Sequence[dict], digit: int) -> str:
    """One line per budget: the winner on the validation images, the settings the seeds do not
    separate from it, and the winner's figures on the test images."""
    by_name = {e["name"]: e for e in summaries}
    head = (f"{'budget (points)':>16}  {'winner (validation)':<20}{f'test: wrong on {digit}':>22}"
            f"{'test: points lost':>24}   not separated at these seeds from")
    lines = [head, "-" * len(head)]
    for c in choices:
        e = by_name[c.name]
        name = c.name if c.within_limit else f"none ({c.name} loses least)"
        lines.append(f"{c.budget:>16.2f}  {name:<20}{span(cell(e, 'test', 'target_wrong')):>22}"
                     f"{span(cell(e, 'test', 'points_lost'), 2):>24}   {', '.join(c.tied) or '-'}")
    return "\n".join(lines)


# The figure ---------------------------------------------------------------------------------------

def plot_front(rows: Sequence[dict], summaries: Sequence[dict], before: dict[str, dict], digit: int,
               budget: float) -> plt.Figure:
    """The trade-off, one panel per split: for each setting one small point per seed and a large
    marker at the mean, the other digits' loss (x) against the target digit's wrong answers (y).
    The front of the means is a dashed line; the budget a vertical line; the pre-trained network
    a star at 0 points lost."""
    fig, axes = new_figure(1, len(SPLITS), figsize=(12, 5.6), sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, split in zip(axes, SPLITS, strict=True):
        points = seed_points(rows, before, split)
        on_front = front(summaries, split)
        for i, e in enumerate(summaries):
            x = [p[0] for p in points[e["name"]]]
            y = [p[1] for p in points[e["name"]]]
            ax.scatter(x, y, s=18, alpha=0.55, color=colours(i % 10), zorder=2)
            lost, wrong = cell(e, split, "points_lost").mean, cell(e, split, "target_wrong").mean
            ax.scatter([lost], [wrong], s=90, color=colours(i % 10), edgecolor="black", zorder=3,
                       label=e["name"] if split == SPLITS[0] else None)
        ends = sorted((cell(e, split, "points_lost").mean, cell(e, split, "target_wrong").mean)
                      for e in summaries if on_front[e["name"]] is None)
        first = split == SPLITS[0]
        ax.plot([p[0] for p in ends], [p[1] for p in ends], linestyle="--", color="gray", zorder=1,
                label="front of the means" if first else None)
        ax.scatter([0], [before[split]["target_wrong"]], marker="*", s=160, color="black", zorder=3,
                   label="pre-trained" if first else None)
        ax.axvline(budget, color="tab:red", linestyle=":",
                   label=f"budget: {budget:.2f} points" if first else None)
        ax.set(xlabel="points the other nine digits lose (mean accuracy, percentage points)",
               ylabel=f"wrong answers on digit {digit}",
               title=f"{split} images" + (" (a winner is named here)" if first else " (reported)"))
        ax.set_ylim(0, 1.08 * max(before[s]["target_wrong"] for s in SPLITS))
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"Fixing digit {digit} against keeping the others "
                 "(small dots: one seed each; large: the mean)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
