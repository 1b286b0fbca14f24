"""Pre-trained weights and LoRA adapters on disk, written atomically and checked on load."""

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

from . import lora
from .model import linear_layers
from .settings import ShortError, shown_path

ADAPTER_FORMAT = "lora-tutorial-adapter/1"
Tensors, Info = dict[str, torch.Tensor], dict[str, Any]  # an adapter: A and B by name, and its metadata
_LORA_FACTS = (lambda m: m.rank, lambda m: float(m.alpha), lambda m: bool(m.use_rslora))  # rank, alpha, rule

class CheckpointError(ShortError, RuntimeError):
    """A checkpoint is missing, damaged, or was made with other settings."""

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) beside `path`, then rename: a crash leaves the old file or none, never half a file."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
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
    text = json.dumps(data, indent=2, default=lambda value: value.as_dict()) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))

def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    return ", ".join(f"{k}: file has {found.get(k)!r}, asked for {wanted.get(k)!r}"
                     for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k))

def save_pretrained(path: Path, state_dict: Tensors, settings: dict[str, Any], extra: dict[str, Any]) -> None:
    """Save weights with the settings that produced them and any plain extras (losses, scores)."""
    atomic_write(path, lambda tmp: torch.save({"format": 1, "settings": settings, "state_dict": state_dict,
                                               **extra}, tmp))

def load_pretrained(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    shown, path = shown_path(path), Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {shown}: run 02_pretrain first.")
    try:
        found = (payload := torch.load(path, map_location="cpu", weights_only=True))["settings"]
    except Exception as err:  # truncated, corrupt or not ours
        raise CheckpointError(f"Checkpoint {shown} cannot be read ({type(err).__name__}: {err}). "
                              "Delete it and pre-train again.") from err
    if found != settings:
        raise CheckpointError(f"Checkpoint {shown} was made with other settings "
                              f"({_differences(found, settings)}): delete it or change the settings back.")
    return payload

def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base weights, not A and B: on other weights an adapter is silent nonsense."""
    digest, base = hashlib.sha256(), {key.replace(".parametrizations.weight.original", ".weight"): value
                                      for key, value in model.state_dict().items() if "lora_" not in key}
    for name, tensor in sorted(base.items()):  # the base's own tensors under their plain names, LoRA or not
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

def lora_setup(ranks: dict[str, int], alphas: dict[str, float], rslora: bool) -> dict[str, Any]:
    """Ranks and alphas as PEFT keeps them: the most common (the larger on a tie), patterns for the rest."""
    info: dict[str, Any] = {}
    for key, values in (("rank", ranks), ("alpha", alphas)):
        info[key] = max(sorted(values.values(), reverse=True), key=list(values.values()).count)
        if pattern := {name: v for name, v in values.items() if v != info[key]}:
            info[f"{key}_pattern"] = pattern
    return {**info, "target_modules": list(ranks), **({"use_rslora": True} if rslora else {})}

def adapter_contents(model: nn.Module, settings: dict[str, Any] | None = None) -> tuple[Tensors, Info]:
    """An adapter as saved: A and B (on the CPU), and what loading checks (layers, shapes, base weights)."""
    if not (loras := lora.lora_modules(model)):
        raise ValueError("This model has no LoRA layers: there is no adapter to save.")
    ranks, alphas, rslora = ({n: f(m) for n, m in loras.items()} for f in _LORA_FACTS)
    if len(set(rslora.values())) > 1:
        raise ValueError("Some layers scale by alpha / sqrt(r) (use_rslora) and some by alpha / r: "
                         "an adapter file holds one rule; use the same for every layer.")
    info = {"format": ADAPTER_FORMAT, **lora_setup(ranks, alphas, all(rslora.values())), "settings": settings,
            "base_fingerprint": base_fingerprint(model),
            "base_shapes": {name: list(lora.base_weight(model.get_submodule(name)).shape) for name in loras}}
    return {k: v.cpu().contiguous() for k, v in lora.lora_state_dict(model).items()}, info

def save_adapter(model: nn.Module, path: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save only LoRA's A and B (safetensors) with `adapter_contents`' metadata; returns that."""
    tensors, info = adapter_contents(model, settings)
    metadata = {k: json.dumps(v) for k, v in info.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return info

def read_adapter(path: Path) -> tuple[Tensors, Info]:
    """The tensors and metadata of an adapter file; a damaged or foreign file is a clear error."""
    shown, path = shown_path(path), Path(path)
    if not path.is_file():
        raise CheckpointError(f"No adapter at {shown}: fine-tune first (05_finetune), or check the path.")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Adapter {shown} cannot be read ({err}): the file is truncated or damaged. "
                              "Delete it and fine-tune again.") from err
    if info.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{shown} is a safetensors file but not a LoRA adapter of this tutorial "
                              f"(format {info.get('format')!r}, expected {ADAPTER_FORMAT!r}).")
    return tensors, info

def put_adapter(model: nn.Module, tensors: Tensors, info: Info, shown: str) -> nn.Module:
    """Put an adapter on the base network (or one with the same LoRA), all else frozen; checked first."""
    layers = linear_layers(model)
    for name, shape in info["base_shapes"].items():
        if name not in layers:
            raise CheckpointError(f"Adapter {shown} adapts layer {name}, which this model does not have "
                                  f"(its Linear layers are {list(layers)}).")
        if (here := list(lora.base_weight(layers[name]).shape)) != shape:
            raise CheckpointError(f"Adapter {shown} does not fit this model: it was trained on a {name} "
                                  f"weight of {shape[0]} x {shape[1]}, this model's {name} is "
                                  f"{here[0]} x {here[1]}.")
    recorded, found = info["base_fingerprint"], base_fingerprint(model)
    if recorded is not None and recorded != found:
        raise CheckpointError(f"Adapter {shown} was trained on other base weights (fingerprint {recorded}, "
                              f"this model's is {found}): load it onto the pre-trained network it was "
                              "fine-tuned from (same seed, pre-training settings and data).")
    if loras := lora.lora_modules(model):
        here = [{n: f(m) for n, m in loras.items()} for f in _LORA_FACTS]
        wanted = [{n: info.get(f"{k}_pattern", {}).get(n, info[k]) for n in info["target_modules"]}
                  for k in ("rank", "alpha")] + [{n: bool(info.get("use_rslora")) for n in here[0]}]
        if here != wanted:
            raise CheckpointError(f"Adapter {shown} has LoRA of rank {wanted[0]}, alpha {wanted[1]}, but "
                                  f"this model already carries LoRA of rank {here[0]}, alpha {here[1]}: "
                                  "load it onto the model without LoRA.")
    else:
        lora.add_lora(model, rank=info["rank"], alpha=info["alpha"], target_modules=info["target_modules"],
                      rank_pattern=info.get("rank_pattern"), alpha_pattern=info.get("alpha_pattern"),
                      use_rslora=bool(info.get("use_rslora")))
        lora.mark_only_lora_as_trainable(model)
    if set(tensors) != (expected := set(lora.lora_state_dict(model))):
        raise CheckpointError(f"Adapter {shown} holds tensors {sorted(set(tensors) - expected)} this "
                              f"model lacks, and lacks {sorted(expected - set(tensors))}.")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # a shape that disagrees with the metadata: a damaged file
        raise CheckpointError(f"Adapter {shown} does not fit this model: {err}") from err
    return model

def load_adapter(model: nn.Module, path: Path, settings: dict[str, Any] | None = None) -> nn.Module:
    """Put a saved adapter on `model` (see `put_adapter`), refusing one made with other `settings`."""
    tensors, info = read_adapter(path)
    if settings is not None and info.get("settings") != settings:
        raise CheckpointError(f"Adapter {shown_path(path)} was made with other settings "
                              f"({_differences(info.get('settings') or {}, settings)}); it is not used.")
    return put_adapter(model, tensors, info, shown_path(path))
