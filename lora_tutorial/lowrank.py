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

from .checkpoints import save_adapter
from .data import Mnist, fit_subset
from .evaluate import evaluate, from_predictions, predict
from .lora import LoRAParametrization, lora_modules, lora_rank, separate_path
from .model import LAYER_SHAPES, linear_layers
from .pipeline import finetune_key, lora_model, train_on_target
from .settings import Settings, SettingsError, check_whole_numbers
from .stats import Spread, spread

# LoRA here adapts all three layers; linear3's weight (10 x 2000) holds a rank of at most 10.
MAX_LORA_RANK = min(min(shape) for shape in LAYER_SHAPES.values())
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


def last_layer_trainable(base: nn.Module, layer: str = "linear3") -> nn.Module:
    """A copy of `base` in which only one layer's weight and bias train (the classic cheap way)."""
    model = copy.deepcopy(base)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(f"{layer}."))
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


def with_deltas(base: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the plain `base` whose layers have W + delta W."""
    model = copy.deepcopy(base)
    layers = linear_layers(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            layers[name].weight += delta.to(layers[name].weight)
    return model


# Fine-tuning runs, one per seed -------------------------------------------------------------

def _summary(settings: Settings, model: nn.Module, data: Mnist) -> dict:
    """The test results that every row reports: wrong answers on the target, the others, overall."""
    return evaluate(model, data.test_images, data.test_labels).digit_summary(settings.target_digit)


def cut_rows(settings: Settings, base: nn.Module, pieces: dict[str, Decomposition], data: Mnist,
             ranks: Sequence[int]) -> list[dict]:
    """The pre-trained network plus each layer's delta W cut to rank r, on the test images, per r."""
    rows = []
    for r in ranks:
        model = with_deltas(base, {name: piece.truncated(r) for name, piece in pieces.items()})
        rows.append({"rank": r, **_summary(settings, model, data)})
    return rows


def cuts_at(rows: Sequence[dict], rank: int) -> list[dict]:
    """Each seed's results for delta W cut to `rank` (rows of `full_runs`)."""
    return [next(cut for cut in row["cuts"] if cut["rank"] == rank) for row in rows]


def full_runs(settings: Settings, data: Mnist, base: nn.Module, seeds: Sequence[int], ranks: Sequence[int],
              verbose: bool = False) -> list[dict]:
    """Fine-tune every weight once per seed (`finetune_seed`), as the settings say (replay included).

    Each row: the seed, the seconds fine-tuning took, the test results, each layer's decomposition
    of delta W (its singular values and top directions, under "pieces") and the test results of
    delta W cut to each of `ranks` (under "cuts").
    """
    rows = []
    for seed in seeds:
        run = replace(settings, finetune_seed=seed)
        model = fully_trainable(base)
        started = time.perf_counter()
        train_on_target(run, data, model, desc=f"Every weight, seed {seed}", verbose=verbose)
        seconds = time.perf_counter() - started
        pieces = {name: decompose(delta, max(ranks)) for name, delta in weight_deltas(base, model).items()}
        rows.append({"seed": seed, "seconds": seconds, **_summary(run, model, data), "pieces": pieces,
                     "cuts": cut_rows(run, base, pieces, data, ranks)})
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
    from .train import make_adam

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
    from .train import make_adam

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


TENSORS = ("pieces", "a_start", "a_end", "predictions")  # what a row holds that JSON cannot


def plain_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows without what JSON cannot hold (decompositions, tensors), for the results file."""
    return [{k: v for k, v in row.items() if k not in TENSORS} for row in rows]


# Tables and sentences written from the results ----------------------------------------------

def rank_table(ranks: Sequence[int], runs: dict[str, list[dict]], lora: dict[int, list[dict]], key: str,
               digits: int) -> str:
    """One measure against the rank r, as mean (min-max) over the seeds: each full run's delta W cut to
    rank r, and LoRA trained at rank r; the whole updates in the last row ('-': not run)."""
    width = 24
    head = f"{'rank r':<8}" + "".join(f"{name + ': cut':>{width}}" for name in runs) + f"{'LoRA':>{width}}"
    lines = [head, "-" * len(head)]
    for r in sorted(set(ranks) | set(lora)):
        cells = [over_seeds(cuts_at(rows, r), key).text(digits) if r in ranks else "-"
                 for rows in runs.values()]
        cells.append(over_seeds(lora[r], key).text(digits) if r in lora else "-")
        lines.append(f"{r:<8}" + "".join(f"{c:>{width}}" for c in cells))
    whole = [over_seeds(rows, key).text(digits) for rows in runs.values()]
    lines.append(f"{'whole':<8}" + "".join(f"{c:>{width}}" for c in [*whole, "-"]))
    return "\n".join(lines)


def _pair(candidate: Sequence[dict], reference: Sequence[dict], key: str, digits: int) -> str:
    return f"{over_seeds(candidate, key).text(digits)} against {over_seeds(reference, key).text(digits)}"


def describe_cut(name: str, rows: Sequence[dict], rank: int, digit: int) -> str:
    """One sentence: delta W of a full run cut to `rank`, against the whole update, with the verdicts."""
    cuts, said = cuts_at(rows, rank), compare(cuts_at(rows, rank), rows)
    return (f"**{name}**, delta W cut to rank {rank}: wrong answers on digit {digit} "
            f"{_pair(cuts, rows, 'target_wrong', 1)} for the whole update ({said['target_wrong']}); "
            f"the other digits {_pair(cuts, rows, 'others_accuracy', 3)} ({said['others_accuracy']}). "
            + ("As good as the whole update on both counts." if as_good(said) else
               "Not as good as the whole update on both counts."))



def describe_lora(lora: dict[int, list[dict]], full: Sequence[dict], name: str, digit: int) -> list[str]:
    """Sentences: LoRA at each rank against the whole update of the full run `name` (same batches),
    against that update cut to the same rank where it was, and each rank against the one before."""
    lines, earlier = [], None

    def against(what: str, said: dict[str, str]) -> str:
        return (f"against {what}: digit {digit} {said['target_wrong']}, "
                f"the other digits {said['others_accuracy']}")

    for rank, rows in sorted(lora.items()):
        line = (f"**LoRA at rank {rank}**: wrong answers on digit {digit} "
                f"{over_seeds(rows, 'target_wrong').text(1)}, the other digits "
                f"{over_seeds(rows, 'others_accuracy').text(3)}; ")
        line += against(f"the {name} update", compare(rows, full))
        if all(any(c["rank"] == rank for c in row["cuts"]) for row in full):
            cut = compare(rows, cuts_at(full, rank))
            line += "; " + against(f"the {name} update cut to rank {rank}", cut)
        if earlier is not None:
            line += "; " + against(f"LoRA at rank {earlier}", compare(rows, lora[earlier]))
        lines.append(line + ".")
        earlier = rank
    return lines


CHANCE = 0.01  # a match that random directions reach less often than this is "above chance"


def direction_agreement(lora_rows: Sequence[dict], full_rows: Sequence[dict]) -> dict[str, dict]:
    """Per layer, LoRA's update against the full update of the same seed (the same batches): |cos|
    between their top output directions and between their top input directions, each side's random
    level (E|cos| in its own dimension), the largest chance over the seeds that a random direction
    matches as well, and how far LoRA's A moved from its random start."""
    agreement = {}
    for layer in lora_rows[0]["pieces"]:
        pairs = [top_direction_cosines(mine["pieces"][layer], full["pieces"][layer])
                 for mine, full in zip(lora_rows, full_rows, strict=True)]
        piece = full_rows[0]["pieces"][layer]
        sides = {}
        for side, index, d in (("output", 0, piece.u.shape[0]), ("input", 1, piece.v.shape[0])):
            cosines = [pair[index] for pair in pairs]
            sides[side] = {"cosines": cosines, "dimensions": d, "random": random_abs_cosine(d),
                           "chance": max(chance_of_abs_cosine(c, d) for c in cosines)}
        agreement[layer] = {**sides, "a_moved": [row["a_moved"][layer] for row in lora_rows]}
    return agreement


def _chance_text(p: float) -> str:
    """A probability as a percentage, like the 1 % threshold it is compared with."""
    return "< 1e-4 %" if p < 1e-6 else f"{100 * p:.2g} %"


def agreement_table(agreement: dict[str, dict]) -> str:
    """The |cos| of each side beside its random level and chance, and how far A moved, as text."""
    head = (f"{'':<9}{'output side u':>18}{'random':>8}{'chance':>9}{'input side v':>18}{'random':>8}"
            f"{'chance':>9}{'A moved by':>20}")
    lines = [head, "-" * len(head)]
    for layer, row in agreement.items():
        cells = "".join(f"{spread(row[side]['cosines']).text(2):>18}{row[side]['random']:>8.3f}"
                        f"{_chance_text(row[side]['chance']):>9}" for side in ("output", "input"))
        lines.append(f"{layer:<9}{cells}{spread(row['a_moved']).text(1, 100) + ' %':>20}")
    return "\n".join(lines)


def describe_agreement(agreement: dict[str, dict]) -> list[str]:
    """One sentence per side and layer: above chance (on every seed) or not."""
    lines = []
    for layer, row in agreement.items():
        for side in ("output", "input"):
            s = row[side]
            above = s["chance"] < CHANCE
            lines.append(f"{layer}, {side} side ({s['dimensions']:,} dimensions): |cos| "
                         f"{spread(s['cosines']).text(2)} against {s['random']:.3f} for random directions: "
                         + (f"above chance on every seed (a random direction matches as well less than "
                            f"{CHANCE:.0%} of the time)." if above else
                            f"no better than chance (a random direction matches as well {s['chance']:.0%} of "
                            "the time or more, for at least one seed)."))
    return lines


def energy_spreads(rows: Sequence[dict], layer: str, ranks: Sequence[int]) -> list[Spread]:
    """The share of a layer's delta W energy in its top r directions, per r, over the seeds' runs."""
    per_seed = [energy_shares(row["pieces"][layer].values, ranks) for row in rows]
    return [spread([shares[i] for shares in per_seed]) for i in range(len(ranks))]


def energy_table(runs: dict[str, list[dict]], random: dict[str, torch.Tensor], ranks: Sequence[int]) -> str:
    """Per layer: the % of delta W's energy in its top r directions for each run, mean (min-max) over
    the seeds, and for a random matrix of the layer's shape."""
    head = f"{'% of the energy in the top r':<30}" + "".join(f"{f'r = {r}':>20}" for r in ranks)
    lines = [head, "-" * len(head)]
    for layer, values in random.items():
        piece = next(iter(runs.values()))[0]["pieces"][layer]
        lines.append(f"{layer} ({piece.u.shape[0]:,} x {piece.v.shape[0]:,})")
        for name, rows in runs.items():
            lines.append(f"  {name:<28}" + "".join(f"{s.text(1, 100):>20}"
                                                 for s in energy_spreads(rows, layer, ranks)))
        lines.append(f"  {'a random matrix':<28}" + "".join(f"{100 * x:>20.1f}"
                                                         for x in energy_shares(values, ranks)))
    return "\n".join(lines)


def describe_energy(runs: dict[str, list[dict]], random: dict[str, torch.Tensor],
                    ranks: Sequence[int]) -> str:
    """Markdown, one line per layer: the top direction's share for each run against a random
    matrix's; the top max(ranks) directions' share; and how the later runs compare with the first."""
    first, *others = runs
    most = max(ranks)
    lines = []
    for layer, values in random.items():
        top = {name: energy_spreads(rows, layer, [1, most]) for name, rows in runs.items()}
        noise = energy_shares(values, [1, most])
        held = [f"{top[name][0].text(1, 100)} % of the {name} update's energy" for name in runs]
        text = (f"- **{layer}**: the top direction holds " + " and ".join(held)
                + f", where a random matrix's top direction holds {100 * noise[0]:.1f} %")
        if 1 < most < len(values):  # the top `most` of fewer directions would be all of them
            held = [f"{top[name][1].text(1, 100)} %" for name in runs]
            text += f"; the top {most} hold " + " and ".join(held) + f" (random: {100 * noise[1]:.1f} %)"
        for name in others:
            said = verdict(top[name][0], top[first][0], True)
            text += (f". The {name} update's top direction holds "
                     + {"tie": "about the same share as", "better": "a larger share than",
                        "worse": "a smaller share than"}[said] + f" the {first} one's")
        lines.append(text + ".")
    return "\n".join(lines)



def describe_costs(costs: Sequence[dict], full: str, small: str) -> str:
    """Markdown: what the way `full` costs against the way `small`, as ratios of the measured costs."""
    rows = {row["name"]: row for row in costs}
    a, b = rows[full], rows[small]
    ms_a, ms_b = sum(a["step_ms"].values()), sum(b["step_ms"].values())

    def times(key: str) -> str:
        return f"{a[key] / b[key]:,.0f} times"

    def sizes(key: str) -> str:
        return f"{size_text(a[key])} against {size_text(b[key])}"

    return (f"Against {small}, fine-tuning {full} trains {times('trainable')} as many numbers, keeps "
            f"{times('optimizer_bytes')} the optimizer state ({sizes('optimizer_bytes')}) and stores a file "
            f"{times('file_bytes')} as large ({sizes('file_bytes')}); but one of its steps takes only "
            f"{ms_a / ms_b:.1f} times as long ({ms_a:.1f} ms against {ms_b:.1f} ms). The forward and "
            f"backward passes take {a['step_ms']['forward_backward']:.1f} ms against "
            f"{b['step_ms']['forward_backward']:.1f} ms, Adam's update {a['step_ms']['adam']:.2f} ms against "
            f"{b['step_ms']['adam']:.2f} ms.")


def summarize(runs: dict[str, list[dict]], random: dict[str, torch.Tensor], lora: dict[int, list[dict]],
              agreement: dict[str, dict], costs: Sequence[dict], digit: int) -> str:
    """The notebook's summary as Markdown bullets, every number and verdict taken from the results."""
    first = next(iter(runs))
    rank = min(c["rank"] for c in next(iter(runs.values()))[0]["cuts"])
    noise = [100 * energy_shares(values, [1])[0] for values in random.values()]
    held = []
    for name, rows in runs.items():
        tops = [100 * energy_spreads(rows, layer, [1])[0].mean for layer in random]
        held.append(f"{min(tops):.0f} to {max(tops):.0f} %" + (" of the layer's energy" if not held else "")
                    + f" in the {name} run")
    bullets = [f"Fully fine-tuned, the top direction of each layer's update holds {' and '.join(held)}, "
               f"where a random matrix's top direction holds {min(noise):.1f} to {max(noise):.1f} % (the "
               "most for linear3, which has only 10 directions)."]
    for name, rows in runs.items():
        said = cut_verdicts(rows, rank)
        good = as_good(said)
        rest = ": within the spread of the seeds, the rest of it added nothing on these two measures."
        bullets.append(f"Cut to rank {rank}, the {name} update is {'as' if good else 'not as'} good as "
                       f"the whole of it (digit {digit}: {said['target_wrong']}, the other digits: "
                       f"{said['others_accuracy']})" + (rest if good else "."))
    if lora:
        low = min(lora)
        said = compare(lora[low], runs[first])
        text = (f"LoRA trained at rank {low} leaves {over_seeds(lora[low], 'target_wrong').text(1)} wrong "
                f"answers on digit {digit}, the other digits at "
                f"{over_seeds(lora[low], 'others_accuracy').text(3)}; against the {first} full update: "
                f"digit {digit} {said['target_wrong']}, the other digits {said['others_accuracy']}")
        for higher in sorted(lora)[1:]:
            step = compare(lora[higher], lora[low])
            text += (f". At rank {higher}, against rank {low}: digit {digit} {step['target_wrong']}, "
                     f"the other digits {step['others_accuracy']}")
        bullets.append(text + ".")
    if agreement:
        above = {side: sum(row[side]["chance"] < CHANCE for row in agreement.values())
                 for side in ("output", "input")}
        bullets.append(f"LoRA's top output directions match the full update's above chance in "
                       f"{above['output']} of {len(agreement)} layers, its input directions in "
                       f"{above['input']}.")
    names = [row["name"] for row in costs]
    bullets.append(describe_costs(costs, names[0], next(n for n in names if n.startswith("LoRA"))))
    return "\n".join(f"- {b}" for b in bullets)
