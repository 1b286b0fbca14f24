"""The plotting helpers draw what they say, with a title and labelled axes (quick: no training)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_tutorial import plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def labelled(ax) -> bool:
    return bool(ax.get_title() and ax.get_xlabel() and ax.get_ylabel())


def test_loss_curve_shows_every_step_and_its_moving_average():
    losses = [2.0 / (1 + i / 50) for i in range(300)]
    fig = plots.plot_loss(losses, window=20, title="Fine-tuning loss")
    ax = fig.axes[0]
    assert ax.get_title() == "Fine-tuning loss" and labelled(ax)
    lengths = sorted(len(line.get_xdata()) for line in ax.get_lines())
    assert lengths[-1] == 300 and lengths[0] < 300  # the raw steps, and the shorter moving average


def test_wrong_counts_draw_two_bars_a_digit_and_mark_the_target():
    before, after = [10, 20, 30, 5, 6, 7, 8, 9, 11, 97], [12, 21, 30, 5, 6, 9, 8, 9, 15, 22]
    fig = plots.plot_wrong_counts(before, after, 9)
    ax = fig.axes[0]
    heights = sorted(round(bar.get_height()) for bars in ax.containers for bar in bars)
    assert heights == sorted(before + after) and labelled(ax)
    assert "target digit 9" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_per_digit_accuracy_and_the_sweep_figures_are_labelled():
    before = [0.99, 0.98, 0.96, 0.95, 0.97, 0.94, 0.97, 0.96, 0.93, 0.90]
    after = [0.98, 0.98, 0.95, 0.93, 0.90, 0.92, 0.97, 0.90, 0.80, 0.98]
    assert all(labelled(ax) for ax in plots.plot_per_digit_accuracy(before, after, 9).axes[:1])
    rows = [{"status": "done", "rank": r, "alpha": float(r), "target_digit": 9, "finetune_steps": 100,
             "lora_parameters": 6_794 * r, "target_wrong_before": 97, "target_wrong_after": 20 // r + seed,
             "other_digits_accuracy_after": 0.95 - r / 100 - seed / 100, "other_digits_accuracy_before": 0.96}
            for r in (1, 2, 4) for seed in (0, 1, 2)]
    figures = plots.plot_sweep(rows)
    assert set(figures) == {"sweep_rank.png", "sweep_tradeoff.png"}
    for fig in figures.values():
        assert all(labelled(ax) for ax in fig.axes)
    target, others = figures["sweep_rank.png"].axes
    assert [round(y) for y in target.containers[0].lines[0].get_ydata()] == [21, 11, 6]  # means over seeds
    trade = figures["sweep_tradeoff.png"].axes[0]
    assert [round(x) for x in trade.containers[0].lines[0].get_xdata()] == [21, 11, 6]
    assert 96 in [round(line.get_ydata()[0]) for line in others.get_lines()]  # the level before, as a line


def test_a_grid_of_digits_titles_each_image_with_its_label():
    images, labels = torch.randn(6, 28, 28), torch.tensor([3, 1, 4, 1, 5, 9])
    fig = plots.show_digits(images, labels, count=6, columns=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert len(titles) == 6 and all(str(int(d)) in t for d, t in zip(labels, titles, strict=True))
