"""10's second half in parts: which digits get an adapter, the adapter trained on all of them, the
summaries and the verdicts read from them, and the figure."""

import dataclasses
import re

import pytest
import torch
from test_forgetting import diagonal

from lora_tutorial import Evaluation, Settings, lora_modules
from lora_tutorial.data import fit_subset
from lora_tutorial.settings import SettingsError
from lora_tutorial.studies.many_adapters import (
    adapter_seed,
    check_adapter_digits,
    figures,
    plot_combinations,
    summarize,
    union_adapter,
    union_settings,
    verdicts,
    weakest_digits,
)
from lora_tutorial.studies.stats import check_repeats, spread


def evaluation(wrong: list[int]) -> Evaluation:
    """100 images of each digit, `wrong[d]` of digit d answered 0 (or 1): test_forgetting's `diagonal`."""
    return diagonal([100 - w for w in wrong])


def test_the_weakest_digits_come_from_the_training_errors_worst_first():
    training = evaluation([5, 9, 1, 30, 0, 2, 9, 4, 7, 12])
    assert weakest_digits(training, 3) == [3, 9, 1]  # 9 and 6 tie at 9 errors: the smaller digit first
    assert weakest_digits(training, 4) == [3, 9, 1, 6]


@pytest.mark.parametrize("value", [1, 10, True, [9], [9, 9], [9, 10], list(range(10)), "3", 2.0])
def test_adapter_digits_refused(value):
    with pytest.raises(SettingsError, match=re.escape(f"adapter_digits={value!r} is not valid: expected")):
        check_adapter_digits(value)


def test_adapter_digits_and_repeats_accepted():
    assert check_adapter_digits(3) == 3 and check_adapter_digits((9, 3)) == [9, 3]
    assert check_repeats(1) == 1
    for bad in (0, True, 2.0):
        with pytest.raises(SettingsError) as refused:
            check_repeats(bad, "latency_repeats")  # 09's timed passes share the check
        assert f"latency_repeats={bad!r}" in str(refused.value) and ">= 1" in str(refused.value)


def test_the_union_adapter_gets_what_the_single_ones_have_together():
    union = union_settings(Settings(rank=2, alpha=1.5, finetune_steps=40), 3)
    assert (union.rank, union.alpha, union.batch_size, union.finetune_steps) == (6, 4.5, 30, 40)
    assert [adapter_seed(0, i) for i in range(3)] == [0, 1000, 2000] and adapter_seed(2, 1) == 1002
    with pytest.raises(SettingsError, match=r"The adapter trained on all 4 digits together has rank 4 x 3: "
                                            r"rank=12 is too large for layer linear3 .* Choose fewer "
                                            r"adapter_digits"):
        union_settings(Settings(rank=3), 4)


def test_fit_subset_and_the_other_digits_accuracy_take_several_digits(mnist):
    images, labels = fit_subset(mnist, [9, 3])
    assert set(labels.tolist()) == {3, 9}
    assert len(labels) == len(fit_subset(mnist, 9)[1]) + len(fit_subset(mnist, 3)[1])
    e = evaluation([0, 0, 50, 0, 0, 0, 0, 0, 0, 10])
    assert e.mean_accuracy_except([2, 9]) == 1.0
    assert e.mean_accuracy_except(9) == pytest.approx((8 + 0.5) / 9)


def test_the_union_adapter_trains_on_its_digits_and_is_reused(small):
    settings, data, base = small
    settings = dataclasses.replace(settings, finetune_steps=5)
    first = union_adapter(settings, data, base, [9, 3])
    assert {n: m.rank for n, m in lora_modules(first).items()} == {"linear1": 2, "linear2": 2, "linear3": 2}
    assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(first).values())  # it trained
    saved = list((settings.output_path / "adapters").glob("union-*.safetensors"))
    assert len(saved) == 1
    again = union_adapter(settings, data, base, [9, 3])  # loaded from that file
    for a, b in zip(lora_modules(first).values(), lora_modules(again).values(), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    union_adapter(settings, data, base, [9, 2])  # other digits: another file
    assert len(list((settings.output_path / "adapters").glob("union-*.safetensors"))) == 2


def test_summaries_and_verdicts_come_from_the_seeds():
    digits = [9, 3]
    before = figures(evaluation([0, 0, 0, 10, 0, 0, 0, 0, 0, 20]), digits)
    rows = []
    for seed, shift in ((0, 0), (1, 2)):
        for name, wrong in (("digit 9 alone", [0, 0, 0, 30, 0, 0, 0, 0, 0, 2]),
                            ("digit 3 alone", [6, 0, 0, 1, 0, 0, 0, 0, 0, 40]),
                            ("sum of the 2", [5, 0, 0, 4, 0, 0, 0, 0, 0, 6]),
                            ("mean of the 2", [0, 0, 0, 6, 0, 0, 0, 0, 0, 12]),
                            ("together", [20, 0, 0, 3, 0, 0, 0, 0, 0, 3])):
            wrong = [w + shift if w else 0 for w in wrong]
            rows.append({"name": name, "seed": seed, **figures(evaluation(wrong), digits)})
    summaries = summarize(rows, digits)
    names = ["digit 9 alone", "digit 3 alone", "sum of the 2", "mean of the 2", "together"]
    assert list(summaries.index) == names
    assert list(summaries.columns) == ["wrong on 9", "wrong on 3", "others %", "all %"]
    assert summaries.loc["digit 9 alone", "wrong on 9"] == spread([2, 4])
    assert summaries.loc["digit 9 alone", "wrong on 3"] == spread([30, 32])
    comparisons = [("sum of the 2", None), ("mean of the 2", "sum of the 2"), ("together", "sum of the 2")]
    found = verdicts(summaries, digits, comparisons).set_index(["name", "against", "measure"])["verdict"]
    # the sum: 7.0 (6-8) on 9 against 9 alone's 3.0 (2-4), apart; wrong 0s 5 and 7: the other digits'
    # accuracy 99.25 (99.12-99.38), against 9 alone's 100 (apart) and 3 alone's (6 and 8 wrong 0s: overlap)
    assert found["sum of the 2", "digit 9 alone", "wrong on 9"] == "worse"
    assert found["sum of the 2", "digit 3 alone", "wrong on 3"] == "worse"
    assert found["sum of the 2", "digit 9 alone", "others %"] == "worse"
    assert found["sum of the 2", "digit 3 alone", "others %"] == "tie"
    # 12-14 against 6-8 on 9, apart; 6-8 against 4-6 on 3, touching; fewer wrong 0s: the others higher
    assert found["mean of the 2", "sum of the 2", "wrong on 9"] == "worse"
    assert found["mean of the 2", "sum of the 2", "wrong on 3"] == "tie"
    assert found["mean of the 2", "sum of the 2", "others %"] == "better"
    assert found["together", "sum of the 2", "wrong on 9"] == "better"
    assert len(found) == 4 + 3 + 3  # against None: each digit's own adapter, on its digit and the others
    with pytest.raises(ValueError, match=r"no summary named \['nothing'\]"):
        verdicts(summaries, digits, [("nothing", None)])
    labels = {name: name.split(" of")[0] for name in names}
    fig = plot_combinations(rows, before, digits, labels)
    left, right = fig.axes
    assert [t.get_text() for t in left.get_xticklabels()] == ["digit 9 alone", "digit 3 alone", "sum", "mean",
                                                             "together"]
    points = [c for c in left.collections if c.get_label().startswith("digit")]
    assert len(points) == 2 and len(points[0].get_offsets()) == 2  # a colour per digit; a point per seed
    firsts = [c for c in left.collections if isinstance(c, type(points[0]))]
    assert len(firsts) == 2 * len(names)  # one group of seeds per digit and adapter
    assert sorted(firsts[0].get_offsets()[:, 1]) == [2.0, 4.0]  # digit 9 alone, wrong on 9, seeds 0 and 1
    assert [line.get_ydata()[0] for line in left.get_lines()] == [20, 10]  # the pre-trained network, dashed
    assert right.get_ylabel() == "accuracy (%)" and left.get_yscale() == "symlog" and left.get_ylim()[0] == 0
    from test_figure_rules import figure_problems  # the rules every figure of the notebooks follows

    assert figure_problems(fig) == []
    with pytest.raises(ValueError, match=r"no rows named \['missing'\]"):
        plot_combinations(rows, before, digits, {"missing": "m"})
    import matplotlib.pyplot as plt

    plt.close("all")
