"""Why a low rank is enough: the update full fine-tuning makes, its singular values, and costs.

LoRA bets that the change a task needs, delta W = W_after - W_before, has a low rank. Here we
fine-tune every weight instead, take delta W of each layer, and ask its singular values how
many directions it really uses: the share of its energy (squared Frobenius norm, the sum of the
squared singular values) that the top r of them hold. Keeping only those r directions is the
best rank-r approximation of delta W (Eckart-Young), which we can put back on the pre-trained
weights and evaluate beside LoRA trained at rank r. The costs of each way to fine-tune
(trainable numbers, optimizer state, file size, time) are measured, not computed from formulas.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoints import save_adapter
from .data import Mnist
from .evaluate import evaluate
from .lora import lora_modules, separate_path
from .model import linear_layers
from .pipeline import lora_copy, train_on_target
from .settings import Settings, check_whole_numbers
from .train import make_adam


def check_ranks(name: str, values: object) -> list[int]:
    """A notebook's list of ranks, checked before any work: whole numbers >= 1, sorted."""
    return sorted(set(check_whole_numbers(name, values, "[1, 2, 4, 8, 16, 32]")))


def fully_trainable(base: nn.Module) -> nn.Module:
    """A copy of `base` in which every weight and bias trains (plain fine-tuning)."""
    model = copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def last_layer_trainable(base: nn.Module, layer: str = "linear3") -> nn.Module:
    """A copy of `base` in which only one layer's weight and bias train (the classic cheap way)."""
    model = copy.deepcopy(base)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(f"{layer}."))
    return model


def lora_at_rank(settings: Settings, base: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """A copy of `base` with LoRA of `rank` on every Linear layer, frozen but for A and B.

    A layer whose weight cannot hold that rank (linear3 is 10 x 2000: rank 10 at most) gets
    its largest. `alpha=None` gives each layer alpha = its rank, so the update's scale
    alpha / r is 1 at every rank (the convention of 07's sweep); LoRA's random A is drawn after
    seeding with the settings' seed (`pipeline.lora_copy`, which the tutorial's own LoRA uses too).
    """
    ranks = {name: min(rank, layer.in_features, layer.out_features)
             for name, layer in linear_layers(base).items()}
    common = float(rank) if alpha is None else float(alpha)
    alphas = {name: float(r) if alpha is None else float(alpha) for name, r in ranks.items()}
    return lora_copy(base, settings.seed, rank=rank, alpha=common,
                     rank_pattern={n: r for n, r in ranks.items() if r != rank},
                     alpha_pattern={n: a for n, a in alphas.items() if a != common})


def weight_deltas(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """W_after - W_before of every Linear layer (for a LoRA model, its current W + scale B A)."""
    old, new = linear_layers(before), linear_layers(after)
    return {name: (new[name].weight - old[name].weight).detach().cpu() for name in old}


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of a matrix, largest first (computed in float64)."""
    return torch.linalg.svdvals(delta.double())


def top_direction_cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """|cos| between the top singular directions of two matrices of one shape: (output side u,
    input side v). 1: the same direction; two random directions in n dimensions give about
    1 / sqrt(n)."""
    ua, _, vha = torch.linalg.svd(a.double(), full_matrices=False)
    ub, _, vhb = torch.linalg.svd(b.double(), full_matrices=False)
    return abs(float(ua[:, 0] @ ub[:, 0])), abs(float(vha[0] @ vhb[0]))


def energy_shares(values: torch.Tensor, ranks: list[int]) -> list[float]:
    """The share of the matrix's energy (sum of squared singular values) held by the top r, per r.

    A rank at or beyond the matrix's own gives exactly 1: nothing is left out.
    """
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks={ranks!r}: expected ranks of at least 1.")
    cumulative = torch.cumsum(values.double() ** 2, dim=0)
    total = cumulative[-1]
    if total == 0:
        return [1.0 for _ in ranks]  # a zero update: any rank holds all of it
    return [float(cumulative[min(r, len(values)) - 1] / total) for r in ranks]


def low_rank_approximations(delta: torch.Tensor, ranks: list[int]) -> dict[int, torch.Tensor]:
    """The best rank-r approximation of `delta` for each r (truncated SVD: its top r singular
    directions, U_r diag(s_r) V_r^T), from one decomposition."""
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks={ranks!r}: expected ranks of at least 1.")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return {r: ((u[:, :r] * s[:r]) @ vh[:r]).to(delta.dtype) for r in ranks}


def with_deltas(base: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the plain `base` whose layers have W + delta W."""
    model = copy.deepcopy(base)
    layers = linear_layers(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            layers[name].weight += delta.to(layers[name].weight)
    return model


def adam_state_bytes(model: nn.Module) -> int:
    """Bytes Adam keeps for the model's trainable parameters, measured on an optimizer of its own.

    Adam holds two running averages per trained number (and a step count per tensor): memory that
    plain fine-tuning pays for every weight of the network, and LoRA only for A and B.
    """
    shadows = [torch.zeros_like(p, requires_grad=True) for p in model.parameters() if p.requires_grad]
    optimizer = make_adam(shadows, lr=1e-3)
    for shadow in shadows:
        shadow.grad = torch.zeros_like(shadow)
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


def saved_bytes(model: nn.Module) -> int:
    """The size of the file that fine-tuning must keep beside the base model, written for real.

    For LoRA that is the adapter (`save_adapter`); otherwise it is every tensor that trained:
    the whole network after full fine-tuning, one layer's weight and bias after last-layer tuning.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "finetuned.safetensors"
        if lora_modules(model):
            save_adapter(model, path)
        else:
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}, str(path))
        return path.stat().st_size


def finetune_and_measure(settings: Settings, data: Mnist, model: nn.Module, name: str,
                         verbose: bool = True) -> dict:
    """Fine-tune what is trainable in `model` on the target digit (in place), as the settings say,
    and measure it: trainable numbers, Adam's state, the saved file, seconds, test results.
    The row also holds the trained model, under "model"."""
    trained = separate_path(model) if lora_modules(model) else model
    started = time.perf_counter()
    train_on_target(settings, data, trained, desc=f"Fine-tuning: {name}", verbose=verbose)
    seconds = time.perf_counter() - started
    result = evaluate(model, data.test_images, data.test_labels)
    return {
        "name": name,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_bytes": adam_state_bytes(model),
        "file_bytes": saved_bytes(model),
        "seconds": seconds,
        **result.digit_summary(settings.target_digit),
        "evaluation": result,
        "model": model,
    }


def truncated_rows(settings: Settings, base: nn.Module, deltas: dict[str, torch.Tensor], data: Mnist,
                   ranks: list[int]) -> list[dict]:
    """Evaluate the pre-trained network plus each layer's delta W cut to rank r, for every r."""
    pieces = {name: low_rank_approximations(delta, ranks) for name, delta in deltas.items()}
    rows = []
    for r in ranks:
        result = evaluate(with_deltas(base, {name: cut[r] for name, cut in pieces.items()}),
                          data.test_images, data.test_labels)
        rows.append({"rank": r, **result.digit_summary(settings.target_digit)})
    return rows


def cost_table(rows: list[dict], digit: int) -> str:
    """The measured costs and results of each way to fine-tune, as a text table."""
    head = (f"{'':<20}{'trained numbers':>16}{'Adam state':>12}{'saved file':>12}"
            f"{f'digit {digit} wrong':>15}{'other digits':>14}{'seconds':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<20}{r['trainable']:>16,}{_size(r['optimizer_bytes']):>12}"
                     f"{_size(r['file_bytes']):>12}{r['target_wrong']:>15}{r['others_accuracy']:>14.3f}"
                     f"{r['seconds']:>9.2f}")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
