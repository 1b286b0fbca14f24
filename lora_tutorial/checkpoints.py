"""Pre-trained weights and LoRA adapters on disk: written atomically, checked on load.

Each file carries the settings that produced it. Loading compares them with the settings
asked for and refuses a mismatch, so weights from another run are never used silently.
Files are written to a temporary name in the same folder and renamed into place: a crash
leaves the previous good file, or none, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or was made with other settings."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(set(found) | set(wanted))
    return ", ".join(f"{k}: file has {found.get(k)!r}, asked for {wanted.get(k)!r}"
                     for k in keys if found.get(k) != wanted.get(k))


def save_pretrained(path: Path, state_dict: dict[str, torch.Tensor], settings: dict[str, Any],
                    extra: dict[str, Any]) -> None:
    """Save weights with the settings that produced them and any plain extras (losses, scores)."""
    payload = {"format": 1, "settings": settings, "state_dict": state_dict, **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_pretrained(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint written by save_pretrained, refusing one made with other settings."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}: run 02_pretrain first (or let the "
                              "notebook pre-train for you).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        found = payload["settings"]
    except Exception as err:  # truncated, corrupt or not ours
        raise CheckpointError(f"Checkpoint {path} cannot be read ({type(err).__name__}: {err}). "
                              "Delete it and pre-train again.") from err
    if found != settings:
        raise CheckpointError(f"Checkpoint {path} was made with other settings "
                              f"({_differences(found, settings)}); it is not used. Delete it or "
                              "change the settings back.")
    return payload


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], settings: dict[str, Any]) -> None:
    """Save only LoRA's A and B tensors (safetensors) with the settings as metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                             metadata={"settings": json.dumps(settings)}))


def load_adapter(path: Path, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load an adapter saved by save_adapter, refusing one made with other settings."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = json.loads((f.metadata() or {}).get("settings", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Adapter {path} cannot be read ({err}). Delete it and fine-tune "
                              "again.") from err
    if found != settings:
        raise CheckpointError(f"Adapter {path} was made with other settings "
                              f"({_differences(found, settings)}); it is not used.")
    return tensors
