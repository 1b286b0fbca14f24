"""The tutorial's steps as functions, so that every notebook runs alone or in order."""

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_adapter, load_pretrained, save_adapter, save_pretrained
from .data import Mnist, check_raw_files, fit_subset, load_mnist, named_folder
from .device import describe_device, pick_device
from .evaluate import Evaluation, evaluate, from_confusion
from .lesson import code_fingerprint, lesson
from .lora import LoRAParametrization, add_lora, lora_modules, mark_only_lora_as_trainable
from .model import OversizedMLP
from .settings import WORST, Settings, check_writable, fingerprint, shown_path
from .train import train, train_with_dataloader

Loop = Callable[[nn.Module, torch.Tensor, torch.Tensor, Settings], list[float]]

def preflight(settings: Settings, check_device: bool = True) -> torch.device | None:
    """Before any work: the device (unless `check_device=False`), writable outputs, a named data folder."""
    device = pick_device(settings.device) if check_device else None
    check_writable("output_dir", settings.output_path)
    check_writable("checkpoint_dir", settings.checkpoint_path)
    if (named := named_folder(settings.data_dir)) is not None:
        check_raw_files(*named)
    return device

def setup(settings: Settings, verbose: bool = True) -> tuple[torch.device, Mnist]:
    """`preflight`, then MNIST (the first `train_samples` images when set) on the device."""
    device = preflight(settings)
    data = load_mnist(settings.data_dir, download=settings.download, verbose=verbose)
    if settings.train_samples is not None:
        data = data.limit(settings.train_samples)
        if verbose:
            print(f"Using the first {len(data.train_labels):,} training images (train_samples).")
    if verbose:
        print(describe_device(device))
    return device, data.to(device)

def package_pretrain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     settings: Settings) -> list[float]:
    """02's loop as the package writes it (`train`): the same weights, bit for bit (a test checks); with
    `pretrain_loop="graphed"` each step one captured graph on a GPU (on a CPU: the same weights)."""
    graphed = settings.pretrain_loop == "graphed"
    return train(model, images, labels, epochs=settings.pretrain_epochs, batch_size=settings.batch_size,
                 lr=settings.learning_rate, seed=None, desc="Pre-training" + " (graphed)" * graphed,
                 graphed=graphed)

def post_pretrain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  settings: Settings) -> list[float]:
    """The post's own loop: a DataLoader over the images, plain Adam, nothing flushed."""
    dataset = torch.utils.data.TensorDataset(images, labels)
    return train_with_dataloader(model, dataset, epochs=settings.pretrain_epochs,
                                 batch_size=settings.batch_size, lr=settings.learning_rate, seed=None,
                                 desc="Pre-training (the post's loop)")

def package_finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     settings: Settings) -> list[float]:
    """05's loop as the package writes it (`train`): the same weights, bit for bit (a test checks)."""
    return train(model, images, labels, max_steps=settings.finetune_steps, batch_size=settings.batch_size,
                 lr=settings.finetune_lr, seed=settings.lora_seed, progress=False)

def pretrain_loop(settings: Settings) -> Loop:
    """02's cell, the post's loop or the graphed one (`pretrain_loop`); the package's copy outside a clone."""
    loops = {"post": post_pretrain, "graphed": package_pretrain}
    return loops.get(settings.pretrain_loop) or lesson("pretrain", package_pretrain)

def lora_class() -> type:
    """03's cell (the package's own class outside a clone)."""
    return lesson("LoRAParametrization", LoRAParametrization)

def finetune_loop(settings: Settings) -> Loop | None:
    """05's cell; None when batches replay other digits (`replay_share`): `train_on_target` does that."""
    return None if settings.replay_share else lesson("finetune_lora", package_finetune)

def pretrain_key(settings: Settings, data: Mnist, loop: Loop | None = None) -> dict:
    loop = loop or pretrain_loop(settings)
    return {**settings.pretrain_key(), "data": data.identity, "loop_code": code_fingerprint(loop)}

def finetune_key(settings: Settings, data: Mnist, lora: type | None = None, loop: Loop | None = None) -> dict:
    """The settings, the data and the code (LoRA class, loops) that decide an adapter."""
    lora = lora or lora_class()
    loop = loop or finetune_loop(settings) or train_on_target
    return {**settings.finetune_key(), "data": data.identity, "pretrain_loop_code": code_fingerprint(
        pretrain_loop(settings)), "lora_code": code_fingerprint(lora), "loop_code": code_fingerprint(loop)}

def pretrained_path(settings: Settings, data: Mnist, loop: Loop | None = None) -> Path:
    name = f"pretrained-{fingerprint(pretrain_key(settings, data, loop), data.identity)}.pt"
    return settings.checkpoint_path / name

def adapter_path(settings: Settings, data: Mnist, lora: type | None = None, loop: Loop | None = None) -> Path:
    name = f"lora-{fingerprint(finetune_key(settings, data, lora, loop), data.identity)}.safetensors"
    return settings.output_path / "adapters" / name

def _check_finite(losses: list[float], what: str, fix: str) -> None:
    if not all(math.isfinite(float(x)) for x in losses):
        raise FloatingPointError(f"{what} diverged (the loss became {losses[-1]}): {fix}")

@dataclass
class Pretrained:
    model: nn.Module
    losses: list[float]  # one per pre-training step
    evaluation: Evaluation  # on the test images: what is reported
    training: Evaluation  # on its own training images: what the target digit is chosen from
    path: Path
    loaded: bool  # True when read from an earlier run's checkpoint

def pretrained_model(settings: Settings, data: Mnist, device: torch.device, loop: Loop | None = None,
                     retrain: bool = False, verbose: bool = True) -> Pretrained:
    """The pre-trained network: from its checkpoint, or trained with `loop` (02's cell) and saved."""
    loop = pretrain_loop(settings) if settings.pretrain_loop != "fast" or loop is None else loop
    path, key = pretrained_path(settings, data, loop), pretrain_key(settings, data, loop)
    if loaded := path.exists() and not retrain:
        payload, model = load_pretrained(path, key), OversizedMLP().to(device)
        model.load_state_dict(payload["state_dict"])
        losses = payload["losses"]
        training = from_confusion(payload["training_confusion"])  # saved with every code-2 checkpoint
        if verbose:
            print(f"Loaded the pre-trained weights for these settings from {shown_path(path)}.")
    else:
        torch.manual_seed(settings.seed)  # the post's seeding: weights, then batch order, from it
        model = OversizedMLP().to(device)
        losses = [float(x) for x in loop(model, data.train_images, data.train_labels, settings)]
        _check_finite(losses, "Pre-training",
                      f"lower the learning rate (learning_rate={settings.learning_rate:g}).")
        training = evaluate(model, data.train_images, data.train_labels)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_pretrained(path, state, key, {"losses": losses, "training_confusion": training.confusion})
        if verbose:
            print(f"Saved the pre-trained weights to {shown_path(path)}.")
    return Pretrained(model, losses, evaluate(model, data.test_images, data.test_labels), training, path,
                      loaded)

def choose_target(settings: Settings, pretrained: Pretrained, verbose: bool = True) -> Settings:
    """"worst" decided: the digit most often wrong on the training images (the test images would flatter)."""
    if settings.target_digit != WORST:
        if verbose:
            print(f"Target digit: {settings.target_digit} (given)")
        return settings
    seen, digit = pretrained.training, pretrained.training.worst_digit()
    if verbose:
        print(f"Target digit: {digit} (the worst: {seen.wrong_counts[digit]:,} of its "
              f"{seen.per_digit_totals()[digit]:,} training images wrong; per digit {seen.wrong_counts})")
    return replace(settings, target_digit=digit, target_rule=WORST)

def lora_copy(base: nn.Module, seed: int, **lora_args) -> nn.Module:
    """A copy of `base` with `add_lora(**lora_args)` (A drawn right after seeding) and the rest frozen."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    add_lora(model, **lora_args)
    mark_only_lora_as_trainable(model)
    return model

def lora_model(settings: Settings, base: nn.Module) -> nn.Module:
    """`lora_copy` with 03's class, as 04 freezes it."""
    return lora_copy(base, settings.lora_seed, rank=settings.rank, alpha=settings.alpha,
                     target_modules=settings.target_modules or None, cls=lora_class())

def train_on_target(settings: Settings, data: Mnist, model: nn.Module, desc: str | None = None,
                    verbose: bool = True, on_step: Callable[[int, int], None] | None = None) -> list[float]:
    """Train what in `model` is trainable on the target digit's fit images (never the validation split) as
    the settings say, `replay_share` of each batch from the other digits; returns the losses."""
    digit = settings.target_digit
    images, labels = fit_subset(data, digit)
    replay = fit_subset(data, digit, others=True) if settings.replay_share else None
    if desc is None:
        desc = f"Fine-tuning on digit {digit}" + (f" ({settings.replay_share:g} replay)" if replay else "")
    return train(model, images, labels, max_steps=settings.finetune_steps, batch_size=settings.batch_size,
                 lr=settings.finetune_lr, seed=settings.lora_seed, desc=desc, progress=verbose,
                 replay=replay, replay_share=settings.replay_share, on_step=on_step)

def save_finetuned(settings: Settings, data: Mnist, model: nn.Module, loop: Loop, losses: list[float],
                   verbose: bool = True) -> Path:
    """Save what `loop` (05's cell) trained, keyed by its code and its LoRA class's; refuse a diverged run."""
    _check_finite(losses, "Fine-tuning", f"nothing was saved. Lower finetune_learning_rate="
                  f"{settings.finetune_lr:g} or alpha={settings.alpha:g}.")
    lora = getattr(lora := type(next(iter(lora_modules(model).values()))), "lesson_class", lora)
    path = adapter_path(settings, data, lora, loop)
    save_adapter(model, path, finetune_key(settings, data, lora, loop))
    if verbose:
        print(f"Saved the LoRA adapter ({path.stat().st_size / 1024:.1f} KiB) to {shown_path(path)}.")
    return path

def finetuned_model(settings: Settings, data: Mnist, base: nn.Module, verbose: bool = True) -> nn.Module:
    """05's adapter for these settings on `base`, loaded (`finetune_seconds` None) or trained now."""
    model, loop, path = lora_model(settings, base), finetune_loop(settings), adapter_path(settings, data)
    model.finetune_seconds = None
    if path.exists():
        load_adapter(model, path, finetune_key(settings, data))
        if verbose:
            print(f"Loaded the LoRA adapter for these settings from {shown_path(path)}.")
        return model
    started = time.perf_counter()
    losses = (train_on_target(settings, data, model, verbose=verbose) if loop is None
              else loop(model, *fit_subset(data, settings.target_digit), settings))
    save_finetuned(settings, data, model, loop or train_on_target, losses, verbose)
    model.finetune_seconds = time.perf_counter() - started
    return model

def comparison(settings: Settings, data: Mnist, pretrained: Evaluation, lora_on: Evaluation,
               lora_off: Evaluation, lora_parameters: int, base_parameters: int,
               finetune_seconds: float | None = None) -> dict:
    """The numbers a run reports, as plain data (the results JSON that `run` reads)."""
    digit = settings.target_digit
    return {"settings": settings.as_dict(),
            "data": {"source": data.source, "location": data.location, "identity": data.identity,
                     "train_images": len(data.train_labels), "test_images": len(data.test_labels),
                     "validation_images": int(data.validation.sum())},
            "base_parameters": base_parameters, "lora_parameters": lora_parameters,
            "lora_share_percent": 100 * lora_parameters / base_parameters,
            "worst_digit_pretrained": pretrained.worst_digit(), "target_digit": digit,
            "target_rule": settings.target_rule, "target_wrong_before": pretrained.wrong_counts[digit],
            "target_wrong_after": lora_on.wrong_counts[digit],
            "other_digits_accuracy_before": pretrained.mean_accuracy_except(digit),
            "other_digits_accuracy_after": lora_on.mean_accuracy_except(digit),
            "lora_off_equals_pretrained": lora_off == pretrained, "finetune_seconds": finetune_seconds,
            "pretrained": pretrained.as_dict(), "lora_on": lora_on.as_dict(), "lora_off": lora_off.as_dict()}
