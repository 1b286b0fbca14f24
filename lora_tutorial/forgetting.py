"""What fine-tuning on one digit costs the other nine, what helps, and what merging saves.

Every remedy here is a setting of the fine-tuning step (`replay_share`, `finetune_steps`,
`alpha`, `target_modules`), so each one runs through the same pipeline as the tutorial's own
fine-tuning, saves its adapter, and is re-used when the notebook runs again.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
from torch import nn

from .data import Mnist
from .evaluate import Evaluation, evaluate
from .pipeline import finetuned_model
from .settings import Settings, SettingsError, check_whole_numbers


def per_digit_change(before: Evaluation, after: Evaluation) -> list[float]:
    """Each digit's accuracy after minus before, in percentage points."""
    return [100 * (a - b) for b, a in zip(before.per_digit_accuracy(), after.per_digit_accuracy(),
                                          strict=True)]


def others_lose_points(before: Evaluation, after: Evaluation, digit: int) -> float:
    """How many percentage points the other nine digits lose on average (negative: they gain)."""
    return 100 * (before.mean_accuracy_except(digit) - after.mean_accuracy_except(digit))


def check_remedies(settings: Settings, variants: object) -> dict[str, Settings]:
    """Each remedy's settings (the notebook's settings with its changes), all checked before any
    of them trains: a name that is not a setting, or a value a setting refuses, is one clear error."""
    names = {f.name for f in dataclasses.fields(Settings)}
    if not isinstance(variants, dict) or not variants:
        raise SettingsError(f"remedies={variants!r} is not valid: expected a dict of name: {{setting: "
                            "value}, e.g. {'replay 0.3': {'replay_share': 0.3}}.")
    for name, changes in variants.items():
        unknown = sorted(set(changes) - names) if isinstance(changes, dict) else None
        if unknown is None or unknown:
            raise SettingsError(f"The remedy {name!r} changes {changes!r}: expected a dict of settings to "
                                f"change, from {sorted(names)}.")
    return {name: dataclasses.replace(settings, **changes) for name, changes in variants.items()}


def check_limit(points: object) -> float:
    """max_forgetting_points, checked before any work: a number of points >= 0."""
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not 0 <= points < float("inf"):
        raise SettingsError(f"max_forgetting_points={points!r} is not valid: expected a number of "
                            "percentage points >= 0, e.g. 1.0.")
    return float(points)


def check_latency(batches: object, repeats: object) -> tuple[list[int], int]:
    """The image counts per forward call and the timed passes, checked before any work."""
    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    batches = check_whole_numbers("latency_batches", batches, "[10000, 100]")
    if not whole(repeats):
        raise SettingsError(f"latency_repeats={repeats!r} is not valid: expected a whole number >= 1, "
                            "e.g. 3.")
    return batches, repeats


def remedy_runs(settings: Settings, data: Mnist, base: nn.Module, variants: dict[str, dict[str, Any]],
                verbose: bool = True) -> list[dict]:
    """Fine-tune LoRA once per variant (the settings with those values changed) and evaluate it.

    A bad value in a variant fails here, before any of them trains. Adapters already saved for
    the same settings are loaded instead of trained again.
    """
    chosen = check_remedies(settings, variants)
    rows = []
    for name, variant in chosen.items():
        if verbose:
            print(f"{name}:")
        model = finetuned_model(variant, data, base, verbose=verbose)
        result = evaluate(model, data.test_images, data.test_labels)
        digit = variant.target_digit
        rows.append({"name": name, "changes": variants[name], **result.digit_summary(digit),
                     "evaluation": result})
    return rows


def choose_setting(rows: list[dict], others_before: float, max_loss_points: float = 1.0) -> dict:
    """The row with the fewest target-digit errors among those whose other digits lose at most
    `max_loss_points` on average; when none stays within that, the one that loses least."""
    kept = [r for r in rows if 100 * (others_before - r["others_accuracy"]) <= max_loss_points]
    if kept:
        return min(kept, key=lambda r: (r["target_wrong"], -r["others_accuracy"]))
    return max(rows, key=lambda r: r["others_accuracy"])


def describe_choice(chosen: dict, others_before: float, max_loss_points: float, digit: int) -> str:
    """One sentence: which setting was chosen and why, including when none kept within the limit."""
    lost = 100 * (others_before - chosen["others_accuracy"])
    limit = f"{max_loss_points:g} point{'' if max_loss_points == 1 else 's'}"
    if lost <= max_loss_points:
        return (f"Chosen: {chosen['name']} ({chosen['changes']}): the fewest wrong answers on digit {digit} "
                f"({chosen['target_wrong']}) among the settings whose other digits lose at most {limit} on "
                f"average (it loses {lost:.2f}).")
    return (f"No setting keeps the other digits within {limit}; the one that loses least is {chosen['name']} "
            f"({lost:.2f} points, {chosen['target_wrong']} wrong on digit {digit}). Raise "
            "max_forgetting_points, or try more replay.")


def forward_latency(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                    batch_size: int | None = None) -> dict[str, float]:
    """Median seconds to run all `images` forward through each model, `batch_size` images per
    call (all at once by default), measured in one run.

    The models take turns in every round, after one warm-up each, so a machine that speeds up
    or slows down mid-way affects them alike; compare the ratios, not the seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r}: expected at least 1.")
    size = batch_size or len(images)
    if size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected at least 1, or None for all images at once.")

    def one_pass(model: nn.Module) -> None:
        for start in range(0, len(images), size):
            model(images[start:start + size])
        if images.device.type == "cuda":  # NVIDIA and AMD (ROCm) GPUs
            torch.cuda.synchronize(images.device)  # GPU work is asynchronous: wait for it
        elif images.device.type == "mps":
            torch.mps.synchronize()

    times: dict[str, list[float]] = {name: [] for name in models}
    was_training = {name: model.training for name, model in models.items()}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            one_pass(model)  # warm-up: memory allocation, first-call costs
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                one_pass(model)
                times[name].append(time.perf_counter() - started)
    for name, model in models.items():
        model.train(was_training[name])  # as `evaluate.predict` does: leave each model as it was
    return {name: statistics.median(values) for name, values in times.items()}
