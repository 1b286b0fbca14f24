"""07's experiment: what LoRA's rank, its scaling rule and the initialisation of A change.

Every configuration (a scaling rule, a rank, an initialisation of A) is fine-tuned from the one
pre-trained network once per fine-tuning seed, in this process: a frozen LoRA copy whose A is
drawn right after seeding with that seed, trained on the target digit's fit images through the
separate low-rank path. Each run is judged on the validation images (training images held out of
fine-tuning: the rank is chosen on them) and, in the main sweep, on the test images (which only
report), and the size of the update it made, ||delta W||_F = ||scale * B @ A||_F, is measured per
layer. `run_study` runs a list of them; `summary` gives each configuration's mean and range over the
seeds; `choose_rank` decides on the validation columns alone; `findings` words the comparisons.

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

from .data import SPLITS, Mnist, split_images
from .evaluate import Evaluation, evaluate, from_confusion
from .lora import base_weight, lora_modules, separate_path
from .model import LAYER_NAMES, OversizedMLP
from .pipeline import lora_copy, train_on_target
from .settings import Settings, SettingsError, check_whole_numbers
from .stats import Spread, spread
from .train import progress_bar

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
METRICS = ("target_wrong", "target_error_rate", "others_accuracy", "accuracy")


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
    """One way to fine-tune: a scaling rule, a rank, and how A is drawn ("normal": the post's N(0, 1);
    "kaiming": PEFT's Kaiming-uniform)."""

    scaling: str
    rank: int
    init: str = "normal"

    @property
    def name(self) -> str:
        return f"{self.scaling}, rank {self.rank}" + (", Kaiming A" if self.init == "kaiming" else "")

    def run_as(self) -> Config:
        """The configuration actually trained: at rank 1 every scaling rule is the same run."""
        return replace(self, scaling="alpha fixed") if self.rank == 1 else self


def check_ranks(settings: Settings, ranks: object) -> list[int]:
    """The notebook's ranks, sorted, each checked against the adapted layers before any work.

    A rank above a layer's smaller side is refused with the settings' own sentence (linear3's
    weight is 10 x 2,000, so with it adapted the rank is at most 10).
    """
    checked = sorted(set(check_whole_numbers("ranks", ranks, "[1, 2, 4, 8]")))
    for rank in checked:
        try:
            replace(settings, rank=rank)
        except SettingsError as err:
            raise SettingsError(f"ranks={list(ranks)}: {err}") from None
    return checked


def check_max_forgetting(value: object) -> float:
    """max_forgetting_points: a number of percentage points >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise SettingsError(f"max_forgetting_points={value!r} is not valid: expected a number of "
                            "percentage points from 0 to 100, e.g. 5.")
    return float(value)


def configurations(ranks: Sequence[int], scalings: Iterable[str] = ("alpha fixed",),
                   init: str = "normal") -> list[Config]:
    """Every (scaling, rank) pair; rank 1 appears under each rule but runs once (`Config.run_as`)."""
    return [Config(s, r, init) for s in scalings for r in ranks]


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
    return {f"{split}_target_wrong": result.wrong_counts[digit],
            f"{split}_target_error_rate": result.wrong_counts[digit] / max(1, total),
            f"{split}_others_accuracy": result.mean_accuracy_except(digit),
            f"{split}_accuracy": result.accuracy}


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

    `settings` carries the target digit (decided), the steps, batch size and learning rate; the
    rank, alpha and seed come from `config` and `seed`. Only the fit images are trained on.
    """
    args = lora_arguments(config.scaling, config.rank, settings.alpha)
    run = replace(settings, finetune_seed=seed, rank=config.rank, alpha=args["alpha"])
    model = lora_copy(base, run.lora_seed, target_modules=settings.target_modules, init=config.init, **args)
    started = time.perf_counter()
    train_on_target(run, data, separate_path(model), verbose=False)
    seconds = time.perf_counter() - started
    loras = lora_modules(model)
    with torch.no_grad():
        norms = {name: float(lora.delta_weight().norm()) for name, lora in loras.items()}
    return model, {"scaling": config.scaling, "rank": config.rank, "init": config.init, "seed": seed,
                   "alpha": args["alpha"], "use_rslora": args["use_rslora"],
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
    the new ones. A run already in `done` is not made again, and rank 1 of any scaling rule is
    run (and stored) once, as "alpha fixed".

    Each model is judged (`Judge`) in a second thread while the next one trains: training runs on
    one thread (see `train`), so on a CPU the evaluation's large matrix products use the other core.
    """
    rows = list(done)
    have = {(r["scaling"], r["rank"], r["init"], r["seed"]) for r in rows}
    todo = [(config, seed) for config in dict.fromkeys(c.run_as() for c in configs) for seed in seeds
            if (config.scaling, config.rank, config.init, seed) not in have]
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


def rows_of(rows: Sequence[dict], config: Config) -> list[dict]:
    """The per-seed rows of one configuration (rank 1 of any rule: the shared "alpha fixed" runs)."""
    wanted = config.run_as()
    key = (wanted.scaling, wanted.rank, wanted.init)
    return [r for r in rows if (r["scaling"], r["rank"], r["init"]) == key]


def summary(rows: Sequence[dict], configs: Iterable[Config]) -> list[dict]:
    """One row per configuration: its seeds and, for every measured column, the mean and range."""
    columns = [f"{s}_{m}" for s in SPLITS for m in METRICS] + [f"delta_norm_{n}" for n in LAYER_NAMES]
    out = []
    for config in configs:
        mine = rows_of(rows, config)
        if not mine:
            raise ValueError(f"No runs of {config.name} among the rows.")
        entry = {"name": config.name, "scaling": config.scaling, "rank": config.rank, "init": config.init,
                 "scale": mine[0]["scale"], "trainable": mine[0]["trainable"],
                 "seeds": sorted(r["seed"] for r in mine)}
        for column in columns:
            values = [r.get(column) for r in mine]
            if all(v is not None for v in values):  # a split not evaluated, a layer not adapted: left out
                s = spread(values)
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
    """The rank `choose_rank` keeps, the ranks it allowed, the best of them, and why, in words."""

    rank: int
    allowed: list[int]  # the ranks whose other digits lost at most the allowed points
    best: int  # the allowed rank with the fewest target errors (means)
    reason: str


def forgetting_points(entry: dict, before: dict, split: str = "validation") -> float:
    """How many points the other digits' mean accuracy fell, mean over the seeds."""
    return 100 * (before[f"{split}_others_accuracy"] - entry[f"{split}_others_accuracy"]["mean"])


def choose_rank(entries: Sequence[dict], before: dict, max_forgetting_points: float) -> Choice:
    """The rank to keep, decided on the validation images alone (the test columns are never read).

    Allowed: the ranks whose other digits' mean validation accuracy fell by at most
    `max_forgetting_points` (means over the seeds). The best of them: the fewest target errors
    (mean). Chosen: the smallest allowed rank tied with the best on both counts, target errors and
    other-digit accuracy (ranges over the seeds overlap): the seeds cannot tell them apart, and a
    smaller adapter trains fewer numbers. When no rank is allowed, the one that forgot least is kept.
    """
    if not entries:
        raise ValueError("choose_rank needs at least one rank's summary.")
    by_rank = sorted(entries, key=lambda e: e["rank"])
    allowed = [e for e in by_rank if forgetting_points(e, before) <= max_forgetting_points]
    if not allowed:
        least = min(by_rank, key=lambda e: (forgetting_points(e, before), e["rank"]))
        return Choice(least["rank"], [], least["rank"],
                      f"no rank kept the other digits within {max_forgetting_points:g} points on the "
                      f"validation images; rank {least['rank']} lost the least "
                      f"({forgetting_points(least, before):.1f})")
    best = min(allowed, key=lambda e: (e["validation_target_wrong"]["mean"], e["rank"]))

    def tied(entry: dict) -> bool:
        return all(as_spread(entry, column).overlaps(as_spread(best, column))
                   for column in ("validation_target_wrong", "validation_others_accuracy"))

    chosen = next(e for e in allowed if tied(e))
    names = [e["rank"] for e in allowed]
    if chosen is best:
        why = f"the fewest target errors on the validation images among the allowed ranks {names}"
    else:
        why = (f"tied on the validation images, on target errors and on the other digits, with rank "
               f"{best['rank']}, which had the fewest target errors among the allowed ranks {names}; "
               "a tie goes to the smaller rank")
    return Choice(chosen["rank"], names, best["rank"], why)


def compare(a: Spread, b: Spread, higher_is_better: bool) -> str:
    """'tie' when the ranges overlap, else which is better: 'first better' / 'second better'."""
    return {"better": "first better", "worse": "second better"}.get(a.versus(b, higher_is_better), "tie")


def markdown_table(entries: Sequence[dict], columns: Sequence[str], digit: int,
                   before: dict | None = None) -> str:
    """A Markdown table, one row per configuration: its scale, trainable numbers and seeds, then each
    of `columns` as the mean (min-max) over the seeds; the pre-trained network first when given."""
    columns = [c for c in columns if any(c in e for e in entries)]  # a layer left out: no column

    def title(column: str) -> str:
        if column.startswith("delta_norm_"):
            return f"‖ΔW‖ {column.removeprefix('delta_norm_')}"
        split, _, metric = column.partition("_")
        what = {"target_wrong": f"digit {digit} wrong", "target_error_rate": f"digit {digit} error %",
                "others_accuracy": "other digits %", "accuracy": "all digits %"}[metric]
        return f"{split}: {what}"

    def cell(value: Spread, column: str) -> str:
        if column.startswith("delta_norm_"):
            return value.text(2)
        return value.text(1, 1 if column.endswith("target_wrong") else 100)

    lines = ["| configuration | scale | trainable | seeds | " + " | ".join(map(title, columns)) + " |",
             "|:--|--:|--:|--:|" + "--:|" * len(columns)]
    if before is not None:
        # the pre-trained network: one value per split column; its update is zero
        values = [("0" if c not in before else f"{before[c]}" if c.endswith("target_wrong")
                   else f"{100 * before[c]:.1f}") for c in columns]
        lines.append("| pre-trained | | | | " + " | ".join(values) + " |")
    for e in entries:
        values = [cell(as_spread(e, c), c) if c in e else "" for c in columns]
        lines.append(f"| {e['name']} | {e['scale']:.3g} | {e['trainable']:,} | {len(e['seeds'])} | "
                     + " | ".join(values) + " |")
    return "\n".join(lines)


def distinct(entries: Iterable[dict]) -> list[dict]:
    """The summaries of distinct runs: rank 1 of "alpha = r" and "rsLoRA" is the "alpha fixed" run,
    and a configuration listed twice counts once."""
    seen, out = set(), []
    for e in entries:
        key = Config(e["scaling"], e["rank"], e["init"]).run_as()
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def entry_at(entries: Sequence[dict], scaling: str, rank: int, init: str = "normal") -> dict:
    """The summary of one configuration (rank 1 of any rule: the shared run, under that rule's name)."""
    for e in entries:
        if (e["scaling"], e["rank"], e["init"]) == (scaling, rank, init):
            return e
    raise KeyError(f"No summary of {scaling}, rank {rank}, {init} A.")


def _verdicts(a: dict, b: dict, split: str = "validation") -> tuple[str, str]:
    """`a` against `b` on target errors (fewer is better) and on the other digits (higher is better):
    each 'better', 'worse' or 'tie' (ranges over the seeds overlap)."""
    words = {"first better": "better", "second better": "worse", "tie": "tie"}
    wrong, others = f"{split}_target_wrong", f"{split}_others_accuracy"
    return (words[compare(as_spread(a, wrong), as_spread(b, wrong), higher_is_better=False)],
            words[compare(as_spread(a, others), as_spread(b, others), higher_is_better=True)])


def _pair(e: dict, split: str = "validation") -> str:
    return (f"{as_spread(e, f'{split}_target_wrong').text(1)} wrong, other digits "
            f"{as_spread(e, f'{split}_others_accuracy').text(1, 100)} %")


def _ranks(ranks: Sequence[int]) -> str:
    """'rank 4', 'ranks 4 and 8', 'ranks 2, 4 and 8'."""
    words = [str(r) for r in ranks]
    return f"rank {words[0]}" if len(words) == 1 else f"ranks {', '.join(words[:-1])} and {words[-1]}"


def _size(e: dict, layer: str) -> float:
    return e[f"delta_norm_{layer}"]["mean"]


def findings(main: Sequence[dict], scaling: Sequence[dict], init: Sequence[dict], before: dict,
             choice: Choice) -> str:
    """What the runs show, as Markdown bullets computed from the summaries (validation images):
    every comparison says 'better', 'worse' or 'tie' from the seeds' ranges, none is typed by hand."""
    lines = []
    ranks = sorted(e["rank"] for e in main)
    low, top = ranks[0], ranks[-1]
    first = entry_at(main, "alpha fixed", low)
    if top != low:
        parts, beats = [], []
        for e in sorted(main, key=lambda e: e["rank"])[1:]:
            target, others = _verdicts(e, first)
            parts.append(f"rank {e['rank']}: target errors {target}, other digits {others}")
            if "worse" not in (target, others) and "better" in (target, others):
                beats.append(e["rank"])
        are = "is" if len(beats) == 1 else "are"
        verdict = (f"rank {low} is **not** the best trade: {_ranks(beats)} {are} better on at least one "
                   "count and worse on neither" if beats else
                   f"no larger rank beats rank {low} on one count without losing on the other")
        lines.append(f"- **Rank, alpha fixed.** Against rank {low} ({_pair(first)}): {'; '.join(parts)}. "
                     f"So at fixed alpha {verdict}. The rule above chose rank {choice.rank}.")
    layer = next((n for n in ("linear2", "linear1", "linear3") if f"delta_norm_{n}" in first), None)
    if layer and top != low and scaling:
        sizes = []
        for rule in SCALINGS:
            ratio = _size(entry_at(scaling, rule, top), layer) / _size(entry_at(scaling, rule, low), layer)
            guess = (top / low) ** RANDOM_WALK_POWER[rule]
            near = "close to" if abs(math.log(ratio / guess)) < math.log(1.25) else (
                "below" if ratio < guess else "above")
            sizes.append(f"{rule} x{ratio:.2f}, {near} the estimate x{guess:.2f}")
        same_scale = [entry_at(scaling, "alpha = r", r) for r in (low, top)]
        grows = _size(same_scale[1], layer) > _size(same_scale[0], layer)
        lines.append(f"- **Update size.** From rank {low} to rank {top}, the mean ||ΔW|| of {layer} changes "
                     f"by: {'; '.join(sizes)}. With alpha = r the factor in front of B @ A stays the same, "
                     f"and the update {'still grows' if grows else 'does not grow'} with the rank.")
        base = entry_at(scaling, "alpha fixed", top)
        rules = []
        for rule in [r for r in SCALINGS if r != "alpha fixed"]:
            e = entry_at(scaling, rule, top)
            target, others = _verdicts(e, base)
            rules.append(f"{rule}: {_pair(e)}, so target errors {target}, other digits {others}")
        lines.append(f"- **Scaling rule at rank {top}.** Against alpha fixed ({_pair(base)}): "
                     f"{'; '.join(rules)}.")
    if init:
        k = init[0]
        n = entry_at(main, "alpha fixed", k["rank"])
        target, others = _verdicts(k, n)
        shrink = ", ".join(f"{name} {_size(n, name) / _size(k, name):.0f}x" for name in LAYER_NAMES
                           if f"delta_norm_{name}" in k)
        lines.append(f"- **Initialisation at rank {k['rank']}.** Kaiming-uniform A: {_pair(k)}; the post's "
                     f"N(0, 1): {_pair(n)}. With Kaiming's A, target errors {target}, other digits {others}; "
                     f"the N(0, 1) update is larger by {shrink} (mean ||ΔW||).")
    everything = distinct([*main, *scaling, *init])
    floor = 100 * before["validation_others_accuracy"]
    below = [e for e in everything if 100 * e["validation_others_accuracy"]["high"] < floor]
    kept = max(everything, key=lambda e: e["validation_others_accuracy"]["mean"])
    lost = min(everything, key=lambda e: e["validation_others_accuracy"]["mean"])
    lines.append(f"- **Forgetting.** {len(below)} of {len(everything)} configurations left the other digits "
                 f"below the pre-trained network's {floor:.1f} % in every seed; the smallest loss was "
                 f"{kept['name']}'s ({100 * kept['validation_others_accuracy']['mean']:.1f} %), the largest "
                 f"{lost['name']}'s ({100 * lost['validation_others_accuracy']['mean']:.1f} %).")
    return "\n".join(lines)
