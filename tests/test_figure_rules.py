"""Every figure the package draws follows the figure rules (figure_rules.py; quick: sample inputs, no
training). The figures 07-11 draw in their cells are checked as the small-settings runs show them
(figure_check.py, tests/test_notebooks.py)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from figure_rules import figure_problems  # noqa: E402

from lora_tutorial import diagrams, plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_the_rules_catch_what_they_should():
    fig, ax = plots.new_figure()
    ax.bar([0, 1], [0.9, 0.95])
    ax.set_ylim(0.8, 1)
    ax.plot([0, 1], [0.9, 0.9], label="a")
    ax.plot([0, 1], [0.8, 0.8], label="b")
    found = figure_problems(fig)
    assert any("no title" in p for p in found) and any("without a label" in p for p in found)
    assert any("no legend" in p for p in found) and any("bar axis starting at 0.8" in p for p in found)
    ax.set(title="Accuracy (axis starts at 80 %)", xlabel="digit", ylabel="accuracy (%)")
    ax.legend()
    assert figure_problems(fig) == []
    fig.patch.set_alpha(0)
    assert [p.split(" (")[0] for p in figure_problems(fig)] == ["transparent background"]


SWEEP_ROWS = [{"status": "done", "rank": r, "alpha": 1.0, "target_digit": 9, "finetune_steps": 100,
               "seed": s, "target_wrong_before": 97, "target_wrong_after": 20 - r - s,
               "other_digits_accuracy_before": 0.96, "other_digits_accuracy_after": 0.9 + 0.01 * s}
              for r in (1, 2, 4) for s in (0, 1, 2)]

STABLE = {
    "show_digits": lambda: plots.show_digits(torch.randn(8, 28, 28), torch.arange(8)),
    "plot_loss": lambda: plots.plot_loss([1 / (1 + i) for i in range(300)]),
    "plot_wrong_counts": lambda: plots.plot_wrong_counts(list(range(10)), list(range(10, 0, -1)), 9),
    "lora_diagram": lambda: diagrams.lora_diagram(2000, 1000, 1),
    "plot_sweep": lambda: plots.plot_sweep(SWEEP_ROWS),
    "plot_trial": lambda: plots.plot_trial([0.9] * 10, [0.8] * 9 + [0.99], [1 / (1 + i) for i in range(100)],
                                           9, "rank 1, alpha 1"),
    "plot_input_directions": lambda: plots.plot_input_directions(
        {"A": torch.randn(1, 784), "full": torch.randn(3, 784)}, "Input directions"),
    "show_changed_predictions": lambda: plots.show_changed_predictions(
        torch.randn(6, 28, 28), torch.tensor([9, 9, 3, 3, 1, 1]), torch.tensor([4, 9, 3, 3, 2, 1]),
        torch.tensor([9, 9, 9, 3, 9, 1])),
}


@pytest.mark.parametrize("name", list(STABLE))
def test_every_figure_follows_the_rules(name):
    fig = STABLE[name]()
    figures = fig.values() if isinstance(fig, dict) else [fig]
    for figure in figures:
        assert figure_problems(figure) == [], name


def test_input_directions_share_one_colour_scale_and_match_signs():
    """Every image on one symmetric scale, each a unit-length direction whose sign agrees with the
    first image's, so that a direction and its negative look the same."""
    first = torch.randn(784, generator=torch.Generator().manual_seed(0))
    fig = plots.plot_input_directions({"A": first[None], "flipped": -2 * first[None]}, "Input directions")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2 and len({im.get_clim() for im in images}) == 1
    low, high = images[0].get_clim()
    assert low == -high and high > 0
    a, b = (im.get_array() for im in images)
    assert abs(float((a ** 2).sum()) - 1) < 1e-9 and (a == b).all()  # unit length, the sign matched


def test_changed_predictions_are_sorted_into_fixed_and_broken():
    labels, before = torch.tensor([9, 9, 3, 3, 1, 1]), torch.tensor([4, 9, 3, 3, 2, 1])
    after = torch.tensor([9, 9, 9, 3, 5, 1])
    fig = plots.show_changed_predictions(torch.randn(6, 28, 28), labels, before, after, count=3)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["fixed: 4 -> 9", "broken: 3 -> 9"]  # image 4 went from one wrong answer to another
