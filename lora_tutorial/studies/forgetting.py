"""What fine-tuning on one digit costs the others, and each remedy's trade-off over seeds (09)."""

import dataclasses
from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd
from torch import nn

from ..data import SPLITS, Mnist, split_images
from ..evaluate import Evaluation, evaluate
from ..pipeline import adapter_path, finetuned_model
from ..plots import legend_below, new_figure
from ..settings import Settings, SettingsError, is_number
from .stats import best_and_ties, check_seeds, spread

REMEDY_SETTINGS = ("rank", "alpha", "target_modules", "finetune_steps", "replay_share")  # fine-tuning's

def check_remedies(settings: Settings, variants: object) -> dict[str, Settings]:
    """Each remedy's settings, all checked (by `Settings`) before any of them trains."""
    if not isinstance(variants, dict) or not variants:
        raise SettingsError(f"remedies={variants!r} is not valid: expected a dict of name: {{setting: "
                            "value}, e.g. {'replay 0.3': {'replay_share': 0.3}}.")
    for name, changes in variants.items():
        if not isinstance(changes, dict) or set(changes) - set(REMEDY_SETTINGS):
            raise SettingsError(f"The remedy {name!r} changes {changes!r}: expected a dict of fine-tuning "
                                f"settings to change, from {list(REMEDY_SETTINGS)}.")
    return {name: dataclasses.replace(settings, **changes) for name, changes in variants.items()}

def check_budgets(limit: object, budgets: object) -> tuple[float | None, list[float]]:
    """max_forgetting_points (None: break-even) and the sensitivity table's budgets: 0 to 100 points."""
    def points(value: object) -> bool:
        return is_number(value) and 0 <= value <= 100
    if limit is not None and not points(limit):
        raise SettingsError(f"max_forgetting_points={limit!r} is not valid: expected None for the "
                            "break-even budget, or a number of percentage points from 0 to 100, e.g. 1.0.")
    if not isinstance(budgets, (list, tuple)) or not budgets or not all(points(b) for b in budgets):
        raise SettingsError(f"budgets={budgets!r} is not valid: expected a list of percentage points "
                            "from 0 to 100, e.g. [0.5, 1, 2, 5].")
    return None if limit is None else float(limit), sorted({float(b) for b in budgets})

def per_digit_change(before: Evaluation, after: Evaluation) -> list[float]:
    """Each digit's accuracy after minus before, in percentage points."""
    return [100 * (a - b) for b, a in zip(*(e.per_digit_accuracy() for e in (before, after)), strict=True)]

def others_lose_points(before: Evaluation, after: Evaluation, digit: int) -> float:
    """How many points the other nine digits lose on average (negative: they gain)."""
    return 100 * (before.mean_accuracy_except(digit) - after.mean_accuracy_except(digit))

def share_answering(evaluation: Evaluation, digit: int) -> float:
    """Of the other digits' wrong answers, the share that answer `digit` (0 when there are none)."""
    others = [d for d in range(10) if d != digit]
    wrong = sum(evaluation.wrong_counts[d] for d in others)
    return sum(evaluation.confusion[d][digit] for d in others) / wrong if wrong else 0.0

def reference(evaluations: dict[str, Evaluation], digit: int) -> dict[str, dict]:
    """The pre-trained network's figures per split, which every 'points lost' is measured from."""
    return {split: {**evaluations[split].digit_summary(digit),
                    "other_images": evaluations[split].total - evaluations[split].per_digit_totals()[digit]}
            for split in SPLITS}

def remedy_runs(settings: Settings, data: Mnist, base: nn.Module, variants: dict[str, dict],
                seeds: Sequence[int], splits: dict | None = None, verbose: bool = True) -> list[dict]:
    """One row per remedy and seed, on both splits; all checked first, saved adapters reused."""
    chosen, seeds = check_remedies(settings, variants), check_seeds(seeds)
    splits, rows = splits or split_images(data), []
    for name, variant in chosen.items():
        trained = 0
        for seed in seeds:
            run = dataclasses.replace(variant, finetune_seed=seed)
            trained += not adapter_path(run, data).exists()
            model = finetuned_model(run, data, base, verbose=False)
            with nn.utils.parametrize.cached():  # W' built once per run; 1,000 images a call: the fastest
                evaluations = {s: evaluate(model, *splits[s], batch_size=1000) for s in SPLITS}
            rows.append({"name": name, "changes": variants[name], "seed": seed,
                         **{s: evaluations[s].digit_summary(run.target_digit) for s in SPLITS},
                         "evaluations": evaluations})
        if verbose:
            print(f"{name}: seeds {', '.join(map(str, seeds))} ({trained} fine-tuned now, "
                  f"{len(seeds) - trained} loaded)")
    return rows

def seed_points(rows: Sequence[dict], before: dict[str, dict], split: str) -> pd.DataFrame:
    """One row per run on `split`: its setting, the points the other digits lose, target wrong."""
    floor = before[split]["others_accuracy"]
    return pd.DataFrame([{"name": r["name"], "points_lost": 100 * (floor - r[split]["others_accuracy"]),
                          "target_wrong": r[split]["target_wrong"], "accuracy": 100 * r[split]["accuracy"]}
                         for r in rows])

def summarize(rows: Sequence[dict], before: dict[str, dict]) -> pd.DataFrame:
    """One row per setting (in the rows' order), columns (split, measure): a `Spread` over seeds."""
    return pd.DataFrame({(s, m): seed_points(rows, before, s).groupby("name", sort=False)[m].agg(spread)
                         for s in SPLITS for m in ("target_wrong", "points_lost", "accuracy")})

def front(summaries: pd.DataFrame, split: str = "validation") -> pd.Series:
    """Per setting, None on the front of the means, else who beats it on both (fewest target errors)."""
    m = summaries[split][["points_lost", "target_wrong"]].map(lambda s: s.mean)
    beats = {n: m[(m <= me).all(axis=1) & (m != me).any(axis=1)]["target_wrong"] for n, me in m.iterrows()}
    return pd.Series({n: b.idxmin() if len(b) else None for n, b in beats.items()}, dtype=object)

def break_even_points(before: dict, digit: int) -> float:
    """The points lost that cost the others as many images as `digit` had wrong (one split of `reference`)."""
    if before["other_images"] < 1:
        raise ValueError(f"No images of digits other than {digit}: the break-even budget needs some.")
    return 100 * before["target_wrong"] / before["other_images"]

@dataclasses.dataclass(frozen=True)
class Choice:
    """The winner at one budget, decided on the validation images."""
    budget: float  # the most the other digits may lose, in points (mean over seeds)
    name: str  # the allowed setting with the fewest target errors by the mean
    allowed: list[str]  # the settings within the budget
    tied: list[str]  # allowed settings the seeds do not separate from the winner
    within_limit: bool  # False: none was allowed; `name` is the one that lost least

def choose_setting(summaries: pd.DataFrame, max_loss_points: float, split: str = "validation") -> Choice:
    """`best_and_ties` on target errors among the settings within the budget; else the least loss."""
    lost = summaries[split, "points_lost"].map(lambda s: s.mean)
    allowed = list(lost.index[lost <= max_loss_points])
    if not allowed:
        return Choice(max_loss_points, lost.idxmin(), [], [], False)
    best, tied = best_and_ties(summaries.loc[allowed, (split, "target_wrong")].to_dict(), False)
    return Choice(max_loss_points, best, allowed, tied, True)

def winner_ranges(summaries: pd.DataFrame, split: str = "validation") -> pd.DataFrame:
    """Each stretch of budgets with one winner (it changes only at a setting's mean loss); `to` None: any."""
    cuts = sorted({max(0.0, s.mean) for s in summaries[split, "points_lost"]})
    w = pd.DataFrame({"from": cuts, "winner": [choose_setting(summaries, c, split).name for c in cuts]})
    w = w[w.winner != w.winner.shift()].reset_index(drop=True)
    return pd.DataFrame({"from": w["from"], "to": [*w["from"][1:], None], "winner": w.winner}, dtype=object)

def plot_front(rows: Sequence[dict], summaries: pd.DataFrame, before: dict[str, dict], digit: int,
               budget: float) -> plt.Figure:
    """Per split, points lost against target errors: a dot per seed, a marker per mean, the front dashed."""
    fig, axes = new_figure(1, len(SPLITS), figsize=(12, 5.6), sharey=True)
    for ax, split in zip(axes, SPLITS, strict=True):
        points = seed_points(rows, before, split)
        means = summaries[split].map(lambda s: s.mean)
        for i, name in enumerate(summaries.index):  # tab10's colours, C0 to C9
            mine = points[points["name"] == name]
            ax.scatter(mine.points_lost, mine.target_wrong, s=18, alpha=0.55, color=f"C{i % 10}", zorder=2)
            ax.scatter(means.loc[name, "points_lost"], means.loc[name, "target_wrong"], s=90, zorder=3,
                       color=f"C{i % 10}", edgecolor="black", label=name)
        ends = means[front(summaries, split).isna()].sort_values(["points_lost", "target_wrong"])
        ax.plot(ends.points_lost, ends.target_wrong, "--", color="gray", zorder=1, label="front of the means")
        ax.scatter([0], [before[split]["target_wrong"]], marker="*", s=160, color="black", zorder=3,
                   label="pre-trained")
        ax.axvline(budget, color="tab:red", linestyle=":", label=f"budget: {budget:.2f} points")
        ax.set(xlabel="points the other nine digits lose (mean accuracy, percentage points)",
               ylabel=f"wrong answers on digit {digit}",
               title=f"{split} images" + (" (a winner is named here)" if ax is axes[0] else " (reported)"),
               ylim=(0, 1.08 * max(before[s]["target_wrong"] for s in SPLITS)))
        ax.grid(alpha=0.3)
    legend_below(fig, axes[0], f"Fixing digit {digit} against keeping the others (small dots: one seed each; "
                 "large: the mean)", 0.1, ncol=6, fontsize=8)
    return fig
