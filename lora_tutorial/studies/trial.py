"""One fine-tuning run as 11's explorer makes it: knobs checked as parameters are, judged on validation."""

import html
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..data import Mnist
from ..evaluate import Evaluation, evaluate
from ..lora import lora_parameter_counts
from ..settings import Settings
from .rank_study import check_scaling, fine_tune, run_settings, scale_of
from .stats import spread, timed


@dataclass(frozen=True)
class Trial:
    """The explorer's knobs; the defaults are the post's fine-tuning (05's run with seed 0)."""
    rank: int = 1
    alpha: float = 1.0
    scaling: str = "alpha fixed"  # one of rank_study.SCALINGS: how the factor follows the rank
    target_modules: tuple[str, ...] | None = None  # None: all three layers
    finetune_steps: int = 100
    target_digit: int = 9
    replay_share: float = 0.0
    seed: int = 0  # the fine-tuning seed: LoRA's random A, the batch order, the replayed images

    @property
    def factor(self) -> float:  # in front of B @ A
        return scale_of(self.scaling, self.rank, self.alpha)

    def describe(self) -> str:
        """The run in one line, with the alpha LoRA is built with (the panel's and figure's title)."""
        alpha = (f"{self.alpha * self.rank:g} (alpha = r x {self.alpha:g})" if self.scaling == "alpha = r"
                 else f"{self.alpha:g} ({self.scaling})")
        layers = "all layers" if self.target_modules is None else ", ".join(self.target_modules)
        replay = f", replay {self.replay_share:g}" if self.replay_share else ""
        return (f"rank {self.rank}, alpha {alpha}, {layers}; {self.finetune_steps} steps on digit "
                f"{self.target_digit}{replay}, seed {self.seed}")

def trial_of(settings: Settings, scaling: str = "alpha fixed") -> Trial:
    if not isinstance(settings.target_digit, int):
        raise ValueError("Decide the target digit first (choose_target), then start the explorer.")
    return Trial(settings.rank, settings.alpha, check_scaling(scaling), settings.target_modules,
                 settings.finetune_steps, settings.target_digit, settings.replay_share, settings.lora_seed)

def trial_settings(settings: Settings, trial: Trial) -> Settings:
    """The settings with the trial's knobs in, checked; their alpha is the one LoRA is built with."""
    return run_settings(settings, trial.scaling, trial.rank, trial.alpha, trial.seed,
                        finetune_steps=trial.finetune_steps, target_modules=trial.target_modules,
                        target_digit=trial.target_digit, target_rule=None, replay_share=trial.replay_share)

@dataclass
class TrialResult:
    """What one trial did: the pre-trained network (`before`) and the fine-tuned one on the same images."""
    trial: Trial
    trainable: int  # numbers fine-tuning trained (A and B of each adapted layer)
    losses: list[float]
    before: Evaluation
    after: Evaluation
    train_seconds: float
    judge_seconds: float
    model: nn.Module  # the fine-tuned LoRA copy, to inspect (or save_adapter)
    settings: dict[str, object]  # the run's settings, as save_adapter records them

    def table(self) -> pd.DataFrame:
        """The target's wrong answers, the other and all digits' accuracy (%): before, after, change."""
        digit = self.trial.target_digit
        before, after = ([e.wrong_counts[digit], 100 * e.mean_accuracy_except(digit), 100 * e.accuracy]
                         for e in (self.before, self.after))
        return pd.DataFrame([before, after, [a - b for a, b in zip(after, before, strict=True)]],
                            ["pre-trained", "fine-tuned", "change"],
                            [f"wrong answers on digit {digit}", "other digits %", "all digits %"])

def run_trial(settings: Settings, data: Mnist, base: nn.Module, trial: Trial, before: Evaluation,
              images: tuple[torch.Tensor, torch.Tensor], on_step: Callable[[int, int], None] | None = None
              ) -> TrialResult:
    """Fine-tune a LoRA copy of `base` as `trial` says (checked first); judge it on `images`."""
    run = trial_settings(settings, trial)
    model, losses, train_seconds = fine_tune(run, data, base, trial.scaling, on_step=on_step)
    after, judge_seconds = timed(evaluate, model, *images)
    return TrialResult(trial, lora_parameter_counts(model)[1], losses, before, after, train_seconds,
                       judge_seconds, model, {**run.as_dict(), "scaling": trial.scaling})

def report(result: TrialResult, html_table: bool = False) -> str:
    """The explorer's words for a run: its headline and numbers, as text or with an HTML table."""
    head = f"{result.trial.describe()}: factor {result.trial.factor:g}, {result.trainable:,} trained numbers"
    where, table, decimals = f"On the {result.before.total:,} validation images:", result.table(), "{:.2f}"
    if html_table:
        return f"<b>{html.escape(head)}</b><br>{where}{table.to_html(float_format=decimals.format)}"
    first, last = (spread(steps).mean for steps in (result.losses[:10], result.losses[-10:]))
    return "\n".join([head, where, table.to_string(float_format=decimals.format),
                      f"Loss {first:.3f} over the first 10 steps, {last:.3f} over the last 10."])
