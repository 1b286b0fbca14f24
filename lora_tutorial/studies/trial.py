"""One fine-tuning run from the pre-trained network, as the explorer (`explore.py`) makes it.

A `Trial` is the explorer's knobs: rank, alpha and the scaling rule that turns them into the
factor in front of B @ A (07's three rules), the layers LoRA adapts, the steps, the target digit,
the replay share and the fine-tuning seed. `trial_settings` puts them into the notebook's
`Settings`, so a bad combination (a rank above what a chosen layer allows, say) is refused with
the same sentence a notebook parameter would get, before anything trains. `run_trial` fine-tunes
a fresh LoRA copy of the frozen network through the separate low-rank path, as 05 does, and judges
it on the validation images: the explorer is for trying settings and choosing among them, and
choices are made on the validation images; the test images stay for reporting (07, 09).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..data import Mnist
from ..evaluate import Evaluation, evaluate
from ..lora import lora_parameter_counts, separate_path
from ..model import LAYER_NAMES
from ..pipeline import lora_copy, train_on_target
from ..settings import Settings, SettingsError
from ..train import make_adam
from .rank_study import SCALINGS, lora_arguments, scale_of
from .stats import spread

# The factor in front of B @ A under each scaling rule, as the explorer labels it (07 compares them).
SCALING_RULES = {"alpha fixed": "alpha / r", "alpha = r": "alpha", "rsLoRA": "alpha / sqrt(r)"}


@dataclass(frozen=True)
class Trial:
    """The explorer's knobs; the defaults are the post's fine-tuning (05's run with seed 0)."""

    rank: int = 1
    alpha: float = 1.0
    scaling: str = "alpha fixed"  # one of SCALINGS: how the factor in front of B @ A follows the rank
    target_modules: tuple[str, ...] | None = None  # None: all three layers
    finetune_steps: int = 100
    target_digit: int = 9
    replay_share: float = 0.0
    seed: int = 0  # the fine-tuning seed: LoRA's random A, the order of the batches, the replayed images

    @property
    def factor(self) -> float:
        """The factor in front of B @ A that LoRA gets from the rank, alpha and scaling rule."""
        return scale_of(self.scaling, self.rank, self.alpha)

    def describe(self) -> str:
        layers = "all layers" if self.target_modules is None else ", ".join(self.target_modules)
        replay = f", replay {self.replay_share:g}" if self.replay_share else ""
        alpha = f"alpha {self.alpha:g} ({self.scaling})"
        if self.scaling == "alpha = r":  # say the alpha LoRA is built with
            alpha = f"alpha {self.alpha * self.rank:g} (alpha = r x {self.alpha:g})"
        return (f"rank {self.rank}, {alpha}, {layers}; "
                f"{self.finetune_steps} steps on digit {self.target_digit}{replay}, seed {self.seed}")


def check_scaling(scaling: object) -> str:
    """A notebook's `scaling` parameter: one of 07's three rules, checked before any work."""
    if scaling not in SCALINGS:
        raise SettingsError(f"scaling={scaling!r} is not valid: expected one of {list(SCALINGS)} (the factor "
                            f"in front of B @ A is {', '.join(SCALING_RULES.values())}).")
    return str(scaling)


def trial_of(settings: Settings, scaling: str = "alpha fixed") -> Trial:
    """The trial a notebook's settings describe (the explorer's starting point)."""
    if not isinstance(settings.target_digit, int):
        raise ValueError("Decide the target digit first (choose_target), then start the explorer.")
    return Trial(rank=settings.rank, alpha=settings.alpha, scaling=check_scaling(scaling),
                 target_modules=settings.target_modules,
                 finetune_steps=settings.finetune_steps, target_digit=settings.target_digit,
                 replay_share=settings.replay_share, seed=settings.lora_seed)


def trial_settings(settings: Settings, trial: Trial) -> Settings:
    """The notebook's settings with the trial's knobs in, checked: a SettingsError names the bad
    value and the fix. The alpha in the result is the one LoRA is built with (07's rules)."""
    check_scaling(trial.scaling)
    if trial.target_modules is not None and not trial.target_modules:
        raise SettingsError(f"target_modules=(): LoRA must adapt at least one layer; tick one of "
                            f"{list(LAYER_NAMES)}.")
    built = replace(settings, rank=trial.rank, finetune_steps=trial.finetune_steps,
                    target_modules=trial.target_modules, target_digit=trial.target_digit, target_rule=None,
                    replay_share=trial.replay_share, finetune_seed=trial.seed, alpha=trial.alpha)
    # the knobs as given are checked above (an error names alpha as the reader set it); LoRA is
    # built with the alpha the scaling rule makes of it
    return replace(built, alpha=lora_arguments(trial.scaling, trial.rank, trial.alpha)["alpha"])


@dataclass
class TrialResult:
    """What one trial did: its losses, the network before and after on the judged images, timings."""

    trial: Trial
    trainable: int  # numbers fine-tuning trained (A and B of each adapted layer)
    losses: list[float]
    before: Evaluation  # the pre-trained network on the judged images
    after: Evaluation  # with the trial's adapter on
    train_seconds: float
    judge_seconds: float
    model: nn.Module  # the fine-tuned LoRA copy, to inspect further (or save_adapter it)
    settings: dict[str, Any]  # the run's settings, as save_adapter records them
    images: str = "validation images"

    @property
    def scale(self) -> float:
        """The factor in front of B @ A."""
        return self.trial.factor

    def numbers(self) -> list[tuple[str, str, str]]:
        """(what, before, after) rows: the target's wrong answers, the other digits, all digits."""
        digit = self.trial.target_digit
        others = self.before.mean_accuracy_except(digit), self.after.mean_accuracy_except(digit)
        return [(f"wrong answers on digit {digit}", f"{self.before.wrong_counts[digit]:,}",
                 f"{self.after.wrong_counts[digit]:,}"),
                ("other digits, mean accuracy", f"{100 * others[0]:.2f} %",
                 f"{100 * others[1]:.2f} % ({100 * (others[1] - others[0]):+.2f} points)"),
                ("all digits, accuracy", f"{100 * self.before.accuracy:.2f} %",
                 f"{100 * self.after.accuracy:.2f} %")]

    def report(self) -> str:
        """The numbers as plain text: the explorer's text form, and what headless runs keep."""
        rows = self.numbers()
        width = max(len(what) for what, _, _ in rows)
        lines = [f"{self.trial.describe()}: factor {self.scale:g}, {self.trainable:,} trained numbers",
                 f"On the {self.before.total:,} {self.images}: pre-trained -> fine-tuned",
                 *(f"  {what:<{width}}  {before} -> {after}" for what, before, after in rows),
                 f"Fine-tuned in {self.train_seconds:.2f} s (loss "
                 f"{spread(self.losses[:10]).mean:.3f} over the first 10 steps, "
                 f"{spread(self.losses[-10:]).mean:.3f} over the last 10), "
                 f"judged in {self.judge_seconds:.2f} s."]
        return "\n".join(lines)


def warm_up() -> None:
    """Build one Adam optimizer and drop it. The first one a process builds imports PyTorch's
    compiler (torch._dynamo): about 1.5 s on a 2-core CPU, which would otherwise land on the
    explorer's first press rather than on building the panel."""
    make_adam([nn.Parameter(torch.zeros(1))], lr=1e-3)


def run_trial(settings: Settings, data: Mnist, base: nn.Module, trial: Trial, before: Evaluation,
              images: tuple[torch.Tensor, torch.Tensor], on_step: Callable[[int, int], None] | None = None
              ) -> TrialResult:
    """Fine-tune a LoRA copy of `base` as `trial` says and judge it on `images` (labelled, the
    validation split in the explorer); `before` is `base` judged on the same images. The knobs are
    checked before anything trains. `on_step(step, steps)` follows training (a progress bar)."""
    run = trial_settings(settings, trial)
    args = lora_arguments(trial.scaling, trial.rank, trial.alpha)
    model = lora_copy(base, run.lora_seed, target_modules=run.target_modules, **args)
    started = time.perf_counter()
    losses = train_on_target(run, data, separate_path(model), verbose=False, on_step=on_step)
    trained = time.perf_counter()
    after = evaluate(model, *images)
    return TrialResult(trial=trial, trainable=lora_parameter_counts(model)[1], losses=losses, before=before,
                       after=after, train_seconds=trained - started,
                       judge_seconds=time.perf_counter() - trained, model=model,
                       settings={**run.as_dict(), "scaling": trial.scaling})
