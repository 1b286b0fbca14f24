"""The post's training, fast: batches by index on the device, the loss read back only for the bar."""

import functools
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .settings import replay_count

Step = Callable[[], None]  # one training step, as `_graphed_steps` makes it
PROGRESS_ENV = "LORA_TUTORIAL_PROGRESS"  # "text" forces plain-text bars (headless runs)

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
    with progress_bar(total if total is not None else len(iterable), desc, enabled) as bar:
        for item in iterable:
            yield item
            bar.update(1)

@contextmanager
def cpu_speedups(device: torch.device | str) -> Iterator[None]:
    """On a CPU, one thread with denormals flushed (x86 computes Adam's decaying averages ~100x slower)."""
    threads = torch.get_num_threads()
    if flush := torch.device(device).type == "cpu" and torch.set_flush_denormal(True):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)

def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)  # None: the global one

def make_adam(params: list[nn.Parameter], lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this PyTorch and device have it, else the default (`capturable`:
    its step can be captured in a CUDA graph)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, capturable=capturable)

def _batches(shuffler, n: int, fresh: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Each batch's indices, epoch after epoch (each epoch's order drawn only when it starts)."""
    while True:
        order = torch.cat(list(shuffler)).to(device)
        for start in range(0, n, fresh):
            yield order[start:start + fresh]

def _trainable(model: nn.Module) -> tuple[list[nn.Parameter], torch.device]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters: nothing to train.")
    return params, params[0].device

def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 1,
          max_steps: int | None = None, batch_size: int = 10, lr: float = 1e-3,
          seed: int | None = 0, desc: str = "Training", progress: bool = True,
          replay: tuple[torch.Tensor, torch.Tensor] | None = None, replay_share: float = 0.0,
          on_step: Callable[[int, int], None] | None = None, graphed: bool = False) -> list[float]:
    """Every step's loss; batches as the post's loop draws them for the same `seed` (None: the global
    generator); `replay_share` of each batch from `replay`; a non-finite loss raises FloatingPointError.
    `graphed` (no replay): `_graphed_steps`, one launch a step on a GPU; elsewhere the same weights."""
    params, device = _trainable(model)
    extra = replay_count(replay_share, batch_size)  # refuses a share no batch can hold
    if extra and (replay is None or len(replay[1]) == 0):
        raise ValueError(f"replay_share={replay_share} needs replay=(images, labels) to draw from.")
    if extra and graphed:
        raise ValueError(f"replay_share={replay_share} with graphed=True: a captured step replays nothing; "
                         "give replay_share=0 or graphed=False.")
    images, labels = images.to(device), labels.to(device)
    if extra:
        replay_images, replay_labels = replay[0].to(device), replay[1].to(device)
        replay_generator = _generator(None if seed is None else seed + 1)
    n, fresh = len(labels), batch_size - extra  # fresh: each batch's images from `images`
    steps = max_steps if max_steps is not None else epochs * math.ceil(n / fresh)
    optimizer = make_adam(params, lr, capturable=graphed and device.type == "cuda")
    # The post's DataLoader(shuffle=True) seeded alike gives the same order; only indices are loaded.
    shuffler = torch.utils.data.DataLoader(range(n), batch_size=n, shuffle=True, generator=_generator(seed))
    batches = zip(range(1, steps + 1), _batches(shuffler, n, fresh, device), strict=False)
    losses = torch.zeros(steps, device=device)
    refresh = max(1, min(200, steps // 50))  # read the loss back this often, not every step
    was_training = model.training
    model.train()
    try:
        if graphed:
            batches = list(batches)
            run = _graphed_steps(model, images, labels, [b for _, b in batches], losses, optimizer)
        with progress_bar(steps, desc, progress) as bar, cpu_speedups(device):
            for step, batch in batches:
                if graphed:
                    run[len(batch)]()
                else:
                    x, y = images[batch], labels[batch]
                    if extra:
                        pick = torch.randint(len(replay_labels), (extra,), generator=replay_generator)
                        pick = pick.to(device)
                        x, y = torch.cat([x, replay_images[pick]]), torch.cat([y, replay_labels[pick]])
                    optimizer.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    optimizer.step()
                    losses[step - 1] = loss.detach()
                if step % refresh == 0 or step == steps:
                    _report(losses[:step], steps, lr, bar, on_step)
    finally:
        model.train(was_training)
    return losses.tolist()

def _report(seen: torch.Tensor, steps: int, lr: float, bar, on_step: Callable | None) -> None:
    """The losses so far: a non-finite one raises; else the bar (and `on_step`) catch up."""
    if not torch.isfinite(seen).all():
        bad = int((~torch.isfinite(seen)).nonzero()[0])
        raise FloatingPointError(f"The loss became {seen[bad].item()} at step {bad + 1}: training diverged. "
                                 f"Lower the learning rate (lr={lr:g}) or LoRA's alpha.")
    bar.set_postfix(loss=f"{seen.mean().item():.3f}", refresh=False)
    bar.update(len(seen) - bar.n)
    if on_step is not None:
        on_step(len(seen), steps)

def _graphed_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
                   losses: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[int, Step]:
    """Per batch size, a step that reads nothing from the host (the batches stacked by size, the next row
    and the step count on the device), so that a GPU replays it as one captured CUDA graph (HIP on ROCm):
    a batch of 10 spends most of its time launching kernels. Without a GPU it runs eagerly."""
    device, graphs = losses.device, losses.device.type == "cuda"
    sizes = list(dict.fromkeys(len(b) for b in batches))  # a short last batch per epoch: a second graph
    tables = {k: torch.stack([b for b in batches if len(b) == k]) for k in sizes}  # each size's batches
    at = {k: torch.zeros(1, dtype=torch.long, device=device) for k in sizes}  # the next row of each table
    done = torch.zeros(1, dtype=torch.long, device=device)

    def step(size: int) -> None:  # everything on the device: nothing here waits for the host
        optimizer.zero_grad(set_to_none=not graphs)  # in a graph: zeroed in place, as replays need
        batch = tables[size].index_select(0, at[size]).squeeze(0)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        losses.index_copy_(0, done, loss.detach().reshape(1))
        at[size].add_(1)
        done.add_(1)

    run = {k: functools.partial(step, k) for k in sizes}
    return _capture(run, optimizer, [*at.values(), done]) if graphs else run

def _capture(steps: dict[int, Step], optimizer: torch.optim.Optimizer, counters: list[torch.Tensor]
             ) -> dict[int, Step]:
    """Each step captured as a CUDA graph (one memory pool), after warm-up runs on a side stream that
    create Adam's state; the weights, that state and the `counters` are then set back to the start."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start, device = [p.detach().clone() for p in params], params[0].device
    with torch.cuda.device(device):  # streams and graphs on the model's GPU, not the current one
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for step in steps.values():
                    step()
                    for counter in counters:
                        counter.zero_()  # the warm-up reads each table's first row, writes the first loss
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
            for state in optimizer.state.values():
                for tensor in state.values():
                    tensor.zero_()  # Adam's averages and its step count: as before any step
        graphs, pool = {}, None
        for size, step in steps.items():
            graphs[size] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[size], pool=pool):
                step()
            pool = graphs[size].pool()
    return {size: graph.replay for size, graph in graphs.items()}

def train_with_dataloader(model: nn.Module, dataset: torch.utils.data.Dataset, *, epochs: int = 1,
                          max_steps: int | None = None, batch_size: int = 10, lr: float = 1e-3,
                          seed: int | None = 0, desc: str = "Training (the post's loop)",
                          progress: bool = True) -> list[float]:
    """The post's loop, for comparison: a DataLoader, default Adam, the loss read every step (slower)."""
    params, device = _trainable(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=_generator(seed))
    steps = max_steps if max_steps is not None else epochs * len(loader)
    optimizer, loss_fn = torch.optim.Adam(params, lr=lr), nn.CrossEntropyLoss()
    losses: list[float] = []
    model.train()
    with progress_bar(steps, desc, progress) as bar:
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
    return losses
