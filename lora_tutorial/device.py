"""Choose the device to run on and say in one line what it is.

ROCm builds of PyTorch reuse the `torch.cuda` API, so an AMD Instinct GPU is device
"cuda" just like an NVIDIA one; `torch.version.hip` tells the two apart.
"""

from __future__ import annotations

import os
import platform

import torch

from .settings import SettingsError, parse_device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """Return the device called `name`; "auto" prefers a GPU, then Apple MPS, then the CPU."""
    choice = parse_device(name)
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(choice)
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(
                f"device={name!r} was asked for, but PyTorch {torch.__version__} sees no GPU here: "
                "use device='auto' or 'cpu', or install PyTorch's ROCm or CUDA build (docs/gpus.md)."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SettingsError(
                f"device={name!r} was asked for, but only {count} GPU(s) are visible "
                f"(cuda:0 to cuda:{count - 1}); check CUDA/HIP_VISIBLE_DEVICES."
            )
        return device
    if not _mps_available():  # parse_device allows nothing but cpu, cuda and mps
        raise SettingsError(f"device={name!r} was asked for, but Apple MPS is not available here: "
                            "use device='auto' or 'cpu'.")
    return device


def describe_device(device: torch.device) -> str:
    """One line: which device, and the software stack behind it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        stack = f"ROCm/HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"Device: {device} = {gpu} ({stack}, PyTorch {torch.__version__})"
    if device.type == "mps":
        return f"Device: mps = Apple GPU (PyTorch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return (
        f"Device: cpu = {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores "
        f"(PyTorch {torch.__version__})"
    )
