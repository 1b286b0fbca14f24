"""The training loop: the post's procedure (Adam, cross-entropy, shuffled mini-batches), fast.

The post feeds a DataLoader that converts and normalises every image again at every step and
reads the loss back from the device at every step. Here the images are already normalised
tensors on the device, batches are taken by index from a seeded permutation, and the loss is
read back only when the progress bar shows it. On a CPU three more things matter a lot:
Adam's running averages decay into denormal floats, which x86 computes about 100x slower, so
they are flushed to zero while training; flushing is a setting of the thread that asks for it,
so training runs on that one thread (PyTorch's other threads would still compute denormals, and
a batch of 10 images is too small to share out anyway: on a 2-core CPU one thread pre-trains
2.5x faster than two); and the fused Adam kernel does one pass over the weights instead of
several.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .settings import replay_count

PROGRESS_ENV = "LORA_TUTORIAL_PROGRESS"  # "text" forces plain-text bars (headless runs)


@contextmanager
def text_progress_bars() -> Iterator[None]:
    """Notebook kernels started inside this block draw plain-text bars (they inherit the
    environment), as executed copies of a headless run should; the caller's setting comes back after."""
    before = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "text"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm.auto's bar (a widget in Jupyter when ipywidgets is there), else a text bar."""
    if os.environ.get(PROGRESS_ENV) == "text":
        from tqdm.std import tqdm
        return tqdm(total=total, desc=desc, disable=not enabled, mininterval=5.0)
    try:
        import ipywidgets  # noqa: F401  (tqdm.auto warns without it; fall back quietly)
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm.std import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled)


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    """`iterable` with a progress bar (`progress_bar`'s kind), for loops written in a notebook."""
    bar = progress_bar(total if total is not None else len(iterable), desc, enabled)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


@contextmanager
def cpu_speedups(device: torch.device | str) -> Iterator[None]:
    """On a CPU, train with denormal numbers flushed to zero and on one thread; elsewhere, nothing.

    Adam's running averages decay into denormal floats, which x86 processors compute about 100x
    slower. Flushing is a setting of the thread that asks for it, so training runs on that one
    thread (a batch of 10 images is too small to share out anyway). Both come back afterwards.
    """
    flush = torch.device(device).type == "cpu" and torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    if flush:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)


def _generator(seed: int | None) -> torch.Generator | None:
    """A generator seeded with `seed`; None means PyTorch's global one (the post's way)."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def make_adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this PyTorch and device have it, else the default."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 1,
          max_steps: int | None = None, batch_size: int = 10, lr: float = 1e-3,
          seed: int | None = 0, desc: str = "Training", progress: bool = True,
          replay: tuple[torch.Tensor, torch.Tensor] | None = None,
          replay_share: float = 0.0, on_step: Callable[[int, int], None] | None = None) -> list[float]:
    """Train the model's trainable parameters; return the loss of every step.

    One epoch visits every image once in a random order, the same order as the post's loop
    (`train_with_dataloader`) given the same `seed`; `seed=None` draws it from PyTorch's global
    generator, as the post does after its one `torch.manual_seed`. With `max_steps` training
    stops after that many batches (starting new epochs if it needs more).
    With `replay=(images, labels)` and a `replay_share` > 0, that share of every batch is drawn
    at random from the replay images (old data, so the network keeps what it knew) and the rest
    from `images`; at share 0 training is exactly the plain run.
    Raises FloatingPointError, naming the step, if the loss stops being finite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters: nothing to train.")
    extra = replay_count(replay_share, batch_size)
    if not 0 <= replay_share < 1 or (replay_share > 0 and not 1 <= extra < batch_size):
        raise ValueError(f"replay_share={replay_share!r} with batch_size={batch_size}: expected 0, or a "
                         "share that puts between 1 and batch_size - 1 replayed images in each batch.")
    if extra and (replay is None or len(replay[1]) == 0):
        raise ValueError(f"replay_share={replay_share} needs replay=(images, labels) to draw from.")
    device = params[0].device
    images, labels = images.to(device), labels.to(device)
    if extra:
        replay_images, replay_labels = replay[0].to(device), replay[1].to(device)
        replay_generator = _generator(None if seed is None else seed + 1)
    n = len(labels)
    fresh = batch_size - extra  # images of each batch taken from `images`
    per_epoch = math.ceil(n / fresh)
    steps = max_steps if max_steps is not None else epochs * per_epoch
    optimizer = make_adam(params, lr)
    loss_fn = nn.CrossEntropyLoss()
    # Shuffle exactly as the post's DataLoader(shuffle=True) does with a generator seeded alike,
    # so both loops see the same batches in the same order; only the indices are loaded.
    shuffler = torch.utils.data.DataLoader(range(n), batch_size=n, shuffle=True,
                                           generator=_generator(seed))
    losses = torch.zeros(steps, device=device)
    refresh = max(1, min(200, steps // 50))  # read the loss back this often, not every step

    was_training = model.training
    model.train()
    bar = progress_bar(steps, desc, progress)
    speedups = cpu_speedups(device)  # flush denormals on one thread (see the module's docstring)
    speedups.__enter__()
    try:
        step = 0
        while step < steps:
            order = torch.cat(list(shuffler)).to(device)  # one epoch's order (exhausts the sampler)
            for start in range(0, n, fresh):
                batch = order[start:start + fresh]
                x, y = images[batch], labels[batch]
                if extra:
                    pick = torch.randint(len(replay_labels), (extra,), generator=replay_generator)
                    pick = pick.to(device)
                    x, y = torch.cat([x, replay_images[pick]]), torch.cat([y, replay_labels[pick]])
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                losses[step] = loss.detach()
                step += 1
                if step % refresh == 0 or step == steps:
                    seen = losses[:step]
                    if not torch.isfinite(seen).all():
                        bad = int((~torch.isfinite(seen)).nonzero()[0]) + 1
                        raise FloatingPointError(
                            f"The loss became {seen[bad - 1].item()} at step {bad}: training "
                            f"diverged. Lower the learning rate (lr={lr:g}) or LoRA's alpha.")
                    bar.set_postfix(loss=f"{seen.mean().item():.3f}", refresh=False)
                    bar.update(step - bar.n)
                    if on_step is not None:
                        on_step(step, steps)
                if step == steps:
                    break
    finally:
        bar.close()
        model.train(was_training)
        speedups.__exit__(None, None, None)
    return losses.tolist()


def train_with_dataloader(model: nn.Module, dataset: torch.utils.data.Dataset, *, epochs: int = 1,
                          max_steps: int | None = None, batch_size: int = 10, lr: float = 1e-3,
                          seed: int | None = 0, desc: str = "Training (the post's loop)",
                          progress: bool = True) -> list[float]:
    """The blog post's loop, kept for comparison and teaching.

    A DataLoader converts and normalises every image again at every step, the default Adam
    runs, the loss is read back from the device at every step, and denormals are left alone.
    Same hyperparameters and semantics as `train`; several times slower on a CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters: nothing to train.")
    device = params[0].device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=_generator(seed))
    steps = max_steps if max_steps is not None else epochs * len(loader)
    optimizer = torch.optim.Adam(params, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    model.train()
    bar = progress_bar(steps, desc, progress)
    try:
        while len(losses) < steps:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                loss = loss_fn(model(x.view(-1, 28 * 28)), y)
                losses.append(loss.item())
                bar.set_postfix(loss=sum(losses) / len(losses), refresh=False)
                bar.update(1)
                loss.backward()
                optimizer.step()
                if len(losses) == steps:
                    break
    finally:
        bar.close()
    return losses
