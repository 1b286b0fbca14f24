"""Serving a fine-tuned network: four ways to run it, timed and profiled.

Parametrized (W' = W + scale * B @ A rebuilt at every call), `parametrize.cached()` (rebuilt once
per block), the separate path (W x + scale * B (A x)) and merged (`merge_and_unload`) compute the
same function; 09_forgetting times them in one run (ratios, not seconds: this machine is shared)
and explains the differences from a profile of one pass each.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ..lora import lora_modules
from ..settings import SettingsError, check_whole_numbers


def check_latency(batches: object, repeats: object) -> tuple[list[int], int]:
    """The image counts per forward call and the timed passes, checked before any work."""
    batches = check_whole_numbers("latency_batches", batches, "[1000, 100]")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise SettingsError(f"latency_repeats={repeats!r} is not valid: expected a whole number >= 1, "
                            "e.g. 3.")
    return batches, repeats


def forward_latency(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                    batch_size: int | None = None,
                    around: dict[str, Callable[[], AbstractContextManager]] | None = None
                    ) -> dict[str, float]:
    """Median seconds to run all `images` forward through each model, `batch_size` images per
    call (all at once by default), measured in one run.

    `around[name]`, when given, makes a context entered once around each of that model's passes
    (e.g. `torch.nn.utils.parametrize.cached`: the weights are rebuilt once per pass, not per call).
    The models take turns in every round, after one warm-up each, so a machine that speeds up
    or slows down mid-way affects them alike; compare the ratios, not the seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r}: expected at least 1.")
    size = batch_size or len(images)
    if size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected at least 1, or None for all images at once.")
    around = around or {}

    def one_pass(name: str, model: nn.Module) -> None:
        with around.get(name, nullcontext)():
            for start in range(0, len(images), size):
                model(images[start:start + size])
        if images.device.type == "cuda":  # NVIDIA and AMD (ROCm) GPUs
            torch.cuda.synchronize(images.device)  # GPU work is asynchronous: wait for it
        elif images.device.type == "mps":
            torch.mps.synchronize()

    times: dict[str, list[float]] = {name: [] for name in models}
    was_training = {name: model.training for name, model in models.items()}
    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            one_pass(name, model)  # warm-up: memory allocation, first-call costs
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                one_pass(name, model)
                times[name].append(time.perf_counter() - started)
    for name, model in models.items():
        model.train(was_training[name])  # as `evaluate.predict` does: leave each model as it was
    return {name: statistics.median(values) for name, values in times.items()}


REBUILD = "rebuild W'"  # the profiler range around each run of a LoRA parametrization


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One operator of a profile: its name, input shapes, calls and self CPU time (ms)."""

    op: str
    shapes: str
    calls: int
    self_ms: float
    rebuild: bool  # run inside a rebuild of W' = W + scale * B @ A


@contextmanager
def rebuilds_marked(model: nn.Module) -> Iterator[None]:
    """While open, every run of one of `model`'s LoRA parametrizations (one rebuild of a layer's
    W') appears in a profile as a range named REBUILD, holding the operators it ran."""
    open_ranges: dict[int, Any] = {}

    def enter(module: nn.Module, args: Any) -> None:
        open_ranges[id(module)] = torch.autograd.profiler.record_function(REBUILD).__enter__()

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_ranges.pop(id(module)).__exit__(None, None, None)

    handles = []
    for lora in lora_modules(model).values():
        handles += [lora.register_forward_pre_hook(enter), lora.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send the process's own stderr (file descriptor 2) to nowhere for a while.

    The profiler's native library writes start/stop lines there (and, on a CUDA build of PyTorch
    without a GPU, a failed device probe); Jupyter would show them under the cell. Python's own
    errors are exceptions and are not affected.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_pass(model: nn.Module, images: torch.Tensor, batch_size: int,
                 around: Callable[[], AbstractContextManager] | None = None) -> tuple[list[OpTime], int]:
    """The operators of one pass of `images` through `model`, `batch_size` images per call, by
    self CPU time (largest first), from PyTorch's profiler, and how many times a layer's W' was
    rebuilt. An operator run inside a rebuild is marked as such (see `rebuilds_marked`)."""
    was_training = model.training
    model.eval()
    # the autograd profiler without Kineto: the same operator records as torch.profiler, without
    # Kineto's start-up (seconds on a CUDA build of PyTorch that finds no GPU)
    with native_stderr_silenced(), rebuilds_marked(model), torch.inference_mode(), \
            torch.autograd.profiler.profile(use_kineto=False, record_shapes=True) as prof:
        with (around or nullcontext)():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size])
    model.train(was_training)
    grouped: dict[tuple[str, str, bool], list[float]] = {}
    rebuilds = 0
    for event in prof.function_events:
        inside, parent = event.name == REBUILD, event.cpu_parent
        while parent is not None and not inside:
            inside, parent = parent.name == REBUILD, parent.cpu_parent
        rebuilds += event.name == REBUILD
        shapes = str([list(s) for s in event.input_shapes if s])
        grouped.setdefault((event.name, shapes, inside), []).append(event.self_cpu_time_total / 1e3)
    ops = [OpTime(name, shapes, len(ms), sum(ms), inside) for (name, shapes, inside), ms in grouped.items()]
    return sorted(ops, key=lambda o: -o.self_ms), rebuilds


def profile_summary(ops: Sequence[OpTime], rebuilds: int,
                    baseline: Sequence[OpTime] = ()) -> dict[str, float]:
    """A profile in a few numbers (ms of self CPU time): the total; the part spent rebuilding W'
    and how many rebuilds; and the part in operators that `baseline` (the merged network's
    profile) never runs, outside rebuilds: the extra work of a separate low-rank path."""
    total = sum(o.self_ms for o in ops)
    rebuild = sum(o.self_ms for o in ops if o.rebuild)
    known = {o.op for o in baseline}
    extra = sum(o.self_ms for o in ops if baseline and not o.rebuild and o.op not in known)
    total = total or float("inf")  # an empty profile: every share 0
    return {"total_ms": sum(o.self_ms for o in ops), "rebuild_ms": rebuild, "rebuilds": rebuilds,
            "extra_ms": extra, "rebuild_share": rebuild / total, "extra_share": extra / total}


def profile_table(ops: Sequence[OpTime], top: int = 4) -> str:
    """The `top` operators by self CPU time, one line each, those inside a rebuild marked."""
    lines = []
    for o in ops[:top]:
        mark = "  <- rebuilding W'" if o.rebuild else ""
        lines.append(f"    {o.op:<16}{o.shapes:<38}{o.calls:>5} calls{o.self_ms:>9.1f} ms{mark}")
    return "\n".join(lines)


# Sentences written from the results (so that the notebook's prose never goes stale) ---------------


def serving_findings(latency: dict[int, dict[str, float]], profiles: dict[int, dict[str, dict]]) -> str:
    """Which way of running the network is faster at each batch size (the timings, as ratios to
    merged measured in one run), and why (the profiles: rebuilds of W' and extra operators)."""
    parts = []
    for batch in sorted(latency, reverse=True):
        times, prof = latency[batch], profiles.get(batch)
        ratios = ", ".join(f"{name} {seconds / times['merged']:.2f}x" for name, seconds in times.items()
                           if name != "merged")
        text = f"**Calls of {batch:,} images**, time against merged: {ratios}."
        if prof:
            par, cached, sep = prof["parametrized"], prof["cached"], prof["separate path"]
            text += (f" The parametrized network rebuilt W' {par['rebuilds']} times "
                     f"({100 * par['rebuild_share']:.0f} % of its operator time), cached() "
                     f"{cached['rebuilds']} times ({100 * cached['rebuild_share']:.0f} %). The separate path "
                     f"rebuilds nothing but spends {100 * sep['extra_share']:.0f} % of its time on B (A x) "
                     "and the sums that add it.")
            if par["rebuilds"] == cached["rebuilds"]:  # one call per pass: both rebuild once per layer
                text += (" With one call per pass, parametrized and cached do the same work: their gap is "
                         "noise.")
        parts.append(text)
    return "\n\n".join(parts)
