"""LoRA in one file: a weight parametrization W' = W + (alpha / r) * B @ A, and its helpers.

`torch.nn.utils.parametrize` lets us wrap a Linear layer's `weight` without touching the
layer: every time the layer reads `weight`, PyTorch calls our module on the frozen original W
and uses what it returns. Only A and B are new parameters.

Shapes follow `nn.Linear`, whose weight is (out_features, in_features): A is (r, in), B is
(out, r), so B @ A has the weight's shape. B starts at zero, so at step 0 the adapted model is
exactly the pre-trained one (LoRA paper, section 4.1). Names follow PEFT and loralib where the
function does the same job: `mark_only_lora_as_trainable`, `lora_state_dict`,
`disable_adapter`, `merge_and_unload`, `print_trainable_parameters`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .model import linear_layers

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
        if init == "normal":  # the blog post's choice, N(0, 1)
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
        else:  # PEFT's and loralib's choice, the same as nn.Linear's own weights
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        # alpha / r (the paper); rsLoRA (Kalajdzievski, 2023; PEFT's use_rslora) uses alpha / sqrt(r)
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.enabled = True

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update scale * B @ A, of the weight's shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, enabled={self.enabled}"


class LessonHelpers:
    """What the package's helpers read from a LoRA module (`rank`, `alpha`, `use_rslora`,
    `delta_weight()`), worked out for a class that keeps only lora_A, lora_B and scale, as 03's
    does. Only a name the class itself lacks is answered here."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "rank":
                return lora_rank(self)
            if name == "alpha":
                return round(float(self.scale) * lora_rank(self), 12)
            if name == "use_rslora":
                return False
            if name == "delta_weight":
                return lambda: (self.lora_B @ self.lora_A) * self.scale
            raise


_with_helpers: dict[type, type] = {}


def with_helpers(cls: type) -> type:
    """`cls` with `LessonHelpers` added (the same class object for the same `cls`); the original is
    kept as `lesson_class`, whose code names the files the class trains."""
    if cls not in _with_helpers:
        _with_helpers[cls] = type(cls.__name__, (LessonHelpers, cls), {"lesson_class": cls})
    return _with_helpers[cls]


def add_lora(model: nn.Module, rank: int = 1, alpha: float = 1.0,
             target_modules: Iterable[str] | None = None, init: str = "normal",
             rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, use_rslora: bool = False) -> nn.Module:
    """Register a LoRA parametrization on the weight of each targeted Linear layer (all by default).

    `rank_pattern` and `alpha_pattern` (PEFT's names) give some layers their own rank or alpha,
    e.g. `rank=16, rank_pattern={"linear3": 10}`: a 10 x 2000 weight has rank at most 10.
    `use_rslora` scales the update by alpha / sqrt(r) instead of alpha / r (PEFT's name).
    Biases are left alone, as in the LoRA paper. Works in place and returns the model.
    """
    layers = linear_layers(model)
    targets = list(layers) if target_modules is None else list(target_modules)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    unknown = [t for t in targets if t not in layers]
    if unknown or not targets:
        raise ValueError(f"target_modules={targets!r}: {unknown or 'none given'} are not Linear "
                         f"layers of this model; valid names are {list(layers)}.")
    stray = [t for t in [*rank_pattern, *alpha_pattern] if t not in targets]
    if stray:
        raise ValueError(f"rank_pattern/alpha_pattern name {stray}, which LoRA does not adapt here: "
                         f"name only layers among target_modules={targets}.")
    for name in targets:
        layer = layers[name]
        limit = min(layer.in_features, layer.out_features)
        r = rank_pattern.get(name, rank)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
            raise ValueError(f"rank={r!r} is not valid for layer {name} "
                             f"({layer.out_features} x {layer.in_features}): expected an integer "
                             f"from 1 to {limit}.")
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"Layer {name} already has a parametrization: call add_lora once.")
    for name in targets:
        layer = layers[name]
        lora = LoRAParametrization(layer.in_features, layer.out_features, rank_pattern.get(name, rank),
                                   alpha_pattern.get(name, alpha), init, use_rslora)
        lora.to(device=layer.weight.device, dtype=layer.weight.dtype)
        parametrize.register_parametrization(layer, "weight", lora)
    return model


def is_lora(module: nn.Module) -> bool:
    """A LoRA parametrization: this package's class, or any with `lora_A`, `lora_B` and `scale`
    (03's class, written in the notebook, is one)."""
    return all(hasattr(module, name) for name in ("lora_A", "lora_B", "scale"))


def lora_rank(lora: nn.Module) -> int:
    return int(lora.lora_A.shape[0])


def lora_alpha(lora: nn.Module) -> float:
    """alpha as given, or worked back from the scale alpha / r for a class that keeps only that."""
    if hasattr(lora, "alpha"):
        return float(lora.alpha)
    return round(float(lora.scale) * lora_rank(lora), 12)


def uses_rslora(lora: nn.Module) -> bool:
    return bool(getattr(lora, "use_rslora", False))


def lora_modules(model: nn.Module) -> dict[str, LoRAParametrization]:
    """The LoRA parametrizations of the model, by the name of the layer they adapt."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if is_lora(p):
                    found[name] = p
    return found


def _require_lora(model: nn.Module) -> dict[str, LoRAParametrization]:
    found = lora_modules(model)
    if not found:
        raise ValueError("This model has no LoRA layers: call add_lora(model, ...) first.")
    return found


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen original W of a layer, whether or not it carries LoRA."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def mark_only_lora_as_trainable(model: nn.Module) -> list[str]:
    """Freeze every parameter that is not LoRA's A or B; return the names frozen."""
    _require_lora(model)
    frozen = []
    for name, param in model.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        if not is_lora:
            frozen.append(name)
    return frozen


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on (W + scale * B @ A) or off (W)."""
    for lora in _require_lora(model).values():
        lora.enabled = bool(enabled)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapter(model):` runs the pre-trained model, then restores each layer's state."""
    loras = _require_lora(model)
    before = {name: lora.enabled for name, lora in loras.items()}
    try:
        set_adapter_enabled(model, False)
        yield model
    finally:
        for name, lora in loras.items():
            lora.enabled = before[name]


def lora_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters of the base model, parameters LoRA adds)."""
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return base, lora


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's one-line summary: trainable, all, and the trainable share."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,} || all params: {total:,} || "
          f"trainable%: {100 * trainable / total:.4f}")


def describe_lora(model: nn.Module) -> str:
    """One line per adapted layer: W, bias, A and B shapes."""
    lines = []
    for name, lora in _require_lora(model).items():
        layer = model.get_submodule(name)
        lines.append(f"{name}: W {tuple(base_weight(layer).shape)} + bias {tuple(layer.bias.shape)}"
                     f" + lora_A {tuple(lora.lora_A.shape)} + lora_B {tuple(lora.lora_B.shape)}")
    return "\n".join(lines)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors under their plain names (`linear1.weight`), LoRA or not."""
    plain = {}
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            plain[key.replace(".parametrizations.weight.original", ".weight")] = value
    return plain


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (A and B of each layer): what fine-tuning produced."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold scale * B @ A into each weight and drop the parametrizations, in place.

    The result is a plain model whose weights equal the parametrization's W' exactly, and
    which runs as fast as the original: nothing is added to the forward pass any more.
    Merge the model itself, not a `copy.deepcopy` of it: a deep copy of a parametrized module
    shares its class with the original, and removing the parametrization from one breaks both
    (a PyTorch limitation). To keep the adapter, reload it onto the base model afterwards.
    """
    for name in _require_lora(model):
        layer = model.get_submodule(name)
        layer.parametrizations.weight[0].enabled = True
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model


class LoRALinear(nn.Module):
    """A LoRA layer computed as W x + b + scale * B (A x): the low-rank path kept separate.

    The parametrization rebuilds the full W + scale * B @ A at every forward and backward pass;
    this computes the same output from the two thin products instead, which is several times
    cheaper when training. It holds no tensors of its own: it reads the frozen W, the bias and
    the LoRA module (A, B, scale, enabled) of a parametrized layer, so training it trains them.
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        if not parametrize.is_parametrized(layer, "weight"):
            raise ValueError("LoRALinear wraps a layer that add_lora has parametrized.")
        self.weight = layer.parametrizations.weight.original
        self.bias = layer.bias
        self.lora = layer.parametrizations.weight[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora.enabled:
            out = out + F.linear(F.linear(x, self.lora.lora_A), self.lora.lora_B) * self.lora.scale
        return out


def separate_path(model: nn.Module) -> nn.Module:
    """The same model, sharing every parameter, with each LoRA layer computed as a LoRALinear.

    Train this view for speed; the parametrized model sees every update, because both hold the
    same tensors. Outputs agree with the parametrization to float rounding (about 1e-6), not
    bit for bit: (x A^T) B^T and x (B A)^T add the same numbers in a different order.
    """
    loras = _require_lora(model)
    shared = {id(t): t for t in [*model.parameters(), *model.buffers(), *loras.values()]}
    view = copy.deepcopy(model, memo=shared)
    for name in loras:
        parent_name, _, child = name.rpartition(".")
        parent = view.get_submodule(parent_name) if parent_name else view
        setattr(parent, child, LoRALinear(model.get_submodule(name)))
    return view


def unload(model: nn.Module) -> nn.Module:
    """Drop the parametrizations without merging: back to the base model, in place."""
    for name in _require_lora(model):
        parametrize.remove_parametrizations(model.get_submodule(name), "weight",
                                            leave_parametrized=False)
    return model
