"""Why a low rank is enough: the update full fine-tuning makes, how few directions carry it, and costs.

LoRA bets that the change a task needs, delta W = W_after - W_before, has a low rank. Here every
weight is fine-tuned instead, once per fine-tuning seed, and each layer's delta W is split into its
singular directions: how much of its energy (squared Frobenius norm, the sum of the squared
singular values) the top r hold; whether its best rank-r piece (the top r directions: no matrix of
rank r is closer, by Eckart-Young) does the work of the whole update when put back on the
pre-trained weights; and whether LoRA, trained from scratch at rank r on the same batches, finds
the same directions. The costs of each way to fine-tune (trained numbers, optimizer state, the
saved file, time per step) are measured, not computed from formulas.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoints import save_adapter
from ..data import Mnist, fit_subset
from ..evaluate import evaluate, from_predictions, predict
from ..lora import LoRAParametrization, lora_modules, lora_rank, separate_path
from ..model import layer_shapes, linear_layers
from ..pipeline import finetune_key, lora_model, train_on_target
from ..settings import Settings, SettingsError, check_whole_numbers
from .stats import Spread, spread

# LoRA here adapts all three layers; linear3's weight (10 x 2000) holds a rank of at most 10.
MAX_LORA_RANK = min(min(shape) for shape in layer_shapes().values())
MEASURES = ("target_wrong", "others_accuracy", "accuracy")


# Checking the notebook's own parameters -----------------------------------------------------

def check_ranks(name: str, values: object) -> list[int]:
    """A notebook's list of ranks, checked before any work: whole numbers >= 1, sorted."""
    return sorted(set(check_whole_numbers(name, values, "[1, 4, 16]")))


def check_lora_ranks(name: str, values: object) -> list[int]:
    """The ranks LoRA is trained at: as `check_ranks`, and none above what every layer can hold."""
    ranks = check_ranks(name, values)
    if ranks[-1] > MAX_LORA_RANK:
        raise SettingsError(f"{name}={values!r} is not valid: LoRA here adapts all three layers, and "
                            f"linear3 (10 x 2000) holds a rank of at most {MAX_LORA_RANK}: give ranks "
                            f"from 1 to {MAX_LORA_RANK}.")
    return ranks


def check_replay_share(settings: Settings, share: object) -> float:
    """full_replay_share (the replay of the second full fine-tune), checked before any work as
    `replay_share` is, and above 0: with no replay the second run would repeat the first."""
    try:
        replace(settings, replay_share=share)
    except SettingsError as err:
        raise SettingsError(str(err).replace("replay_share=", "full_replay_share=", 1)) from None
    if share == 0:
        raise SettingsError("full_replay_share=0 is not valid: the second full fine-tune would be the first "
                            "one again; give a share above 0, e.g. 0.3.")
    return float(share)


# The models: every weight, the last layer, LoRA ---------------------------------------------

def fully_trainable(base: nn.Module) -> nn.Module:
    """A copy of `base` in which every weight and bias trains (plain fine-tuning)."""
    model = copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def lora_at_rank(settings: Settings, base: nn.Module, rank: int) -> nn.Module:
    """The tutorial's own LoRA (`pipeline.lora_model`) at `rank` on all three layers, the rest frozen.

    alpha stays the settings' alpha at every rank, so the update's factor alpha / r shrinks as the
    rank grows (the LoRA paper's protocol, and 07's); A is drawn after seeding with the settings'
    fine-tuning seed, so one seed gives one A whatever else runs before.
    """
    return lora_model(replace(settings, rank=rank, target_modules=None), base)


# Updates and their singular directions ------------------------------------------------------

def weight_deltas(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """W_after - W_before of every Linear layer (for a LoRA model, its current W + scale B A)."""
    old, new = linear_layers(before), linear_layers(after)
    return {name: (new[name].weight - old[name].weight).detach().cpu() for name in old}


@dataclass
class Decomposition:
    """A matrix's singular values (all of them, largest first) and its top singular directions."""

    values: torch.Tensor  # float64, min(out, in) of them (fewer for a LoRA update: its rank)
    u: torch.Tensor  # (out, k): the top k output directions, as unit columns
    v: torch.Tensor  # (in, k): the top k input directions, as unit columns

    def truncated(self, rank: int) -> torch.Tensor:
        """The best rank-`rank` approximation, U_r diag(s_r) V_r^T, in float32. A rank at or beyond
        the matrix's own gives back the whole matrix."""
        rank = min(rank, len(self.values))
        if rank > self.u.shape[1]:
            raise ValueError(f"rank={rank}: only the top {self.u.shape[1]} directions were kept.")
        return ((self.u[:, :rank] * self.values[:rank]) @ self.v[:, :rank].T).float()


@contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch's CPU work on one thread inside the block. LAPACK's eigen-solvers slow down many times
    over when their threads compete with other work for a small CPU; on one thread they are steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gram_side(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The matrix in float64 turned so that it has at least as many rows as columns, and whether it was."""
    m = matrix.detach().cpu().double()
    return (m.T, True) if m.shape[0] < m.shape[1] else (m, False)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values of a matrix, largest first, in float64: the square roots of the
    eigenvalues of its smaller Gram matrix (M^T M or M M^T), several times faster than an SVD here."""
    m, _ = _gram_side(matrix)
    with one_thread():
        return torch.linalg.eigvalsh(m.T @ m).flip(0).clamp(min=0).sqrt()


def decompose(matrix: torch.Tensor, keep: int) -> Decomposition:
    """The singular values of `matrix` and its top `keep` singular directions, in float64.

    From the eigen-decomposition of the smaller Gram matrix: its eigenvectors are one side's
    directions, and the other side's follow as M v / sigma. The same values and directions as an
    SVD (each direction up to its sign), in a fraction of the time for these shapes.
    """
    m, turned = _gram_side(matrix)
    with one_thread():
        eigenvalues, vectors = torch.linalg.eigh(m.T @ m)  # ascending
    values = eigenvalues.flip(0).clamp(min=0).sqrt()
    keep = min(keep, len(values))
    v = vectors.flip(1)[:, :keep]
    s = values[:keep]
    u = (m @ v) / torch.where(s > 0, s, torch.ones_like(s))
    u[:, s == 0] = 0  # a direction with no energy has no output side
    return Decomposition(values, v, u) if turned else Decomposition(values, u, v)


def decompose_lora(lora: LoRAParametrization) -> Decomposition:
    """The decomposition of LoRA's update scale * B @ A from its factors alone: QR of B and of A^T,
    then the SVD of the small r x r core. The full matrix is never built."""
    qb, rb = torch.linalg.qr(lora.lora_B.detach().cpu().double())  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(lora.lora_A.detach().cpu().double().T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T * lora.scale)
    return Decomposition(s, qb @ u, qa @ vh.T)


def energy_shares(values: torch.Tensor, ranks: Iterable[int]) -> list[float]:
    """The share of the matrix's energy (sum of squared singular values) held by the top r, per r.

    A rank at or beyond the matrix's own gives exactly 1: nothing is left out.
    """
    ranks = list(ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks={ranks!r}: expected ranks of at least 1.")
    cumulative = torch.cumsum(values.double() ** 2, dim=0)
    total = cumulative[-1]
    if total == 0:
        return [1.0 for _ in ranks]  # a zero update: any rank holds all of it
    return [float(cumulative[min(r, len(values)) - 1] / total) for r in ranks]


def random_matrix_values(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """The singular values of a matrix of independent N(0, 1) numbers of this shape: the yardstick
    of an update with no structure, which spreads its energy over all its directions."""
    generator = torch.Generator().manual_seed(seed)
    return singular_values(torch.randn(shape, generator=generator, dtype=torch.float64))


def random_abs_cosine(d: int) -> float:
    """E|cos| between two independent random directions in d dimensions (uniform on the sphere).

    Exactly Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)), close to sqrt(2 / (pi d)) for large d: about
    0.26 for d = 10, 0.025 for d = 1,000. Each side of a layer has its own d: linear3's output side
    has 10 dimensions, its input side 2,000.
    """
    if d < 1:
        raise ValueError(f"d={d}: a direction needs at least one dimension.")
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def chance_of_abs_cosine(c: float, d: int, points: int = 200_001) -> float:
    """The probability that a random direction in d dimensions reaches |cos| >= c with a given one.

    The angle theta between them has a density proportional to sin(theta)^(d - 2) on [0, pi], so
    the share of it within arccos(c) of either end is integrated numerically.
    """
    if d < 1:
        raise ValueError(f"d={d}: a direction needs at least one dimension.")
    c = min(max(abs(c), 0.0), 1.0)
    if d == 1:
        return 1.0  # the only directions are +-1
    theta = np.linspace(0.0, np.pi / 2, points)
    with np.errstate(divide="ignore"):
        density = np.exp((d - 2) * np.log(np.sin(theta))) if d > 2 else np.ones_like(theta)
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(theta))])
    return float(np.interp(np.arccos(c), theta, cumulative) / cumulative[-1])


def top_direction_cosines(a: Decomposition, b: Decomposition) -> tuple[float, float]:
    """|cos| between the top singular directions of two updates of one shape: (output side u,
    input side v). 1: the same direction (the sign of a singular direction means nothing)."""
    return abs(float(a.u[:, 0] @ b.u[:, 0])), abs(float(a.v[:, 0] @ b.v[:, 0]))


def bias_deltas(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """b_after - b_before of every Linear layer: the part of a full fine-tune's update that no
    singular direction of delta W describes (zero for LoRA, which leaves the biases frozen)."""
    old, new = linear_layers(before), linear_layers(after)
    return {name: (new[name].bias - old[name].bias).detach().cpu() for name in old}


def with_deltas(base: nn.Module, deltas: dict[str, torch.Tensor],
                biases: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of the plain `base` whose layers have W + delta W and, where `biases` are given,
    b + delta b."""
    model = copy.deepcopy(base)
    layers = linear_layers(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            layers[name].weight += delta.to(layers[name].weight)
        for name, delta in (biases or {}).items():
            layers[name].bias += delta.to(layers[name].bias)
    return model


# Fine-tuning runs, one per seed -------------------------------------------------------------

def _summary(settings: Settings, model: nn.Module, data: Mnist) -> dict:
    """The test results that every row reports: wrong answers on the target, the others, overall."""
    return evaluate(model, data.test_images, data.test_labels).digit_summary(settings.target_digit)


def cut_rows(settings: Settings, base: nn.Module, pieces: dict[str, Decomposition], data: Mnist,
             ranks: Sequence[int], biases: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """The pre-trained network plus each layer's delta W cut to rank r and its whole delta b (the
    fine-tuned biases), on the test images, per r. Only the weights' update is cut: the biases
    carry no singular directions, so the cut and the whole update differ in delta W alone."""
    rows = []
    for r in ranks:
        model = with_deltas(base, {name: piece.truncated(r) for name, piece in pieces.items()}, biases)
        rows.append({"rank": r, **_summary(settings, model, data)})
    return rows


def cuts_at(rows: Sequence[dict], rank: int) -> list[dict]:
    """Each seed's results for delta W cut to `rank` (rows of `full_runs`)."""
    return [next(cut for cut in row["cuts"] if cut["rank"] == rank) for row in rows]


def full_runs(settings: Settings, data: Mnist, base: nn.Module, seeds: Sequence[int], ranks: Sequence[int],
              verbose: bool = False) -> list[dict]:
    """Fine-tune every weight once per seed (`finetune_seed`), as the settings say (replay and
    learning rate included).

    Each row: the seed, the learning rate, the seconds fine-tuning took, the test results, each
    layer's decomposition of delta W (its singular values and top directions, under "pieces"), its
    delta b ("biases") and the test results of delta W cut to each of `ranks` plus the whole delta b
    (under "cuts").
    """
    rows = []
    for seed in seeds:
        run = replace(settings, finetune_seed=seed)
        model = fully_trainable(base)
        started = time.perf_counter()
        train_on_target(run, data, model, desc=f"Every weight, seed {seed}", verbose=verbose)
        seconds = time.perf_counter() - started
        pieces = {name: decompose(delta, max(ranks)) for name, delta in weight_deltas(base, model).items()}
        biases = bias_deltas(base, model)
        rows.append({"seed": seed, "learning_rate": run.finetune_lr, "seconds": seconds,
                     **_summary(run, model, data), "pieces": pieces, "biases": biases,
                     "cuts": cut_rows(run, base, pieces, data, ranks, biases)})
    return rows


def lora_runs(settings: Settings, data: Mnist, base: nn.Module, rank: int, seeds: Sequence[int],
              verbose: bool = False) -> list[dict]:
    """Fine-tune LoRA at `rank` (`lora_at_rank`) once per seed, through the separate path as 05 does.

    Each row: the seed, the seconds, the test results, each layer's decomposition of its update
    ("pieces"), how far A moved from its random start, as a share of its size ("a_moved"), A itself
    at its start and after training ("a_start", "a_end"), and the predicted digit of every test
    image ("predictions").
    """
    rows = []
    for seed in seeds:
        run = replace(settings, finetune_seed=seed)
        model = lora_at_rank(run, base, rank)
        start = {name: lora.lora_A.detach().clone() for name, lora in lora_modules(model).items()}
        started = time.perf_counter()
        train_on_target(run, data, separate_path(model), desc=f"LoRA rank {rank}, seed {seed}",
                        verbose=verbose)
        seconds = time.perf_counter() - started
        loras = lora_modules(model)
        predictions = predict(model, data.test_images)  # once: the summary is read off them too
        summary = from_predictions(predictions, data.test_labels).digit_summary(run.target_digit)
        rows.append({"seed": seed, "seconds": seconds, **summary,
                     "pieces": {name: decompose_lora(lora) for name, lora in loras.items()},
                     "a_moved": {name: float((lora.lora_A.detach() - start[name]).norm() / start[name].norm())
                                 for name, lora in loras.items()},
                     "a_start": {name: a.cpu() for name, a in start.items()},
                     "a_end": {name: lora.lora_A.detach().cpu().clone() for name, lora in loras.items()},
                     "predictions": predictions})
    return rows


# Several seeds, one verdict -----------------------------------------------------------------

def over_seeds(rows: Sequence[dict], key: str) -> Spread:
    """The mean and min-max range of one measure over the runs of several seeds."""
    return spread([row[key] for row in rows])


def verdict(candidate: Spread, reference: Spread, higher_is_better: bool) -> str:
    """'tie' when the two ranges overlap (the seeds alone move them that far), else 'better' or
    'worse' for the candidate."""
    return candidate.versus(reference, higher_is_better)


def cut_verdicts(full: Sequence[dict], rank: int) -> dict[str, str]:
    """delta W cut to `rank` against the whole update, over the seeds: on the target digit (fewer
    wrong answers is better) and on the other digits (higher accuracy is better)."""
    return compare(cuts_at(full, rank), full)


def compare(candidate: Sequence[dict], reference: Sequence[dict]) -> dict[str, str]:
    """Two sets of runs over the seeds: 'tie', 'better' or 'worse' for the candidate on the target
    digit (fewer wrong answers is better) and on the other digits (higher accuracy is better)."""
    return {key: verdict(over_seeds(candidate, key), over_seeds(reference, key), key != "target_wrong")
            for key in ("target_wrong", "others_accuracy")}


def as_good(verdicts: dict[str, str]) -> bool:
    """True when a piece of the update is at least as good as the whole on both counts."""
    return all(v in ("tie", "better") for v in verdicts.values())


# What each way of fine-tuning costs ---------------------------------------------------------

def adam_state_bytes(model: nn.Module) -> int:
    """Bytes Adam keeps for the model's trainable parameters, measured on an optimizer of its own.

    Adam holds two running averages per trained number (and a step count per tensor): memory that
    plain fine-tuning pays for every weight of the network, and LoRA only for A and B.
    """
    from ..train import make_adam

    shadows = [torch.zeros_like(p, requires_grad=True) for p in model.parameters() if p.requires_grad]
    optimizer = make_adam(shadows, lr=1e-3)
    for shadow in shadows:
        shadow.grad = torch.zeros_like(shadow)
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


def saved_bytes(model: nn.Module, record: dict | None = None) -> int:
    """The size of the file that fine-tuning must keep beside the base model, written for real.

    For LoRA that is the adapter as `save_adapter` writes it, with `record` (05 records
    `pipeline.finetune_key`, the settings that made it) in its header; otherwise every tensor that
    trained: the whole network after full fine-tuning, one layer's weight and bias after last-layer
    tuning.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "finetuned.safetensors"
        if lora_modules(model):
            save_adapter(model, path, record)
        else:
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}, str(path))
        return path.stat().st_size


def step_times(models: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor, batch_size: int,
               lr: float, steps: int = 20, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Milliseconds per fine-tuning step of each model, split into forward + backward and Adam's update.

    Each model (copied, so the originals stay as they are) takes `warmup` untimed steps, then
    `steps` timed ones, the models taking turns at every step so that the machine's ups and downs
    hit them alike; the medians are returned. LoRA models run through the separate path, and on a
    CPU on one thread with denormals flushed, as `train` fine-tunes.
    """
    from ..train import make_adam

    runs = {}
    for name, model in models.items():
        copied = copy.deepcopy(model)
        trained = separate_path(copied) if lora_modules(copied) else copied
        params = [p for p in copied.parameters() if p.requires_grad]
        runs[name] = (trained, make_adam(params, lr), {"forward_backward": [], "adam": []})
    device = next(next(iter(models.values())).parameters()).device
    generator = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    if flush:
        torch.set_num_threads(1)
    try:
        for step in range(warmup + steps):
            pick = torch.randint(len(labels), (batch_size,), generator=generator).to(labels.device)
            x, y = images[pick], labels[pick]
            for trained, optimizer, times in runs.values():
                optimizer.zero_grad(set_to_none=True)
                started = time.perf_counter()
                loss_fn(trained(x), y).backward()
                middle = time.perf_counter()
                optimizer.step()
                ended = time.perf_counter()
                if step >= warmup:
                    times["forward_backward"].append(middle - started)
                    times["adam"].append(ended - middle)
    finally:
        if flush:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)
    return {name: {part: 1e3 * statistics.median(values) for part, values in times.items()}
            for name, (_, _, times) in runs.items()}


def measure_costs(settings: Settings, data: Mnist, models: dict[str, nn.Module],
                  steps: int = 20) -> list[dict]:
    """Each way's costs: numbers trained, Adam's state, the saved file and the time per step (on
    the target digit's fine-tuning images). A LoRA file records the settings 05 would record for
    that rank, so rank 1 gives the size of 05's own adapter file."""
    images, labels = fit_subset(data, settings.target_digit)
    times = step_times(models, images, labels, settings.batch_size, settings.learning_rate, steps)
    rows = []
    for name, model in models.items():
        loras = lora_modules(model)
        rank = max(lora_rank(lora) for lora in loras.values()) if loras else None
        record = finetune_key(replace(settings, rank=rank), data) if loras else None
        rows.append({"name": name, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "optimizer_bytes": adam_state_bytes(model), "file_bytes": saved_bytes(model, record),
                     "step_ms": times[name]})
    return rows


def size_text(n: int) -> str:
    """Bytes in KiB below a mebibyte, else in MiB (the units the tutorial quotes file sizes in)."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def cost_table(rows: Sequence[dict]) -> str:
    """The measured costs of each way to fine-tune, as a text table."""
    head = (f"{'':<18}{'trained numbers':>16}{'Adam state':>12}{'saved file':>12}"
            f"{'ms per step':>13}{'fwd + bwd':>11}{'Adam':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = r["step_ms"]
        lines.append(f"{r['name']:<18}{r['trainable']:>16,}{size_text(r['optimizer_bytes']):>12}"
                     f"{size_text(r['file_bytes']):>12}{ms['forward_backward'] + ms['adam']:>13.2f}"
                     f"{ms['forward_backward']:>11.2f}{ms['adam']:>8.2f}")
    return "\n".join(lines)


TENSORS = ("pieces", "biases", "a_start", "a_end", "predictions")  # what a row holds that JSON cannot


def plain_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows without what JSON cannot hold (decompositions, tensors), for the results file."""
    return [{k: v for k, v in row.items() if k not in TENSORS} for row in rows]


# Tuning the full fine-tune's learning rate on the validation images -------------------------

def check_rates(name: str, values: object) -> list[float]:
    """A list of learning rates, checked before any work: numbers above 0, returned sorted."""
    ok = isinstance(values, (list, tuple)) and len(values) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values)
    if not ok:
        raise SettingsError(f"{name}={values!r} is not valid: expected a list of learning rates above 0, "
                            "e.g. [3e-5, 1e-4, 3e-4, 1e-3].")
    return sorted({float(v) for v in values})


def validation_summary(model: nn.Module, data: Mnist, digit: int) -> dict:
    """What a choice is made on: the validation images' wrong answers on `digit`, the other digits'
    mean accuracy, and the score, the mean of the digit's accuracy and the others' (07's score: the
    task is to fix one digit while keeping nine, so each side weighs half)."""
    result = evaluate(model, data.val_images, data.val_labels)
    wrong, total = result.wrong_counts[digit], result.per_digit_totals()[digit]
    others = result.mean_accuracy_except(digit)
    return {"validation_target_wrong": wrong, "validation_others_accuracy": others,
            "validation_score": (1 - wrong / max(1, total) + others) / 2}


def rate_grid(settings: Settings, data: Mnist, base: nn.Module, rates: Sequence[float], seeds: Sequence[int],
              verbose: bool = False) -> list[dict]:
    """Fine-tune every weight at each learning rate and seed, as the settings say otherwise (replay
    included); one row each, judged on the validation images only."""
    rows = []
    for lr in rates:
        for seed in seeds:
            run = replace(settings, finetune_seed=seed, finetune_learning_rate=lr)
            model = fully_trainable(base)
            train_on_target(run, data, model, desc=f"Every weight, rate {lr:g}, seed {seed}", verbose=verbose)
            rows.append({"learning_rate": lr, "seed": seed,
                         **validation_summary(model, data, run.target_digit)})
    return rows


@dataclass
class Tuned:
    """The grid's learning rate with the highest mean validation score, and every rate's mean.
    `at_edge`: the best is the grid's smallest or largest rate, so a wider grid might do better."""

    learning_rate: float
    means: dict[float, float]
    at_edge: bool


def tune_rate(rows: Sequence[dict]) -> Tuned:
    """The learning rate with the highest mean validation score over the seeds (no test image read)."""
    if not rows:
        raise ValueError("tune_rate needs the rows of at least one run.")
    rates = sorted({row["learning_rate"] for row in rows})
    means = {lr: statistics.fmean(row["validation_score"] for row in rows if row["learning_rate"] == lr)
             for lr in rates}
    best = max(means, key=means.get)
    return Tuned(best, means, len(rates) > 1 and best in (rates[0], rates[-1]))


# Fewer images: LoRA against every weight on a small fixed subset ----------------------------

def image_subset(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` of the images, the first of one random order drawn from `seed`: fixed per seed, and
    nested (the 10 of a seed are among its 50), so a larger set only adds images."""
    if not 1 <= count <= len(labels):
        raise ValueError(f"count={count}: expected from 1 to the {len(labels):,} images there are.")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    order = order.to(labels.device)
    return images[order], labels[order]


def check_image_counts(name: str, values: object) -> list[int]:
    """The numbers of target-digit images to fine-tune on: whole numbers >= 1, sorted."""
    return sorted(set(check_whole_numbers(name, values, "[10, 50, 500]")))


def usable_counts(counts: Sequence[int], data: Mnist, digit: int) -> tuple[list[int], list[int]]:
    """The counts this run has enough fit images of `digit` for, and those it has not (a run on a
    few training images, `train_samples`, may hold fewer than the largest count)."""
    available = len(fit_subset(data, digit)[1])
    return [c for c in counts if c <= available], [c for c in counts if c > available]


def data_size_runs(settings: Settings, data: Mnist, base: nn.Module, counts: Sequence[int],
                   seeds: Sequence[int], full_rate: float, rank: int = 1, verbose: bool = False
                   ) -> list[dict]:
    """Every weight (at `full_rate`) and LoRA at `rank` (at the settings' rate) fine-tuned on `count`
    images of the target digit, per count and seed: the same subset and batch order for both ways,
    the settings' steps and batch size. Each row: the way, the count, the seed, the learning rate
    and the test results."""
    from ..train import train

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
                             **_summary(run, model, data)})
    return rows


# Verdicts in words ---------------------------------------------------------------------------

def versus(candidate: Sequence[dict], reference: Sequence[dict], key: str, names: tuple[str, str]) -> str:
    """Two sets of per-seed runs on one measure: 'no difference detected at N seeds' when their ranges
    overlap, else which is lower or higher, every seed of one beyond every seed of the other."""
    a, b = over_seeds(candidate, key), over_seeds(reference, key)
    if a.overlaps(b):
        return f"no difference detected at {min(a.count, b.count)} seeds"
    high, low = names if a.mean > b.mean else names[::-1]
    what = "more wrong answers" if key == "target_wrong" else "higher accuracy"
    return f"{high} {what} than {low} on every seed"


def both(candidate: Sequence[dict], reference: Sequence[dict], names: tuple[str, str], digit: int) -> str:
    """`versus` on the target digit's wrong answers and on the other digits' accuracy (said once when
    neither shows a difference)."""
    said = [versus(candidate, reference, key, names) for key in ("target_wrong", "others_accuracy")]
    if all(text.startswith("no difference") for text in said):
        return f"{said[0]} on either measure"
    return (f"digit {digit}: {versus(candidate, reference, 'target_wrong', names)}; other digits: "
            f"{versus(candidate, reference, 'others_accuracy', names)}")


# Tables and figures, one point per seed ------------------------------------------------------

def seed_table(groups: dict[str, Sequence[dict]], digit: int):
    """Per group of per-seed rows: the seeds, and the mean (min-max) of each test measure."""
    import pandas as pd

    return pd.DataFrame([{"": name, "seeds": len(rows),
                          f"digit {digit} wrong": over_seeds(rows, "target_wrong").text(1),
                          "other digits %": spread([100 * r["others_accuracy"] for r in rows]).text(1)}
                         for name, rows in groups.items()]).set_index("")


PANELS = (("target_wrong", "wrong answers on digit {digit}", 1.0),
          ("others_accuracy", "other digits' mean accuracy (%)", 100.0))


def plot_seeds(groups: dict[str, Sequence[dict]], before: dict, digit: int, title: str,
               colors: Sequence[str] | None = None):
    """Wrong answers on the digit and the other digits' accuracy on the test images: one column of
    points per group (one point per seed), a bar at their mean, the pre-trained network dashed."""
    from ..plots import legend_below, new_figure, seed_column

    colors = list(colors or [f"C{i}" for i in range(len(groups))])
    fig, axes = new_figure(1, len(PANELS), figsize=(5.4 * len(PANELS), 4.4), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], PANELS, strict=True):
        label = label.format(digit=digit)
        for i, (rows, color) in enumerate(zip(groups.values(), colors, strict=True)):
            ys = [scale * row[key] for row in rows]
            seed_column(ax, i, ys, color, 0.06, 0.25, size=22, label="one point per seed" if i == 0 else None,
                        mean_label="mean" if i == 0 else None)
        ax.axhline(scale * before[key], color="gray", ls="--", lw=1, label="pre-trained")
        ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=8)
        ax.set(title=label, xlabel="", ylabel=label)
        ax.set_xlabel("fine-tuned network")
        ax.grid(axis="y", alpha=0.3)
    legend_below(fig, axes[0][0], title, 0.06)
    return fig


def plot_rates(grids: dict[str, Sequence[dict]], tuned: dict[str, Tuned]):
    """Each full fine-tune's validation score against the learning rate: one point per seed, a line
    through the means, the tuned rate ringed."""
    from ..plots import new_figure

    fig, ax = new_figure(figsize=(7.5, 4.2))
    for i, (name, rows) in enumerate(grids.items()):
        color, rates = f"C{i}", sorted(tuned[name].means)
        for lr in rates:
            ys = [100 * row["validation_score"] for row in rows if row["learning_rate"] == lr]
            xs = [lr * 1.05 ** (j - (len(ys) - 1) / 2) for j in range(len(ys))]
            ax.scatter(xs, ys, s=16, color=color, alpha=0.7,
                       label=f"{name}, one point per seed" if lr == rates[0] else None)
        ax.plot(rates, [100 * tuned[name].means[lr] for lr in rates], color=color, label=f"{name}, mean")
        best = tuned[name].learning_rate
        ax.scatter([best], [100 * tuned[name].means[best]], s=220, facecolors="none", edgecolors=color,
                   linewidths=2)
    ax.set_xscale("log")
    ax.set(title="Every weight fine-tuned: validation score against the learning rate (ringed: chosen)",
           xlabel="learning rate (log scale)", ylabel="validation score (%)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_energy(runs: dict[str, list[dict]], random: dict[str, torch.Tensor], most: int = 64):
    """One panel per layer: the share of delta W's energy in its top r directions against r, one thin
    curve per seed for each run, and a random matrix of the layer's shape dashed."""
    from ..plots import new_figure

    layers = list(random)
    fig, axes = new_figure(1, len(layers), figsize=(4.3 * len(layers), 3.9), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for i, (name, rows) in enumerate(runs.items()):
            for j, row in enumerate(rows):
                values = row["pieces"][layer].values[:most].double() ** 2
                shares = (torch.cumsum(values, 0) / (row["pieces"][layer].values.double() ** 2).sum()).numpy()
                ax.plot(range(1, len(shares) + 1), shares, color=f"C{i}", lw=1, alpha=0.7,
                        label=f"{name}, one curve per seed" if j == 0 else None)
        noise = random[layer][:most].double() ** 2
        total = (random[layer].double() ** 2).sum()
        ax.plot(range(1, len(noise) + 1), (torch.cumsum(noise, 0) / total).numpy(), "--", color="gray",
                label="a random matrix")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="r, the directions kept (log scale)", ylabel="share of the energy in the top r",
               ylim=(0, 1.02), title=f"{layer}: {len(random[layer]):,} directions in all")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("How much of delta W its top r directions hold")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def by_count(rows: Sequence[dict]) -> dict[tuple[int, str], list[dict]]:
    """`data_size_runs` rows grouped by (count, way), in the order they came."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["images"], row["way"]), []).append(row)
    return groups


def plot_data_sizes(rows: Sequence[dict], before: dict, digit: int):
    """Test results against the number of images fine-tuned on (log scale): one point per seed for
    each way, a line through the means, the pre-trained network dashed."""
    from ..plots import new_figure

    groups = by_count(rows)
    ways = list(dict.fromkeys(way for _, way in groups))
    fig, axes = new_figure(1, len(PANELS), figsize=(5.4 * len(PANELS), 4.2), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], PANELS, strict=True):
        label = label.format(digit=digit)
        for i, way in enumerate(ways):
            counts = sorted(c for c, w in groups if w == way)
            shift = 1.08 ** (i - (len(ways) - 1) / 2)
            for c in counts:
                ys = [scale * row[key] for row in groups[c, way]]
                xs = [c * shift * 1.02 ** (j - (len(ys) - 1) / 2) for j in range(len(ys))]
                ax.scatter(xs, ys, s=18, color=f"C{i}", alpha=0.8, label=f"{way}, one point per seed"
                           if c == counts[0] else None)
            ax.plot([c * shift for c in counts], [statistics.fmean(scale * r[key] for r in groups[c, way])
                                                  for c in counts], color=f"C{i}", label=f"{way}, mean")
        ax.axhline(scale * before[key], color="gray", ls="--", lw=1, label="pre-trained")
        ax.set_xscale("log")
        ax.set(title=label, xlabel=f"images of digit {digit} fine-tuned on (log scale)", ylabel=label)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Fewer images: every weight against LoRA, on the test images")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def data_size_table(rows: Sequence[dict], digit: int):
    """Per count and way: the mean (min-max) of each test measure over the seeds."""
    groups = by_count(rows)
    return seed_table({f"{count} images, {way}": mine for (count, way), mine in groups.items()}, digit)


CHANCE = 0.01  # a match that random directions reach less often than this is "above chance"


def direction_agreement(lora_rows: Sequence[dict], full_rows: Sequence[dict]) -> dict[str, dict]:
    """Per layer, LoRA's update against the full update of the same seed (the same batches): |cos|
    between their top output directions and between their top input directions, each side's random
    level (E|cos| in its own dimension), each seed's chance that a random direction matches as well,
    how many seeds are above chance (a chance below `CHANCE`), and how far LoRA's A moved from its
    random start. A count of seeds, not the worst seed, so one unlucky seed does not hide the rest."""
    agreement = {}
    for layer in lora_rows[0]["pieces"]:
        pairs = [top_direction_cosines(mine["pieces"][layer], full["pieces"][layer])
                 for mine, full in zip(lora_rows, full_rows, strict=True)]
        piece = full_rows[0]["pieces"][layer]
        sides = {}
        for side, index, d in (("output", 0, piece.u.shape[0]), ("input", 1, piece.v.shape[0])):
            cosines = [pair[index] for pair in pairs]
            chances = [chance_of_abs_cosine(c, d) for c in cosines]
            sides[side] = {"cosines": cosines, "dimensions": d, "random": random_abs_cosine(d),
                           "chances": chances, "above_chance": sum(p < CHANCE for p in chances)}
        agreement[layer] = {**sides, "a_moved": [row["a_moved"][layer] for row in lora_rows]}
    return agreement


def agreement_table(agreement: dict[str, dict]) -> str:
    """The |cos| of each side beside its random level and the seeds above chance, and how far A
    moved, as text."""
    head = (f"{'':<9}{'output side u':>18}{'random':>8}{'above chance':>14}{'input side v':>18}"
            f"{'random':>8}{'above chance':>14}{'A moved by':>20}")
    lines = [head, "-" * len(head)]
    for layer, row in agreement.items():
        cells = "".join(f"{spread(row[side]['cosines']).text(2):>18}{row[side]['random']:>8.3f}"
                        f"{seeds_text(row[side]):>14}" for side in ("output", "input"))
        lines.append(f"{layer:<9}{cells}{spread(row['a_moved']).text(1, 100) + ' %':>20}")
    return "\n".join(lines)


def seeds_text(side: dict) -> str:
    """How many seeds of one side are above chance, as "4 of 5"."""
    return f"{side['above_chance']} of {len(side['cosines'])}"


def energy_spreads(rows: Sequence[dict], layer: str, ranks: Sequence[int]) -> list[Spread]:
    """The share of a layer's delta W energy in its top r directions, per r, over the seeds' runs."""
    per_seed = [energy_shares(row["pieces"][layer].values, ranks) for row in rows]
    return [spread([shares[i] for shares in per_seed]) for i in range(len(ranks))]


def energy_table(runs: dict[str, list[dict]], random: dict[str, torch.Tensor], ranks: Sequence[int]) -> str:
    """Per layer: the % of delta W's energy in its top r directions for each run, mean (min-max) over
    the seeds, and for a random matrix of the layer's shape. "—" where r reaches the layer's largest
    possible rank, since there every update holds 100 % trivially."""
    head = f"{'% of the energy in the top r':<30}" + "".join(f"{f'r = {r}':>20}" for r in ranks)
    lines = [head, "-" * len(head)]
    for layer, values in random.items():
        piece = next(iter(runs.values()))[0]["pieces"][layer]
        most = min(piece.u.shape[0], piece.v.shape[0])
        lines.append(f"{layer} ({piece.u.shape[0]:,} x {piece.v.shape[0]:,})")
        for name, rows in runs.items():
            spreads = energy_spreads(rows, layer, ranks)
            lines.append(f"  {name:<28}" + "".join(f"{s.text(1, 100) if r < most else '—':>20}"
                                                 for r, s in zip(ranks, spreads, strict=True)))
        shares = energy_shares(values, ranks)
        lines.append(f"  {'a random matrix':<28}" + "".join(f"{f'{100 * x:.1f}' if r < most else '—':>20}"
                                                         for r, x in zip(ranks, shares, strict=True)))
    return "\n".join(lines)


def describe_costs(costs: Sequence[dict], full: str, small: str) -> str:
    """One sentence: what the way `full` costs against the way `small`, as ratios of measured costs."""
    rows = {row["name"]: row for row in costs}
    a, b = rows[full], rows[small]
    ms_a, ms_b = sum(a["step_ms"].values()), sum(b["step_ms"].values())

    def ratio(key: str) -> str:
        return f"{a[key] / b[key]:,.0f} times"

    return (f"Against {small}, {full} trains {ratio('trainable')} as many numbers, keeps "
            f"{ratio('optimizer_bytes')} the optimizer state ({size_text(a['optimizer_bytes'])}) and saves a "
            f"file {ratio('file_bytes')} as large ({size_text(a['file_bytes'])}, its bare trained weights "
            f"as one safetensors file); one step takes {ms_a / ms_b:.1f} times as long.")


def summarize(runs: dict[str, list[dict]], random: dict[str, torch.Tensor], lora: dict[int, list[dict]],
              agreement: dict[str, dict], costs: Sequence[dict], sizes: Sequence[dict], digit: int) -> str:
    """The notebook's findings as Markdown bullets, every number and verdict taken from the results."""
    first = next(iter(runs))
    rank = min(c["rank"] for c in runs[first][0]["cuts"])
    noise = [100 * energy_shares(values, [1])[0] for values in random.values()]
    held = []
    for name, rows in runs.items():
        tops = [100 * energy_spreads(rows, layer, [1])[0].mean for layer in random]
        held.append(f"{min(tops):.0f}-{max(tops):.0f} % ({name})")
    bullets = [f"The top direction of each layer's delta W holds {' and '.join(held)} of its energy; "
               "a random "
               f"matrix's top direction holds {min(noise):.1f}-{max(noise):.1f} %."]
    cuts = [f"{name}: {both(cuts_at(rows, rank), rows, ('the cut', 'the whole'), digit)}"
            for name, rows in runs.items()]
    bullets.append(f"**Is rank {rank} enough** to do the whole update's job? Its cut (rank-{rank} delta W "
                   "plus delta b) against the whole update, " + "; ".join(cuts) + ".")
    if lora:
        low = min(lora)
        text = (f"LoRA at rank {low} against the whole {first} update: "
                f"{both(lora[low], runs[first], ('LoRA', 'it'), digit)}")
        for higher in sorted(lora)[1:]:
            text += (f". Rank {higher} against rank {low}: "
                     f"{both(lora[higher], lora[low], (f'rank {higher}', f'rank {low}'), digit)}")
        bullets.append(text + ".")
    if agreement:
        sides = {side: ", ".join(f"{layer} {seeds_text(row[side])}" for layer, row in agreement.items())
                 for side in ("output", "input")}
        bullets.append(f"Seeds on which LoRA's top direction matches the {first} update's above chance: "
                       f"output side {sides['output']}; input side {sides['input']}.")
    names = [row["name"] for row in costs]
    bullets.append(describe_costs(costs, names[0], next(n for n in names if n.startswith("LoRA"))))
    if sizes:
        bullets.append(describe_data_sizes(sizes, digit))
    return "\n".join(f"- {b}" for b in bullets)


def lora_ahead(sizes: Sequence[dict]) -> list[int]:
    """The image counts at which LoRA beats every weight on either measure, its seeds' range apart
    from theirs (fewer wrong answers on the digit, or higher accuracy on the others)."""
    groups, ahead = by_count(sizes), []
    for count in sorted({c for c, _ in groups}):
        mine = next((rows for (c, way), rows in groups.items() if c == count and way.startswith("LoRA")),
                    None)
        full = groups.get((count, "every weight"))
        if mine and full:
            wrong, others = (over_seeds(mine, k) for k in ("target_wrong", "others_accuracy"))
            if (wrong.high < over_seeds(full, "target_wrong").low
                    or others.low > over_seeds(full, "others_accuracy").high):
                ahead.append(count)
    return ahead


def describe_data_sizes(sizes: Sequence[dict], digit: int) -> str:
    """LoRA against every weight at each image count, and whether LoRA was ahead anywhere."""
    groups = by_count(sizes)
    lora_way = next(way for _, way in groups if way.startswith("LoRA"))
    counts = sorted({c for c, _ in groups})
    names = ("LoRA", "every weight")
    parts = [f"{c} images: {both(groups[c, lora_way], groups[c, 'every weight'], names, digit)}"
             for c in counts]
    ahead = lora_ahead(sizes)
    verdict = ("LoRA is ahead at no count, so these runs do not support the claim that it needs fewer data."
               if not ahead else f"LoRA is ahead at {', '.join(map(str, ahead))} images.")
    return f"Fewer images, {lora_way} against every weight. " + "; ".join(parts) + ". " + verdict
