"""07's study: LoRA's rank, scaling rule and A's init; choices on validation, reports on test."""

import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, replace

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ..data import SPLITS, Mnist, split_images
from ..evaluate import Evaluation, evaluate, from_predictions
from ..lora import base_weight, lora_modules, lora_parameter_counts, separate_path
from ..model import OversizedMLP, layer_shapes
from ..pipeline import lora_copy, train_on_target
from ..settings import Settings, SettingsError, check_whole_numbers
from ..train import progress_bar
from .stats import Spread, best_and_ties, spread, timed

# Each rule, with the factor in front of B @ A it gives at rank r; at rank 1 all three are one run.
SCALINGS = {"alpha fixed": "alpha / r", "alpha = r": "alpha", "rsLoRA": "alpha / sqrt(r)"}

def check_scaling(scaling: object) -> str:
    if scaling not in SCALINGS:
        raise SettingsError(f"scaling={scaling!r} is not valid: expected one of {list(SCALINGS)} (the factor "
                            f"in front of B @ A is {', '.join(SCALINGS.values())}).")
    return str(scaling)

def lora_arguments(scaling: str, rank: int, alpha: float = 1.0) -> dict:
    """`add_lora`'s rank, alpha and use_rslora for a scaling rule at a rank (base alpha: the post's 1)."""
    check_scaling(scaling)
    built = float(alpha) * rank if scaling == "alpha = r" else float(alpha)
    return {"rank": rank, "alpha": built, "use_rslora": scaling == "rsLoRA"}

def scale_of(scaling: str, rank: int, alpha: float = 1.0) -> float:
    """The factor in front of B @ A that the rule gives at this rank."""
    return lora_arguments(scaling, rank, alpha)["alpha"] / (math.sqrt(rank) if scaling == "rsLoRA" else rank)

@dataclass(frozen=True)
class Config:
    """One way to fine-tune: A drawn "normal" (the post's) or "kaiming" (PEFT's); no rate: the settings'."""
    scaling: str
    rank: int
    init: str = "normal"
    learning_rate: float | None = None

    @property
    def name(self) -> str:
        return (f"{self.scaling}, rank {self.rank}" + (", Kaiming A" if self.init == "kaiming" else "")
                + ("" if self.learning_rate is None else f", lr {self.learning_rate:g}"))

    def run_as(self) -> "Config":
        """The configuration actually trained: at rank 1 every scaling rule is the same run."""
        return replace(self, scaling="alpha fixed") if self.rank == 1 else self

def check_ranks(settings: Settings, ranks: object, name: str = "ranks", at_least: int = 2,
                every_layer: bool = False) -> list[int]:
    """The ranks, sorted, `at_least` different; the largest checked by the settings (every smaller one
    then fits), with `every_layer` on each layer alone (08 and 12 adapt all: none can be left out)."""
    checked = sorted(set(check_whole_numbers(name, ranks, "[1, 2, 4, 8]")))
    try:
        for layers in [[layer] for layer in layer_shapes()] if every_layer else [settings.target_modules]:
            replace(settings, rank=checked[-1], target_modules=layers)
    except SettingsError as err:
        raise SettingsError(f"{name}={list(ranks)}: {err}") from None
    if len(checked) < at_least:
        raise SettingsError(f"{name}={ranks!r}: give at least {at_least} different ranks to compare, "
                            "e.g. [1, 8].")
    return checked

def run_settings(settings: Settings, scaling: str, rank: int, alpha: float, seed: int, **changes) -> Settings:
    """One run's settings, checked with alpha as given; LoRA's alpha then follows the scaling rule."""
    checked = replace(settings, rank=rank, alpha=alpha, finetune_seed=seed, **changes)
    return replace(checked, alpha=lora_arguments(scaling, rank, alpha)["alpha"])

def fine_tune(run: Settings, data: Mnist, base: nn.Module, scaling: str, init: str = "normal",
              on_step: Callable[[int, int], None] | None = None) -> tuple[nn.Module, list[float], float]:
    """A fresh LoRA copy of `base` trained through the separate path: the model, losses, seconds."""
    model = lora_copy(base, run.lora_seed, target_modules=run.target_modules, init=init, rank=run.rank,
                      alpha=run.alpha, use_rslora=scaling == "rsLoRA")
    losses, seconds = timed(train_on_target, run, data, separate_path(model), verbose=False, on_step=on_step)
    return model, losses, seconds

def split_columns(split: str, result: Evaluation, digit: int) -> dict[str, float]:
    """"score": the mean of the target digit's accuracy and the other digits' mean accuracy."""
    error_rate = result.wrong_counts[digit] / max(1, result.per_digit_totals()[digit])
    others = result.mean_accuracy_except(digit)
    return {f"{split}_target_wrong": result.wrong_counts[digit], f"{split}_target_error_rate": error_rate,
            f"{split}_others_accuracy": others, f"{split}_accuracy": result.accuracy,
            f"{split}_score": (1 - error_rate + others) / 2}

def measure(model: nn.Module, digit: int, images: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> pd.Series:
    """One model's columns on each split (`validation_score`, ...), by `evaluate`."""
    return pd.Series({k: v for split, (x, y) in images.items()
                      for k, v in split_columns(split, evaluate(model, x, y), digit).items()})

class Judge:
    """`evaluate` up to float rounding, with the frozen W1 x + b1 computed once per image set."""

    def __init__(self, base: OversizedMLP, images: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        first = base.linear1
        with torch.inference_mode():
            flat = {split: (x.reshape(len(x), -1), y.cpu()) for split, (x, y) in images.items()}
            self.sets = {s: (x, y, F.linear(x, base_weight(first), first.bias)) for s, (x, y) in flat.items()}

    def predict(self, model: nn.Module, split: str) -> torch.Tensor:
        x, _, frozen = self.sets[split]
        lora = lora_modules(model).get("linear1")
        with torch.inference_mode():
            hidden = (torch.addmm(frozen, F.linear(x, lora.lora_A), lora.lora_B.T, alpha=lora.scale)
                      if lora is not None and lora.enabled else frozen.clone())
            return model.linear3(torch.relu_(model.linear2(torch.relu_(hidden)))).argmax(dim=1).cpu()

    def measure(self, model: nn.Module, digit: int) -> dict:
        row = {}
        for split, (_, labels, _) in self.sets.items():
            row.update(split_columns(split, from_predictions(self.predict(model, split), labels), digit))
        return row

def run_study(settings: Settings, data: Mnist, base: nn.Module, configs: Iterable[Config],
              seeds: Sequence[int], splits: Sequence[str] = SPLITS, done: pd.DataFrame | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Each configuration and seed not in `done`, judged in a second thread while the next one trains."""
    key = ["scaling", "rank", "init", "learning_rate", "seed"]
    have = set() if done is None else set(done[key].itertuples(index=False, name=None))
    todo = [(config, seed) for config in dict.fromkeys(
        replace(c, learning_rate=c.learning_rate or settings.finetune_lr).run_as() for c in configs)
            for seed in seeds if (*astuple(config), seed) not in have]
    judge, judged, digit = Judge(base, split_images(data, splits)), [], settings.target_digit
    with progress_bar(len(todo), "Fine-tuning runs", progress) as bar, ThreadPoolExecutor(1) as pool:
        for config, seed in todo:
            run = run_settings(settings, config.scaling, config.rank, settings.alpha, seed,
                               finetune_learning_rate=config.learning_rate)
            model, _, seconds = fine_tune(run, data, base, config.scaling, config.init)
            loras = lora_modules(model)
            norms = {f"delta_norm_{n}": float(m.delta_weight().detach().norm()) for n, m in loras.items()}
            row = {**asdict(config), "seed": seed, "alpha": run.alpha, "scale": [*loras.values()][0].scale,
                   "trainable": lora_parameter_counts(model)[1], **norms, "seconds": seconds}
            if judged:
                judged[-1].result()  # at most one model waits: memory stays small
            judged.append(pool.submit(lambda m, r: {**r, **judge.measure(m, digit)}, model, row))
            bar.update(1)
    new = pd.DataFrame([future.result() for future in judged])
    return new if done is None else pd.concat([done, new], ignore_index=True)

def runs_of(runs: pd.DataFrame, config: Config) -> pd.DataFrame:
    """One configuration's runs by seed (rank 1: the shared runs); no learning rate: the one they used."""
    run = config.run_as()
    mine = runs[(runs.scaling == run.scaling) & (runs["rank"] == run.rank) & (runs.init == run.init)]
    if run.learning_rate is not None:
        mine = mine[mine.learning_rate == run.learning_rate]
    elif mine.learning_rate.nunique() > 1:
        raise ValueError(f"{config.name} was run at several learning rates "
                         f"{sorted(mine.learning_rate.unique())}: name one.")
    if mine.empty:
        raise ValueError(f"No runs of {config.name} among the runs.")
    return mine.sort_values("seed")

def summary(runs: pd.DataFrame, configs: Iterable[Config]) -> pd.DataFrame:
    """Per configuration and measured column: the seeds, the mean, lowest and highest."""
    chosen = pd.concat([runs_of(runs, c).assign(name=c.name) for c in configs])
    measured = [c for c in chosen if c.startswith(("validation_", "test_", "delta_norm_"))]
    long = chosen.melt(["name", "seed"], measured, var_name="measure").dropna()
    # the mean as `spread` sums it: pandas' compensated sum can differ in the last bit
    return long.groupby(["name", "measure"], sort=False)["value"].agg(
        seeds="count", mean=lambda v: spread(v).mean, low="min", high="max").reset_index()

def higher_on(runs: pd.DataFrame, higher: Config, lower: Config, column: str = "validation_score"
              ) -> tuple[int, int]:
    """On how many shared seeds `higher` beats `lower` in `column` (seed against seed), and of how many."""
    pairs = pd.merge(runs_of(runs, higher), runs_of(runs, lower), on="seed")
    return int((pairs[f"{column}_x"] > pairs[f"{column}_y"]).sum()), len(pairs)

@dataclass(frozen=True)
class Choice:
    """The rank kept, the best, the seeds (of `shared`) where the best beats it; validation scores (%)."""
    rank: int
    best: int
    wins: int
    shared: int
    scores: dict[int, Spread]

def choose_rank(runs: pd.DataFrame, configs: Sequence[Config]) -> Choice:
    """On the validation score alone: the smallest rank among the best and its ties."""
    by_rank = {c.rank: c for c in sorted(configs, key=lambda c: c.rank)}
    scores = {r: spread(100 * runs_of(runs, c).validation_score) for r, c in by_rank.items()}
    best, ties = best_and_ties(scores, higher_is_better=True)
    chosen = min([best, *ties])
    return Choice(chosen, best, *higher_on(runs, by_rank[best], by_rank[chosen]), scores)

@dataclass(frozen=True)
class Tuned:
    """A rule's learning rate tuned at one rank, and each rate's mean validation score (%)."""
    scaling: str
    rank: int
    learning_rate: float
    means: dict[float, float]

    @property
    def config(self) -> Config:
        return Config(self.scaling, self.rank, "normal", self.learning_rate)

def tune_learning_rate(runs: pd.DataFrame, scaling: str, rank: int, learning_rates: Sequence[float]) -> Tuned:
    """The grid's learning rate with the best mean validation score."""
    scores = {lr: spread(100 * runs_of(runs, Config(scaling, rank, "normal", lr)).validation_score)
              for lr in sorted(learning_rates)}
    best, _ = best_and_ties(scores, higher_is_better=True)
    return Tuned(scaling, rank, best, {lr: s.mean for lr, s in scores.items()})
