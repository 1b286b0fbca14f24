"""The device to run on, and one line that says what it is (an AMD GPU is "cuda" too: ROCm's torch)."""

import os
import platform

import torch

from .settings import SettingsError, parse_device


def pick_device(name: str = "auto") -> torch.device:
    """The device called `name`; "auto" prefers a GPU, then Apple MPS, then the CPU."""
    choice = parse_device(name)
    has_mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    device = torch.device(choice)
    asked = f"device={name!r} was asked for, but"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"{asked} PyTorch {torch.__version__} sees no GPU here: use device='auto' or "
                            "'cpu', or install PyTorch's ROCm or CUDA build (docs/gpus.md).")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise SettingsError(f"{asked} only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1}); "
                            "check CUDA/HIP_VISIBLE_DEVICES.")
    if device.type == "mps" and not has_mps:
        raise SettingsError(f"{asked} Apple MPS is not available here: use device='auto' or 'cpu'.")
    return device

def describe_device(device: torch.device) -> str:
    """One line: which device, and the software stack behind it."""
    version = f"PyTorch {torch.__version__}"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)  # without an index: the current device
        stack = f"ROCm/HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"Device: {device} = {gpu} ({stack}, {version})"
    if device.type == "mps":
        return f"Device: mps = Apple GPU ({version})"
    cpu = platform.processor() or platform.machine()
    return f"Device: cpu = {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores ({version})"
