"""LoRA's structure drawn (an idea, not a result: no data axes; results are in `plots.py`)."""

from functools import partial

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, Patch, Polygon, Rectangle

from .plots import new_figure
from .settings import is_number

FROZEN, TRAINED, SIGNAL = "#b8c2cc", "#f5a442", "#dbe9f6"  # untouched weights, trained ones, vectors

def _shapes(o: int | None, i: int | None, r: int | None) -> dict[str, str]:
    """The drawing's labels: symbols, or one real layer's sizes (out, in, rank) with their counts."""
    if (o, i, r) == (None, None, None):
        return {"W": "out × in", "A": "r × in", "B": "out × r", "x": "in", "h": "out", "r": "r"}
    if not all(is_number(v, whole=True) and v >= 1 for v in (o, i, r)):
        raise ValueError(f"out_features={o!r}, in_features={i!r}, rank={r!r}: "
                         "give all three as whole numbers >= 1, or none for the symbols.")
    if r > min(o, i):
        raise ValueError(f"rank={r} is larger than min(out, in) = {min(o, i)}.")
    return {"W": f"{o:,} × {i:,} = {o * i:,}", "A": f"{r} × {i:,} = {r * i:,}",
            "B": f"{o:,} × {r} = {o * r:,}", "x": f"{i:,}", "h": f"{o:,}", "r": f"{r}"}

def lora_diagram(out_features: int | None = None, in_features: int | None = None, rank: int | None = None,
                 title: str | None = None) -> plt.Figure:
    """The frozen W beside the trainable path A then B, summed; a real layer's shapes when given."""
    label = _shapes(out_features, in_features, rank)
    fig, ax = new_figure(figsize=(7.6, 5.6))
    ax.set(xlim=(0, 11.2), ylim=(0, 8.6), aspect="equal")
    ax.axis("off")
    text = partial(ax.text, ha="center", va="center")

    def arrow(start: tuple[float, float], end: tuple[float, float]) -> None:
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.3,
                                     color="black", shrinkA=0, shrinkB=0))

    for y, words in ((0.35, f"input x   ({label['x']} numbers)"),
                     (7.55, f"h = W x + (α / r) B A x   ({label['h']} numbers)")):
        ax.add_patch(Rectangle((1.5, y), 7.5, 0.5, facecolor=SIGNAL, edgecolor="black"))
        text(5.25, y + 0.25, words)
    ax.add_patch(Rectangle((0.8, 2.0), 3.4, 3.4, facecolor=FROZEN, edgecolor="black"))
    text(2.5, 4.0, "W", fontsize=20, fontweight="bold")
    text(2.5, 3.1, f"pre-trained, frozen\n{label['W']}", fontsize=9)
    centre, wide, narrow = 7.6, 3.2, 0.5  # A narrows in -> r, B widens r -> out
    for name, low, high, y, middle, note in (("A", wide, narrow, 2.0, 2.45, "starts random, N(0, 1)"),
                                             ("B", narrow, wide, 4.1, 4.95, "starts at zero")):
        corners = [(centre - low / 2, y), (centre + low / 2, y), (centre + high / 2, y + 1.3),
                   (centre - high / 2, y + 1.3)]
        ax.add_patch(Polygon(corners, closed=True, facecolor=TRAINED, edgecolor="black"))
        text(centre, middle, name, fontsize=16, fontweight="bold")
        text(centre + wide / 2 + 0.1, middle, f"{label[name]}\n{note}", ha="left", fontsize=9)
    arrow((centre, 3.3), (centre, 4.1))
    text(centre + 0.35, 3.7, f"A x: {label['r']} number" + "s" * (label["r"] != "1"), ha="left", fontsize=8)
    plus = (5.25, 6.5)
    ax.add_patch(Circle(plus, 0.32, facecolor="white", edgecolor="black"))
    text(*plus, "+", fontsize=16)
    for x, into in ((2.5, plus[0] - 0.3), (centre, plus[0] + 0.3)):  # x feeds both paths; they are added
        arrow((x, 0.85), (x, 2.0))
        arrow((x, 5.4), (into, plus[1] - 0.1))
    text(6.75, 6.15, "× α / r", fontsize=10)
    arrow((plus[0], plus[1] + 0.32), (plus[0], 7.55))
    ax.legend(handles=[Patch(facecolor=FROZEN, edgecolor="black", label="frozen: no gradient"),
                       Patch(facecolor=TRAINED, edgecolor="black", label="trained by fine-tuning")],
              loc="upper left", bbox_to_anchor=(0.0, 0.82), fontsize=9, frameon=False)
    ax.set_title(title or "LoRA: a frozen weight W beside a trainable low-rank path B A")
    fig.tight_layout()
    return fig
