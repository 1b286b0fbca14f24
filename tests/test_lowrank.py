"""Why low rank: singular values, energy shares, truncated SVD, and the measured costs."""

import pytest
import torch

from lora_tutorial import OversizedMLP, add_lora, lora_modules
from lora_tutorial.lowrank import (
    adam_state_bytes,
    check_ranks,
    energy_shares,
    finetune_and_measure,
    fully_trainable,
    last_layer_trainable,
    lora_at_rank,
    low_rank_approximations,
    saved_bytes,
    singular_values,
    top_direction_cosines,
    weight_deltas,
    with_deltas,
)
from lora_tutorial.pipeline import pretrained_model, setup

PARAMETERS = 2_807_010


def test_energy_shares_grow_with_the_rank_and_reach_one_at_full_rank():
    torch.manual_seed(0)
    delta = torch.randn(40, 12) @ torch.diag(torch.linspace(3, 0.1, 12)) @ torch.randn(12, 30)
    values = singular_values(delta)
    assert len(values) == 30 and torch.all(values[:-1] >= values[1:])
    shares = energy_shares(values, [1, 2, 4, 8, 12, 30, 64])
    assert all(a < b for a, b in zip(shares[:4], shares[1:5], strict=True))
    assert 0 < shares[0] < 1
    assert shares[4] == pytest.approx(1, abs=1e-9)  # a rank-12 product: only float rounding beyond 12
    assert shares[5:] == [1.0, 1.0]  # at full rank (30) and beyond it, exactly all
    assert sum(values.double() ** 2) == pytest.approx(torch.linalg.matrix_norm(delta.double()) ** 2)
    with pytest.raises(ValueError, match=r"ranks=\[0\]"):
        energy_shares(values, [0])


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_a_rank_r_approximation_has_rank_at_most_r_and_is_the_best(rank):
    torch.manual_seed(1)
    delta = torch.randn(50, 20)
    approx = low_rank_approximations(delta, [rank, 20])[rank]
    assert approx.shape == delta.shape and approx.dtype == delta.dtype
    assert torch.linalg.matrix_rank(approx) <= rank
    values = singular_values(delta)
    # Eckart-Young: what is left out is exactly the energy of the singular values dropped
    left = torch.linalg.matrix_norm((delta - approx).double()) ** 2
    assert float(left) == pytest.approx(float((values[rank:] ** 2).sum()), rel=1e-4)
    assert torch.allclose(low_rank_approximations(delta, [20])[20], delta, atol=1e-5)
    with pytest.raises(ValueError, match=r"ranks=\[0\]"):
        low_rank_approximations(delta, [0])


def test_deltas_of_a_lora_model_are_its_low_rank_update_and_go_back_on_exactly():
    torch.manual_seed(0)
    base = OversizedMLP()
    tuned = lora_at_rank(settings_stub(), base, 3)
    with torch.no_grad():
        for lora in lora_modules(tuned).values():
            lora.lora_B.normal_()
    deltas = weight_deltas(base, tuned)
    assert list(deltas) == ["linear1", "linear2", "linear3"]
    for name, lora in lora_modules(tuned).items():
        assert torch.allclose(deltas[name], lora.delta_weight().detach(), atol=1e-6)
        assert torch.linalg.matrix_rank(deltas[name]) <= 3
    images = torch.randn(4, 28, 28)
    assert torch.allclose(with_deltas(base, deltas)(images), tuned(images), atol=1e-4)


def settings_stub():
    from lora_tutorial import Settings
    return Settings()


def test_lora_at_a_rank_beyond_linear3_gives_it_its_largest_and_keeps_the_scale_at_one():
    model = lora_at_rank(settings_stub(), OversizedMLP(), 16)
    assert {n: (m.rank, m.scale) for n, m in lora_modules(model).items()} == {
        "linear1": (16, 1.0), "linear2": (16, 1.0), "linear3": (10, 1.0)}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    fixed = lora_at_rank(settings_stub(), OversizedMLP(), 4, alpha=1.0)
    assert {m.scale for m in lora_modules(fixed).values()} == {0.25}


def test_measured_costs_follow_what_trains():
    base = OversizedMLP()
    full, last = fully_trainable(base), last_layer_trainable(base)
    lora = OversizedMLP()
    add_lora(lora)
    for name, p in lora.named_parameters():
        p.requires_grad_("lora_" in name)
    # Adam: two float32 running averages per trained number, plus a small step count per tensor
    for model, trained in ((full, PARAMETERS), (last, 20_010), (lora, 6_794)):
        assert 8 * trained <= adam_state_bytes(model) <= 8 * trained + 64 * 6
    assert 4 * PARAMETERS < saved_bytes(full) < 4 * PARAMETERS + 4096
    assert 4 * 20_010 < saved_bytes(last) < 4 * 20_010 + 4096
    assert 4 * 6_794 < saved_bytes(lora) < 4 * 6_794 + 4096
    assert all(p.requires_grad for p in full.parameters())
    assert [n for n, p in last.named_parameters() if p.requires_grad] == ["linear3.weight", "linear3.bias"]


def test_fine_tuning_the_last_layer_moves_only_it_and_is_measured(small_settings):
    device, data = setup(small_settings, verbose=False)
    base = pretrained_model(small_settings, data, device, verbose=False).model
    model = last_layer_trainable(base)
    row = finetune_and_measure(small_settings, data, model, "last layer", verbose=False)
    deltas = weight_deltas(base, model)
    assert torch.count_nonzero(deltas["linear1"]) == 0 and torch.count_nonzero(deltas["linear2"]) == 0
    assert torch.count_nonzero(deltas["linear3"]) > 0
    assert row["trainable"] == 20_010 and row["seconds"] > 0
    assert row["target_wrong"] == row["evaluation"].wrong_counts[9]
    assert 0 < row["others_accuracy"] <= 1


def test_top_direction_cosines_see_the_same_and_orthogonal_directions():
    u, v = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    big = 5 * torch.outer(u, v) + 0.1 * torch.outer(torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0, 0]))
    assert top_direction_cosines(big, -2 * torch.outer(u, v)) == pytest.approx((1.0, 1.0))
    other_input = torch.outer(u, torch.tensor([0, 0, 0, 1.0]))
    assert top_direction_cosines(big, other_input) == pytest.approx((1.0, 0.0))


def test_a_notebooks_ranks_are_checked_with_the_fix():
    from lora_tutorial import SettingsError
    assert check_ranks("ranks", [8, 1, 2, 1]) == [1, 2, 8]
    for bad in ([], [0], [1.5], "1, 2", [True]):
        with pytest.raises(SettingsError, match=r"ranks=.* is not valid: expected a list of whole numbers"):
            check_ranks("ranks", bad)
    with pytest.raises(SettingsError, match=r"give a list with -y '\{ranks: \[1, 4\]\}'"):
        check_ranks("ranks", "[0, 2]")
