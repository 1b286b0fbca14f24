"""lora_tutorial: the helpers behind the LoRA notebooks (model, data, LoRA, training, evaluation).
What this file imports is the public API: `from lora_tutorial import add_lora`."""

from .checkpoints import CheckpointError, base_fingerprint, load_adapter, read_adapter, save_adapter
from .data import MnistError, fit_subset, load_mnist
from .device import describe_device, pick_device
from .evaluate import Evaluation, evaluate, predict
from .lora import (
    LoRAParametrization,
    add_lora,
    base_weight,
    describe_lora,
    disable_adapter,
    lora_modules,
    lora_parameter_counts,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    print_trainable_parameters,
    separate_path,
    set_adapter_enabled,
)
from .model import OversizedMLP, count_parameters, describe_layers, linear_layers
from .pipeline import (
    adapter_path,
    choose_target,
    finetuned_model,
    lora_model,
    pretrained_model,
    save_finetuned,
    setup,
)
from .settings import Settings, SettingsError
from .train import cpu_speedups, make_adam, progress, train
