"""LoRA as a weight parametrization W' = W + (alpha / r) * B @ A (B starts at zero: step 0 is the
pre-trained model), and its helpers, named as PEFT and loralib name the same job."""

import copy
import functools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .model import count_parameters, linear_layers

INITS = ("normal", "kaiming")

class LoRAParametrization(nn.Module):
    """Returns W + scale * B @ A when enabled, W untouched when not."""

    def __init__(self, in_features: int, out_features: int, rank: int = 1, alpha: float = 1.0,
                 init: str = "normal", use_rslora: bool = False) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r} is not valid: expected one of {INITS}.")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        if init == "normal":  # the blog post's N(0, 1)
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
        else:  # PEFT's and loralib's, as nn.Linear's own weights
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank  # rsLoRA: alpha / sqrt(r)
        self.enabled = True

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight() if self.enabled else weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, enabled={self.enabled}"

class LessonHelpers:
    """rank, alpha, use_rslora and delta_weight for a class with only lora_A, lora_B and scale (03's):
    what the package reads off every LoRA layer (an adapter file records them)."""

    def __getattr__(self, name: str):  # only for names the class (or nn.Module) does not have
        derived = {"rank": lambda m: int(m.lora_A.shape[0]), "use_rslora": lambda m: False,
                   "alpha": lambda m: round(float(m.scale) * m.rank, 12),  # worked back from alpha / r
                   "delta_weight": lambda m: lambda: (m.lora_B @ m.lora_A) * m.scale}
        return derived[name](self) if name in derived else super().__getattr__(name)

@functools.cache  # one class per `cls`
def with_helpers(cls: type) -> type:
    """`cls` with `LessonHelpers` added, the original kept as `lesson_class`."""
    return type(cls.__name__, (LessonHelpers, cls), {"lesson_class": cls})

def add_lora(model: nn.Module, rank: int = 1, alpha: float = 1.0, target_modules: Iterable[str] | None = None,
             init: str = "normal", rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, use_rslora: bool = False,
             cls: type | None = None) -> nn.Module:
    """LoRA on each targeted Linear weight (all by default), in place; `rank_pattern`/`alpha_pattern`
    (PEFT's) give some layers their own; `cls`: another class, cls(in, out, rank, alpha), `with_helpers`."""
    layers = linear_layers(model)
    targets = list(layers) if target_modules is None else list(target_modules)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    unknown = [t for t in targets if t not in layers]
    if unknown or not targets:
        raise ValueError(f"target_modules={targets!r}: {unknown or 'none given'} are not Linear "
                         f"layers of this model; valid names are {list(layers)}.")
    if stray := [t for t in [*rank_pattern, *alpha_pattern] if t not in targets]:
        raise ValueError(f"rank_pattern/alpha_pattern name {stray}, which LoRA does not adapt here: "
                         f"name only layers among target_modules={targets}.")
    for name in targets:
        layer, r = layers[name], rank_pattern.get(name, rank)
        limit = min(layer.in_features, layer.out_features)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
            raise ValueError(f"rank={r!r} is not valid for layer {name} ({layer.out_features} x "
                             f"{layer.in_features}): expected an integer from 1 to {limit}.")
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"Layer {name} already has a parametrization: call add_lora once.")
    for name in targets:
        layer, r, a = layers[name], rank_pattern.get(name, rank), alpha_pattern.get(name, alpha)
        lora = (LoRAParametrization(layer.in_features, layer.out_features, r, a, init, use_rslora)
                if cls is None else with_helpers(cls)(layer.in_features, layer.out_features, r, a))
        lora.to(device=layer.weight.device, dtype=layer.weight.dtype)
        parametrize.register_parametrization(layer, "weight", lora)
    return model

def lora_modules(model: nn.Module) -> dict[str, LoRAParametrization]:
    """The LoRA parametrizations (ours or any with lora_A, lora_B and scale: 03's), by layer name."""
    return {name: p for name, module in model.named_modules() if parametrize.is_parametrized(module, "weight")
            for p in module.parametrizations.weight
            if all(hasattr(p, k) for k in ("lora_A", "lora_B", "scale"))}

def _require_lora(model: nn.Module) -> dict[str, LoRAParametrization]:
    if not (found := lora_modules(model)):
        raise ValueError("This model has no LoRA layers: call add_lora(model, ...) first.")
    return found

def base_weight(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else (
        layer.weight)

def mark_only_lora_as_trainable(model: nn.Module) -> list[str]:
    """Freeze every parameter that is not LoRA's A or B; return the names frozen."""
    _require_lora(model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return [name for name, _ in model.named_parameters() if "lora_" not in name]

def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    for lora in _require_lora(model).values():
        lora.enabled = bool(enabled)

@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapter(model):` runs the pre-trained model, then restores each layer's state."""
    before = {lora: lora.enabled for lora in _require_lora(model).values()}
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        for lora, enabled in before.items():
            lora.enabled = enabled

def lora_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters of the base model, parameters LoRA adds)."""
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return count_parameters(model) - lora, lora

def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's one-line summary: trainable, all, and the trainable share."""
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || "
          f"trainable%: {100 * trainable / total:.4f}")

def describe_lora(model: nn.Module) -> str:
    return "\n".join(
        f"{name}: W {tuple(base_weight(layer).shape)} + bias {tuple(layer.bias.shape)} + lora_A "
        f"{tuple(lora.lora_A.shape)} + lora_B {tuple(lora.lora_B.shape)}"
        for name, lora in _require_lora(model).items() for layer in [model.get_submodule(name)])

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold scale * B @ A into each weight, in place. Not on a deep copy: it shares the parametrized
    class, and removing it from one breaks both (a PyTorch limitation)."""
    set_adapter_enabled(model, True)
    return unload(model, merge=True)

def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Drop the parametrizations, back to the base model, in place (`merge`: scale * B @ A folded into W)."""
    for name in _require_lora(model):
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=merge)
    return model

class LoRALinear(nn.Module):
    """W x + b + scale * B (A x): two thin products, not W + scale * B @ A each pass (several times
    cheaper to train); it holds a parametrized layer's own tensors, so training it trains them."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = layer.parametrizations.weight.original, layer.bias
        self.lora = layer.parametrizations.weight[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora.enabled:
            out = out + F.linear(F.linear(x, self.lora.lora_A), self.lora.lora_B) * self.lora.scale
        return out

def separate_path(model: nn.Module) -> nn.Module:
    """A view sharing every parameter, each LoRA layer a LoRALinear (equal to float rounding, ~1e-6)."""
    loras = _require_lora(model)
    shared = {id(t): t for t in [*model.parameters(), *model.buffers(), *loras.values()]}
    view = copy.deepcopy(model, memo=shared)
    for name in loras:
        parent_name, _, child = name.rpartition(".")
        parent = view.get_submodule(parent_name) if parent_name else view
        setattr(parent, child, LoRALinear(model.get_submodule(name)))
    return view
