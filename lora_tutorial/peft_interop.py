"""The tutorial's LoRA adapters in Hugging Face PEFT's format, and back.

PEFT's LoRA on an `nn.Linear` holds the same two matrices as ours: `lora_A` of shape (r, in) and
`lora_B` of shape (out, r), scaled by lora_alpha / r (or / sqrt(r) with `use_rslora`). Only the
files differ. A PEFT adapter is a folder (what `PeftModel.save_pretrained` writes) with
`adapter_config.json` (a `LoraConfig`) and `adapter_model.safetensors`, whose tensors are named
`base_model.model.<layer>.lora_A.weight` and `...lora_B.weight`. `to_peft` writes such a folder
from an adapter of this tutorial (a model carrying LoRA, or a file `save_adapter` wrote), so
`PeftModel.from_pretrained(base, folder)` loads it; `from_peft` puts a PEFT folder's adapter on
our network as the tutorial's own LoRA. Writing needs `peft` (its `LoraConfig` writes the config);
reading does not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoints import CheckpointError, adapter_contents, base_fingerprint, read_adapter
from .lora import add_lora, lora_modules, mark_only_lora_as_trainable
from .model import linear_layers
from .settings import shown_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_INSTALL = "pip install 'peft>=0.18,<1'"
KEY = re.compile(r"base_model\.model\.(?P<layer>.+)\.lora_(?P<part>[AB])\.weight")
# Our own facts, kept in the safetensors header beside PEFT's {"format": "pt"}; PEFT ignores them.
FINGERPRINT_KEY, SETTINGS_KEY = "lora_tutorial.base_fingerprint", "lora_tutorial.settings"
# PEFT features this tutorial's LoRA does not have, with the value that means "not used".
NOT_USED = {
    "use_dora": (False, "DoRA adds a trained magnitude vector per layer"),
    "bias": ("none", "PEFT then trains and saves biases too"),
    "lora_bias": (False, "a trained bias on B"),
    "modules_to_save": (None, "whole modules trained and saved beside the adapter"),
    "target_parameters": (None, "LoRA on parameters rather than on Linear layers"),
    "fan_in_fan_out": (False, "weights stored transposed (GPT-2's Conv1D)"),
    "layer_replication": (None, "layers copied inside the base model"),
    "trainable_token_indices": (None, "trained embedding rows"),
}


def require_peft():
    """The `peft` module, or one sentence that says how to install it."""
    try:
        import peft
    except ImportError:
        raise CheckpointError(f"This needs Hugging Face PEFT, which is not installed here: {PEFT_INSTALL}"
                              " (the project's requirements.txt installs it).") from None
    return peft


def peft_config(info: dict[str, Any]):
    """The `peft.LoraConfig` that describes an adapter of this tutorial (its `adapter_contents`
    or `read_adapter` metadata): same layers, ranks, alphas and scaling rule, biases left alone."""
    peft = require_peft()
    return peft.LoraConfig(r=info["rank"], lora_alpha=info["alpha"], target_modules=info["target_modules"],
                           rank_pattern=info.get("rank_pattern", {}),
                           alpha_pattern=info.get("alpha_pattern", {}),
                           use_rslora=bool(info.get("use_rslora")), lora_dropout=0.0, bias="none")


def peft_key(layer: str, part: str) -> str:
    """PEFT's name for one of a layer's LoRA tensors (part 'A' or 'B') in an adapter file."""
    return f"base_model.model.{layer}.lora_{part}.weight"


def to_peft(adapter: nn.Module | str | Path, folder: str | Path, overwrite: bool = False) -> Path:
    """Write an adapter of this tutorial as a PEFT adapter folder; return the folder.

    `adapter` is a model carrying LoRA or the path of a file `save_adapter` wrote. The folder is
    written beside its final place and moved there whole, so a failure leaves the folder as it was.
    A folder that already holds files is refused unless `overwrite=True`.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{shown_path(folder)} is a file: give to_peft a folder to write the "
                              "adapter in.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise CheckpointError(f"{shown_path(folder)} already holds files: choose an empty or new folder, or "
                              "pass overwrite=True to replace it.")
    if isinstance(adapter, nn.Module):
        tensors, info = adapter_contents(adapter)
    else:
        tensors, info = read_adapter(Path(adapter))
    config = peft_config(info)  # before anything is written: PEFT missing is one sentence
    ours = {}
    for key, value in tensors.items():  # "linear1.parametrizations.weight.0.lora_A"
        layer, part = key.split(".parametrizations.")[0], key.rsplit("lora_", 1)[1]
        ours[peft_key(layer, part)] = value.contiguous()
    metadata = {"format": "pt", FINGERPRINT_KEY: info["base_fingerprint"],
                SETTINGS_KEY: json.dumps(info.get("settings"))}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config.save_pretrained(str(staging))
        save_file(ours, str(staging / WEIGHTS_FILE), metadata=metadata)
        _move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename `staging` to `folder`; an existing `folder` is set aside first and removed last."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.replace(folder, old)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(old, folder)  # put the old adapter back
        raise
    shutil.rmtree(old, ignore_errors=True)


PeftAdapter = tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, str]]


def read_peft(folder: str | Path) -> PeftAdapter:
    """A PEFT LoRA adapter folder, checked: its A and B per layer, its config, its file header.

    Refused with one sentence: a missing folder or file, a damaged file, another PEFT method, and
    the LoRA features this tutorial's LoRA does not have (DoRA, trained biases, modules_to_save, ...).
    """
    folder = Path(folder)
    shown = shown_path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise CheckpointError(f"No {CONFIG_FILE} in {shown}: give the folder that PEFT's save_pretrained "
                              "(or to_peft) wrote.")
    if not weights_path.is_file():
        other = " (only the older adapter_model.bin: load it in PEFT and save it again)" if (
            folder / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"No {WEIGHTS_FILE} in {shown}{other}.")
    try:
        config = json.loads(config_path.read_text())
        with safe_open(str(weights_path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"The adapter in {shown} cannot be read ({err}): a file is truncated or "
                              "damaged.") from err
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{shown} holds a PEFT adapter of type {config.get('peft_type')!r}, not LoRA.")
    for field, (unused, what) in NOT_USED.items():
        value = config.get(field, unused)
        if value not in (unused, [], {}):
            raise CheckpointError(f"{shown} uses PEFT's {field}={value!r} ({what}), which this tutorial's "
                                  "LoRA does not have: load it with PEFT itself (PeftModel.from_pretrained).")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        found = KEY.fullmatch(key)
        if found is None:
            raise CheckpointError(f"{shown} holds the tensor {key!r}, which is not LoRA's A or B of a "
                                  "Linear layer: load it with PEFT itself.")
        layers.setdefault(found["layer"], {})[found["part"]] = value
    unpaired = sorted(name for name, parts in layers.items() if set(parts) != {"A", "B"})
    if unpaired or not layers:
        raise CheckpointError(f"The adapter in {shown} is incomplete: "
                              f"{f'layers {unpaired} lack A or B' if unpaired else 'it holds no tensors'}.")
    return layers, config, header


def _pattern_value(pattern: dict[str, Any], layer: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern and alpha_pattern: the first key that matches the end of the
    layer's name (a regular expression), else the default."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def from_peft(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the LoRA adapter of a PEFT folder on `model` (the base network, without LoRA) as this
    tutorial's LoRA: same A, B, alpha and scaling rule; everything else frozen. Returns the model.

    Refused before anything changes (see `read_peft` for the folder): a layer the model lacks or of
    another shape, a model that already carries LoRA, and, when the file records the base weights'
    fingerprint (`to_peft` writes it; PEFT's own files do not), other base weights.
    """
    shown = shown_path(Path(folder))
    layers, config, header = read_peft(folder)
    if lora_modules(model):
        raise CheckpointError(f"This model already carries LoRA: load {shown} onto the network without it.")
    linears = linear_layers(model)
    for name, parts in layers.items():
        if name not in linears:
            raise CheckpointError(f"The adapter in {shown} adapts layer {name}, which this model does not "
                                  f"have (its Linear layers are {list(linears)}).")
        out_features, in_features = linears[name].weight.shape
        a, b = parts["A"].shape, parts["B"].shape
        if a[1] != in_features or b[0] != out_features or a[0] != b[1]:
            raise CheckpointError(f"The adapter in {shown} does not fit this model's {name} "
                                  f"({out_features} x {in_features}): its A is {tuple(a)}, its B {tuple(b)}.")
    recorded = header.get(FINGERPRINT_KEY)
    if recorded is not None and recorded != base_fingerprint(model):
        raise CheckpointError(f"The adapter in {shown} was trained on other base weights (fingerprint "
                              f"{recorded}, this model's is {base_fingerprint(model)}): load it onto the "
                              "pre-trained network it was fine-tuned from.")
    ranks = {name: parts["A"].shape[0] for name, parts in layers.items()}
    alphas = {name: float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
              for name in layers}
    rank, alpha = max(ranks.values(), key=list(ranks.values()).count), config["lora_alpha"]
    add_lora(model, rank=rank, alpha=float(alpha), target_modules=list(layers),
             rank_pattern={n: r for n, r in ranks.items() if r != rank},
             alpha_pattern={n: a for n, a in alphas.items() if a != float(alpha)},
             use_rslora=bool(config.get("use_rslora")))
    mark_only_lora_as_trainable(model)
    loras = lora_modules(model)
    with torch.no_grad():
        for name, parts in layers.items():
            loras[name].lora_A.copy_(parts["A"])
            loras[name].lora_B.copy_(parts["B"])
    return model
