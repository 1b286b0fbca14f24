"""Forgetting: per-digit changes, remedies over seeds chosen on the validation images, serving."""

import dataclasses

import pytest
import torch
from torch.nn.utils import parametrize

from lora_tutorial import Settings, SettingsError, evaluate, merge_and_unload, separate_path
from lora_tutorial.evaluate import from_confusion
from lora_tutorial.pipeline import finetuned_model
from lora_tutorial.studies.forgetting import (
    SPLITS,
    break_even_points,
    check_budgets,
    check_remedies,
    choose_setting,
    front,
    others_lose_points,
    per_digit_change,
    plot_front,
    reference,
    remedy_runs,
    seed_points,
    share_answering,
    summarize,
    winner_ranges,
)
from lora_tutorial.studies.serving import forward_latency, profile_pass, profile_summary
from lora_tutorial.studies.stats import spread


def diagonal(correct, wrong_as=None):
    """An evaluation with `correct[d]` of 100 images of each digit right; the rest are called
    `wrong_as` (default: 0, or 1 for the zeros)."""
    rows = []
    for d, c in enumerate(correct):
        row = [0] * 10
        row[d] = c
        other = wrong_as if wrong_as is not None and wrong_as != d else (1 if d == 0 else 0)
        row[other] += 100 - c
        rows.append(row)
    return from_confusion(rows)


def test_per_digit_change_the_other_nine_and_who_they_are_called():
    before = diagonal([90] * 10)
    after = diagonal([81] * 9 + [99], wrong_as=9)
    assert per_digit_change(before, after) == pytest.approx([-9] * 9 + [9])
    assert others_lose_points(before, after, 9) == pytest.approx(9)
    assert others_lose_points(before, before, 9) == 0
    assert share_answering(before, 9) == 0 and share_answering(after, 9) == 1.0
    assert share_answering(diagonal([100] * 10), 9) == 0.0  # no mistakes at all


def run_rows(name, seeds, validation, test, steps=100, replay=0.0):
    """Per-seed rows as `remedy_runs` makes them: (target_wrong, others_accuracy) per split."""
    return [{"name": name, "changes": {}, "seed": s, "finetune_steps": steps, "replay_share": replay,
             "validation": {"target_wrong": v[0], "others_accuracy": v[1], "accuracy": v[1]},
             "test": {"target_wrong": t[0], "others_accuracy": t[1], "accuracy": t[1]}}
            for s, v, t in zip(seeds, validation, test, strict=True)]


BEFORE = {split: {"target_wrong": 90, "others_accuracy": 0.96, "accuracy": 0.955} for split in SPLITS}


def test_the_choice_reads_the_validation_images_never_the_test_images():
    seeds = [0, 1, 2]
    rows = (run_rows("plain", seeds, [(10, 0.90)] * 3, [(10, 0.90)] * 3)
            # on the validation images A is clearly better on the target digit; on the test images B is
            + run_rows("A", seeds, [(20, 0.958), (21, 0.957), (22, 0.958)], [(60, 0.958)] * 3)
            + run_rows("B", seeds, [(40, 0.958), (41, 0.957), (42, 0.958)], [(20, 0.958)] * 3))
    summaries = summarize(rows, BEFORE)
    assert list(summaries.index) == ["plain", "A", "B"]
    assert summaries.loc["A", ("validation", "target_wrong")] == spread([20, 21, 22])
    assert summaries.loc["plain", ("test", "points_lost")].mean == pytest.approx(6.0)  # 100 * (0.96 - 0.90)
    choice = choose_setting(summaries, 1.0)
    assert (choice.name, choice.allowed, choice.tied, choice.budget) == ("A", ["A", "B"], [], 1.0)
    assert choose_setting(summaries, 1.0, split="test").name == "B"  # what the test images would pick
    points = seed_points(rows, BEFORE, "validation")
    mine = points[points["name"] == "A"]
    assert list(mine["target_wrong"]) == [20, 21, 22] and mine["points_lost"].iloc[1] == pytest.approx(0.3)
    assert front(summaries).to_dict() == {"plain": None, "A": None, "B": "A"}


def test_the_winner_moves_with_the_budget_and_ties_are_named():
    seeds = [0, 1, 2]
    rows = (run_rows("plain", seeds, [(10, 0.90)] * 3, [(10, 0.90)] * 3)  # loses 6 points
            + run_rows("replay", seeds, [(15, 0.955), (18, 0.955), (25, 0.955)], [(15, 0.955)] * 3)  # 0.5
            + run_rows("gentle", seeds, [(20, 0.952), (22, 0.952), (24, 0.952)], [(20, 0.952)] * 3)  # 0.8
            + run_rows("tiny", seeds, [(60, 0.9595)] * 3, [(60, 0.9595)] * 3))  # 0.05
    summaries = summarize(rows, BEFORE)
    choice = choose_setting(summaries, 1.0)
    # replay has the fewest errors by the mean among those within 1 point; gentle's range overlaps it
    assert (choice.name, choice.tied, choice.within_limit) == ("replay", ["gentle"], True)
    assert choose_setting(summaries, 0.1).name == "tiny"  # a stricter budget leaves only the smallest update
    nothing = choose_setting(summaries, 0.01)
    assert (nothing.name, nothing.within_limit, nothing.allowed) == ("tiny", False, [])
    winners = [choose_setting(summaries, b).name for b in [0.6, 1, 2, 10]]
    assert winners == ["replay", "replay", "replay", "plain"]
    stretches = winner_ranges(summaries)
    assert list(stretches["winner"]) == ["tiny", "replay", "plain"]
    assert [round(s, 6) for s in stretches["from"]] == [0.05, 0.5, 6.0] and stretches["to"].iloc[-1] is None
    assert stretches["to"].iloc[1] == pytest.approx(6.0)  # gentle (0.8) joins without changing the winner
    # each stretch's winner is what choose_setting says anywhere inside it
    for low, high, name in stretches.itertuples(index=False):
        assert choose_setting(summaries, low).name == name
        assert choose_setting(summaries, (high or low + 1) - 1e-9).name == name
    assert front(summaries).to_dict() == {"plain": None, "replay": None, "gentle": "replay", "tiny": None}


def test_the_break_even_budget_counts_images():
    pre = diagonal([90] * 10)  # 100 images per digit, 10 wrong of each
    before = reference({split: pre for split in SPLITS}, 9)
    assert before["test"]["other_images"] == 900 and before["test"]["target_wrong"] == 10
    # losing 10 of the other 900 images is 1.11 points of their mean accuracy: as many as the 9s had wrong
    assert break_even_points(before["test"], 9) == pytest.approx(100 * 10 / 900)
    after = diagonal([80] + [90] * 8 + [100])  # the zeros lose 10 images; every 9 is fixed
    assert others_lose_points(pre, after, 9) == pytest.approx(break_even_points(before["test"], 9))
    with pytest.raises(ValueError, match="No images of digits other than 9"):
        break_even_points({"target_wrong": 3, "other_images": 0}, 9)


def test_each_remedy_runs_once_per_seed_on_both_splits(small):
    settings, data, base = small
    splits = {"validation": (data.val_images, data.val_labels),
              "test": (data.test_images[:2000], data.test_labels[:2000])}  # a part of the test set: quick
    rows = remedy_runs(settings, data, base, {"plain": {}, "replay 0": {"replay_share": 0.0},
                                              "replay 0.5": {"replay_share": 0.5},
                                              "last layer": {"target_modules": ["linear3"]}},
                       seeds=[0, 1], splits=splits, verbose=False)
    assert [(r["name"], r["seed"]) for r in rows[:4]] == [("plain", 0), ("plain", 1), ("replay 0", 0),
                                                          ("replay 0", 1)]
    plain, zero, replay, last = (rows[i:i + 2] for i in range(0, 8, 2))
    for p, z in zip(plain, zero, strict=True):
        assert z["evaluations"] == p["evaluations"]  # share 0 is the plain run: every prediction the same
    assert plain[0]["evaluations"]["test"] != plain[1]["evaluations"]["test"]  # another seed, another run
    assert replay[0]["changes"] == {"replay_share": 0.5}
    assert last[0]["changes"] == {"target_modules": ["linear3"]}
    assert plain[0]["evaluations"]["validation"].total == int(data.validation.sum())
    assert plain[0]["evaluations"]["test"].total == min(2000, len(data.test_labels))  # the sample has 1,000
    digit = settings.target_digit
    assert plain[0]["validation"] == plain[0]["evaluations"]["validation"].digit_summary(digit)
    # the same settings and seed again: loaded, the same predictions
    again = remedy_runs(settings, data, base, {"plain": {}}, seeds=[1], splits=splits, verbose=False)
    assert again[0]["evaluations"] == plain[1]["evaluations"]
    before = reference({split: evaluate(base, *splits[split]) for split in SPLITS}, digit)
    lost = summarize(rows, before)["test", "points_lost"]
    assert [s.count for s in lost] == [2] * 4  # one value per seed
    # training on other digits too keeps them better than training on the target digit alone
    assert lost["replay 0.5"].mean < lost["plain"].mean


def test_bad_remedies_and_seeds_fail_before_anything_trains(small, tmp_path):
    settings, data, base = small
    fresh = dataclasses.replace(settings, output_dir=str(tmp_path / "out"),
                                checkpoint_dir=str(settings.checkpoint_path))
    with pytest.raises(SettingsError, match=r"replay_share=1.5 is not valid"):
        remedy_runs(fresh, data, base, {"plain": {}, "too much": {"replay_share": 1.5}}, [0], verbose=False)
    with pytest.raises(SettingsError, match=r"The remedy 'typo' changes \{'replay': 0.3\}: expected a dict"):
        remedy_runs(fresh, data, base, {"plain": {}, "typo": {"replay": 0.3}}, [0], verbose=False)
    with pytest.raises(SettingsError, match=r"seeds=\[0, 0\] is not valid"):
        remedy_runs(fresh, data, base, {"plain": {}}, [0, 0], verbose=False)
    assert not (tmp_path / "out" / "adapters").exists()


def test_the_notebook_parameters_are_checked_with_the_fix():
    plain = Settings()
    assert check_remedies(plain, {"r": {"replay_share": 0.3}})["r"].replay_share == 0.3
    with pytest.raises(SettingsError, match=r"remedies=\[\] is not valid: expected a dict"):
        check_remedies(plain, [])
    with pytest.raises(SettingsError, match=r"rank=0 is not valid"):
        check_remedies(plain, {"no rank": {"rank": 0}})
    for outside in ({"finetune_seed": 3}, {"target_digit": 4}, {"seed": 1}, {"train_samples": 100}):
        with pytest.raises(SettingsError, match=r"expected a dict of fine-tuning settings to change"):
            check_remedies(plain, {"outside": outside})  # one thing varied: the fine-tuning step only
    assert check_budgets(1, [2, 0.5, 2]) == (1.0, [0.5, 2.0]) and check_budgets(None, [100])[0] is None
    for bad in ([], [-1], ["1"], 1.0, [float("inf")], [100.5]):
        with pytest.raises(SettingsError) as refused:
            check_budgets(None, bad)
        assert f"budgets={bad!r}" in str(refused.value) and "from 0 to 100" in str(refused.value)
    for bad in (-1, 101, True, "1"):
        with pytest.raises(SettingsError) as refused:
            check_budgets(bad, [1])
        message = str(refused.value)
        assert f"max_forgetting_points={bad!r}" in message and "from 0 to 100" in message
        assert "None for the break-even budget" in message


def test_merged_and_cached_equal_parametrized_exactly_and_all_four_are_timed(small):
    settings, data, base = small
    model = finetuned_model(settings, data, base, verbose=False)
    images = data.test_images[:500]
    separate = separate_path(model)
    with torch.inference_mode():
        parametrized_logits = model(images)
        separate_logits = separate(images)
        in_calls = torch.cat([model(images[i:i + 100]) for i in range(0, 500, 100)])
        with parametrize.cached():  # the weights built at the first call, reused by the next four
            assert torch.equal(torch.cat([model(images[i:i + 100]) for i in range(0, 500, 100)]), in_calls)
            assert torch.equal(model(images), parametrized_logits)
    merged = merge_and_unload(finetuned_model(settings, data, base, verbose=False))  # a second copy
    with torch.inference_mode():
        assert torch.equal(merged(images), parametrized_logits)
    assert torch.allclose(separate_logits, parametrized_logits, atol=1e-4)
    ways = {"parametrized": model, "cached": model, "separate": separate, "merged": merged}
    times = forward_latency(ways, images, 2, around={"cached": parametrize.cached})
    assert list(times) == list(ways) and all(t > 0 for t in times.values())
    assert evaluate(merged, images, data.test_labels[:500]) == evaluate(model, images, data.test_labels[:500])
    merged.train()
    calls = []
    merged.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    forward_latency({"merged": merged}, images, repeats=2, batch_size=200)
    assert calls == [200, 200, 100] * 3  # a warm-up pass, then two timed ones
    assert merged.training, "timing leaves the model's train/eval mode as it found it"
    with pytest.raises(ValueError, match="repeats=0"):
        forward_latency({"merged": merged}, images, 0)


def test_the_profile_counts_the_rebuilds_of_each_way(small):
    settings, data, base = small
    model = finetuned_model(settings, data, base, verbose=False)
    separate = separate_path(model)
    merged = merge_and_unload(finetuned_model(settings, data, base, verbose=False))
    images = data.test_images[:500]  # 5 calls of 100
    found = {"parametrized": profile_pass(model, images, 100),
             "cached": profile_pass(model, images, 100, parametrize.cached),
             "separate": profile_pass(separate, images, 100), "merged": profile_pass(merged, images, 100)}
    assert {name: rebuilds for name, (_, rebuilds) in found.items()} == {
        "parametrized": 15, "cached": 3, "separate": 0, "merged": 0}  # 3 layers x 5 calls; once per layer
    ops = found["parametrized"][0]
    assert set(ops["op"][ops["rebuild"]]) >= {"aten::mm", "aten::mul", "aten::add"}  # B @ A, scale, W + ...
    assert not found["separate"][0]["rebuild"].any() and not found["merged"][0]["rebuild"].any()
    assert ops["calls"][(ops["op"] == "aten::mm") & ops["rebuild"]].sum() == 15
    assert list(ops["self_ms"]) == sorted(ops["self_ms"], reverse=True)  # the largest first
    summary = profile_summary(found)
    parametrized = summary.loc["parametrized"]
    assert parametrized["rebuilds"] == 15 and 0 < parametrized["rebuild_share"] < 1
    assert summary.loc["cached", "rebuild_ms"] < summary.loc["parametrized", "rebuild_ms"]
    assert summary.loc["separate", "extra_share"] > 0  # B (A x): operators merged never runs
    assert summary.loc["merged", "extra_ms"] == 0 and summary.loc["merged", "rebuild_share"] == 0


def test_the_figures_start_at_zero_and_draw_the_pre_trained_reference():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_tutorial.plots import plot_per_digit_accuracy

    before = [0.98, 0.99, 0.94, 0.90, 0.97, 0.98, 0.97, 0.94, 0.96, 0.90]
    runs = [[a - 0.1 * (d in (7, 8)) + 0.01 * s for d, a in enumerate(before)] for s in range(3)]
    from test_figure_rules import figure_problems  # the rules every figure follows

    fig = plot_per_digit_accuracy(before, runs, 9)
    assert figure_problems(fig) == []
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_title() and ax.get_xlabel() and "%" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pre-trained" in legend and "after LoRA fine-tuning (mean of 3 seeds, min-max)" in legend
    assert [t.get_text() for t in ax.texts][7] == "-9.0"  # the mean change, above each bar
    seeds = [0, 1, 2]
    rows = (run_rows("plain", seeds, [(10, 0.90), (12, 0.91), (14, 0.92)], [(10, 0.90)] * 3)
            + run_rows("gentle", seeds, [(30, 0.958)] * 3, [(31, 0.957)] * 3)
            + run_rows("worse", seeds, [(40, 0.95)] * 3, [(40, 0.95)] * 3))
    summaries = summarize(rows, BEFORE)
    fig = plot_front(rows, summaries, BEFORE, 9, 1.5)
    assert figure_problems(fig) == []
    validation, test = fig.axes
    assert validation.get_title().startswith("validation") and test.get_title().startswith("test")
    assert validation.get_ylim()[0] == 0 and validation.get_ylim()[1] > 90  # the pre-trained 90 in sight
    # one dot per seed per setting, one mean per setting, and the pre-trained star, in each panel
    sizes = [len(c.get_offsets()) for c in validation.collections]
    assert sizes == [3, 1, 3, 1, 3, 1, 1]
    dots = validation.collections[0].get_offsets()
    assert sorted(dots[:, 1]) == [10, 12, 14] and dots[0, 0] == pytest.approx(6.0)
    # the front joins plain and gentle (worse is beaten by gentle on both counts)
    line = next(line for line in validation.get_lines() if line.get_linestyle() == "--")
    assert list(line.get_ydata()) == [30, 12]
    assert validation.get_lines()[-1].get_xdata()[0] == 1.5  # the budget
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["plain", "gentle", "worse", "front of the means", "pre-trained", "budget: 1.50 points"]
    plt.close("all")
