"""Pre-trained weights and LoRA adapters on disk: written atomically, checked on load.

Each file carries the settings that produced it. Loading compares them with the settings
asked for and refuses a mismatch, so weights from another run are never used silently. An
adapter also carries a fingerprint of the base weights it was trained on, and its shapes,
so it cannot be put on the wrong network.
Files are written to a temporary name in the same folder and renamed into place: a crash
leaves the previous good file, or none, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .lora import (
    add_lora,
    base_state_dict,
    base_weight,
    lora_alpha,
    lora_modules,
    lora_rank,
    lora_state_dict,
    mark_only_lora_as_trainable,
    uses_rslora,
)
from .model import linear_layers
from .settings import ShortError, shown_path


class CheckpointError(ShortError, RuntimeError):
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
    """Write `data` as JSON, atomically; objects with an `as_dict()` (an Evaluation) as that dict."""
    text = json.dumps(data, indent=2, default=_as_plain) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _as_plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    raise TypeError(f"{type(value).__name__} cannot be written as JSON")


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
    shown = shown_path(path)  # paths inside the project, relative to it
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {shown}: run 02_pretrain first (or let the "
                              "notebook pre-train for you).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        found = payload["settings"]
    except Exception as err:  # truncated, corrupt or not ours
        raise CheckpointError(f"Checkpoint {shown} cannot be read ({type(err).__name__}: {err}). "
                              "Delete it and pre-train again.") from err
    if found != settings:
        raise CheckpointError(f"Checkpoint {shown} was made with other settings "
                              f"({_differences(found, settings)}); it is not used. Delete it or "
                              "change the settings back.")
    return payload


ADAPTER_FORMAT = "lora-tutorial-adapter/1"


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base model's weights and biases (LoRA's A and B excluded).

    An adapter is a correction to particular weights: on any other weights it computes
    nonsense without failing. Saving this hash with the adapter lets loading refuse that.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(model).items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _common_and_pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The value most layers share (the larger on a tie), and the layers that differ from it."""
    counts = {v: list(values.values()).count(v) for v in values.values()}
    common = max(counts, key=lambda v: (counts[v], v))
    return common, {name: v for name, v in values.items() if v != common}


def layer_ranks(info: dict[str, Any]) -> dict[str, int]:
    """Each adapted layer's rank, read off an adapter's metadata."""
    return {name: info.get("rank_pattern", {}).get(name, info["rank"]) for name in info["target_modules"]}


def layer_alphas(info: dict[str, Any]) -> dict[str, float]:
    """Each adapted layer's alpha, read off an adapter's metadata."""
    return {name: float(info.get("alpha_pattern", {}).get(name, info["alpha"]))
            for name in info["target_modules"]}


def adapter_contents(model: nn.Module, settings: dict[str, Any] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter as it is saved: LoRA's A and B (on the CPU), and its metadata.

    The metadata holds rank and alpha (with `rank_pattern` / `alpha_pattern` for layers that
    differ), the adapted layers and their weight shapes, a fingerprint of the base weights, and
    the settings that produced the adapter.
    """
    loras = lora_modules(model)
    if not loras:
        raise ValueError("This model has no LoRA layers: there is no adapter to save.")
    rank, rank_pattern = _common_and_pattern({n: lora_rank(lora) for n, lora in loras.items()})
    alpha, alpha_pattern = _common_and_pattern({n: lora_alpha(lora) for n, lora in loras.items()})
    info = {
        "format": ADAPTER_FORMAT,
        "rank": rank,
        "alpha": alpha,
        "target_modules": list(loras),
        "base_shapes": {name: list(base_weight(model.get_submodule(name)).shape) for name in loras},
        "base_fingerprint": base_fingerprint(model),
        "settings": settings,
    }
    if rank_pattern:  # only layers whose rank or alpha differs from the rest (PEFT's convention)
        info["rank_pattern"] = rank_pattern
    if alpha_pattern:
        info["alpha_pattern"] = alpha_pattern
    rslora = {uses_rslora(lora) for lora in loras.values()}
    if len(rslora) > 1:
        raise ValueError("Some layers scale by alpha / sqrt(r) (use_rslora) and some by alpha / r: "
                         "an adapter file holds one rule; use the same for every layer.")
    if rslora == {True}:  # only then, so older files and readers stay as they were
        info["use_rslora"] = True
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    return tensors, info


def save_adapter(model: nn.Module, path: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save only LoRA's A and B (safetensors), with what is needed to load them safely
    (`adapter_contents`' metadata). Returns that metadata."""
    tensors, info = adapter_contents(model, settings)
    metadata = {k: json.dumps(v) for k, v in info.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return info


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of an adapter file; a damaged or foreign file is a clear error."""
    shown = shown_path(path)  # paths inside the project, relative to it
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No adapter at {shown}: fine-tune first (05_finetune), or check the path.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
        info = {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Adapter {shown} cannot be read ({err}): the file is truncated or damaged. "
                              "Delete it and fine-tune again.") from err
    if info.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{shown} is a safetensors file but not a LoRA adapter of this tutorial "
                              f"(format {info.get('format')!r}, expected {ADAPTER_FORMAT!r}).")
    return tensors, info


def _check_fits(model: nn.Module, info: dict[str, Any], path: Path) -> None:
    """Refuse an adapter made for other layer shapes, other base weights, or another LoRA setup."""
    shown = shown_path(path)  # paths inside the project, relative to it
    layers = linear_layers(model)
    for name, shape in info["base_shapes"].items():
        if name not in layers:
            raise CheckpointError(f"Adapter {shown} adapts layer {name}, which this model does not have "
                                  f"(its Linear layers are {list(layers)}).")
        here = list(base_weight(layers[name]).shape)
        if here != shape:
            raise CheckpointError(f"Adapter {shown} does not fit this model: it was trained on a {name} "
                                  f"weight of {shape[0]} x {shape[1]}, this model's {name} is "
                                  f"{here[0]} x {here[1]}.")
    found = base_fingerprint(model)
    if found != info["base_fingerprint"]:
        raise CheckpointError(f"Adapter {shown} was trained on other base weights (fingerprint "
                              f"{info['base_fingerprint']}, this model's is {found}): load it onto the "
                              "pre-trained network it was fine-tuned from (same seed, pre-training "
                              "settings and data).")
    loras = lora_modules(model)
    if loras:
        here = {"rank": {n: lora_rank(lora) for n, lora in loras.items()},
                "alpha": {n: lora_alpha(lora) for n, lora in loras.items()},
                "rslora": {n: uses_rslora(lora) for n, lora in loras.items()}}
        wanted = {"rank": layer_ranks(info), "alpha": layer_alphas(info),
                  "rslora": {n: bool(info.get("use_rslora")) for n in layer_ranks(info)}}
        if here != wanted:
            raise CheckpointError(f"Adapter {shown} has LoRA of rank {wanted['rank']}, alpha "
                                  f"{wanted['alpha']}, but this model already carries LoRA of rank "
                                  f"{here['rank']}, alpha {here['alpha']}: load it onto the model "
                                  "without LoRA.")


def load_adapter(model: nn.Module, path: Path, settings: dict[str, Any] | None = None) -> nn.Module:
    """Put a saved adapter on `model` (the base network, or one already carrying the same LoRA).

    Refused, before anything changes: a damaged file, other layer shapes, other base weights,
    a LoRA of another rank or on other layers, and (when `settings` is given) an adapter made
    with other settings. A base model gets LoRA added with the file's rank, alpha and layers,
    and everything but the adapter frozen. Returns the model.
    """
    shown = shown_path(path)  # paths inside the project, relative to it
    path = Path(path)
    tensors, info = read_adapter(path)
    if settings is not None and info.get("settings") != settings:
        raise CheckpointError(f"Adapter {shown} was made with other settings "
                              f"({_differences(info.get('settings') or {}, settings)}); it is not used.")
    _check_fits(model, info, path)
    if not lora_modules(model):
        add_lora(model, rank=info["rank"], alpha=info["alpha"], target_modules=info["target_modules"],
                 rank_pattern=info.get("rank_pattern"), alpha_pattern=info.get("alpha_pattern"),
                 use_rslora=bool(info.get("use_rslora")))
        mark_only_lora_as_trainable(model)
    expected = set(lora_state_dict(model))
    if set(tensors) != expected:
        raise CheckpointError(f"Adapter {shown} holds tensors {sorted(set(tensors) - expected)} this "
                              f"model lacks, and lacks {sorted(expected - set(tensors))}.")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # a shape that disagrees with the metadata: a damaged file
        raise CheckpointError(f"Adapter {shown} does not fit this model: {err}") from err
    return model
