"""Notebook 08's study: full fine-tuning's update, its singular directions, LoRA's, and what each costs.
Runs are DataFrames, one row per seed; columns `TENSORS` hold each layer's `Decomposition`, tensors."""

import copy
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file
from scipy.special import betainc
from torch import nn

from ..checkpoints import save_adapter
from ..data import Mnist, fit_subset
from ..evaluate import evaluate, from_predictions, predict
from ..lora import LoRAParametrization, lora_modules, separate_path
from ..model import count_parameters, linear_layers
from ..pipeline import finetune_key, lora_model, train_on_target
from ..settings import Settings, SettingsError
from ..train import cpu_speedups, make_adam, train
from .rank_study import split_columns
from .stats import best_and_ties, interleaved_seconds, spread, timed

MEASURES = ("target_wrong", "others_accuracy")  # fewer wrong answers on the digit; higher accuracy elsewhere
TENSORS = ("pieces", "biases", "a_start", "a_end", "predictions")  # the columns JSON cannot hold

def check_replay_share(settings: Settings, share: object) -> float:
    """Checked as `replay_share` is, and above 0 (else the second full run repeats the first)."""
    try:
        replace(settings, replay_share=share)
    except SettingsError as err:
        raise SettingsError(str(err).replace("replay_share=", "full_replay_share=", 1)) from None
    if share == 0:
        raise SettingsError("full_replay_share=0 is not valid: the second full fine-tune would be the first "
                            "one again; give a share above 0, e.g. 0.3.")
    return float(share)

def fully_trainable(base: nn.Module) -> nn.Module:
    """A copy of `base` in which every weight and bias trains."""
    return copy.deepcopy(base).requires_grad_(True)

def lora_at_rank(settings: Settings, base: nn.Module, rank: int) -> nn.Module:
    """LoRA at `rank` on every layer; alpha stays fixed, so alpha / r shrinks as r grows (as in 07)."""
    return lora_model(replace(settings, rank=rank, target_modules=None), base)

def deltas(before: nn.Module, after: nn.Module, part: str = "weight") -> dict[str, torch.Tensor]:
    """after - before of each Linear layer's weight (for LoRA, W + scale B A) or bias."""
    old, new = linear_layers(before), linear_layers(after)
    return {name: (getattr(new[name], part) - getattr(old[name], part)).detach().cpu() for name in old}

@dataclass
class Decomposition:
    """A matrix's singular values (all, largest first, float64) and its top k directions (unit columns)."""
    values: torch.Tensor
    u: torch.Tensor  # (out, k)
    v: torch.Tensor  # (in, k)

    def truncated(self, rank: int) -> torch.Tensor:
        """The best rank-`rank` approximation in float32 (the whole matrix at or beyond its rank)."""
        rank = min(rank, len(self.values))
        if rank > self.u.shape[1]:
            raise ValueError(f"rank={rank}: only the top {self.u.shape[1]} directions were kept.")
        return ((self.u[:, :rank] * self.values[:rank]) @ self.v[:, :rank].T).float()

def decompose(matrix: torch.Tensor, keep: int) -> Decomposition:
    """All singular values, the top `keep` directions (an SVD: 0.5 s for 2000 x 1000, fast enough)."""
    u, s, vh = torch.linalg.svd(matrix.detach().cpu().double(), full_matrices=False)
    return Decomposition(s, u[:, :keep], vh[:keep].T)

def decompose_lora(lora: LoRAParametrization) -> Decomposition:
    """scale * B @ A decomposed from its factors (QR of B and A^T, SVD of the r x r core), never built."""
    qb, rb = torch.linalg.qr(lora.lora_B.detach().cpu().double())
    qa, ra = torch.linalg.qr(lora.lora_A.detach().cpu().double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T * lora.scale)
    return Decomposition(s, qb @ u, qa @ vh.T)

def energy_shares(values: torch.Tensor, ranks: Iterable[int]) -> list[float]:
    """The share of the energy (sum of squared singular values) in the top r, per r; 1 at full rank."""
    ranks = list(ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks={ranks!r}: expected ranks of at least 1.")
    cumulative = torch.cumsum(values.double() ** 2, dim=0)
    if cumulative[-1] == 0:
        return [1.0 for _ in ranks]  # a zero update: any rank holds all of it
    return [float(cumulative[min(r, len(values)) - 1] / cumulative[-1]) for r in ranks]

def random_abs_cosine(d: int) -> float:
    """E|cos| of two random directions in d dimensions: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)

def chance_of_abs_cosine(c: float, d: int) -> float:
    """P(|cos| >= c) for a random direction in d dimensions: cos^2 ~ Beta(1/2, (d-1)/2), so the regularized
    incomplete beta I_{1-c^2}((d-1)/2, 1/2)."""
    return 1.0 if d == 1 else float(betainc((d - 1) / 2, 0.5, 1.0 - min(abs(c), 1.0) ** 2))  # d=1: +-1 only

def with_deltas(base: nn.Module, weights: dict, biases: dict | None = None) -> nn.Module:
    """A copy of `base` with W + delta W and, where given, b + delta b."""
    model = copy.deepcopy(base)
    layers = linear_layers(model)
    with torch.no_grad():
        for part, changes in (("weight", weights), ("bias", biases or {})):
            for name, delta in changes.items():
                getattr(layers[name], part).add_(delta.to(getattr(layers[name], part)))
    return model

def _tested(settings: Settings, model: nn.Module, data: Mnist) -> dict:
    return evaluate(model, data.test_images, data.test_labels).digit_summary(settings.target_digit)

def cut_rows(settings: Settings, base: nn.Module, pieces: dict[str, Decomposition], data: Mnist,
             ranks: Sequence[int], biases: dict | None = None) -> pd.DataFrame:
    """Per rank (the index): test results of base + delta W cut to rank r + the whole delta b."""
    cut = lambda r: with_deltas(base, {n: p.truncated(r) for n, p in pieces.items()}, biases)  # noqa: E731
    return pd.DataFrame([{"rank": r, **_tested(settings, cut(r), data)} for r in ranks]).set_index("rank")

def cuts_at(rows: pd.DataFrame, rank: int) -> pd.DataFrame:
    """Each seed's results for delta W cut to `rank`."""
    return pd.concat([c.loc[[rank]] for c in rows["cuts"]], ignore_index=True).assign(seed=list(rows.seed))

def full_runs(settings: Settings, data: Mnist, base: nn.Module, seeds: Sequence[int], ranks: Sequence[int],
              verbose: bool = False) -> pd.DataFrame:
    """Every weight fine-tuned per seed: test results, delta W decomposed ("pieces"), delta b, `cut_rows`."""
    rows = []
    for seed in seeds:
        run, model = replace(settings, finetune_seed=seed), fully_trainable(base)
        seconds = timed(train_on_target, run, data, model, f"Every weight, seed {seed}", verbose)[1]
        pieces = {name: decompose(delta, max(ranks)) for name, delta in deltas(base, model).items()}
        biases = deltas(base, model, "bias")
        rows.append({"seed": seed, "learning_rate": run.finetune_lr, "seconds": seconds, "pieces": pieces,
                     **_tested(run, model, data), "biases": biases,
                     "cuts": cut_rows(run, base, pieces, data, ranks, biases)})
    return pd.DataFrame(rows)

def lora_runs(settings: Settings, data: Mnist, base: nn.Module, rank: int, seeds: Sequence[int],
              verbose: bool = False) -> pd.DataFrame:
    """LoRA at `rank` per seed (separate path, as 05): results, "pieces", A at start and end, its move."""
    rows = []
    for seed in seeds:
        run = replace(settings, finetune_seed=seed)
        model = lora_at_rank(run, base, rank)
        start = {n: m.lora_A.detach().cpu().clone() for n, m in lora_modules(model).items()}
        desc = f"LoRA rank {rank}, seed {seed}"
        seconds = timed(train_on_target, run, data, separate_path(model), desc, verbose)[1]
        end = {n: m.lora_A.detach().cpu().clone() for n, m in lora_modules(model).items()}
        predictions = predict(model, data.test_images)
        rows.append({"seed": seed, "seconds": seconds,
                     **from_predictions(predictions, data.test_labels).digit_summary(run.target_digit),
                     "pieces": {n: decompose_lora(m) for n, m in lora_modules(model).items()},
                     "a_moved": {n: float((end[n] - start[n]).norm() / start[n].norm()) for n in end},
                     "a_start": start, "a_end": end, "predictions": predictions})
    return pd.DataFrame(rows)

def compare(candidate: pd.DataFrame, reference: pd.DataFrame) -> pd.Series:
    """'better', 'worse' or 'tie' (`Spread.versus`) over the seeds, per measure in `MEASURES`."""
    return pd.Series({k: spread(candidate[k]).versus(spread(reference[k]), k != "target_wrong")
                      for k in MEASURES})

def direction_agreement(lora_rows: pd.DataFrame, full_rows: pd.DataFrame) -> pd.DataFrame:
    """Per layer, side, seed: |cos| of LoRA's and the full top direction, E|cos| in d, a match's chance."""
    rows = []
    for seed, mine, full in zip(lora_rows.seed, lora_rows.pieces, full_rows.pieces, strict=True):
        for layer, piece in full.items():
            for side, a, b in (("output", mine[layer].u, piece.u), ("input", mine[layer].v, piece.v)):
                cos, d = abs(float(a[:, 0] @ b[:, 0])), len(b)  # |cos|: a direction's sign means nothing
                rows.append({"layer": layer, "side": side, "seed": seed, "cosine": cos, "dimensions": d,
                             "random": random_abs_cosine(d), "chance": chance_of_abs_cosine(cos, d)})
    return pd.DataFrame(rows)

def adam_state_bytes(model: nn.Module) -> int:
    """Bytes Adam keeps for the trainable parameters (two running averages each), measured."""
    shadows = [torch.zeros_like(p, requires_grad=True) for p in model.parameters() if p.requires_grad]
    optimizer = make_adam(shadows, lr=1e-3)
    sum(shadow.sum() for shadow in shadows).backward()  # zero gradients, one step: the state exists
    optimizer.step()
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))

def saved_bytes(model: nn.Module, record: dict | None = None) -> int:
    """The size of the file kept beside the base, written for real (the adapter, or what trained)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "finetuned.safetensors"
        if lora_modules(model):
            save_adapter(model, path, record)
        else:
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}, str(path))
        return path.stat().st_size

def step_times(models: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor, batch_size: int,
               lr: float, steps: int = 20, warmup: int = 3) -> pd.DataFrame:
    """Median ms per step of each model (a copy), forward + backward and Adam apart, taking turns, as
    `train` runs (`cpu_speedups`). One random batch: the time does not depend on its images."""
    pick = torch.randint(len(labels), (batch_size,), generator=torch.Generator().manual_seed(0))
    x, y = images[pick.to(labels.device)], labels[pick.to(labels.device)]
    calls = {}
    for name, model in models.items():
        copied = copy.deepcopy(model)
        trained = separate_path(copied) if lora_modules(copied) else copied
        optimizer = make_adam([p for p in copied.parameters() if p.requires_grad], lr)
        def forward_backward(trained=trained, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(trained(x), y).backward()
        calls[name, "forward_backward"], calls[name, "adam"] = forward_backward, optimizer.step
    with cpu_speedups(x.device):
        times = interleaved_seconds(calls, steps, warmup)
    return pd.DataFrame({f"{part}_ms": {name: 1e3 * times[name, part].mean for name in models}
                         for part in ("forward_backward", "adam")})

def measure_costs(settings: Settings, data: Mnist, models: dict[str, nn.Module], steps: int = 20
                  ) -> pd.DataFrame:
    """Per way: numbers trained, Adam's and the file's bytes (rank 1's is 05's file), `step_times`."""
    rows = {}
    for name, model in models.items():
        loras = lora_modules(model)
        record = loras and finetune_key(replace(settings, rank=max(m.rank for m in loras.values())), data)
        rows[name] = {"trainable": count_parameters(model, trainable_only=True),
                      "optimizer_bytes": adam_state_bytes(model),
                      "file_bytes": saved_bytes(model, record or None)}
    images, labels = fit_subset(data, settings.target_digit)
    times = step_times(models, images, labels, settings.batch_size, settings.learning_rate, steps)
    return pd.DataFrame.from_dict(rows, orient="index").join(times)

def rate_grid(settings: Settings, data: Mnist, base: nn.Module, rates: Sequence[float], seeds: Sequence[int],
              verbose: bool = False) -> pd.DataFrame:
    """Every weight at each rate and seed, on the validation images: 07's score and its two parts."""
    rows = []
    for lr in rates:
        for seed in seeds:
            run = replace(settings, finetune_seed=seed, finetune_learning_rate=lr)
            model = fully_trainable(base)
            train_on_target(run, data, model, desc=f"Every weight, rate {lr:g}, seed {seed}", verbose=verbose)
            result = evaluate(model, data.val_images, data.val_labels)
            rows.append({"learning_rate": lr, "seed": seed,
                         **split_columns("validation", result, run.target_digit)})
    return pd.DataFrame(rows).drop(columns=["validation_target_error_rate", "validation_accuracy"])

@dataclass
class Tuned:
    """The chosen rate, each rate's mean validation score, and whether the choice is at the grid's edge."""
    learning_rate: float
    means: dict[float, float]
    at_edge: bool

def tune_rate(rows: pd.DataFrame) -> Tuned:
    """The rate with the best mean validation score over the seeds (`best_and_ties`; no rows: refused)."""
    spreads = {float(lr): spread(g) for lr, g in rows.groupby("learning_rate")["validation_score"]}
    best, rates = best_and_ties(spreads, higher_is_better=True)[0], sorted(spreads)
    edge = len(rates) > 1 and best in (rates[0], rates[-1])  # a wider grid might do better
    return Tuned(best, {r: s.mean for r, s in spreads.items()}, edge)

def image_subset(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int) -> tuple:
    """The first `count` of a random order drawn from `seed`: fixed per seed and nested (10 within 50)."""
    if not 1 <= count <= len(labels):
        raise ValueError(f"count={count}: expected from 1 to the {len(labels):,} images there are.")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    return images[order.to(labels.device)], labels[order.to(labels.device)]

def data_size_runs(settings: Settings, data: Mnist, base: nn.Module, counts: Sequence[int],
                   seeds: Sequence[int], full_rate: float, rank: int = 1, verbose: bool = False
                   ) -> pd.DataFrame:
    """Every weight (at `full_rate`) and LoRA at `rank` on `count` target images, same subset and batches."""
    images, labels = fit_subset(data, settings.target_digit)
    rows = []
    for seed in seeds:
        run = replace(settings, finetune_seed=seed)
        for count in counts:
            x, y = image_subset(images, labels, count, seed)
            full, lora = fully_trainable(base), lora_at_rank(run, base, rank)
            ways = (("every weight", full, full, full_rate),
                    (f"LoRA, rank {rank}", lora, separate_path(lora), run.finetune_lr))
            for way, model, trained, lr in ways:
                train(trained, x, y, max_steps=run.finetune_steps, batch_size=run.batch_size, lr=lr,
                      seed=run.lora_seed, desc=f"{way}, {count} images, seed {seed}", progress=verbose)
                rows.append({"way": way, "images": count, "seed": seed, "learning_rate": lr,
                             **_tested(run, model, data)})
    return pd.DataFrame(rows)
