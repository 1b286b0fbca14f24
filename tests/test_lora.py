"""LoRA's math, shapes, freezing, switching and merging, on the tutorial's real network."""

import pytest
import torch
from torch import nn

from lora_tutorial import (
    LoRAParametrization,
    OversizedMLP,
    add_lora,
    base_weight,
    count_parameters,
    describe_lora,
    disable_adapter,
    lora_modules,
    lora_parameter_counts,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    print_trainable_parameters,
    separate_path,
    set_adapter_enabled,
)
from lora_tutorial.lora import LoRALinear, unload


def lora_net(rank=1, alpha=1.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = OversizedMLP()
    add_lora(model, rank=rank, alpha=alpha, **kwargs)
    return model


def randomize_b(model):
    """Give every B non-zero values, as training would."""
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.lora_B.normal_(std=0.05)


@pytest.fixture
def images():
    return torch.randn(32, 28, 28, generator=torch.Generator().manual_seed(1))


def test_shapes_follow_linear_out_in():
    model = lora_net(rank=3)
    for name, layer in [("linear1", model.linear1), ("linear2", model.linear2), ("linear3", model.linear3)]:
        lora = lora_modules(model)[name]
        assert lora.lora_A.shape == (3, layer.in_features)
        assert lora.lora_B.shape == (layer.out_features, 3)
        shape = (layer.out_features, layer.in_features)
        assert lora.delta_weight().shape == base_weight(layer).shape == shape
    assert "lora_A (3, 784) + lora_B (1000, 3)" in describe_lora(model)


def test_initialisation_normal_a_zero_b():
    lora = LoRAParametrization(2000, 1000, rank=64, alpha=64)
    assert torch.count_nonzero(lora.lora_B) == 0
    assert abs(lora.lora_A.std().item() - 1.0) < 0.02  # N(0, 1), as the post draws it
    kaiming = LoRAParametrization(2000, 1000, rank=64, init="kaiming")
    bound = 1 / 2000 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 2000
    assert kaiming.lora_A.abs().max() <= bound and kaiming.lora_A.std() < 0.1
    with pytest.raises(ValueError) as refused:
        LoRAParametrization(10, 10, init="xavier")
    assert all(part in str(refused.value) for part in ("init='xavier'", "normal", "kaiming"))


def test_zero_start_leaves_the_model_unchanged(images):
    torch.manual_seed(0)
    plain = OversizedMLP()
    adapted = lora_net(seed=0)  # same seed: same base weights
    assert torch.equal(adapted(images), plain(images))
    set_adapter_enabled(adapted, False)
    assert torch.equal(adapted(images), plain(images))


def test_weight_is_w_plus_scaled_b_at_a_exactly():
    model = lora_net(rank=4, alpha=8.0)
    randomize_b(model)
    for name, lora in lora_modules(model).items():
        layer = model.get_submodule(name)
        assert lora.scale == 2.0
        expected = base_weight(layer) + (lora.lora_B @ lora.lora_A) * 2.0
        assert torch.equal(layer.weight, expected)
        assert not torch.equal(layer.weight, base_weight(layer))


def test_freezing_leaves_gradients_only_on_lora(images):
    model = lora_net()
    frozen = mark_only_lora_as_trainable(model)
    assert frozen == [
        "linear1.bias", "linear1.parametrizations.weight.original",
        "linear2.bias", "linear2.parametrizations.weight.original",
        "linear3.bias", "linear3.parametrizations.weight.original",
    ]
    nn.functional.cross_entropy(model(images), torch.arange(32) % 10).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name
    assert count_parameters(model, trainable_only=True) == 6_794


def test_disable_adapter_restores_each_layers_state_even_on_error(images):
    model = lora_net()
    randomize_b(model)
    lora_modules(model)["linear3"].enabled = False  # a layer the user switched off by hand
    adapted = model(images)
    with disable_adapter(model):
        assert all(not lora.enabled for lora in lora_modules(model).values())
        assert torch.equal(model.linear1.weight, base_weight(model.linear1))
    assert [lora.enabled for lora in lora_modules(model).values()] == [True, True, False]
    assert torch.equal(model(images), adapted)
    with pytest.raises(RuntimeError, match="boom"), disable_adapter(model):
        raise RuntimeError("boom")
    assert lora_modules(model)["linear1"].enabled


def test_parameter_counts_match_the_post(capsys):
    model = lora_net(rank=1)
    assert lora_parameter_counts(model) == (2_807_010, 6_794)
    mark_only_lora_as_trainable(model)
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        "trainable params: 6,794 || all params: 2,813,804 || trainable%: 0.2415")
    base, added = lora_parameter_counts(lora_net(rank=8))
    layers = [(784, 1000), (1000, 2000), (2000, 10)]
    assert added == 8 * sum(i + o for i, o in layers) and base == 2_807_010


def test_only_some_layers():
    model = lora_net(rank=2, target_modules=["linear3"])
    assert list(lora_modules(model)) == ["linear3"]
    assert lora_parameter_counts(model)[1] == 2 * (2000 + 10)


@pytest.mark.parametrize("kwargs, parts", [  # the bad value, where, and the limit or the valid names
    ({"rank": 0}, ("rank=0", "linear1", "from 1 to 784")),
    ({"rank": 11}, ("rank=11", "linear3", "from 1 to 10")),
    ({"rank": 1.5}, ("rank=1.5", "integer")),
    ({"target_modules": ["fc1"]}, ("'fc1'", "'linear1', 'linear2', 'linear3'")),
])
def test_bad_arguments_are_refused_before_any_change(kwargs, parts):
    model = OversizedMLP()
    with pytest.raises(ValueError) as refused:
        add_lora(model, **kwargs)
    assert all(part in str(refused.value) for part in parts), str(refused.value)
    assert lora_modules(model) == {}


def test_adding_twice_and_helpers_without_lora_are_clear_errors():
    model = lora_net()
    with pytest.raises(ValueError, match="add_lora once"):
        add_lora(model)
    with pytest.raises(ValueError, match=r"add_lora\(model"):  # no LoRA yet: the fix is named
        mark_only_lora_as_trainable(OversizedMLP())


def test_merge_and_unload_equals_the_parametrization_exactly(images):
    model = lora_net(rank=2, alpha=3.0)
    randomize_b(model)
    with torch.no_grad():
        weights = {n: model.get_submodule(n).weight.clone() for n in lora_modules(model)}
        expected = model(images)
    set_adapter_enabled(model, False)  # merging merges the adapter even when it is switched off
    merged = merge_and_unload(model)
    assert lora_modules(merged) == {}
    assert type(merged.linear1) is nn.Linear
    for name, weight in weights.items():
        assert torch.equal(merged.get_submodule(name).weight, weight)
    assert torch.equal(merged(images), expected)
    assert not any("lora_" in k for k in merged.state_dict())


def test_unload_gives_back_the_base_model(images):
    torch.manual_seed(0)
    plain = OversizedMLP()
    model = lora_net(seed=0)
    randomize_b(model)
    base = unload(model)
    assert torch.equal(base(images), plain(images))


def test_lora_state_dict_holds_only_a_and_b():
    model = lora_net(rank=2)
    state = lora_state_dict(model)
    assert sorted(state) == sorted(f"{layer}.parametrizations.weight.0.lora_{m}"
                                   for layer in ("linear1", "linear2", "linear3") for m in "AB")
    assert sum(t.numel() for t in state.values()) == 2 * 6_794


def test_separate_path_matches_the_parametrization_in_outputs_and_gradients(images):
    model = lora_net(rank=4, alpha=2.0)
    randomize_b(model)
    mark_only_lora_as_trainable(model)
    view = separate_path(model)
    assert [type(view.get_submodule(n)) for n in ("linear1", "linear2", "linear3")] == [LoRALinear] * 3
    assert type(model.linear1) is not LoRALinear  # the parametrized model itself is untouched
    labels = torch.arange(32) % 10

    def run(forward):  # outputs and LoRA gradients, computed through `forward`
        for p in model.parameters():
            p.grad = None
        out = forward(images)
        nn.functional.cross_entropy(out, labels).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (out_p, grads_p), (out_s, grads_s) = run(model), run(view)
    assert torch.allclose(out_s, out_p, atol=1e-5, rtol=1e-5)
    assert len(grads_p) == 6
    for name in grads_p:
        assert torch.allclose(grads_s[name], grads_p[name], atol=1e-6, rtol=1e-4), name
    with disable_adapter(model):  # the view follows the switch: it shares the LoRA modules
        assert torch.equal(view(images), model(images))


def test_training_the_separate_path_trains_the_parametrized_model(images):
    model = lora_net(rank=2)
    mark_only_lora_as_trainable(model)
    view = separate_path(model)
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
    optimizer = torch.optim.SGD([p for p in view.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(view(images), torch.arange(32) % 10).backward()
    optimizer.step()
    lora = lora_modules(model)["linear2"]
    assert torch.count_nonzero(lora.lora_B) > 0  # the step reached the parametrized model's B
    expected = base_weight(model.linear2) + (lora.lora_B @ lora.lora_A) * lora.scale
    assert torch.equal(model.linear2.weight, expected)


def test_the_layer_shapes_settings_check_against_are_the_models():
    """Settings read the shapes from a model built on the meta device: they must be a real model's."""
    from lora_tutorial.model import layer_shapes, linear_layers

    layers = linear_layers(OversizedMLP())
    assert layer_shapes() == {name: tuple(layer.weight.shape) for name, layer in layers.items()}
    assert layer_shapes(OversizedMLP(hidden_size_1=7))["linear1"] == (7, 784)


def test_rank_pattern_gives_a_layer_its_own_rank_and_alpha():
    model = OversizedMLP()
    add_lora(model, rank=16, alpha=16.0, rank_pattern={"linear3": 10}, alpha_pattern={"linear3": 10.0})
    shapes = {n: (tuple(m.lora_A.shape), m.scale) for n, m in lora_modules(model).items()}
    assert shapes == {"linear1": ((16, 784), 1.0), "linear2": ((16, 1000), 1.0), "linear3": ((10, 2000), 1.0)}
    with pytest.raises(ValueError, match="rank=16"):  # without the pattern, linear3 refuses rank 16
        add_lora(OversizedMLP(), rank=16)
    stray = OversizedMLP()
    with pytest.raises(ValueError) as refused:
        add_lora(stray, rank=4, target_modules=["linear1"], rank_pattern={"linear3": 2})
    assert "'linear3'" in str(refused.value) and "target_modules=['linear1']" in str(refused.value)
    assert lora_modules(stray) == {}
