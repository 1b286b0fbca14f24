"""The code the reader reads is the code that runs: 02's and 05's loops and 03's class.

The package keeps its own loops for the studies; here they give the notebook loops' weights bit
for bit. And a cached file is never stale: edit 05's loop or 03's A, and 06's `finetuned_model`
trains a new adapter instead of loading the old one.
"""

import shutil
from dataclasses import replace

import nbformat
import pytest
import torch

from lora_tutorial import OversizedMLP, Settings, lora_state_dict
from lora_tutorial.lesson import LESSONS, LessonError, code_fingerprint, lesson, notebooks_folder
from lora_tutorial.pipeline import (
    adapter_path,
    finetuned_model,
    lora_model,
    package_finetune,
    package_pretrain,
    pretrain_loop,
    train_on_target,
)


def tiny_data(n=240, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_02s_loop_and_the_packages_train_the_same_weights_bit_for_bit():
    images, labels = tiny_data()
    settings = Settings(pretrain_epochs=2)  # two epochs: the second shuffle must agree too
    trained = []
    for loop in (lesson("pretrain"), package_pretrain):
        torch.manual_seed(0)  # the post's seeding: weights, then the order, from the global generator
        model = OversizedMLP()
        losses = loop(model, images, labels, settings)
        trained.append((model.state_dict(), losses))
    (ours, our_losses), (theirs, their_losses) = trained
    assert len(our_losses) == 2 * len(labels) // settings.batch_size
    assert our_losses == their_losses
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_05s_loop_and_the_packages_train_the_same_adapter_bit_for_bit():
    images, labels = tiny_data(n=57)  # 6 batches a pass, so 20 steps start new passes
    torch.manual_seed(0)
    base = OversizedMLP()
    settings = Settings(finetune_steps=20, finetune_seed=3, target_digit=9)
    trained = []
    for loop in (lesson("finetune_lora"), package_finetune):
        model = lora_model(settings, base)  # 03's class, A from the fine-tuning seed
        losses = loop(model, images, labels, settings)
        trained.append((lora_state_dict(model), losses))
    (ours, our_losses), (theirs, their_losses) = trained
    assert len(our_losses) == 20 and our_losses == their_losses
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours["linear1.parametrizations.weight.0.lora_B"],
                           torch.zeros_like(ours["linear1.parametrizations.weight.0.lora_B"]))


def test_lora_model_uses_03s_class_from_the_notebook():
    torch.manual_seed(0)
    model = lora_model(Settings(rank=2), OversizedMLP())
    module = model.linear2.parametrizations.weight[0]
    assert isinstance(module, lesson("LoRAParametrization")) and type(module).lesson_class is lesson(
        "LoRAParametrization")
    assert module.rank == 2 and module.alpha == 1.0  # the package's helpers ask for these
    assert torch.equal(module.delta_weight(), module.lora_B @ module.lora_A * 0.5)
    assert module.lora_A.shape == (2, 1000) and not module.lora_B.any()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{layer}.parametrizations.weight.0.lora_{m}" for layer in ("linear1", "linear2", "linear3")
        for m in "AB"]


def test_a_fingerprint_follows_the_code_not_comments_or_where_it_was_written():
    def make(source):
        namespace = {}
        exec(source, namespace)
        return namespace["f"]

    plain = make("def f(x, lr=1):\n    return x * lr\n")
    commented = "# a comment\n\n\ndef f(x, lr=1):\n    return x * lr  # same\n"
    assert code_fingerprint(plain) == code_fingerprint(make(commented))
    assert code_fingerprint(plain) != code_fingerprint(make("def f(x, lr=2):\n    return x * lr\n"))
    assert code_fingerprint(plain) != code_fingerprint(make("def f(x, lr=1):\n    return x * lr * 2\n"))
    cls = lesson("LoRAParametrization")
    assert code_fingerprint(cls) == code_fingerprint(lesson("LoRAParametrization"))


def edited_notebooks(tmp_path, notebook, tag, old, new):
    """A copy of the notebooks with one lesson cell edited, as a reader would, and saved."""
    folder = tmp_path / "notebooks"
    shutil.copytree(notebooks_folder(), folder)
    path = folder / f"{notebook}.ipynb"
    nb = nbformat.read(path, as_version=4)
    [cell] = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert old in cell.source
    cell.source = cell.source.replace(old, new)
    nbformat.write(nb, path)
    return folder


@pytest.mark.parametrize("edit", [
    ("05_finetune", "finetune-loop", "settings.finetune_lr)", "settings.finetune_lr * 3)"),  # the loop
    ("03_parametrize", "lora-class", "torch.randn(rank, in_features)", "torch.randn(rank, in_features) / 4"),
])
def test_after_an_edit_06_trains_a_new_adapter_instead_of_loading_the_old_one(small, tmp_path, monkeypatch,
                                                                              edit):
    settings, data, base = small
    settings = replace(settings, output_dir=str(tmp_path / "out"), finetune_steps=5)
    first = finetuned_model(settings, data, base, verbose=False)  # 05's code as committed: saved
    old_file = adapter_path(settings, data)
    assert first.finetune_seconds is not None and old_file.is_file()
    assert finetuned_model(settings, data, base, verbose=False).finetune_seconds is None  # found again

    folder = edited_notebooks(tmp_path, *edit)
    monkeypatch.setattr("lora_tutorial.lesson.notebooks_folder", lambda: folder)
    again = finetuned_model(settings, data, base, verbose=False)
    assert again.finetune_seconds is not None, "the edited code trained afresh"
    new_file = adapter_path(settings, data)
    assert new_file != old_file and new_file.is_file() and old_file.is_file()
    old, new = lora_state_dict(first), lora_state_dict(again)
    assert any(not torch.equal(old[k], new[k]) for k in old), "the new adapter is the edited code's"


def test_replayed_batches_train_with_the_packages_loop_under_their_own_name(small):
    settings, data, _ = small
    plain, replayed = settings, replace(settings, replay_share=0.3)
    assert adapter_path(plain, data) != adapter_path(replayed, data)
    assert adapter_path(replayed, data) == adapter_path(replayed, data, loop=train_on_target)


def test_a_broken_lesson_cell_says_which_cell_and_how_to_fix_it(tmp_path, monkeypatch):
    folder = edited_notebooks(tmp_path, "02_pretrain", "pretrain-loop", "def pretrain(", "def pretrain(((")
    monkeypatch.setattr("lora_tutorial.lesson.notebooks_folder", lambda: folder)
    with pytest.raises(LessonError) as broken:
        pretrain_loop(Settings())
    assert all(part in str(broken.value) for part in ("'pretrain-loop'", "02_pretrain.ipynb", "SyntaxError",
                                                      "Fix the cell"))
    assert set(LESSONS) == {"pretrain", "LoRAParametrization", "finetune_lora"}
