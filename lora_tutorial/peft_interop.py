"""The tutorial's adapters as PEFT adapter folders and back: the same A and B, in PEFT's files."""

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoints import CheckpointError, adapter_contents, lora_setup, put_adapter, read_adapter
from .settings import shown_path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
KEY = re.compile(r"base_model\.model\.(?P<layer>.+)\.lora_(?P<part>[AB])\.weight")  # PEFT's tensor names
FINGERPRINT_KEY, SETTINGS_KEY = "lora_tutorial.base_fingerprint", "lora_tutorial.settings"  # PEFT skips them
NOT_USED = {  # PEFT features our LoRA does not have: the value that means "not used", and what they are
    "use_dora": (False, "DoRA adds a trained magnitude vector per layer"),
    "bias": ("none", "PEFT then trains and saves biases too"), "lora_bias": (False, "a trained bias on B"),
    "modules_to_save": (None, "whole modules trained and saved beside the adapter"),
    "target_parameters": (None, "LoRA on parameters rather than on Linear layers"),
    "fan_in_fan_out": (False, "weights stored transposed (GPT-2's Conv1D)"),
    "layer_replication": (None, "layers copied inside the base model"),
    "trainable_token_indices": (None, "trained embedding rows"),
}

def require_peft():
    try:
        import peft
    except ImportError:
        raise CheckpointError("This needs Hugging Face PEFT, which is not installed here: pip install "
                              "'peft>=0.18,<1' (the project's requirements.txt installs it).") from None
    return peft

def to_peft(adapter: nn.Module | str | Path, folder: str | Path, overwrite: bool = False) -> Path:
    """Write an adapter (a model with LoRA, or a `save_adapter` file) as a PEFT folder, whole or none."""
    folder, shown = Path(folder), shown_path(folder)
    if folder.exists() and not (folder.is_dir() and (overwrite or not any(folder.iterdir()))):
        raise CheckpointError(f"{shown} is a file: give to_peft a folder to write the adapter in." if not
                              folder.is_dir() else f"{shown} already holds files: choose an empty or new "
                              "folder, or pass overwrite=True to replace it.")
    tensors, info = adapter_contents(adapter) if isinstance(adapter, nn.Module) else read_adapter(adapter)
    config = require_peft().LoraConfig(  # before anything is written: PEFT missing is one sentence
        r=info["rank"], lora_alpha=info["alpha"], target_modules=info["target_modules"],
        rank_pattern=info.get("rank_pattern", {}), alpha_pattern=info.get("alpha_pattern", {}),
        use_rslora=bool(info.get("use_rslora")), lora_dropout=0.0, bias="none")
    theirs = {f"base_model.model.{k.rsplit('.', 4)[0]}.lora_{k[-1]}.weight": t for k, t in tensors.items()}
    meta = {"format": "pt", FINGERPRINT_KEY: info["base_fingerprint"],
            SETTINGS_KEY: json.dumps(info.get("settings"))}
    staging, old = (folder.with_name(f".{folder.name}.{end}-{os.getpid()}") for end in ("new", "old"))
    try:  # staged beside the folder, then renamed; the folder replaced is set aside and removed last
        staging.mkdir(parents=True)
        config.save_pretrained(str(staging))
        save_file(theirs, str(staging / WEIGHTS_FILE), metadata=meta)
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder

def read_peft(folder: str | Path) -> tuple[dict[str, dict], dict, dict[str, str]]:
    """A PEFT LoRA folder's A and B per layer, config and header, checked (reading needs no peft)."""
    folder, shown = Path(folder), shown_path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"No {CONFIG_FILE} in {shown}: give the folder that PEFT's save_pretrained "
                              "(or to_peft) wrote.")
    if not (weights := folder / WEIGHTS_FILE).is_file():
        old = " (only the older adapter_model.bin: load it in PEFT and save it again)"
        raise CheckpointError(f"No {WEIGHTS_FILE} in {shown}{old * (folder / 'adapter_model.bin').exists()}.")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        with safe_open(str(weights), framework="pt") as f:
            header, tensors = f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"The adapter in {shown} cannot be read ({err}): a file is truncated or "
                              "damaged.") from err
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{shown} holds a PEFT adapter of type {config.get('peft_type')!r}, not LoRA.")
    for field, (unused, what) in NOT_USED.items():
        if (value := config.get(field, unused)) not in (unused, [], {}):
            raise CheckpointError(f"{shown} uses PEFT's {field}={value!r} ({what}), which this tutorial's "
                                  "LoRA does not have: load it with PEFT itself (PeftModel.from_pretrained).")
    layers: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if (found := KEY.fullmatch(key)) is None:
            raise CheckpointError(f"{shown} holds the tensor {key!r}, which is not LoRA's A or B of a "
                                  "Linear layer: load it with PEFT itself.")
        layers.setdefault(found["layer"], {})[found["part"]] = tensor
    bad = sorted(n for n, p in layers.items() if set(p) != {"A", "B"} or p["A"].shape[0] != p["B"].shape[1])
    if bad or not layers:
        raise CheckpointError(f"The adapter in {shown} is incomplete: " + (
            f"layers {bad} lack A or B, or their ranks differ." if bad else "it holds no tensors."))
    return layers, config, header

def from_peft(model: nn.Module, folder: str | Path) -> nn.Module:
    """A PEFT folder's LoRA put on `model` as ours, with `load_adapter`'s checks (base weights when known)."""
    layers, config, header = read_peft(folder)
    alphas = {n: float(next((a for k, a in (config.get("alpha_pattern") or {}).items()  # PEFT's matching rule
                             if re.match(rf"(.*\.)?({k})$", n)), config["lora_alpha"])) for n in layers}
    info = {**lora_setup({n: p["A"].shape[0] for n, p in layers.items()}, alphas, config.get("use_rslora")),
            "base_shapes": {n: [p["B"].shape[0], p["A"].shape[1]] for n, p in layers.items()},
            "base_fingerprint": header.get(FINGERPRINT_KEY)}
    ours = {f"{n}.parametrizations.weight.0.lora_{k}": t for n, p in layers.items() for k, t in p.items()}
    return put_adapter(model, ours, info, f"in {shown_path(folder)}")
