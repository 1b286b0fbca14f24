"""Every figure the notebooks show. Each function returns the matplotlib Figure."""

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter
from torch.nn import functional as F

from .data import MEAN, STD

BACKGROUND = "white"  # opaque: Jupyter's transparent default is unreadable on a dark theme

def new_figure(nrows: int = 1, ncols: int = 1, **kwargs) -> tuple[plt.Figure, object]:
    """`plt.subplots` with an opaque background, readable in JupyterLab's light and dark themes."""
    fig, axes = plt.subplots(nrows, ncols, **kwargs)
    fig.patch.set(facecolor=BACKGROUND, alpha=1.0)
    return fig, axes

def finish(fig: plt.Figure, title: str | None = None, **kwargs) -> plt.Figure:
    """The title (when given) above a tight layout: how every figure here ends."""
    if title:
        fig.suptitle(title, **kwargs)
    fig.tight_layout()
    return fig

def seed_column(ax, x: float, ys: Sequence[float], color: str, step: float, half_width: float,
                size: float = 20, label: str | None = None, mean_label: str | None = None) -> None:
    """Every seed shown: one point per seed in a narrow column around `x`, and a bar at their mean."""
    xs = [x + (j - (len(ys) - 1) / 2) * step for j in range(len(ys))]
    ax.scatter(xs, ys, s=size, color=color, alpha=0.8, zorder=3, label=label)
    ax.hlines(sum(ys) / len(ys), x - half_width, x + half_width, color=color, lw=2, label=mean_label)

def legend_below(fig: plt.Figure, ax, title: str, bottom: float, **legend) -> None:
    """One legend for every panel (`ax`'s labels) under the figure, and the title above it."""
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, **{"loc": "lower center", "ncol": len(names), "frameon": False, **legend})
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))

def _image_grid(rows: int, columns: int, figsize: tuple[float, float]) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = new_figure(rows, columns, figsize=figsize, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes

def _pixels(images: torch.Tensor) -> np.ndarray:  # 28 x 28, the normalisation undone
    return (images.detach().cpu() * STD + MEAN).clamp(0, 1).reshape(-1, 28, 28).numpy()

def show_digits(images: torch.Tensor, labels: torch.Tensor, count: int = 24, columns: int = 8,
                title: str = "MNIST samples") -> plt.Figure:
    """A grid of the first `count` images, each titled with its label."""
    count = min(count, len(images))
    rows = -(-count // columns)
    fig, axes = _image_grid(rows, columns, (columns * 1.1, rows * 1.3))
    for ax, pixels, label in zip(axes.flat, _pixels(images[:count]), labels, strict=False):
        ax.imshow(pixels, cmap="gray_r")
        ax.set_title(str(int(label)), fontsize=10)
    return finish(fig, title)

def plot_loss(losses: Sequence[float], window: int = 100, title: str = "Pre-training loss") -> plt.Figure:
    """Loss per step (faint) and its moving average over `window` steps."""
    values = np.asarray(losses, dtype=float)
    fig, ax = new_figure(figsize=(7, 3.5))
    ax.plot(values, color="tab:blue", alpha=0.25, linewidth=0.6, label="per batch")
    if len(values) >= window:
        ax.plot(np.arange(window - 1, len(values)), np.convolve(values, np.ones(window) / window, "valid"),
                color="tab:blue", label=f"mean of {window} batches")
    top = float(values.max()) if len(values) else 1.0
    if len(values) >= 1000 and (cut := float(np.percentile(values, 99))) < top:  # wild batches hide the trend
        top, title = cut, title + " (axis cut at the 99th percentile of the batches)"
    ax.set(xlabel="step (batch)", ylabel="cross-entropy loss", title=title, ylim=(0, top * 1.02))
    ax.legend()
    return finish(fig)

def _mark_target(ax, digit: int) -> None:
    ax.axvspan(digit - 0.5, digit + 0.5, color="tab:orange", alpha=0.12, zorder=0,
               label=f"target digit {digit}")

def plot_wrong_counts(before: Sequence[int], after: Sequence[int], target_digit: int,
                      labels: tuple[str, str] = ("pre-trained", "with LoRA")) -> plt.Figure:
    """Wrong answers per digit, two bars each; the target digit's pair is highlighted."""
    fig, ax = new_figure(figsize=(8, 3.8))
    for shift, counts, label, color in ((-0.2, before, labels[0], "tab:gray"),
                                        (0.2, after, labels[1], "tab:orange")):
        ax.bar_label(ax.bar(np.arange(10) + shift, counts, width=0.4, label=label, color=color), fontsize=8)
    _mark_target(ax, target_digit)
    ax.set(xticks=np.arange(10), xlabel="true digit", ylabel="wrong answers (test set)",
           title="Wrong answers per digit")
    ax.legend()
    return finish(fig)

def _mean_and_bars(groups: Sequence[Sequence[float]]) -> tuple[list[float], list[list[float]]]:
    # each group's mean, and matplotlib's error bars down to its minimum and up to its maximum
    means = [sum(g) / len(g) for g in groups]
    return means, [[m - min(g) for m, g in zip(means, groups, strict=True)],
                   [max(g) - m for m, g in zip(means, groups, strict=True)]]

def _count_axis(ax, which: str) -> None:  # symlog: 0 wrong answers and the pre-trained tens both fit
    getattr(ax, f"set_{which}scale")("symlog", linthresh=1)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(FixedLocator([0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axis.set_minor_formatter(NullFormatter())
    getattr(ax, f"set_{which}lim")(-0.3, max(getattr(ax, f"get_{which}lim")()[1], 1) * 1.4)

def plot_sweep(rows: list[dict]) -> dict[str, plt.Figure]:
    """The sweep's rows against the rank (`sweep_rank.png`) and as a trade-off (`sweep_tradeoff.png`)."""
    done = [r for r in rows if r["status"] == "done"]
    series: dict[tuple, dict[int, list[dict]]] = {}
    for r in done:  # one series per alpha rule ("rank": alpha = r), digit and step count
        key = ("rank" if r["alpha"] == r["rank"] != 1 else r["alpha"], r["target_digit"], r["finetune_steps"])
        series.setdefault(key, {}).setdefault(r["rank"], []).append(r)
    for (rule, digit, steps), by_rank in list(series.items()):  # rank 1 with alpha 1 is also alpha = r
        if rule == "rank" and 1 in (shared := series.get((1.0, digit, steps), {})):
            by_rank[1] = shared[1]
            if set(shared) == {1}:
                del series[(1.0, digit, steps)]
    rank_fig, (left, right) = new_figure(1, 2, figsize=(11, 4))
    trade_fig, trade = new_figure(figsize=(8, 4.8))
    for (alpha, digit, steps), by_rank in sorted(series.items(), key=str):
        ranks = sorted(by_rank)
        label = f"alpha={'r' if alpha == 'rank' else f'{alpha:g}'}, digit {digit}, {steps} steps"
        wx, wxerr = _mean_and_bars([[r["target_wrong_after"] for r in by_rank[k]] for k in ranks])
        oy, oyerr = _mean_and_bars([[100 * r["other_digits_accuracy_after"] for r in by_rank[k]]
                                    for k in ranks])
        color = left.errorbar(ranks, wx, wxerr, fmt="o-", capsize=3, label=label)[0].get_color()
        right.errorbar(ranks, oy, oyerr, fmt="s--", capsize=3, color=color, label=label)
        trade.errorbar(wx, oy, xerr=wxerr, yerr=oyerr, fmt="o", capsize=3, color=color, label=label)
        for x, y, k in zip(wx, oy, ranks, strict=True):
            trade.annotate(f"r={k}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for digit, first in {r["target_digit"]: r for r in done}.items():  # the pre-trained network's levels
        wrong, others = first["target_wrong_before"], 100 * first["other_digits_accuracy_before"]
        for ax, level in ((left, wrong), (right, others)):
            ax.axhline(level, color="gray", ls=":", lw=0.9, label=f"pre-trained (digit {digit})")
        trade.scatter([wrong], [others], marker="x", c="gray", zorder=3, label=f"pre-trained (digit {digit})")
    ticks = sorted({r["rank"] for r in done}) or [1]
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{k:,}" for k in ticks], minor=False)
        ax.set_xlabel("LoRA rank r")
        ax.xaxis.set_minor_formatter(NullFormatter())
    _count_axis(left, "y")
    _count_axis(trade, "x")
    others_label = "mean accuracy, the other nine digits (%)"
    left.set(ylabel="wrong answers on the target digit (test images)", title="Target digit (symlog scale)")
    right.set(ylabel=others_label, title="The other digits")
    trade.set(xlabel="wrong answers on the target digit, test images (fewer is better; symlog scale)",
              ylabel=others_label, title="Fixing the target digit against keeping the others")
    left.legend(fontsize=8)
    trade.legend(fontsize=8)
    trade.grid(alpha=0.3)
    return {"sweep_rank.png": finish(rank_fig, "What LoRA's rank buys (mean and min-max over the seeds)"),
            "sweep_tradeoff.png": finish(trade_fig)}

def plot_per_digit_accuracy(before: Sequence[float], after: Sequence[float] | Sequence[Sequence[float]],
                            target_digit: int, images: str = "test images") -> plt.Figure:
    """Accuracy per digit after fine-tuning (one run, or one per seed: mean, min-max) by the pre-trained."""
    fig, ax = new_figure(figsize=(8, 3.8))
    _per_digit_bars(ax, before, after, target_digit, images)
    ax.set_title("Accuracy per digit after fine-tuning (numbers: mean change in points)")
    return finish(fig)

def _per_digit_bars(ax, before, after, target_digit: int, images: str) -> None:
    digits, before = np.arange(10), 100 * np.asarray(before, dtype=float)
    runs = 100 * np.atleast_2d(np.asarray(after, dtype=float))
    mean, several = runs.mean(axis=0), len(runs) > 1
    what = "after LoRA fine-tuning" + (f" (mean of {len(runs)} seeds, min-max)" if several else "")
    ax.bar(digits, mean, width=0.6, color="tab:orange", label=what, capsize=3,
           yerr=np.clip([mean - runs.min(axis=0), runs.max(axis=0) - mean], 0, None) if several else None)
    ax.hlines(before, digits - 0.38, digits + 0.38, color="black", linewidth=2, label="pre-trained", zorder=3)
    _mark_target(ax, target_digit)
    for x, (b, a) in enumerate(zip(before, mean, strict=True)):
        ax.text(x, max(a, b) + 1.5, f"{a - b:+.1f}", ha="center", va="bottom", fontsize=8)
    ax.set(xticks=digits, xlabel="true digit", ylabel=f"accuracy on the {images} (%)", ylim=(0, 112))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)

def plot_trial(before: Sequence[float], after: Sequence[float], losses: Sequence[float], target_digit: int,
               title: str, images: str = "validation images") -> plt.Figure:
    """The explorer's run: `plot_per_digit_accuracy`'s bars beside every step's loss and its running mean."""
    fig, (bars, curve) = new_figure(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [3, 2]})
    _per_digit_bars(bars, before, after, target_digit, images)
    bars.set_title("Accuracy per digit (numbers: change in points)", fontsize=10)
    steps, window = np.arange(1, len(losses) + 1), max(1, min(20, len(losses) // 5))
    curve.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="one batch")
    curve.plot(steps[window - 1:], np.convolve(losses, np.ones(window) / window, "valid"), color="tab:blue",
               linewidth=2, label=f"mean of {window} steps")
    curve.set(xlabel="fine-tuning step", ylabel="cross-entropy loss (per batch)", ylim=(0, None))
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.set_title("Fine-tuning loss (axis starts at 0)", fontsize=10)
    curve.legend(fontsize=8, frameon=False)
    return finish(fig, title, fontsize=10)

def plot_input_directions(rows: dict[str, torch.Tensor], title: str,
                          captions: dict[str, list[str]] | None = None) -> plt.Figure:
    """(k, 784) input directions per row as unit images on one colour scale, signs matched to the first."""
    units = {n: F.normalize(t.detach().double().cpu().reshape(len(t), -1), dim=1) for n, t in rows.items()}
    first = next(iter(units.values()))[0]  # a direction's sign means nothing: match them all to this one
    units = {name: u * torch.where(u @ first < 0, -1.0, 1.0)[:, None] for name, u in units.items()}
    limit, columns = max(float(u.abs().max()) for u in units.values()), max(len(u) for u in units.values())
    fig, axes = _image_grid(len(rows), columns, (1.9 * columns + 1.6, 2.0 * len(rows) + 0.6))
    for r, (name, u) in enumerate(units.items()):
        names = (captions or {}).get(name, [f"direction {i + 1}" for i in range(len(u))])
        for c, (image, caption) in enumerate(zip(u, names, strict=False)):
            shown = axes[r, c].imshow(image.reshape(28, 28).numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[r, c].set_title(f"{name}\n{caption}" if c == 0 else caption, fontsize=8, loc="left")
    bar = fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8)
    bar.set_label("pixel weight in a unit-length direction (no unit; 1/28 = 0.036 if spread evenly)")
    fig.suptitle(title)
    return fig

def show_changed_predictions(images: torch.Tensor, labels: torch.Tensor, before: torch.Tensor,
                             after: torch.Tensor, count: int = 8,
                             title: str = "Test images whose prediction changed") -> plt.Figure:
    """The first `count` test images fixed (wrong before, right after) and broken (the reverse)."""
    fixed = ((before != labels) & (after == labels)).nonzero().flatten()[:count]
    broken = ((before == labels) & (after != labels)).nonzero().flatten()[:count]
    fig, axes = _image_grid(2, count, (1.15 * count, 3.2))
    pixels = _pixels(images)
    for r, (name, picked, color) in enumerate((("fixed", fixed, "tab:green"), ("broken", broken, "tab:red"))):
        for c, i in enumerate(picked.tolist()):
            axes[r, c].imshow(pixels[i], cmap="gray_r")
            change = f"{int(before[i])} -> {int(after[i])}"
            axes[r, c].set_title(f"{name}: {change}" if c == 0 else change, fontsize=8, color=color)
    return finish(fig, title + " (predicted before -> with LoRA)")
