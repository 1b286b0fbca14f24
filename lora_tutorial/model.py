"""The over-sized MLP (784 -> 1000 -> 2000 -> 10): big weight matrices make LoRA's savings easy to see."""

import torch
from torch import nn

LAYER_NAMES = ("linear1", "linear2", "linear3")

class OversizedMLP(nn.Module):
    def __init__(self, hidden_size_1: int = 1000, hidden_size_2: int = 2000) -> None:
        super().__init__()
        self.linear1 = nn.Linear(28 * 28, hidden_size_1)
        self.linear2 = nn.Linear(hidden_size_1, hidden_size_2)
        self.linear3 = nn.Linear(hidden_size_2, 10)
        self.relu = nn.ReLU()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.linear1(images.reshape(-1, 28 * 28)))
        return self.linear3(self.relu(self.linear2(x)))

RichBoyNet = OversizedMLP  # the blog post's name (its owner does not care what it costs)

def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

def layer_shapes(model: nn.Module | None = None) -> dict[str, tuple[int, int]]:
    """Each Linear weight's (out, in); without a model, the default one's, on the meta device (no memory)."""
    if model is None:
        with torch.device("meta"):
            model = OversizedMLP()
    return {name: tuple(layer.weight.shape) for name, layer in linear_layers(model).items()}

def describe_layers(model: nn.Module) -> str:
    return "\n".join(f"{name}: weight {tuple(layer.weight.shape)} + bias {tuple(layer.bias.shape)} = "
                     f"{layer.weight.numel() + layer.bias.numel():,}"
                     for name, layer in linear_layers(model).items())

def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
