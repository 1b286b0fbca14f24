"""The tutorial's steps as functions, so that every notebook can run alone or in order.

A notebook asks for the model at the stage it teaches: `pretrained_model` loads the
checkpoint written for these settings, or pre-trains and writes it; `choose_target` decides
the digit to fine-tune on from its errors on the training images; `lora_model` adds LoRA
and freezes the rest; `finetune` trains the adapter and saves it; `finetuned_model` loads
that adapter, or fine-tunes when there is none.
"""

from __future__ import annotations

import copy
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
from .lora import add_lora, mark_only_lora_as_trainable, separate_path
from .model import OversizedMLP
from .settings import WORST, Settings, check_writable, fingerprint, shown_path
from .train import train, train_with_dataloader


def preflight(settings: Settings, check_device: bool = True) -> torch.device | None:
    """What the settings need from this machine, checked before any work: the device is here
    (unless the work runs elsewhere: `check_device=False`), the output folders can be written, a
    data folder named explicitly holds MNIST's files. Returns the device."""
    device = pick_device(settings.device) if check_device else None
    check_writable("output_dir", settings.output_path)
    check_writable("checkpoint_dir", settings.checkpoint_path)
    named = named_folder(settings.data_dir)
    if named is not None:
        check_raw_files(*named)
    return device


def setup(settings: Settings, verbose: bool = True) -> tuple[torch.device, Mnist]:
    """Check the machine (`preflight`), load MNIST (the first `train_samples` images when set)
    and move it to the device."""
    device = preflight(settings)
    data = load_mnist(settings.data_dir, download=settings.download, verbose=verbose)
    if settings.train_samples is not None:
        data = data.limit(settings.train_samples)
        if verbose:
            print(f"Using the first {len(data.train_labels):,} training images (train_samples).")
    if verbose:
        print(describe_device(device))
    return device, data.to(device)


def pretrain_key(settings: Settings, data: Mnist) -> dict:
    return {**settings.pretrain_key(), "data": data.identity}


def finetune_key(settings: Settings, data: Mnist) -> dict:
    return {**settings.finetune_key(), "data": data.identity}


def pretrained_path(settings: Settings, data: Mnist) -> Path:
    name = f"pretrained-{fingerprint(settings.pretrain_key(), data.identity)}.pt"
    return settings.checkpoint_path / name


def adapter_path(settings: Settings, data: Mnist) -> Path:
    name = f"lora-{fingerprint(settings.finetune_key(), data.identity)}.safetensors"
    return settings.output_path / "adapters" / name


@dataclass
class Pretrained:
    model: nn.Module
    losses: list[float]  # one per pre-training step
    evaluation: Evaluation  # on the test images: what is reported
    training: Evaluation  # on its own training images: what the target digit is chosen from
    path: Path
    loaded: bool  # True when read from an earlier run's checkpoint


def pretrained_model(settings: Settings, data: Mnist, device: torch.device, retrain: bool = False,
                     verbose: bool = True) -> Pretrained:
    """The pre-trained network for these settings: from its checkpoint, or trained and saved."""
    path = pretrained_path(settings, data)
    key = pretrain_key(settings, data)
    loaded = path.exists() and not retrain
    if loaded:
        payload = load_pretrained(path, key)
        model = OversizedMLP().to(device)
        model.load_state_dict(payload["state_dict"])
        losses = payload["losses"]
        training = (from_confusion(payload["training_confusion"]) if "training_confusion" in payload
                    else evaluate(model, data.train_images, data.train_labels))
        if verbose:
            print(f"Loaded the pre-trained weights for these settings from {shown_path(path)}.")
    else:
        # The post's seeding: one manual_seed, then the initial weights and the batch order are
        # drawn from the global generator in that order, so the run follows the post's on a CPU.
        torch.manual_seed(settings.seed)
        model = OversizedMLP().to(device)
        if settings.pretrain_loop == "post":  # the post's own loop: a DataLoader, plain Adam, no flushing
            dataset = torch.utils.data.TensorDataset(data.train_images, data.train_labels)
            losses = train_with_dataloader(model, dataset, epochs=settings.pretrain_epochs,
                                           batch_size=settings.batch_size, lr=settings.learning_rate,
                                           seed=None, desc="Pre-training (the post's loop)", progress=verbose)
        else:
            losses = train(model, data.train_images, data.train_labels, epochs=settings.pretrain_epochs,
                           batch_size=settings.batch_size, lr=settings.learning_rate,
                           seed=None, desc="Pre-training", progress=verbose)
        training = evaluate(model, data.train_images, data.train_labels)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_pretrained(path, state, key, {"losses": losses, "training_confusion": training.confusion})
        if verbose:
            print(f"Saved the pre-trained weights to {shown_path(path)}.")
    return Pretrained(model, losses, evaluate(model, data.test_images, data.test_labels), training, path,
                      loaded)


def choose_target(settings: Settings, pretrained: Pretrained, verbose: bool = True) -> Settings:
    """The settings with the digit to fine-tune on decided, and said in one line.

    A digit given as a number stays. "worst" (the default) becomes the digit the pre-trained
    network gets wrong most on its training images, as the post chose 9 from its own run. The
    test images are not looked at: a choice made on them would flatter the results reported on
    them. Checkpoints and adapters are keyed on the digit itself.
    """
    if settings.target_digit != WORST:
        if verbose:
            print(f"Target digit: {settings.target_digit} (given)")
        return settings
    seen = pretrained.training
    digit = seen.worst_digit()
    if verbose:
        print(f"Target digit: {digit} (the worst: {seen.wrong_counts[digit]:,} of its "
              f"{seen.per_digit_totals()[digit]:,} training images wrong; per digit {seen.wrong_counts})")
    return replace(settings, target_digit=digit, target_rule=WORST)


def describe_target(digit: int, rule: str | None) -> str:
    """'9 (the worst)' or '9 (given)': the target digit and how it was decided, for summaries."""
    return f"{digit} (the worst)" if rule == WORST else f"{digit} (given)"


def lora_copy(base: nn.Module, seed: int, **lora_args) -> nn.Module:
    """A copy of `base` with LoRA added (`add_lora`'s arguments) and everything else frozen.

    LoRA's A is drawn at random right after seeding with `seed`, so the same seed gives the same A.
    """
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    add_lora(model, **lora_args)
    mark_only_lora_as_trainable(model)
    return model


def lora_model(settings: Settings, base: nn.Module) -> nn.Module:
    """A copy of `base` with LoRA on the target layers (all by default) and everything else frozen."""
    return lora_copy(base, settings.lora_seed, rank=settings.rank, alpha=settings.alpha,
                     target_modules=settings.target_modules)


def train_on_target(settings: Settings, data: Mnist, model: nn.Module, desc: str | None = None,
                    verbose: bool = True, on_step: Callable[[int, int], None] | None = None) -> list[float]:
    """Train whatever in `model` is trainable on the target digit, as the settings say: the
    steps, batch size, learning rate and fine-tuning seed, and `replay_share` of each batch drawn
    from the other digits' images. Only the fit images are used, never the validation split.
    `on_step` goes to `train` (the explorer's progress bar). Returns the losses."""
    digit = settings.target_digit
    images, labels = fit_subset(data, digit)  # the validation images are never fine-tuned on
    replay = None
    if settings.replay_share:
        replay = fit_subset(data, digit, others=True)
    if desc is None:
        desc = f"Fine-tuning on digit {digit}" + (f" ({settings.replay_share:g} replay)" if replay else "")
    return train(model, images, labels, max_steps=settings.finetune_steps, batch_size=settings.batch_size,
                 lr=settings.learning_rate, seed=settings.lora_seed, desc=desc, progress=verbose,
                 replay=replay, replay_share=settings.replay_share, on_step=on_step)


def finetune(settings: Settings, data: Mnist, model: nn.Module, verbose: bool = True,
             fast_path: bool = True) -> list[float]:
    """Train the LoRA adapter on the target digit alone; save it; return the losses.

    With `fast_path` the steps run through `separate_path(model)`, which trains the very same
    A and B without rebuilding W + scale * B @ A at every step; `fast_path=False` trains
    through the parametrization itself (slower; results equal up to float rounding).
    """
    trained = separate_path(model) if fast_path else model
    losses = train_on_target(settings, data, trained, verbose=verbose)
    path = adapter_path(settings, data)
    save_adapter(model, path, finetune_key(settings, data))
    if verbose:
        print(f"Saved the LoRA adapter ({path.stat().st_size / 1024:.1f} KiB) to {shown_path(path)}.")
    return losses


def finetuned_model(settings: Settings, data: Mnist, base: nn.Module, verbose: bool = True) -> nn.Module:
    """The fine-tuned LoRA model: the saved adapter on `base`, or fine-tuned now if there is none.
    `model.finetune_seconds` says how long fine-tuning took, or None when the adapter was loaded."""
    model = lora_model(settings, base)
    path = adapter_path(settings, data)
    model.finetune_seconds = None  # fine-tuning time; None when the adapter was loaded from its file
    if not path.exists():
        started = time.perf_counter()
        finetune(settings, data, model, verbose)
        model.finetune_seconds = time.perf_counter() - started
        return model
    load_adapter(model, path, finetune_key(settings, data))
    if verbose:
        print(f"Loaded the LoRA adapter for these settings from {shown_path(path)}.")
    return model


def comparison(settings: Settings, data: Mnist, pretrained: Evaluation, lora_on: Evaluation,
               lora_off: Evaluation, lora_parameters: int, base_parameters: int,
               finetune_seconds: float | None = None) -> dict:
    """The numbers a run reports, as plain data (the results JSON that `run` reads)."""
    digit = settings.target_digit
    return {
        "settings": settings.as_dict(),
        "data": {"source": data.source, "location": data.location, "identity": data.identity,
                 "train_images": len(data.train_labels), "test_images": len(data.test_labels),
                 "validation_images": int(data.validation.sum())},
        "base_parameters": base_parameters,
        "lora_parameters": lora_parameters,
        "lora_share_percent": 100 * lora_parameters / base_parameters,
        "worst_digit_pretrained": pretrained.worst_digit(),
        "target_digit": digit,
        "target_rule": settings.target_rule,  # "worst": chosen on the training images
        "target_wrong_before": pretrained.wrong_counts[digit],
        "target_wrong_after": lora_on.wrong_counts[digit],
        "other_digits_accuracy_before": pretrained.mean_accuracy_except(digit),
        "other_digits_accuracy_after": lora_on.mean_accuracy_except(digit),
        "lora_off_equals_pretrained": lora_off == pretrained,
        "finetune_seconds": finetune_seconds,
        "pretrained": pretrained.as_dict(),
        "lora_on": lora_on.as_dict(),
        "lora_off": lora_off.as_dict(),
    }
