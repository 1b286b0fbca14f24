"""Checkpoints and adapters: cached per settings, refused when they do not match, never half-written."""

from dataclasses import replace

import pytest
import torch

from lora_tutorial import (
    CheckpointError,
    Settings,
    choose_target,
    evaluate,
    finetuned_model,
    lora_model,
    lora_modules,
    predict,
    pretrained_model,
)
from lora_tutorial.checkpoints import atomic_write, load_adapter, load_pretrained, save_pretrained
from lora_tutorial.evaluate import from_confusion
from lora_tutorial.lora import separate_path
from lora_tutorial.pipeline import adapter_path, finetune_key, pretrained_path, setup, train_on_target


@pytest.fixture
def small(small_settings):
    device, data = setup(small_settings, verbose=False)
    return small_settings, device, data


def test_worst_is_decided_on_the_training_images_and_keys_adapters_like_the_digit(small, capsys):
    settings, device, data = small
    settings = replace(settings, target_digit="worst")
    pre = pretrained_model(settings, data, device, verbose=False)
    on_training = evaluate(pre.model, data.train_images, data.train_labels)
    assert pre.training == on_training
    digit = on_training.worst_digit()
    chosen = choose_target(settings, pre)
    assert (chosen.target_digit, chosen.target_rule) == (digit, "worst")
    assert (f"Target digit: {digit} (the worst: {on_training.wrong_counts[digit]:,} of its "
            f"{on_training.per_digit_totals()[digit]:,} training images wrong") in capsys.readouterr().out
    # the test images play no part: test errors that point at another digit change nothing
    other = (digit + 1) % 10
    skewed = [[100 if p == t else 0 for p in range(10)] for t in range(10)]
    skewed[other][other], skewed[other][(other + 1) % 10] = 50, 50
    assert from_confusion(skewed).worst_digit() == other
    assert choose_target(settings, replace(pre, evaluation=from_confusion(skewed)), verbose=False) == chosen
    # a checkpoint remembers the training errors: loading it gives the same choice without evaluating
    again = pretrained_model(settings, data, device, verbose=False)
    assert again.loaded and again.training == on_training
    given = choose_target(replace(settings, target_digit=digit), pre)
    assert capsys.readouterr().out == f"Target digit: {digit} (given)\n"
    assert adapter_path(chosen, data) == adapter_path(given, data)  # keyed on the digit, however chosen


def test_pretraining_happens_once_per_settings(small, tmp_path):
    settings, device, data = small
    settings = replace(settings, checkpoint_dir=str(tmp_path / "own"))  # not the session's shared one
    first = pretrained_model(settings, data, device, verbose=False)
    assert not first.loaded and first.path.is_file() and len(first.losses) == 200
    second = pretrained_model(settings, data, device, verbose=False)
    assert second.loaded and second.losses == first.losses and second.evaluation == first.evaluation
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = Settings(**{**settings.as_dict(), "seed": 1})
    assert pretrained_path(other, data) != first.path
    assert pretrained_path(Settings(**{**settings.as_dict(), "rank": 8}), data) == first.path


def test_weights_from_other_settings_are_refused(small):
    settings, device, data = small
    pre = pretrained_model(settings, data, device, verbose=False)
    other = Settings(**{**settings.as_dict(), "learning_rate": 0.01})
    pretrained_path(other, data).write_bytes(pre.path.read_bytes())  # a mislabelled file
    with pytest.raises(CheckpointError, match=r"was made with other settings \(learning_rate: file has "
                                              r"0\.001, asked for 0\.01\): delete it"):
        pretrained_model(other, data, device, verbose=False)


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "pretrained.pt"
    save_pretrained(path, {"w": torch.ones(3)}, {"seed": 0}, {"losses": [1.0]})
    assert load_pretrained(path, {"seed": 0})["losses"] == [1.0]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read .* Delete it and pre-train again"):
        load_pretrained(path, {"seed": 0})


def test_a_crash_while_writing_keeps_the_previous_file(tmp_path):
    path = tmp_path / "pretrained.pt"
    save_pretrained(path, {"w": torch.ones(3)}, {"seed": 0}, {"losses": [1.0]})
    good = path.read_bytes()

    def crash(tmp):
        tmp.write_bytes(good[:50])  # half a file, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["pretrained.pt"], "no temporary file left behind"


def test_adapter_round_trip_and_mismatch(small):
    settings, device, data = small
    pre = pretrained_model(settings, data, device, verbose=False)
    tuned = finetuned_model(settings, data, pre.model, verbose=False)  # fine-tunes and saves
    path = adapter_path(settings, data)
    assert path.is_file() and path.stat().st_size < 40_000  # rank 1: 6,794 floats
    again = finetuned_model(settings, data, pre.model, verbose=False)  # loads the file
    assert evaluate(again, data.test_images, data.test_labels) == evaluate(tuned, data.test_images,
                                                                          data.test_labels)
    rank2 = Settings(**{**settings.as_dict(), "rank": 2})
    with pytest.raises(CheckpointError, match=r"other settings \(rank: file has 1, asked for 2\)"):
        load_adapter(lora_model(rank2, pre.model), path, finetune_key(rank2, data))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        finetuned_model(settings, data, pre.model, verbose=False)


def test_lora_model_does_not_touch_the_base(small):
    settings, device, data = small
    pre = pretrained_model(settings, data, device, verbose=False)
    before = {k: v.clone() for k, v in pre.model.state_dict().items()}
    model = lora_model(settings, pre.model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6_794
    assert type(pre.model.linear1) is torch.nn.Linear
    for key, value in pre.model.state_dict().items():
        assert torch.equal(value, before[key])


def test_fast_and_parametrized_fine_tuning_agree(small):
    """The separate low-rank path trains the same adapter as the parametrization, up to rounding."""
    settings, device, data = small
    pre = pretrained_model(settings, data, device, verbose=False)
    fast, slow = lora_model(settings, pre.model), lora_model(settings, pre.model)
    losses_fast = train_on_target(settings, data, separate_path(fast), verbose=False)
    losses_slow = train_on_target(settings, data, slow, verbose=False)
    assert losses_fast == pytest.approx(losses_slow, rel=1e-3, abs=1e-4)
    for name, lora in lora_modules(fast).items():
        other = lora_modules(slow)[name]
        fast_delta, slow_delta = lora.delta_weight().detach(), other.delta_weight().detach()
        assert (fast_delta - slow_delta).norm() <= 1e-3 * slow_delta.norm(), name
    agree = (predict(fast, data.test_images) == predict(slow, data.test_images)).float().mean()
    assert agree > 0.999


def test_a_diverged_run_writes_no_checkpoint(small):
    settings, device, data = small
    wild = Settings(**{**settings.as_dict(), "learning_rate": 1e20})
    message = (r"Pre-training diverged \(the loss became (nan|inf)\): "
               r"lower the learning rate \(learning_rate=1e\+20\)")
    with pytest.raises(FloatingPointError, match=message):
        pretrained_model(wild, data, device, verbose=False)
    assert not pretrained_path(wild, data).exists()
    pre = pretrained_model(settings, data, device, verbose=False)
    huge = Settings(**{**settings.as_dict(), "alpha": 1e20})
    with pytest.raises(FloatingPointError, match=r"Fine-tuning diverged .*nothing was saved"):
        finetuned_model(huge, data, pre.model, verbose=False)
    assert not adapter_path(huge, data).exists()


KILLED_WHILE_SAVING = """
import os, signal, sys, torch
from lora_tutorial import checkpoints

def dies_half_way(payload, path):
    with open(path, "wb") as f:
        f.write(b"PK" + bytes(1000))  # the start of a file, then the process is killed
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoints.torch.save = dies_half_way
checkpoints.save_pretrained(sys.argv[1], {"w": torch.ones(3)}, {"seed": 0}, {"losses": []})
"""


def test_a_process_killed_while_saving_leaves_no_checkpoint_to_load(small, tmp_path):
    """A real kill (no cleanup code runs): the checkpoint's name never points at half a file."""
    import subprocess
    import sys

    settings, device, data = small
    settings = replace(settings, checkpoint_dir=str(tmp_path / "own"))  # not the session's shared one
    path = pretrained_path(settings, data)
    done = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(path)], timeout=120)
    assert done.returncode == -9
    assert not path.exists(), "the final name is only ever given to a complete file"
    leftovers = list(path.parent.glob(f".{path.name}.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1002
    pre = pretrained_model(settings, data, device, verbose=False)  # trains afresh, never reads the stub
    assert not pre.loaded and pretrained_model(settings, data, device, verbose=False).loaded
