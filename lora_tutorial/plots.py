"""Every figure the notebooks show. Each function returns the matplotlib Figure."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import FuncFormatter, NullFormatter

from .data import MEAN, STD

# Jupyter's inline backend draws figures on a transparent background, which leaves black text on
# JupyterLab's dark theme unreadable: every figure here gets an opaque white one.
BACKGROUND = "white"


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs) -> tuple[plt.Figure, object]:
    """`plt.subplots` with an opaque background, readable in JupyterLab's light and dark themes."""
    fig, axes = plt.subplots(nrows, ncols, **kwargs)
    fig.patch.set_facecolor(BACKGROUND)
    fig.patch.set_alpha(1.0)
    return fig, axes


def show_digits(images: torch.Tensor, labels: torch.Tensor, count: int = 24, columns: int = 8,
                title: str = "MNIST samples") -> plt.Figure:
    """A grid of the first `count` images, each titled with its label."""
    count = min(count, len(images))
    rows = -(-count // columns)
    fig, axes = new_figure(rows, columns, figsize=(columns * 1.1, rows * 1.3))
    pixels = (images[:count].detach().cpu() * STD + MEAN).clamp(0, 1).numpy()  # undo the normalisation
    for i, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if i < count:
            ax.imshow(pixels[i].reshape(28, 28), cmap="gray_r")
            ax.set_title(str(int(labels[i])), fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loss(losses: Sequence[float], window: int = 100, title: str = "Pre-training loss") -> plt.Figure:
    """Loss per step (faint) and its moving average over `window` steps."""
    values = np.asarray(losses, dtype=float)
    fig, ax = new_figure(figsize=(7, 3.5))
    ax.plot(values, color="tab:blue", alpha=0.25, linewidth=0.6, label="per batch")
    if len(values) >= window:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(values)), smooth, color="tab:blue",
                label=f"mean of {window} batches")
    top = float(np.percentile(values, 99)) if len(values) else 1.0  # a few wild batches would hide the trend
    ax.set(xlabel="step (batch)", ylabel="cross-entropy loss", title=title, ylim=(0, top))
    ax.legend()
    fig.tight_layout()
    return fig


def plot_wrong_counts(before: Sequence[int], after: Sequence[int], target_digit: int,
                      labels: tuple[str, str] = ("pre-trained", "with LoRA")) -> plt.Figure:
    """Wrong answers per digit, two bars each; the target digit's pair is highlighted."""
    digits = np.arange(10)
    fig, ax = new_figure(figsize=(8, 3.8))
    ax.bar(digits - 0.2, before, width=0.4, label=labels[0], color="tab:gray")
    ax.bar(digits + 0.2, after, width=0.4, label=labels[1], color="tab:orange")
    ax.axvspan(target_digit - 0.5, target_digit + 0.5, color="tab:orange", alpha=0.12, zorder=0,
               label=f"target digit {target_digit}")
    for x, (b, a) in enumerate(zip(before, after, strict=True)):
        ax.text(x - 0.2, b, str(b), ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, a, str(a), ha="center", va="bottom", fontsize=8)
    ax.set(xticks=digits, xlabel="true digit", ylabel="wrong answers (test set)",
           title="Wrong answers per digit")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_sweep(rows: list[dict]) -> dict[str, plt.Figure]:
    """Target-digit and other-digit accuracy after LoRA, against rank and against trainable
    parameters (log axes); with several seeds, the mean and the min-max band."""
    done = [r for r in rows if r["status"] == "done"]
    series: dict[tuple, dict[int, list[dict]]] = {}
    for r in done:
        key = (r["alpha"] if r["alpha"] != r["rank"] else "rank", r["target_digit"], r["finetune_steps"])
        series.setdefault(key, {}).setdefault(r["rank"], []).append(r)
    figures = {}
    for name, x_of, xlabel in (("sweep_rank.png", lambda r: r["rank"], "LoRA rank r"),
                               ("sweep_params.png", lambda r: r["lora_parameters"],
                                "trainable LoRA parameters")):
        fig, ax = new_figure(figsize=(7.5, 4))
        for (alpha, digit, steps), by_rank in sorted(series.items(), key=str):
            ranks = sorted(by_rank)
            xs = [x_of(by_rank[k][0]) for k in ranks]
            label = f"alpha={'r' if alpha == 'rank' else alpha}, digit {digit}, {steps} steps"
            for column, style, what in (("target_accuracy_after", "-o", "target digit"),
                                        ("other_digits_accuracy_after", "--s", "other digits")):
                values = [[r[column] for r in by_rank[k]] for k in ranks]
                mean = [sum(v) / len(v) for v in values]
                line, = ax.plot(xs, mean, style, label=f"{what} ({label})")
                if any(len(v) > 1 for v in values):
                    ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values],
                                    color=line.get_color(), alpha=0.2)
        if done:
            ax.axhline(sum(r["other_digits_accuracy_before"] for r in done) / len(done), color="gray",
                       linewidth=0.8, linestyle=":", label="other digits before LoRA")
        ax.set_xscale("log", base=2 if name == "sweep_rank.png" else 10)
        ax.set_xticks(sorted({x_of(r) for r in done}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=xlabel, ylabel="test accuracy after fine-tuning", title="What LoRA's rank buys")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures[name] = fig
    return figures


def plot_singular_values(values: dict[str, torch.Tensor], shares: dict[str, list[float]],
                         ranks: Sequence[int], show: int = 100) -> plt.Figure:
    """Left: each layer's singular values of delta W, largest first (log scale). Right: the share
    of each layer's energy the top r hold, against r."""
    fig, (left, right) = new_figure(1, 2, figsize=(11, 3.8))
    for name, s in values.items():
        s = s.detach().cpu().double().numpy()[:show]
        left.semilogy(np.arange(1, len(s) + 1), s, ".-", markersize=3, label=f"{name} ({len(values[name])})")
        right.plot(ranks, shares[name], "o-", label=name)
    left.set(xlabel="index of the singular value", ylabel="singular value (log scale)",
             title=f"Singular values of delta W (first {show})")
    left.legend(fontsize=8, title="layer (how many)", title_fontsize=8)
    right.set_xscale("log", base=2)
    right.set_xticks(list(ranks))
    right.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    right.xaxis.set_minor_formatter(NullFormatter())
    right.set(xlabel="rank r", ylabel="share of the energy in the top r", ylim=(0, 1.02),
              title="How much of delta W the top r directions hold")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_rank_comparison(ranks: Sequence[int], truncated: Sequence[dict], lora: Sequence[dict],
                         full: dict, pretrained: dict, digit: int) -> plt.Figure:
    """Wrong answers on the target digit and the other digits' accuracy against the rank r, for
    full fine-tuning's delta W cut to rank r and for LoRA trained at rank r; the full fine-tune
    and the pre-trained network as horizontal lines."""
    fig, axes = new_figure(1, 2, figsize=(11, 3.8))
    for ax, key, ylabel in ((axes[0], "target_wrong", f"wrong answers on digit {digit}"),
                            (axes[1], "others_accuracy", "mean accuracy, the other nine digits")):
        ax.plot(ranks, [r[key] for r in truncated], "o-", label="full fine-tune's delta W, cut to rank r")
        ax.plot(ranks, [r[key] for r in lora], "s--", label="LoRA trained at rank r")
        ax.axhline(full[key], color="tab:red", linewidth=0.9, label="full fine-tune")
        ax.axhline(pretrained[key], color="gray", linewidth=0.9, linestyle=":", label="pre-trained")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ranks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="rank r", ylabel=ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle("Rank r: the best rank-r piece of the full update, and LoRA")
    fig.tight_layout()
    return fig


def plot_per_digit_accuracy(before: Sequence[float], after: Sequence[float], target_digit: int) -> plt.Figure:
    """Each digit's test accuracy before and after fine-tuning, with the change in points."""
    digits = np.arange(10)
    before, after = 100 * np.asarray(before), 100 * np.asarray(after)
    fig, ax = new_figure(figsize=(8, 3.8))
    ax.bar(digits - 0.2, before, width=0.4, label="pre-trained", color="tab:gray")
    ax.bar(digits + 0.2, after, width=0.4, label="after LoRA fine-tuning", color="tab:orange")
    ax.axvspan(target_digit - 0.5, target_digit + 0.5, color="tab:orange", alpha=0.12, zorder=0,
               label=f"target digit {target_digit}")
    for x, (b, a) in enumerate(zip(before, after, strict=True)):
        ax.text(x + 0.2, a + 0.5, f"{a - b:+.1f}", ha="center", va="bottom", fontsize=8)
    low = min(before.min(), after.min())
    ax.set(xticks=digits, xlabel="true digit", ylabel="accuracy (%)", ylim=(max(0, low - 10), 104),
           title="Accuracy per digit (the numbers: change in points)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_tradeoff(rows: Sequence[dict], pretrained: dict, chosen: str, digit: int) -> plt.Figure:
    """One point per fine-tuning setting: wrong answers on the target digit against the other
    digits' mean accuracy. Up and to the left is better on both counts; settings that land on
    (nearly) the same point share one label; the chosen one is green, named in the legend."""
    fig, ax = new_figure(figsize=(8, 4.5))
    groups: dict[tuple[int, float], list[dict]] = {}
    for row in rows:
        if row["name"] != chosen:
            key = (row["target_wrong"], round(100 * row["others_accuracy"], 1))
            groups.setdefault(key, []).append(row)
    for members in groups.values():
        xs, ys = [r["target_wrong"] for r in members], [100 * r["others_accuracy"] for r in members]
        ax.scatter(xs, ys, s=30, color="tab:blue", zorder=3)
        ax.annotate(" / ".join(r["name"] for r in members), (xs[0], max(ys)), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    best = next(r for r in rows if r["name"] == chosen)
    ax.scatter(best["target_wrong"], 100 * best["others_accuracy"], s=80, color="tab:green", zorder=3,
               label=f"chosen: {chosen}")
    ax.scatter(pretrained["target_wrong"], 100 * pretrained["others_accuracy"], marker="x", color="gray",
               zorder=3, label="pre-trained")
    ax.set(xlabel=f"wrong answers on digit {digit} (fewer is better)",
           ylabel="mean accuracy of the other nine digits (%)",
           title="What each setting buys on the target digit, and what it costs the others")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
