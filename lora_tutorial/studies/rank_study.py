"""07's experiment: what LoRA's rank, its scaling rule and the initialisation of A change.

Every configuration (a scaling rule, a rank, an initialisation of A, a learning rate) is fine-tuned
from the one pre-trained network once per fine-tuning seed, in this process: a frozen LoRA copy
whose A is drawn right after seeding with that seed, trained on the target digit's fit images
through the separate low-rank path. Each run is judged on the validation images (choices are made
on them) and on the test images (which only report), and the size of the update it made,
||delta W||_F = ||scale * B @ A||_F, is measured per layer. `run_study` runs a list of them and
re-uses the runs it is given; `choose_rank` and `tune_learning_rate` decide on the validation
columns alone; `rule_table` and `plot_seeds` show the test columns, one point per seed.

The scaling rule decides how the update's factor changes with the rank r:
"alpha fixed" (the paper's and the post's alpha / r), "alpha = r" (alpha grows with r, so the
factor stays at its rank-1 value) and "rsLoRA" (alpha / sqrt(r), Kalajdzievski 2023). At rank 1
the three are one and the same run, which is therefore made once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from ..data import SPLITS, Mnist, split_images
from ..evaluate import Evaluation, evaluate, from_confusion
from ..lora import base_weight, lora_modules, separate_path
from ..model import LAYER_NAMES, OversizedMLP
from ..pipeline import lora_copy, train_on_target
from ..settings import Settings, SettingsError, check_whole_numbers
from ..train import progress_bar
from .stats import Spread, spread

# Each rule gives, for a rank r and the base alpha, the alpha LoRA is built with and whether the
# factor is alpha / sqrt(r) (PEFT's use_rslora) instead of alpha / r.
SCALINGS: dict[str, Callable[[int, float], tuple[float, bool]]] = {
    "alpha fixed": lambda rank, alpha: (alpha, False),  # factor alpha / r: shrinks as the rank grows
    "alpha = r": lambda rank, alpha: (alpha * rank, False),  # factor alpha: the same at every rank
    "rsLoRA": lambda rank, alpha: (alpha, True),  # factor alpha / sqrt(r)
}
# How ||delta W|| should grow with r under each rule, if Adam moves each of A's and B's numbers by
# about the learning rate per step and the r directions of B @ A add up like a random walk
# (||B @ A|| about sqrt(r) times its rank-1 size): the rule's factor times sqrt(r).
RANDOM_WALK_POWER = {"alpha fixed": -0.5, "alpha = r": 0.5, "rsLoRA": 0.0}
# "score": the mean of the target digit's accuracy and the other digits' mean accuracy. The task is
# to fix one digit while keeping nine, so each side weighs half; one number lets a choice be a maximum.
METRICS = ("target_wrong", "target_error_rate", "others_accuracy", "accuracy", "score")


def lora_arguments(scaling: str, rank: int, alpha: float = 1.0) -> dict:
    """`add_lora`'s rank, alpha and use_rslora for a scaling rule at a rank (base alpha: the post's 1)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is not one of {list(SCALINGS)}.")
    built_alpha, rslora = SCALINGS[scaling](rank, float(alpha))
    return {"rank": rank, "alpha": built_alpha, "use_rslora": rslora}


def scale_of(scaling: str, rank: int, alpha: float = 1.0) -> float:
    """The factor in front of B @ A that the rule gives at this rank (what LoRAParametrization computes)."""
    args = lora_arguments(scaling, rank, alpha)
    return args["alpha"] / (math.sqrt(rank) if args["use_rslora"] else rank)


@dataclass(frozen=True)
class Config:
    """One way to fine-tune: a scaling rule, a rank, how A is drawn ("normal": the post's N(0, 1);
    "kaiming": PEFT's Kaiming-uniform) and the learning rate (None: the settings' own)."""

    scaling: str
    rank: int
    init: str = "normal"
    learning_rate: float | None = None

    @property
    def name(self) -> str:
        return (f"{self.scaling}, rank {self.rank}" + (", Kaiming A" if self.init == "kaiming" else "")
                + ("" if self.learning_rate is None else f", lr {self.learning_rate:g}"))

    def at(self, settings: Settings) -> Config:
        """This configuration with its learning rate written out (the settings' when it has none)."""
        if self.learning_rate is not None:
            return self
        return replace(self, learning_rate=settings_rate(settings))

    @property
    def key(self) -> tuple:
        """What identifies its runs among the rows (with the seed): rank 1 of any rule is one run."""
        run = self.run_as()
        return (run.scaling, run.rank, run.init, run.learning_rate)

    def run_as(self) -> Config:
        """The configuration actually trained: at rank 1 every scaling rule is the same run."""
        return replace(self, scaling="alpha fixed") if self.rank == 1 else self


def settings_rate(settings: Settings) -> float:
    """The fine-tuning learning rate the settings give (`finetune_lr` where the settings have one)."""
    return getattr(settings, "finetune_lr", settings.learning_rate)


def finetune_rate(settings: Settings, rate: float) -> dict:
    """`replace`'s arguments that make `rate` the fine-tuning learning rate (the fine-tuning one only,
    where the settings keep it apart from pre-training's)."""
    if hasattr(settings, "finetune_learning_rate"):
        return {"finetune_learning_rate": rate}
    return {"learning_rate": rate}


def check_ranks(settings: Settings, ranks: object) -> list[int]:
    """The notebook's ranks, sorted, each checked against the adapted layers before any work.

    At least two (the lesson compares ranks, and the scaling rules differ only above rank 1). A rank
    above a layer's smaller side is refused with the settings' own sentence (linear3's weight is
    10 x 2,000, so with it adapted the rank is at most 10).
    """
    checked = sorted(set(check_whole_numbers("ranks", ranks, "[1, 2, 4, 8]")))
    for rank in checked:
        try:
            replace(settings, rank=rank)
        except SettingsError as err:
            raise SettingsError(f"ranks={list(ranks)}: {err}") from None
    if len(checked) < 2:
        raise SettingsError(f"ranks={ranks!r}: give at least two different ranks to compare, e.g. [1, 8].")
    return checked


def check_learning_rates(values: object) -> list[float]:
    """learning_rates: at least two distinct numbers between 0 and 1, sorted (a grid to tune on)."""
    ok = isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in values)
    if not ok or len(set(values)) < 2:
        raise SettingsError(f"learning_rates={values!r} is not valid: expected a list of at least two "
                            "different numbers between 0 and 1, e.g. [3e-4, 1e-3, 3e-3].")
    return sorted({float(v) for v in values})


def configurations(ranks: Sequence[int], scalings: Iterable[str] = ("alpha fixed",),
                   init: str = "normal", learning_rates: Sequence[float | None] = (None,)) -> list[Config]:
    """Every (scaling, rank, learning rate); rank 1 appears under each rule but runs once
    (`Config.run_as`)."""
    return [Config(s, r, init, lr) for s in scalings for r in ranks for lr in learning_rates]


def measure(model: nn.Module, digit: int, images: dict[str, tuple[torch.Tensor, torch.Tensor]]
            ) -> dict:
    """The columns one model earns on each split: target-digit errors (count and rate), the other
    digits' mean accuracy, the overall accuracy, prefixed by the split's name."""
    row = {}
    for split, (x, y) in images.items():
        result = evaluate(model, x, y)
        row.update(split_columns(split, result, digit))
    return row


def split_columns(split: str, result: Evaluation, digit: int) -> dict:
    """One evaluation's columns, named after its split: `validation_target_wrong`, ..."""
    total = result.per_digit_totals()[digit]
    error_rate = result.wrong_counts[digit] / max(1, total)
    others = result.mean_accuracy_except(digit)
    return {f"{split}_target_wrong": result.wrong_counts[digit],
            f"{split}_target_error_rate": error_rate,
            f"{split}_others_accuracy": others,
            f"{split}_accuracy": result.accuracy,
            f"{split}_score": (1 - error_rate + others) / 2}


class Judge:
    """Judges many LoRA copies of one pre-trained network on fixed image sets, at a lower cost.

    Each copy computes its first layer as W1 x + b1 + scale * B1 (A1 x), and the frozen part
    W1 x + b1 is the same for all of them: it is computed once per image set, which saves about a
    quarter of every evaluation. The predictions are `evaluate`'s up to float rounding (the low-rank
    term is added to the product instead of to the weight). The network is the tutorial's
    `OversizedMLP`: linear1, ReLU, linear2, ReLU, linear3.
    """

    def __init__(self, base: nn.Module, images: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not isinstance(base, OversizedMLP):
            raise TypeError(f"Judge reads an OversizedMLP's layers; got {type(base).__name__}.")
        first = base.linear1
        self.sets = {}
        with torch.inference_mode():
            for split, (x, y) in images.items():
                flat = x.reshape(len(x), -1)
                self.sets[split] = (flat, y.cpu(), F.linear(flat, base_weight(first), first.bias))

    def predict(self, model: nn.Module, split: str) -> torch.Tensor:
        """The predicted digit of every image of `split`, by a LoRA copy of the base network."""
        x, _, frozen = self.sets[split]
        lora = lora_modules(model).get("linear1")
        with torch.inference_mode():
            if lora is not None and lora.enabled:
                hidden = torch.addmm(frozen, F.linear(x, lora.lora_A), lora.lora_B.T, alpha=lora.scale)
            else:
                hidden = frozen.clone()
            hidden = torch.relu_(model.linear2(torch.relu_(hidden)))
            return model.linear3(hidden).argmax(dim=1).cpu()

    def measure(self, model: nn.Module, digit: int) -> dict:
        """`measure`'s columns for every image set."""
        row = {}
        for split, (_, labels, _) in self.sets.items():
            pairs = labels * 10 + self.predict(model, split)  # true digit, predicted digit
            confusion = torch.bincount(pairs, minlength=100).reshape(10, 10).tolist()
            row.update(split_columns(split, from_confusion(confusion), digit))
        return row


def train_one(settings: Settings, data: Mnist, base: nn.Module, config: Config, seed: int
              ) -> tuple[nn.Module, dict]:
    """Fine-tune one configuration with one fine-tuning seed: the trained LoRA copy, and its row so
    far (what was run, the scale, the trainable numbers, ||delta W|| per layer, seconds).

    `settings` carries the target digit (decided), the steps and batch size (and the learning rate
    when `config` has none); the rank, alpha and seed come from `config` and `seed`. Only the fit
    images are trained on.
    """
    args = lora_arguments(config.scaling, config.rank, settings.alpha)
    config = config.at(settings)
    run = replace(settings, finetune_seed=seed, rank=config.rank, alpha=args["alpha"],
                  **finetune_rate(settings, config.learning_rate))
    model = lora_copy(base, run.lora_seed, target_modules=settings.target_modules, init=config.init, **args)
    started = time.perf_counter()
    train_on_target(run, data, separate_path(model), verbose=False)
    seconds = time.perf_counter() - started
    loras = lora_modules(model)
    with torch.no_grad():
        norms = {name: float(lora.delta_weight().norm()) for name, lora in loras.items()}
    return model, {"scaling": config.scaling, "rank": config.rank, "init": config.init, "seed": seed,
                   "learning_rate": config.learning_rate, "alpha": args["alpha"],
                   "use_rslora": args["use_rslora"],
                   "scale": next(iter(loras.values())).scale,
                   "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   **{f"delta_norm_{name}": norms.get(name) for name in LAYER_NAMES},
                   "seconds": seconds}


def run_one(settings: Settings, data: Mnist, base: nn.Module, config: Config, seed: int,
            images: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """`train_one`, then the model judged on `images` (default: the validation and the test images)."""
    model, row = train_one(settings, data, base, config, seed)
    judge = Judge(base, images if images is not None else split_images(data))
    return {**row, **judge.measure(model, settings.target_digit)}


def run_study(settings: Settings, data: Mnist, base: nn.Module, configs: Iterable[Config],
              seeds: Sequence[int], splits: Sequence[str] = SPLITS, done: Sequence[dict] = (),
              progress: bool = True) -> list[dict]:
    """Every configuration with every seed, judged on `splits`; returns the rows of `done` plus
    the new ones. A run already in `done` (same configuration, learning rate and seed) is not made
    again, and rank 1 of any scaling rule is run (and stored) once, as "alpha fixed".

    Each model is judged (`Judge`) in a second thread while the next one trains: training runs on
    one thread (see `train`), so on a CPU the evaluation's large matrix products use the other core.
    """
    rows = list(done)
    have = {(*row_key(r), r["seed"]) for r in rows}
    todo = [(config, seed) for config in dict.fromkeys(c.at(settings).run_as() for c in configs)
            for seed in seeds if (*config.key, seed) not in have]
    judge = Judge(base, split_images(data, splits))
    bar = progress_bar(len(todo), "Fine-tuning runs", progress)

    def judged(model: nn.Module, row: dict) -> dict:
        return {**row, **judge.measure(model, settings.target_digit)}

    pending = None
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            for config, seed in todo:
                trained = train_one(settings, data, base, config, seed)
                if pending is not None:  # at most one model waits: memory stays small
                    rows.append(pending.result())
                    bar.update(1)
                pending = pool.submit(judged, *trained)
            if pending is not None:
                rows.append(pending.result())
                bar.update(1)
    finally:
        bar.close()
    return rows


def row_key(row: dict) -> tuple:
    """A row's configuration, as `Config.key` gives it (rows written before learning rates: None)."""
    return (row["scaling"], row["rank"], row["init"], row.get("learning_rate"))


def rows_of(rows: Sequence[dict], config: Config) -> list[dict]:
    """The per-seed rows of one configuration, by seed (rank 1 of any rule: the shared "alpha fixed"
    runs). A configuration without a learning rate takes its runs at whichever one rate they used."""
    run = config.run_as()
    mine = [r for r in rows if row_key(r)[:3] == run.key[:3]
            and (run.learning_rate is None or r.get("learning_rate") == run.learning_rate)]
    rates = {r.get("learning_rate") for r in mine}
    if run.learning_rate is None and len(rates) > 1:
        raise ValueError(f"{config.name} was run at several learning rates {sorted(rates)}: name one.")
    return sorted(mine, key=lambda r: r["seed"])


def values(rows: Sequence[dict], column: str, scale: float = 1.0) -> list[float]:
    """One column of per-seed rows, each value times `scale` (100 for percentages)."""
    return [scale * r[column] for r in rows]


def mean_norms(rows: Sequence[dict]) -> dict[str, float]:
    """The mean ||delta W|| over the seeds, per adapted layer."""
    return {name: spread(values(rows, f"delta_norm_{name}")).mean for name in LAYER_NAMES
            if all(r.get(f"delta_norm_{name}") is not None for r in rows)}


def summary(rows: Sequence[dict], configs: Iterable[Config]) -> list[dict]:
    """One row per configuration: its seeds and, for every measured column, the mean and range."""
    columns = [f"{s}_{m}" for s in SPLITS for m in METRICS] + [f"delta_norm_{n}" for n in LAYER_NAMES]
    out = []
    for config in configs:
        mine = rows_of(rows, config)
        if not mine:
            raise ValueError(f"No runs of {config.name} among the rows.")
        entry = {"name": config.name, "scaling": config.scaling, "rank": config.rank, "init": config.init,
                 "learning_rate": mine[0].get("learning_rate"), "scale": mine[0]["scale"],
                 "trainable": mine[0]["trainable"], "seeds": [r["seed"] for r in mine]}
        for column in columns:
            found = [r.get(column) for r in mine]
            if all(v is not None for v in found):  # a split not evaluated, a layer not adapted: left out
                s = spread(found)
                entry[column] = {"mean": s.mean, "low": s.low, "high": s.high}
        out.append(entry)
    return out


def as_spread(entry: dict, column: str) -> Spread:
    """A summary cell back as a `Spread`."""
    cell = entry[column]
    return Spread(cell["mean"], cell["low"], cell["high"], len(entry["seeds"]))


def reference(pretrained: nn.Module, data: Mnist, digit: int) -> dict:
    """The pre-trained network's columns on the validation and test images (the 'before')."""
    return measure(pretrained, digit, split_images(data))


@dataclass(frozen=True)
class Choice:
    """The rank `choose_rank` keeps, the rank with the best mean score, and why, in words."""

    rank: int
    best: int
    reason: str


def higher_on(rows: Sequence[dict], higher: Config, lower: Config, column: str = "validation_score"
              ) -> tuple[int, int]:
    """On how many seeds `higher` beats `lower` in `column`, seed against seed (the seeds share
    the batch order, so the pairs are fair), and out of how many shared seeds."""
    a = {r["seed"]: r[column] for r in rows_of(rows, higher)}
    b = {r["seed"]: r[column] for r in rows_of(rows, lower)}
    shared = sorted(set(a) & set(b))
    return sum(a[s] > b[s] for s in shared), len(shared)


def choose_rank(rows: Sequence[dict], configs: Sequence[Config]) -> Choice:
    """The rank to keep, decided on the validation score alone (the test columns are never read).

    Best: the highest mean score over the seeds. Chosen: the smallest rank whose range of scores
    overlaps the best's: the seeds cannot tell the two apart, and a smaller adapter trains fewer
    numbers.
    """
    if not configs:
        raise ValueError("choose_rank needs at least one configuration.")
    by_rank = {c.rank: c for c in configs}
    scores = {c.rank: spread(values(rows_of(rows, c), "validation_score", 100)) for c in configs}
    best = max(scores, key=lambda r: (scores[r].mean, -r))
    chosen = min(r for r in scores if scores[r].overlaps(scores[best]))
    if chosen == best:
        reason = f"the highest mean validation score, {scores[best].mean:.1f} %"
    else:
        wins, shared = higher_on(rows, by_rank[best], by_rank[chosen])
        reason = (f"the smallest rank whose range of validation scores overlaps that of rank {best}; "
                  f"rank {best} is higher on average ({scores[best].mean:.1f} % against "
                  f"{scores[chosen].mean:.1f} %) and on {wins} of {shared} seeds, seed against seed")
    return Choice(chosen, best, reason)


@dataclass(frozen=True)
class Tuned:
    """A scaling rule's learning rate, tuned at one rank: the rate with the highest mean validation
    score over the seeds, every rate's mean score, and whether the best lies at an end of the grid
    (then a wider grid might find a better one)."""

    scaling: str
    rank: int
    learning_rate: float
    means: dict[float, float]
    at_edge: bool

    @property
    def config(self) -> Config:
        return Config(self.scaling, self.rank, "normal", self.learning_rate)


def tune_learning_rate(rows: Sequence[dict], scaling: str, rank: int, learning_rates: Sequence[float]
                       ) -> Tuned:
    """The learning rate of the grid with the highest mean validation score (test columns unread)."""
    means = {}
    for lr in sorted(learning_rates):
        mine = rows_of(rows, Config(scaling, rank, "normal", lr))
        if not mine:
            raise ValueError(f"No runs of {scaling}, rank {rank} at learning rate {lr:g} among the rows.")
        means[lr] = spread(values(mine, "validation_score", 100)).mean
    best = max(means, key=means.get)
    return Tuned(scaling, rank, best, means, best in (min(means), max(means)))


def verdict(first: Sequence[dict], second: Sequence[dict], names: tuple[str, str],
            column: str = "test_score", figures: bool = True) -> str:
    """Two configurations' per-seed `column` (a fraction is shown in %): 'no difference detected at
    N seeds' when the ranges overlap, else which is higher (every seed of one above every seed of the
    other); with their mean (min-max) unless `figures` is False."""
    scale, unit = (1, "") if column.endswith("_wrong") else (100, " %")
    a, b = (spread(values(rows, column, scale)) for rows in (first, second))
    seeds = min(a.count, b.count)
    shown = f" ({names[0]} {a.text(1)}{unit}, {names[1]} {b.text(1)}{unit})" if figures else ""
    if a.overlaps(b):
        return f"no difference detected at {seeds} seeds{shown}"
    high, low = names if a.mean > b.mean else names[::-1]
    return f"{high} higher than {low}, the ranges over {seeds} seeds apart{shown}"


def verdicts(first: Sequence[dict], second: Sequence[dict], names: tuple[str, str], digit: int,
             split: str = "test") -> str:
    """`verdict` on the score and on its two halves, without figures: the score can tie while one
    configuration fixes more of the digit and forgets more of the others."""
    parts = {"score": "score", f"digit {digit} wrong": "target_wrong", "other digits": "others_accuracy"}
    return "; ".join(f"{label}: {verdict(first, second, names, f'{split}_{column}', figures=False)}"
                     for label, column in parts.items())


def seed_table(groups: dict[str, Sequence[dict]], digit: int, split: str = "test"):
    """A short table: per configuration (its per-seed rows), the scale, the learning rate and, on
    `split`, the mean (min-max) over the seeds of each measure."""
    import pandas as pd

    lines = []
    for name, rows in groups.items():
        lines.append({"": name, "scale": f"{rows[0]['scale']:.3g}",
                      "learning rate": f"{rows[0].get('learning_rate'):g}", "seeds": len(rows),
                      f"digit {digit} wrong": spread(values(rows, f"{split}_target_wrong")).text(1),
                      "other digits %": spread(values(rows, f"{split}_others_accuracy", 100)).text(1),
                      "score %": spread(values(rows, f"{split}_score", 100)).text(1)})
    return pd.DataFrame(lines).set_index("")


SPLIT_COLORS = {"validation": "tab:orange", "test": "tab:blue"}
PANELS = (("score", "score (%)", 100.0), ("target_wrong", "digit {digit} wrong", 1.0),
          ("others_accuracy", "other digits (%)", 100.0))


def plot_seeds(groups: dict[str, Sequence[dict]], digit: int, splits: Sequence[str] = SPLITS,
               before: dict | None = None, title: str = "", xlabel: str = "configuration"):
    """One panel per measure (`PANELS`), one column of points per group (a configuration's per-seed
    rows), one point per seed and a bar at their mean; the pre-trained network's value dashed."""
    from ..plots import legend_below, new_figure, seed_column

    fig, axes = new_figure(1, len(PANELS), figsize=(4.3 * len(PANELS), 3.9), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], PANELS, strict=True):
        label = label.format(digit=digit)
        for k, split in enumerate(splits):
            color, offset = SPLIT_COLORS[split], (k - (len(splits) - 1) / 2) * 0.24
            for i, rows in enumerate(groups.values()):
                ys = values(rows, f"{split}_{metric}", scale)
                seed_column(ax, i + offset, ys, color, 0.03, 0.1,
                            label=f"{split}, one point per seed" if i == 0 else None)
            if before is not None:
                ax.axhline(scale * before[f"{split}_{metric}"], color=color, ls="--", lw=1,
                           label=f"pre-trained, {split}")
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set(title=label, xlabel=xlabel, ylabel=label)
        ax.grid(axis="y", alpha=0.3)
    legend_below(fig, axes[0][0], title, 0.08)
    return fig


def plot_learning_rates(rows: Sequence[dict], tuned: Sequence[Tuned], title: str = ""):
    """Each rule's validation score against the learning rate, one point per seed, a line through
    the means, the tuned rate ringed."""
    from ..plots import SCALING_STYLE, new_figure

    fig, ax = new_figure(figsize=(7.5, 4.2))
    for t in tuned:
        color = SCALING_STYLE.get(t.scaling, ("tab:gray",))[0]
        rates = sorted(t.means)
        for lr in rates:
            ys = values(rows_of(rows, Config(t.scaling, t.rank, "normal", lr)), "validation_score", 100)
            xs = [lr * 1.04 ** (j - (len(ys) - 1) / 2) for j in range(len(ys))]
            ax.scatter(xs, ys, s=16, color=color, alpha=0.7)
        ax.plot(rates, [t.means[lr] for lr in rates], color=color, marker="_", label=f"{t.scaling} (mean)")
        ax.scatter([t.learning_rate], [t.means[t.learning_rate]], s=220, facecolors="none",
                   edgecolors=color, linewidths=2)
    ax.set_xscale("log")
    ax.set(title=title or "Validation score against the learning rate (ringed: the tuned rate)",
           xlabel="learning rate (log scale)", ylabel="validation score (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
