"""Forgetting: per-digit changes, remedies as fine-tuning settings, and merged inference."""

import dataclasses

import pytest
import torch

from lora_tutorial import SettingsError, evaluate, merge_and_unload, separate_path
from lora_tutorial.evaluate import from_confusion
from lora_tutorial.forgetting import (
    check_latency,
    check_limit,
    check_remedies,
    choose_setting,
    describe_choice,
    forward_latency,
    others_lose_points,
    per_digit_change,
    remedy_runs,
)
from lora_tutorial.pipeline import choose_target, finetuned_model, pretrained_model, setup


def diagonal(correct):
    """An evaluation with `correct[d]` of 100 images of each digit right (the rest called 0/1)."""
    rows = []
    for d, c in enumerate(correct):
        row = [0] * 10
        row[d] = c
        row[1 if d == 0 else 0] += 100 - c
        rows.append(row)
    return from_confusion(rows)


def test_per_digit_change_and_the_other_nine():
    before = diagonal([90] * 10)
    after = diagonal([81] * 9 + [99])
    assert per_digit_change(before, after) == pytest.approx([-9] * 9 + [9])
    assert others_lose_points(before, after, 9) == pytest.approx(9)
    assert others_lose_points(before, before, 9) == 0


def test_the_chosen_setting_keeps_the_other_digits_within_the_limit():
    rows = [{"name": "plain", "target_wrong": 20, "others_accuracy": 0.90},
            {"name": "replay", "target_wrong": 50, "others_accuracy": 0.958},
            {"name": "gentle", "target_wrong": 70, "others_accuracy": 0.959}]
    assert choose_setting(rows, others_before=0.964)["name"] == "replay"
    assert choose_setting(rows, others_before=0.964, max_loss_points=0.1)["name"] == "gentle"
    assert choose_setting(rows, others_before=0.964, max_loss_points=10)["name"] == "plain"
    for row in rows:
        row["changes"] = {}
    kept = describe_choice(choose_setting(rows, 0.964), 0.964, 1.0, 9)
    assert kept.startswith("Chosen: replay ({}): the fewest wrong answers on digit 9 (50) among the settings "
                           "whose other digits lose at most 1 point on average (it loses 0.60).")
    nothing = choose_setting(rows, others_before=0.964, max_loss_points=0.1)
    assert describe_choice(nothing, 0.964, 0.1, 9).startswith(
        "No setting keeps the other digits within 0.1 points; the one that loses least is gentle "
        "(0.50 points")


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_checkpoints):
    from lora_tutorial import Settings
    settings = Settings(train_samples=2000, finetune_steps=20, download=False,
                        output_dir=str(tmp_path_factory.mktemp("forgetting") / "out"),
                        checkpoint_dir=shared_checkpoints)
    device, data = setup(settings, verbose=False)
    pre = pretrained_model(settings, data, device, verbose=False)
    return choose_target(settings, pre, verbose=False), data, pre.model  # "worst", decided


def test_replay_share_0_is_the_plain_run_and_variants_change_what_they_name(small):
    settings, data, base = small
    rows = remedy_runs(settings, data, base, {"plain": {}, "replay 0": {"replay_share": 0.0},
                                              "replay 0.5": {"replay_share": 0.5},
                                              "last layer": {"target_modules": ["linear3"]}},
                       verbose=False)
    plain, zero, replay, last = rows
    assert zero["evaluation"] == plain["evaluation"]  # every prediction the same
    assert replay["evaluation"] != plain["evaluation"]
    assert last["changes"] == {"target_modules": ["linear3"]}
    # training on other digits too keeps them better than training on nines alone
    assert replay["others_accuracy"] > plain["others_accuracy"]


def test_a_bad_variant_fails_before_any_variant_trains(small, tmp_path):
    settings, data, base = small
    fresh = dataclasses.replace(settings, output_dir=str(tmp_path / "out"),
                                checkpoint_dir=str(settings.checkpoint_path))
    with pytest.raises(SettingsError, match=r"replay_share=1.5 is not valid"):
        remedy_runs(fresh, data, base, {"plain": {}, "too much": {"replay_share": 1.5}}, verbose=False)
    with pytest.raises(SettingsError, match=r"The remedy 'typo' changes \{'replay': 0.3\}: expected a dict"):
        remedy_runs(fresh, data, base, {"plain": {}, "typo": {"replay": 0.3}}, verbose=False)
    assert not (tmp_path / "out" / "adapters").exists()


def test_merged_equals_parametrized_exactly_and_all_three_are_timed(small):
    settings, data, base = small
    model = finetuned_model(settings, data, base, verbose=False)
    images = data.test_images[:500]
    separate = separate_path(model)
    with torch.inference_mode():
        parametrized_logits = model(images)
        separate_logits = separate(images)
    merged = merge_and_unload(finetuned_model(settings, data, base, verbose=False))  # a second copy
    with torch.inference_mode():
        assert torch.equal(merged(images), parametrized_logits)
    assert torch.allclose(separate_logits, parametrized_logits, atol=1e-4)
    times = forward_latency({"parametrized": model, "separate": separate, "merged": merged}, images, 2)
    assert list(times) == ["parametrized", "separate", "merged"] and all(t > 0 for t in times.values())
    assert evaluate(merged, images, data.test_labels[:500]) == evaluate(model, images, data.test_labels[:500])
    merged.train()
    calls = []
    merged.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    forward_latency({"merged": merged}, images, repeats=2, batch_size=200)
    assert calls == [200, 200, 100] * 3  # a warm-up pass, then two timed ones
    assert merged.training, "timing leaves the model's train/eval mode as it found it"
    with pytest.raises(ValueError, match="repeats=0"):
        forward_latency({"merged": merged}, images, 0)


def test_the_notebook_parameters_are_checked_with_the_fix():
    from lora_tutorial import Settings
    plain = Settings()
    assert check_remedies(plain, {"r": {"replay_share": 0.3}})["r"].replay_share == 0.3
    with pytest.raises(SettingsError, match=r"remedies=\[\] is not valid: expected a dict"):
        check_remedies(plain, [])
    with pytest.raises(SettingsError, match=r"target_digit=12 is not valid"):
        check_remedies(plain, {"other digit": {"target_digit": 12}})
    assert check_limit(1) == 1.0
    with pytest.raises(SettingsError, match=r"max_forgetting_points=-1 is not valid: expected a number"):
        check_limit(-1)
    assert check_latency([10000, 100], 3) == ([10000, 100], 3)
    with pytest.raises(SettingsError, match=r"latency_batches=\[0\] is not valid"):
        check_latency([0], 3)
    with pytest.raises(SettingsError, match=r"latency_repeats=0 is not valid: expected a whole number >= 1"):
        check_latency([100], 0)
