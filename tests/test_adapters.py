"""Adapter files: just A and B with what is needed to load them safely, refused when they do not fit."""

import json

import pytest
import torch

from lora_tutorial import (
    CheckpointError,
    OversizedMLP,
    add_lora,
    base_fingerprint,
    load_adapter,
    lora_modules,
    read_adapter,
    save_adapter,
)


@pytest.fixture
def trained(tmp_path):
    """A base network, a copy of it with a rank-2 adapter whose B is not zero, and its file."""
    torch.manual_seed(0)
    base = OversizedMLP()
    tuned = OversizedMLP()
    tuned.load_state_dict(base.state_dict())
    add_lora(tuned, rank=2, alpha=4.0, target_modules=["linear1", "linear3"])
    with torch.no_grad():
        for lora in lora_modules(tuned).values():
            lora.lora_B.normal_()
    path = tmp_path / "adapter.safetensors"
    info = save_adapter(tuned, path, settings={"seed": 0})
    return base, tuned, path, info


def test_the_file_holds_only_a_and_b_and_says_what_they_are(trained):
    base, tuned, path, info = trained
    tensors, meta = read_adapter(path)
    assert sorted(tensors) == ["linear1.parametrizations.weight.0.lora_A",
                               "linear1.parametrizations.weight.0.lora_B",
                               "linear3.parametrizations.weight.0.lora_A",
                               "linear3.parametrizations.weight.0.lora_B"]
    assert meta == info
    assert (meta["rank"], meta["alpha"], meta["target_modules"]) == (2, 4.0, ["linear1", "linear3"])
    assert meta["base_shapes"] == {"linear1": [1000, 784], "linear3": [10, 2000]}
    assert meta["base_fingerprint"] == base_fingerprint(base) == base_fingerprint(tuned)
    assert meta["settings"] == {"seed": 0}
    numbers = 2 * (784 + 1000) + 2 * (2000 + 10)
    assert numbers * 4 < path.stat().st_size < numbers * 4 + 4096  # float32 plus a small header


def test_loading_onto_the_base_adds_lora_and_reproduces_the_outputs(trained):
    base, tuned, path, _ = trained
    images = torch.randn(5, 28, 28)
    loaded = load_adapter(base, path)
    assert loaded is base and list(lora_modules(base)) == ["linear1", "linear3"]
    assert torch.equal(base(images), tuned(images))
    assert all(p.requires_grad == ("lora_" in n) for n, p in base.named_parameters())
    again = OversizedMLP()
    again.load_state_dict(tuned.state_dict(), strict=False)  # the base weights, plain names
    with torch.no_grad():
        for name in ("linear1", "linear3"):
            again.get_submodule(name).weight.copy_(tuned.get_submodule(name).parametrizations.weight.original)
    load_adapter(again, path, settings={"seed": 0})
    assert torch.equal(again(images), tuned(images))


def test_another_base_is_refused_by_its_fingerprint(trained):
    _, _, path, info = trained
    other = OversizedMLP()  # other random weights, same shapes
    before = {k: v.clone() for k, v in other.state_dict().items()}
    message = (rf"was trained on other base weights \(fingerprint {info['base_fingerprint']}, this "
               r"model's is [0-9a-f]{16}\): load it onto the pre-trained network it was fine-tuned from")
    with pytest.raises(CheckpointError, match=message):
        load_adapter(other, path)
    assert not lora_modules(other), "nothing changed before the refusal"
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_other_shapes_are_refused_naming_the_layer(trained):
    _, _, path, _ = trained
    with pytest.raises(CheckpointError, match=r"does not fit this model: it was trained on a linear1 weight "
                                              r"of 1000 x 784, this model's linear1 is 500 x 784"):
        load_adapter(OversizedMLP(hidden_size_1=500), path)
    with pytest.raises(CheckpointError, match=r"adapts layer linear1, which this model does not have"):
        load_adapter(torch.nn.Sequential(torch.nn.Linear(784, 10)), path)


def test_a_model_with_another_lora_is_refused(trained):
    base, _, path, _ = trained
    add_lora(base, rank=1, alpha=1.0)
    message = (r"has LoRA of rank \{'linear1': 2, 'linear3': 2\}, alpha \{'linear1': 4.0, 'linear3': 4.0\}, "
               r"but this model already carries LoRA of rank \{'linear1': 1, 'linear2': 1, 'linear3': 1\}")
    with pytest.raises(CheckpointError, match=message):
        load_adapter(base, path)


def test_other_settings_are_refused(trained):
    base, _, path, _ = trained
    with pytest.raises(CheckpointError, match=r"other settings \(seed: file has 0, asked for 1\)"):
        load_adapter(base, path, settings={"seed": 1})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_file_is_a_clear_error(trained, damage):
    base, _, path, _ = trained
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a safetensors file",
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"cannot be read .*: the file is truncated or damaged\. "
                                              r"Delete it and fine-tune again"):
        load_adapter(base, path)
    assert not lora_modules(base)


def test_a_foreign_safetensors_file_and_a_missing_file_are_named(trained, tmp_path):
    base, _, _, _ = trained
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign), metadata={"name": json.dumps("x")})
    with pytest.raises(CheckpointError, match=r"is a safetensors file but not a LoRA adapter of this"):
        load_adapter(base, foreign)
    with pytest.raises(CheckpointError, match=r"No adapter at .*missing\.safetensors"):
        load_adapter(base, tmp_path / "missing.safetensors")


def test_saving_needs_lora(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(OversizedMLP(), tmp_path / "a.safetensors")
    assert not any(tmp_path.iterdir())


def test_layers_of_their_own_rank_and_alpha_round_trip(tmp_path):
    """rank 16 fits linear1 and linear2 but not linear3 (10 x 2000): rank_pattern gives it 10."""
    torch.manual_seed(0)
    base = OversizedMLP()
    tuned = copy_of(base)
    add_lora(tuned, rank=16, alpha=16.0, rank_pattern={"linear3": 10}, alpha_pattern={"linear3": 10.0})
    with torch.no_grad():
        for lora in lora_modules(tuned).values():
            lora.lora_B.normal_()
    path = tmp_path / "patterned.safetensors"
    info = save_adapter(tuned, path)
    assert (info["rank"], info["rank_pattern"]) == (16, {"linear3": 10})
    assert (info["alpha"], info["alpha_pattern"]) == (16.0, {"linear3": 10.0})
    load_adapter(base, path)
    assert {n: (m.rank, m.scale) for n, m in lora_modules(base).items()} == {
        "linear1": (16, 1.0), "linear2": (16, 1.0), "linear3": (10, 1.0)}
    images = torch.randn(5, 28, 28)
    assert torch.equal(base(images), tuned(images))
    plain = OversizedMLP()
    add_lora(plain, rank=2)
    info = save_adapter(plain, tmp_path / "plain.safetensors")
    assert "rank_pattern" not in info and "alpha_pattern" not in info  # one rank: no pattern written


def copy_of(model):
    twin = OversizedMLP()
    twin.load_state_dict(model.state_dict())
    return twin
