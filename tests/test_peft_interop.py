"""The tutorial's adapters in PEFT's format and back: PEFT itself reads what to_peft writes, and
from_peft reads what PEFT writes; a folder the tutorial's LoRA cannot represent is one sentence,
before anything changes."""

import copy
import json
import sys

import peft  # a dependency: a missing or broken install fails here rather than skipping
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tutorial import OversizedMLP, add_lora, lora_modules, save_adapter, separate_path
from lora_tutorial.checkpoints import CheckpointError
from lora_tutorial.peft_interop import CONFIG_FILE, WEIGHTS_FILE, from_peft, read_peft, to_peft


def network(seed: int = 0) -> OversizedMLP:
    torch.manual_seed(seed)
    return OversizedMLP()


def trained_lora(base, **lora_args):
    """A copy of `base` with LoRA whose B is not zero (as after training), so that every check
    below compares a real update."""
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    add_lora(model, **lora_args)
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.lora_B.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def base():
    return network()


@pytest.fixture(scope="module")
def images():
    return torch.randn(200, 784, generator=torch.Generator().manual_seed(2))


def test_peft_loads_what_to_peft_writes(base, images, tmp_path):
    ours = trained_lora(base, rank=2, alpha=4.0)
    folder = to_peft(ours, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    with torch.inference_mode():
        # PEFT computes W x + b + scale * B (A x), as our separate path does: bit for bit
        assert torch.equal(loaded(images), separate_path(ours)(images))
        gap = (loaded(images) - ours(images)).abs().max() / ours(images).abs().max()
        assert 0 < gap < 1e-5  # the parametrized W + scale * B A: the same sums in another order
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 4.0)
    assert (config["bias"], config["lora_dropout"], config["use_rslora"]) == ("none", 0.0, False)
    assert sorted(config["target_modules"]) == ["linear1", "linear2", "linear3"]


def test_an_adapter_file_converts_like_the_model_it_came_from(base, tmp_path):
    ours = trained_lora(base, rank=1)
    save_adapter(ours, tmp_path / "lora.safetensors", {"rank": 1})
    from_model = to_peft(ours, tmp_path / "a")
    from_file = to_peft(tmp_path / "lora.safetensors", tmp_path / "b")
    a, b = load_file(from_model / WEIGHTS_FILE), load_file(from_file / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(a) == [f"base_model.model.linear{i}.lora_{p}.weight" for i in (1, 2, 3) for p in "AB"]
    assert read_peft(from_file)[2]["lora_tutorial.settings"] == '{"rank": 1}'  # the settings travel too


def test_round_trip_keeps_every_number_and_the_per_layer_settings(base, images, tmp_path):
    ours = trained_lora(base, rank=4, alpha=2.0, rank_pattern={"linear3": 2}, alpha_pattern={"linear1": 0.5},
                        use_rslora=True)
    back = from_peft(copy.deepcopy(base), to_peft(ours, tmp_path / "a"))
    here, there = lora_modules(ours), lora_modules(back)
    assert {n: (m.rank, m.alpha, m.use_rslora) for n, m in there.items()} == {
        "linear1": (4, 0.5, True), "linear2": (4, 2.0, True), "linear3": (2, 2.0, True)}
    for name in here:
        assert torch.equal(here[name].lora_A, there[name].lora_A)
        assert torch.equal(here[name].lora_B, there[name].lora_B)
    assert [n for n, p in back.named_parameters() if p.requires_grad] == [
        n for n, p in back.named_parameters() if "lora_" in n]  # everything but A and B frozen
    with torch.inference_mode():
        assert torch.equal(back(images), ours(images))


def test_from_peft_reads_what_peft_itself_saves(base, images, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["linear1", "linear3"],
                             init_lora_weights=False)  # A and B both random: a non-zero update
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "peft")
    ours = from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert list(lora_modules(ours)) == ["linear1", "linear3"]
    with torch.inference_mode():
        assert torch.equal(separate_path(ours)(images), model(images))


def test_a_folder_with_files_is_kept_unless_overwrite_and_a_failed_write_keeps_the_old_one(
        base, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    first = to_peft(trained_lora(base, rank=1), folder)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(CheckpointError, match=r"already holds files: choose an empty or new folder, or pass "
                                              r"overwrite=True"):
        to_peft(trained_lora(base, rank=2), folder)
    import lora_tutorial.peft_interop as interop

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(interop, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        to_peft(trained_lora(base, rank=2), folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no half-written folder left beside it
    monkeypatch.undo()
    to_peft(trained_lora(base, rank=2), folder, overwrite=True)
    assert json.loads((folder / CONFIG_FILE).read_text())["r"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def rewrite_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, r"uses PEFT's use_dora=True \(DoRA adds a trained magnitude vector per layer\)"),
    ({"bias": "all"}, r"uses PEFT's bias='all' \(PEFT then trains and saves biases too\)"),
    ({"modules_to_save": ["linear3"]}, r"uses PEFT's modules_to_save=\['linear3'\]"),
    ({"peft_type": "IA3"}, r"holds a PEFT adapter of type 'IA3', not LoRA"),
])
def test_what_the_tutorials_lora_cannot_hold_is_refused(base, tmp_path, change, message):
    folder = to_peft(trained_lora(base, rank=1), tmp_path / "a")
    rewrite_config(folder, **change)
    model = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=message):
        from_peft(model, folder)
    assert lora_modules(model) == {}  # refused before anything changed


def test_missing_damaged_and_foreign_files_are_one_sentence(base, tmp_path):
    folder = to_peft(trained_lora(base, rank=1), tmp_path / "a")
    model = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=r"No adapter_config.json in .*empty: give the folder"):
        (tmp_path / "empty").mkdir()
        from_peft(model, tmp_path / "empty")
    weights = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).unlink()
    (folder / "adapter_model.bin").write_bytes(b"old")
    with pytest.raises(CheckpointError, match=r"No adapter_model.safetensors in .* \(only the older "
                                              r"adapter_model.bin: load it in PEFT and save it again\)"):
        from_peft(model, folder)
    (folder / WEIGHTS_FILE).write_bytes(weights[:1000])
    with pytest.raises(CheckpointError, match=r"cannot be read .*truncated or damaged"):
        from_peft(model, folder)
    tensors = {"base_model.model.linear1.lora_embedding_A": torch.zeros(1, 784)}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"holds the tensor 'base_model.model.linear1.lora_embedding_A'"
                                              r", which is not LoRA's A or B of a Linear layer"):
        from_peft(model, folder)
    save_file({"base_model.model.linear1.lora_A.weight": torch.zeros(1, 784)}, str(folder / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"is incomplete: layers \['linear1'\] lack A or B"):
        from_peft(model, folder)
    assert lora_modules(model) == {}


def test_the_wrong_network_is_refused(base, tmp_path):
    """The checks are load_adapter's (their wording is tested in test_adapters.py)."""
    folder = to_peft(trained_lora(base, rank=1), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"other base weights \(fingerprint \w+, this model's is \w+\)"):
        from_peft(network(seed=1), folder)
    with pytest.raises(CheckpointError, match=r"linear1 .*1000 x 784.* linear1 is 500 x 784"):
        from_peft(OversizedMLP(hidden_size_1=500), folder)
    with pytest.raises(CheckpointError, match=r"\{'linear1': 1.* already carries LoRA .*\{'linear1': 2"):
        from_peft(trained_lora(base, rank=2), folder)
    same = trained_lora(base, rank=1)  # the same LoRA: its A and B are replaced, as load_adapter does
    with torch.inference_mode():
        assert torch.equal(from_peft(same, folder)(torch.ones(1, 784)),
                           from_peft(copy.deepcopy(base), folder)(torch.ones(1, 784)))
    with pytest.raises(CheckpointError, match=r"is a file: give to_peft a folder"):
        (tmp_path / "file").write_text("x")
        to_peft(trained_lora(base, rank=1), tmp_path / "file")


def test_a_layer_whose_a_and_b_disagree_is_refused(base, tmp_path):
    folder = to_peft(trained_lora(base, rank=1), tmp_path / "a")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    tensors["base_model.model.linear2.lora_B.weight"] = torch.zeros(2000, 2)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    model = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=r"incomplete: layers \['linear2'\] .*ranks differ"):
        from_peft(model, folder)
    assert lora_modules(model) == {}


def test_without_peft_writing_says_how_to_install_it(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match=r"needs Hugging Face PEFT, which is not installed here: "
                                              r"pip install 'peft>=0.18,<1'"):
        to_peft(trained_lora(base, rank=1), tmp_path / "a")
    assert not (tmp_path / "a").exists()
