"""11's explorer: the trial it runs (checked knobs, 05's run with 05's knobs) and the panel over
it, driven here without a browser (tests/test_jupyterlab.py drives it in JupyterLab)."""

import copy
import dataclasses

import pytest
import torch

from lora_tutorial import Settings, finetuned_model, load_adapter, lora_state_dict, read_adapter, save_adapter
from lora_tutorial.data import split_images
from lora_tutorial.evaluate import evaluate
from lora_tutorial.settings import SettingsError
from lora_tutorial.studies import explore
from lora_tutorial.studies.explore import Explorer
from lora_tutorial.studies.trial import Trial, check_scaling, report, run_trial, trial_of, trial_settings


@pytest.mark.parametrize(("changes", "parts"), [
    ({"rank": 16}, ["rank=16", "linear3", "<= 10"]),
    ({"target_modules": ()}, ["target_modules=()", "'linear1'"]),  # the settings' own check
    ({"scaling": "alpha / r"}, ["scaling='alpha / r'", "'alpha fixed'"]),
    ({"alpha": -1.0, "scaling": "alpha = r", "rank": 4}, ["alpha=-1.0", "> 0"]),  # as the reader set it
    ({"replay_share": 0.04}, ["replay_share=0.04", "between 1 and 9"]),
    ({"finetune_steps": 0}, ["finetune_steps=0", ">= 1"]),
])
def test_a_bad_trial_is_refused_with_the_value_and_the_fix(changes, parts):
    trial = dataclasses.replace(Trial(), **changes)
    with pytest.raises(SettingsError) as refused:
        trial_settings(Settings(target_digit=9), trial)
    assert all(part in str(refused.value) for part in parts), str(refused.value)


def test_the_scaling_rule_decides_the_alpha_lora_is_built_with():
    settings = Settings(target_digit=9)
    built = {rule: trial_settings(settings, Trial(rank=4, alpha=2.0, scaling=rule)).alpha
             for rule in ("alpha fixed", "alpha = r", "rsLoRA")}
    assert built == {"alpha fixed": 2.0, "alpha = r": 8.0, "rsLoRA": 2.0}
    hidden = ("linear1", "linear2")
    run = trial_settings(settings, Trial(rank=16, target_modules=hidden, seed=7, target_digit=3))
    assert (run.rank, run.target_modules, run.lora_seed, run.target_digit) == (16, hidden, 7, 3)
    described = Trial(rank=4, alpha=2.0, scaling="alpha = r").describe()
    assert described.startswith("rank 4, alpha 8 (alpha = r x 2)")  # the alpha LoRA is built with
    with pytest.raises(SettingsError, match="scaling=None"):
        check_scaling(None)
    with pytest.raises(ValueError, match="Decide the target digit first"):
        trial_of(settings.__class__())  # "worst", not yet a digit


def test_the_first_press_is_05s_run_and_judged_on_the_validation_images(small):
    settings, data, base = small
    images = split_images(data, ("validation",))["validation"]
    before = evaluate(base, *images)
    steps = []
    result = run_trial(settings, data, base, trial_of(settings), before, images,
                       on_step=lambda step, total: steps.append((step, total)))
    saved = lora_state_dict(finetuned_model(settings, data, base, verbose=False))  # 05's adapter
    pressed = lora_state_dict(result.model)
    # 05's loop trains through the rebuilt weight, the press through the separate path: rounding apart
    assert saved.keys() == pressed.keys()
    assert all(torch.allclose(saved[k], pressed[k], rtol=0, atol=1e-4) for k in saved)
    assert any(pressed[k].abs().max() > 1e-3 for k in pressed if k.endswith("lora_B"))  # B moved: it trained
    assert len(result.losses) == settings.finetune_steps and steps[-1] == (20, 20)
    assert result.after.total == result.before.total == int(data.validation.sum())
    assert result.trainable == 6_794 and result.trial.factor == 1.0
    digit, table = settings.target_digit, result.table()
    wrong = [before.wrong_counts[digit], result.after.wrong_counts[digit]]
    # before, after, change
    assert table[f"wrong answers on digit {digit}"].tolist() == [*wrong, wrong[1] - wrong[0]]
    assert table.loc["fine-tuned", "all digits %"] == pytest.approx(100 * result.after.accuracy)
    text = report(result)
    assert f"On the {before.total:,} validation images" in text and "6,794 trained numbers" in text
    assert text.startswith(result.trial.describe()) and "<table" in report(result, html_table=True)
    assert result.settings["finetune_seed"] == 0 and result.settings["scaling"] == "alpha fixed"


def test_a_pressed_adapter_saves_with_its_settings_and_loads_back(small, tmp_path):
    settings, data, base = small
    images = split_images(data, ("validation",))["validation"]
    trial = Trial(rank=2, scaling="rsLoRA", replay_share=0.3, finetune_steps=5, target_digit=3, seed=4)
    result = run_trial(settings, data, base, trial, evaluate(base, *images), images)
    save_adapter(result.model, tmp_path / "mine.safetensors", result.settings)
    _, info = read_adapter(tmp_path / "mine.safetensors")
    assert info["use_rslora"] is True and info["rank"] == 2
    assert {k: info["settings"][k] for k in ("replay_share", "target_digit", "finetune_seed", "scaling")} == {
        "replay_share": 0.3, "target_digit": 3, "finetune_seed": 4, "scaling": "rsLoRA"}
    loaded = lora_state_dict(load_adapter(copy.deepcopy(base), tmp_path / "mine.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in lora_state_dict(result.model).items())


def test_the_panel_refuses_a_bad_rank_trains_with_the_button_disabled_and_redraws(small):
    settings, data, base = small
    explorer = Explorer(settings, data, base)
    assert explorer.message.value == "" and not explorer.button.disabled
    assert "alpha / r = 1" in explorer.factor.value

    explorer.rank.value = 16  # linear3 (10 x 2,000) cannot take it
    assert "too large for layer linear3" in explorer.message.value and explorer.button.disabled
    assert explorer.fine_tune() is None and explorer.result is None  # nothing trains
    explorer.layers["linear3"].value = False
    assert explorer.message.value == "" and not explorer.button.disabled
    assert "alpha / r = 0.0625" in explorer.factor.value

    explorer.rank.value, explorer.layers["linear3"].value, explorer.steps.value = 2, True, 30
    seen = []
    explorer.on_step = lambda step, steps: seen.append((step, explorer.button.disabled, explorer.busy))
    result = explorer.fine_tune()
    assert seen and all(disabled and busy for _, disabled, busy in seen)  # disabled while it trains
    assert seen[-1][0] == 30 and not explorer.button.disabled and not explorer.busy
    assert result is explorer.result and result.trial.rank == 2 and result.trial.finetune_steps == 30
    assert bytes(explorer.figure.value).startswith(b"\x89PNG")
    assert "rank 2, alpha 1 (alpha fixed), all layers; 30 steps" in explorer.numbers.value
    assert explorer.message.value.startswith("Updated in ") and set(explorer.seconds) == {
        "fine-tuning", "judging", "drawing", "update"}
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and bundle["text/plain"].startswith("rank 2,")
    assert bundle["image/png"]  # what a viewer without widgets shows


def test_a_run_that_fails_is_a_message_in_the_panel_not_a_traceback(small, monkeypatch):
    settings, data, base = small
    explorer = Explorer(settings, data, base)
    first = explorer.fine_tune()

    def diverges(*args, **kwargs):
        raise FloatingPointError("The loss became nan at step 3: training diverged. Lower the learning rate")

    monkeypatch.setattr(explore, "run_trial", diverges)
    explorer.alpha.value = 16.0
    assert explorer.fine_tune() is None
    assert "The loss became nan at step 3" in explorer.message.value
    assert explorer.result is first and explorer.progress.bar_style == "danger"
    assert not explorer.busy and explorer.button.description == "Fine-tune"
    explorer.alpha.value = 1.0  # a change of knob checks again and frees the button
    assert not explorer.button.disabled and explorer.message.value == ""
