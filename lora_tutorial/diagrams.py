"""Figures that explain an idea rather than show a result: LoRA's structure, drawn with matplotlib.

Results (losses, wrong answers, sweeps) are plotted in `plots.py`; the drawings here have no data
axes to read, so their axes are turned off.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, Patch, Polygon, Rectangle

from .plots import new_figure

FROZEN = "#b8c2cc"  # grey-blue: weights that training leaves alone
TRAINED = "#f5a442"  # orange: the only numbers fine-tuning changes
SIGNAL = "#dbe9f6"  # pale blue: the input and output vectors


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.3,
                                 color="black", shrinkA=0, shrinkB=0))


def _shapes(out_features: int | None, in_features: int | None, rank: int | None) -> dict[str, str]:
    """The labels of the drawing: symbols, or the sizes of one real layer with their counts."""
    given = [out_features, in_features, rank]
    if all(v is None for v in given):
        return {"W": "out × in", "A": "r × in", "B": "out × r", "x": "in", "h": "out", "r": "r"}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in given):
        raise ValueError(f"out_features={out_features!r}, in_features={in_features!r}, rank={rank!r}: "
                         "give all three as whole numbers >= 1, or none for the symbols.")
    if rank > min(out_features, in_features):
        raise ValueError(f"rank={rank} is larger than min(out, in) = {min(out_features, in_features)}.")
    return {"W": f"{out_features:,} × {in_features:,} = {out_features * in_features:,}",
            "A": f"{rank} × {in_features:,} = {rank * in_features:,}",
            "B": f"{out_features:,} × {rank} = {out_features * rank:,}",
            "x": f"{in_features:,}", "h": f"{out_features:,}", "r": f"{rank}"}


def lora_diagram(out_features: int | None = None, in_features: int | None = None, rank: int | None = None,
                 title: str | None = None) -> plt.Figure:
    """LoRA's structure: the frozen W beside the trainable path A then B, summed into the output.

    The input x goes up through both paths; A narrows it to r numbers and B widens them back to
    the layer's output size, drawn as trapezoids whose widths follow that flow. With the sizes of
    a real layer (`out_features`, `in_features`, `rank`) the boxes are labelled with its shapes and
    parameter counts; without them, with symbols.
    """
    label = _shapes(out_features, in_features, rank)
    fig, ax = new_figure(figsize=(7.6, 5.6))
    ax.set(xlim=(0, 11.2), ylim=(0, 8.6), aspect="equal")
    ax.axis("off")

    # input x at the bottom, output h at the top
    ax.add_patch(Rectangle((1.5, 0.35), 7.5, 0.5, facecolor=SIGNAL, edgecolor="black"))
    ax.text(5.25, 0.6, f"input x   ({label['x']} numbers)", ha="center", va="center")
    ax.add_patch(Rectangle((1.5, 7.55), 7.5, 0.5, facecolor=SIGNAL, edgecolor="black"))
    ax.text(5.25, 7.8, f"h = W x + (α / r) B A x   ({label['h']} numbers)", ha="center", va="center")

    # the frozen weight, on the left
    ax.add_patch(Rectangle((0.8, 2.0), 3.4, 3.4, facecolor=FROZEN, edgecolor="black"))
    ax.text(2.5, 4.0, "W", ha="center", va="center", fontsize=20, fontweight="bold")
    ax.text(2.5, 3.1, f"pre-trained, frozen\n{label['W']}", ha="center", va="center", fontsize=9)

    # the low-rank path, on the right: A narrows in -> r, B widens r -> out
    centre, wide, narrow = 7.6, 3.2, 0.5
    ax.add_patch(Polygon([(centre - wide / 2, 2.0), (centre + wide / 2, 2.0), (centre + narrow / 2, 3.3),
                          (centre - narrow / 2, 3.3)], closed=True, facecolor=TRAINED, edgecolor="black"))
    ax.add_patch(Polygon([(centre - narrow / 2, 4.1), (centre + narrow / 2, 4.1), (centre + wide / 2, 5.4),
                          (centre - wide / 2, 5.4)], closed=True, facecolor=TRAINED, edgecolor="black"))
    ax.text(centre, 2.45, "A", ha="center", va="center", fontsize=16, fontweight="bold")
    ax.text(centre, 4.95, "B", ha="center", va="center", fontsize=16, fontweight="bold")
    ax.text(centre + wide / 2 + 0.1, 2.45, f"{label['A']}\nstarts random, N(0, 1)", ha="left",
            va="center", fontsize=9)
    ax.text(centre + wide / 2 + 0.1, 4.95, f"{label['B']}\nstarts at zero", ha="left", va="center",
            fontsize=9)
    _arrow(ax, (centre, 3.3), (centre, 4.1))
    ax.text(centre + 0.35, 3.7, f"A x: {label['r']} number{'s' if label['r'] != '1' else ''}",
            ha="left", va="center", fontsize=8)

    # x feeds both paths; their results are added
    _arrow(ax, (2.5, 0.85), (2.5, 2.0))
    _arrow(ax, (centre, 0.85), (centre, 2.0))
    plus = (5.25, 6.5)
    ax.add_patch(Circle(plus, 0.32, facecolor="white", edgecolor="black"))
    ax.text(*plus, "+", ha="center", va="center", fontsize=16)
    _arrow(ax, (2.5, 5.4), (plus[0] - 0.3, plus[1] - 0.1))
    _arrow(ax, (centre, 5.4), (plus[0] + 0.3, plus[1] - 0.1))
    ax.text(6.75, 6.15, "× α / r", ha="center", va="center", fontsize=10)
    _arrow(ax, (plus[0], plus[1] + 0.32), (plus[0], 7.55))

    ax.legend(handles=[Patch(facecolor=FROZEN, edgecolor="black", label="frozen: no gradient"),
                       Patch(facecolor=TRAINED, edgecolor="black", label="trained by fine-tuning")],
              loc="upper left", bbox_to_anchor=(0.0, 0.82), fontsize=9, frameon=False)
    ax.set_title(title or "LoRA: a frozen weight W beside a trainable low-rank path B A")
    fig.tight_layout()
    return fig
