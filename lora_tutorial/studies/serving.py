"""Four ways to serve one adapter (09), all the same function: timed taking turns, and profiled."""

import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pandas as pd
import torch
from torch import nn

from ..lora import lora_modules
from .stats import interleaved_seconds

Around = Callable[[], AbstractContextManager]
REBUILD = "rebuild W'"  # the profiler range around each run of a LoRA parametrization

def forward_latency(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                    batch_size: int | None = None, around: dict[str, Around] | None = None
                    ) -> dict[str, float]:
    """Median seconds per pass of `images` through each model (`around[name]` entered once a pass)."""
    size, around = batch_size or len(images), around or {}
    if size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected at least 1, or None for all images at once.")
    def one_pass(name: str, model: nn.Module) -> None:
        with around.get(name, nullcontext)():
            for start in range(0, len(images), size):
                model(images[start:start + size])
        if images.device.type == "cuda":  # GPU work is asynchronous: wait for it
            torch.cuda.synchronize(images.device)
        elif images.device.type == "mps":
            torch.mps.synchronize()
    was_training = {name: model.training for name, model in models.items()}
    with torch.inference_mode():
        seconds = interleaved_seconds({name: lambda n=name, m=model: one_pass(n, m.eval())
                                       for name, model in models.items()}, repeats)
    for name, model in models.items():
        model.train(was_training[name])  # as `evaluate.predict` does: leave each model as it was
    return {name: s.mean for name, s in seconds.items()}

def profile_pass(model: nn.Module, images: torch.Tensor, batch_size: int, around: Around | None = None
                 ) -> tuple[pd.DataFrame, int]:
    """One pass's operators by self CPU time (ms, largest first; `rebuild`: inside one), and the rebuilds."""
    was_training, open_ranges = model.training, []
    handles = [h for lora in lora_modules(model).values() for h in (  # each LoRA rebuild: a REBUILD range
        lora.register_forward_pre_hook(
            lambda *_: open_ranges.append(torch.autograd.profiler.record_function(REBUILD).__enter__())),
        lora.register_forward_hook(lambda *_: open_ranges.pop().__exit__(None, None, None)))]
    model.eval()
    sys.stderr.flush()  # file descriptor 2 to nowhere: the profiler's native lines would show under the cell
    saved, sink = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    try:  # without Kineto: the same records, without its start-up (seconds on a CUDA build with no GPU)
        with torch.inference_mode(), \
                torch.autograd.profiler.profile(use_kineto=False, record_shapes=True) as prof, \
                (around or nullcontext)():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size])
    finally:
        os.dup2(saved, 2)
        for fd in (saved, sink):
            os.close(fd)
        model.train(was_training)
        for handle in handles:
            handle.remove()
    records = []
    for event in prof.function_events:
        inside, parent = event.name == REBUILD, event.cpu_parent
        while parent is not None and not inside:
            inside, parent = parent.name == REBUILD, parent.cpu_parent
        records.append((event.name, str([list(s) for s in event.input_shapes if s]), inside,
                        event.self_cpu_time_total / 1e3))
    ops = pd.DataFrame(records, columns=["op", "shapes", "rebuild", "self_ms"]).groupby(
        ["op", "shapes", "rebuild"], sort=False)["self_ms"].agg(calls="size", self_ms="sum").reset_index()
    rebuilds = sum(event.name == REBUILD for event in prof.function_events)
    return ops.sort_values("self_ms", ascending=False, kind="stable", ignore_index=True), rebuilds

def profile_summary(found: dict[str, tuple[pd.DataFrame, int]], baseline: str = "merged") -> pd.DataFrame:
    """Per way, ms of self CPU time: all, rebuilding W', in operators `baseline` never runs; shares."""
    known = found[baseline][0]["op"]
    frame = pd.DataFrame([{"way": name, "total_ms": ops["self_ms"].sum(), "rebuilds": rebuilds,
                           "rebuild_ms": ops["self_ms"][ops["rebuild"]].sum(),
                           "extra_ms": ops["self_ms"][~ops["rebuild"] & ~ops["op"].isin(known)].sum()}
                          for name, (ops, rebuilds) in found.items()]).set_index("way")
    total = frame["total_ms"].where(frame["total_ms"] > 0, float("inf"))  # an empty profile: shares 0
    return frame.assign(rebuild_share=frame["rebuild_ms"] / total, extra_share=frame["extra_ms"] / total)
