"""lora_tutorial: the helpers behind the LoRA notebooks (model, data, LoRA, training, evaluation)."""

from .checkpoints import CheckpointError, base_fingerprint, load_adapter, read_adapter, save_adapter
from .data import Mnist, MnistError, digit_subset, fit_subset, load_mnist
from .device import describe_device, pick_device
from .evaluate import Evaluation, evaluate, predict
from .lora import (
    LoRALinear,
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
    unload,
)
from .model import OversizedMLP, RichBoyNet, count_parameters, describe_layers, linear_layers
from .pipeline import (
    Pretrained,
    adapter_path,
    choose_target,
    finetune,
    finetuned_model,
    lora_model,
    preflight,
    pretrained_model,
    save_finetuned,
    setup,
)
from .settings import Settings, SettingsError
from .train import cpu_speedups, make_adam, progress, train

__all__ = [
    "CheckpointError", "Evaluation", "LoRALinear", "LoRAParametrization", "Mnist", "MnistError",
    "OversizedMLP", "Pretrained", "RichBoyNet", "Settings", "SettingsError", "adapter_path",
    "add_lora", "base_fingerprint", "choose_target", "base_weight", "count_parameters", "load_adapter",
    "preflight",
    "read_adapter", "save_adapter",
    "describe_device", "describe_layers", "describe_lora", "digit_subset", "disable_adapter",
    "evaluate", "finetune", "finetuned_model", "linear_layers", "load_mnist", "lora_model",
    "lora_modules", "lora_parameter_counts", "lora_state_dict", "mark_only_lora_as_trainable",
    "merge_and_unload", "pick_device", "predict", "pretrained_model", "print_trainable_parameters",
    "separate_path", "set_adapter_enabled", "setup", "train", "unload",
    "cpu_speedups", "fit_subset", "make_adam", "progress", "save_finetuned",
]
