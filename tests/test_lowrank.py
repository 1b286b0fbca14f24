"""Why low rank (08): decompositions, energy shares, random yardsticks, verdicts, runs and measured costs."""

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from lora_tutorial import OversizedMLP, Settings, SettingsError, add_lora, lora_modules
from lora_tutorial.data import Mnist
from lora_tutorial.pipeline import finetune_key
from lora_tutorial.studies.lowrank import (
    TENSORS,
    adam_state_bytes,
    chance_of_abs_cosine,
    check_replay_share,
    compare,
    cut_rows,
    cuts_at,
    data_size_runs,
    decompose,
    decompose_lora,
    deltas,
    direction_agreement,
    energy_shares,
    full_runs,
    fully_trainable,
    image_subset,
    lora_at_rank,
    lora_runs,
    measure_costs,
    random_abs_cosine,
    rate_grid,
    saved_bytes,
    step_times,
    tune_rate,
    with_deltas,
)
from lora_tutorial.studies.rank_study import check_ranks

PARAMETERS = 2_807_010


# Decompositions -----------------------------------------------------------------------------

def test_energy_shares_grow_with_the_rank_and_reach_one_at_full_rank():
    torch.manual_seed(0)
    delta = torch.randn(40, 12) @ torch.diag(torch.linspace(3, 0.1, 12)) @ torch.randn(12, 30)
    values = decompose(delta, keep=1).values
    assert len(values) == 30 and torch.all(values[:-1] >= values[1:])
    shares = energy_shares(values, [1, 2, 4, 8, 12, 30, 64])
    assert all(a < b for a, b in zip(shares[:4], shares[1:5], strict=True)) and 0 < shares[0] < 1
    assert shares[4] == pytest.approx(1, abs=1e-9)  # a rank-12 product: only float rounding beyond 12
    assert shares[5:] == [1.0, 1.0]  # at full rank (30) and beyond it, exactly all
    assert sum(values ** 2) == pytest.approx(torch.linalg.matrix_norm(delta.double()) ** 2)
    assert energy_shares(torch.zeros(5), [1, 3]) == [1.0, 1.0]  # a zero update: nothing is left out
    with pytest.raises(ValueError, match=r"ranks=\[0\]"):
        energy_shares(values, [0])


@pytest.mark.parametrize("shape", [(50, 20), (20, 50)])
def test_the_cut_is_the_best_of_its_rank(shape):
    torch.manual_seed(1)
    delta = torch.randn(shape)
    piece = decompose(delta, keep=5)
    assert piece.u.shape == (shape[0], 5) and piece.v.shape == (shape[1], 5)
    for rank in (1, 2, 5):
        cut = piece.truncated(rank)
        assert cut.shape == delta.shape and cut.dtype == torch.float32
        assert torch.linalg.matrix_rank(cut) <= rank
        # Eckart-Young: what is left out is exactly the energy of the singular values dropped
        left = torch.linalg.matrix_norm((delta - cut).double()) ** 2
        assert float(left) == pytest.approx(float((piece.values[rank:] ** 2).sum()), rel=1e-4)
    with pytest.raises(ValueError, match="rank=6"):
        piece.truncated(6)
    assert torch.allclose(decompose(delta, keep=20).truncated(64), delta, atol=1e-5)  # beyond its rank: all


def test_a_zero_update_decomposes_to_nothing():
    piece = decompose(torch.zeros(6, 4), keep=2)
    assert torch.count_nonzero(piece.values) == 0 and torch.isfinite(piece.u).all()
    assert torch.count_nonzero(piece.truncated(2)) == 0


def test_a_lora_update_decomposes_from_its_factors_alone():
    torch.manual_seed(2)
    model = OversizedMLP()
    add_lora(model, rank=3, alpha=2.0)
    for lora in lora_modules(model).values():
        torch.nn.init.normal_(lora.lora_B)
        mine, reference = decompose_lora(lora), decompose(lora.delta_weight().detach(), keep=3)
        assert len(mine.values) == 3
        assert torch.allclose(mine.values, reference.values[:3], rtol=1e-5)
        assert abs(float(mine.u[:, 0] @ reference.u[:, 0])) == pytest.approx(1.0, abs=1e-5)  # up to its sign
        assert abs(float(mine.v[:, 0] @ reference.v[:, 0])) == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(mine.truncated(3), lora.delta_weight().detach(), atol=1e-4)


# Random yardsticks --------------------------------------------------------------------------

def random_unit_vectors(count, d, seed):
    x = torch.randn(count, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("d", [10, 1000])
def test_the_random_cosine_level_matches_a_simulation_in_its_own_dimension(d):
    a, b = random_unit_vectors(4000, d, 0), random_unit_vectors(4000, d, 1)
    assert random_abs_cosine(d) == pytest.approx(float((a * b).sum(dim=1).abs().mean()), rel=0.2)
    assert random_abs_cosine(d) == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=0.03)
    assert random_abs_cosine(1) == pytest.approx(1.0)


@pytest.mark.parametrize("d, c", [(10, 0.5), (10, 0.9), (1000, 0.05), (2, 0.5)])
def test_the_chance_of_a_random_match_agrees_with_a_simulation(d, c):
    count = 40_000 if d <= 10 else 10_000
    a, b = random_unit_vectors(count, d, 2), random_unit_vectors(count, d, 3)
    simulated = float(((a * b).sum(dim=1).abs() >= c).double().mean())
    error = math.sqrt(simulated * (1 - simulated) / count)
    assert chance_of_abs_cosine(c, d) == pytest.approx(simulated, abs=5 * error + 1e-3)
    assert chance_of_abs_cosine(0.0, d) == pytest.approx(1.0)
    assert chance_of_abs_cosine(1.0, d) == pytest.approx(0.0, abs=1e-9)
    assert chance_of_abs_cosine(0.3, 1) == 1.0


# Verdicts and parameter checks ------------------------------------------------------------

def test_compare_calls_overlapping_ranges_a_tie_and_knows_which_way_is_better():
    whole = pd.DataFrame({"target_wrong": [10, 12], "others_accuracy": [0.5, 0.6]})
    cut = whole + [5, 0.2]  # more wrong answers, higher accuracy on every seed
    assert compare(whole, whole).to_dict() == {"target_wrong": "tie", "others_accuracy": "tie"}
    assert compare(cut, whole).to_dict() == {"target_wrong": "worse", "others_accuracy": "better"}


def test_the_notebooks_parameters_are_refused_with_the_value_the_limit_and_the_fix():
    every = {"name": "lora_ranks", "at_least": 1, "every_layer": True}  # as 08 and 12 check their ranks
    assert check_ranks(Settings(), [4, 1, 10, 1], **every) == [1, 4, 10]
    with pytest.raises(SettingsError, match=r"lora_ranks=\[0\] .* whole numbers >= 1"):
        check_ranks(Settings(), [0], **every)
    with pytest.raises(SettingsError) as refused:
        check_ranks(Settings(), [1, 16], **every)
    assert "lora_ranks=[1, 16]" in str(refused.value) and "linear3" in str(refused.value)
    assert "rank <= 10" in str(refused.value) and "leave" not in str(refused.value)  # 08 keeps every layer
    settings = Settings()
    assert check_replay_share(settings, 0.3) == 0.3
    with pytest.raises(SettingsError, match=r"^full_replay_share=1.5 "):
        check_replay_share(settings, 1.5)
    with pytest.raises(SettingsError, match=r"full_replay_share=0 .*e.g. 0.3"):
        check_replay_share(settings, 0)


# The models and what they cost --------------------------------------------------------------

def test_lora_at_a_rank_keeps_alpha_fixed_and_draws_a_from_the_fine_tuning_seed():
    base, settings = OversizedMLP(), Settings(alpha=1.0, target_digit=9)
    model = lora_at_rank(settings, base, 4)
    assert {n: (m.rank, m.scale) for n, m in lora_modules(model).items()} == {
        "linear1": (4, 0.25), "linear2": (4, 0.25), "linear3": (4, 0.25)}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    a = lora_modules(model)["linear1"].lora_A
    assert torch.equal(a, lora_modules(lora_at_rank(settings, base, 4))["linear1"].lora_A)
    other = lora_at_rank(replace(settings, finetune_seed=1), base, 4)
    assert not torch.equal(a, lora_modules(other)["linear1"].lora_A)


def test_deltas_of_a_lora_model_are_its_low_rank_update_and_go_back_on_exactly():
    torch.manual_seed(0)
    base = OversizedMLP()
    tuned = lora_at_rank(Settings(target_digit=9), base, 3)
    with torch.no_grad():
        for lora in lora_modules(tuned).values():
            lora.lora_B.normal_()
    weights = deltas(base, tuned)
    assert list(weights) == ["linear1", "linear2", "linear3"]
    for name, lora in lora_modules(tuned).items():
        assert torch.allclose(weights[name], lora.delta_weight().detach(), atol=1e-6)
    assert all(torch.count_nonzero(b) == 0 for b in deltas(base, tuned, "bias").values())  # biases frozen
    images = torch.randn(4, 28, 28)
    assert torch.allclose(with_deltas(base, weights)(images), tuned(images), atol=1e-4)


def test_measured_costs_follow_what_trains():
    full, lora = fully_trainable(OversizedMLP()), lora_at_rank(Settings(target_digit=9), OversizedMLP(), 1)
    for model, trained in ((full, PARAMETERS), (lora, 6_794)):  # Adam: two float32 averages per number
        assert 8 * trained <= adam_state_bytes(model) <= 8 * trained + 64 * 6
    assert 4 * PARAMETERS < saved_bytes(full) < 4 * PARAMETERS + 4096
    assert 4 * 6_794 < saved_bytes(lora) < 4 * 6_794 + 4096
    assert saved_bytes(lora, {"rank": 1, "what": "the settings 05 records"}) > saved_bytes(lora)


def test_step_times_split_each_step_and_leave_the_models_as_they_were():
    torch.manual_seed(0)
    base = OversizedMLP()
    full, lora = fully_trainable(base), lora_at_rank(Settings(target_digit=9), base, 1)
    before, threads = {k: v.clone() for k, v in full.state_dict().items()}, torch.get_num_threads()
    times = step_times({"full": full, "lora": lora}, torch.randn(30, 28, 28), torch.randint(0, 10, (30,)),
                       batch_size=10, lr=1e-3, steps=3, warmup=1)
    assert list(times.index) == ["full", "lora"] and list(times) == ["forward_backward_ms", "adam_ms"]
    assert (times > 0).all().all()
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in before.items())
    assert torch.count_nonzero(lora_modules(lora)["linear1"].lora_B) == 0  # still untrained
    assert torch.get_num_threads() == threads  # one thread while timing, then as before


def tiny_pair(seed=0):
    """A tiny 784 -> 8 -> 10 network and a copy whose weights and biases all moved."""
    torch.manual_seed(seed)
    nn = torch.nn
    before = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
    after = fully_trainable(before)
    with torch.no_grad():
        for p in after.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return before, after


def test_the_cut_is_rank_r_delta_w_plus_the_whole_delta_b():
    before, after = tiny_pair()
    pieces = {name: decompose(delta, keep=8) for name, delta in deltas(before, after).items()}
    biases = deltas(before, after, "bias")
    images = torch.randn(16, 28, 28)
    whole = with_deltas(before, {n: p.truncated(8) for n, p in pieces.items()}, biases)
    assert torch.allclose(whole(images), after(images), atol=1e-4)  # full rank + delta b: the whole update
    cut = with_deltas(before, {n: p.truncated(1) for n, p in pieces.items()}, biases)
    assert torch.equal(cut[3].bias, after[3].bias)
    assert torch.linalg.matrix_rank(cut[1].weight - before[1].weight) == 1
    with torch.no_grad():
        after[3].bias[3] += 100.0  # a bias change alone that makes every answer a 3
    images, labels = torch.randn(200, 28, 28), torch.arange(200) % 10
    data = Mnist(images, labels, images, labels, "sample", "tiny")
    rows = cut_rows(Settings(target_digit=3), before, pieces, data, [1, 8], deltas(before, after, "bias"))
    assert list(rows.index) == [1, 8] and (rows.target_wrong == 0).all() and (rows.others_accuracy == 0).all()
    assert (cut_rows(Settings(target_digit=3), before, pieces, data, [8]).others_accuracy > 0).all()


# Real runs, tiny ----------------------------------------------------------------------------

def test_full_and_lora_runs_on_small_settings(small):
    settings, data, base = small
    data = replace(data, test_images=data.test_images[:2000], test_labels=data.test_labels[:2000])
    settings = replace(settings, finetune_steps=10)
    full = full_runs(settings, data, base, [0, 1], [1, 4])
    assert list(full.seed) == [0, 1] and (full.seconds > 0).all()
    assert (full.learning_rate == settings.finetune_lr).all()
    assert full.pieces[0]["linear1"].u.shape == (1000, 4)  # the top max(ranks) directions kept
    assert not torch.equal(full.pieces[0]["linear2"].values, full.pieces[1]["linear2"].values)
    assert float(full.biases[0]["linear3"].abs().sum()) > 0  # every weight trains, the biases too
    assert list(full.cuts[0].index) == [1, 4]
    cut = cuts_at(full, 4)
    assert list(cut.seed) == [0, 1]
    assert cut.target_wrong.tolist() == [c.loc[4, "target_wrong"] for c in full.cuts]
    lora = lora_runs(settings, data, base, 1, [0, 1])
    assert [len(p["linear2"].values) for p in lora.pieces] == [1, 1]
    for _, row in lora.iterrows():  # A before and after, as 08 draws them; the moved share is theirs
        start, end = row.a_start["linear1"], row.a_end["linear1"]
        assert start.shape == end.shape == (1, 784) and 0 < row.a_moved["linear1"] < 1
        assert float((end - start).norm() / start.norm()) == pytest.approx(row.a_moved["linear1"])
        assert row.predictions.shape == data.test_labels.shape
    json.dumps(lora.drop(columns=[c for c in TENSORS if c in lora]).to_dict("records"))  # the rest: JSON
    agreement = direction_agreement(lora, full)
    assert len(agreement) == 2 * 3 * 2  # seeds x layers x sides
    top = (full.pieces[0]["linear1"], lora.pieces[0]["linear1"])
    first = agreement[(agreement.layer == "linear1") & (agreement.seed == 0)].set_index("side").cosine
    assert first["input"] == pytest.approx(abs(float(top[0].v[:, 0] @ top[1].v[:, 0])))
    linear3 = agreement[agreement.layer == "linear3"].set_index("side")
    assert linear3.dimensions.to_dict() == {"output": 10, "input": 2000}
    assert linear3.loc["output", "random"].tolist() == [pytest.approx(random_abs_cosine(10))] * 2
    assert agreement.cosine.between(0, 1).all() and agreement.chance.between(0, 1).all()
    costs = measure_costs(settings, data, {"every weight": fully_trainable(base),
                                           "LoRA, rank 1": lora_at_rank(settings, base, 1)}, steps=2)
    assert costs.trainable.tolist() == [PARAMETERS, 6_794]
    assert costs.loc["LoRA, rank 1", "file_bytes"] == saved_bytes(
        lora_at_rank(settings, base, 1), finetune_key(replace(settings, rank=1), data))


def test_tune_rate_takes_the_best_mean_validation_score_and_flags_an_edge():
    rows = pd.DataFrame([{"learning_rate": lr, "seed": s, "validation_score": score + 0.01 * s}
                         for lr, score in ((1e-4, 0.90), (3e-4, 0.95), (1e-3, 0.80)) for s in range(3)])
    tuned = tune_rate(rows)
    assert tuned.learning_rate == 3e-4 and not tuned.at_edge
    assert tuned.means[1e-3] == pytest.approx(0.81)
    assert tune_rate(rows[rows.learning_rate != 3e-4]).at_edge
    with pytest.raises(ValueError, match="at least one result"):
        tune_rate(rows[:0])


def test_image_subsets_are_fixed_per_seed_and_nested():
    images, labels = torch.arange(100).float().reshape(100, 1), torch.arange(100)
    ten, _ = image_subset(images, labels, 10, seed=3)
    fifty, fifty_labels = image_subset(images, labels, 50, seed=3)
    assert torch.equal(ten, fifty[:10]) and len(set(fifty_labels.tolist())) == 50  # nested, no repeats
    assert torch.equal(ten, image_subset(images, labels, 10, seed=3)[0])
    assert not torch.equal(ten, image_subset(images, labels, 10, seed=4)[0])
    with pytest.raises(ValueError, match="count=101: .* 100 images"):
        image_subset(images, labels, 101, seed=0)


def test_rate_grid_and_data_sizes_on_small_settings(small):
    settings, data, base = small
    data = replace(data, test_images=data.test_images[:1000], test_labels=data.test_labels[:1000])
    settings = replace(settings, finetune_steps=5)
    grid = rate_grid(settings, data, base, [1e-5, 1e-3], [0, 1])
    assert list(zip(grid.learning_rate, grid.seed, strict=True)) == [(1e-5, 0), (1e-5, 1), (1e-3, 0),
                                                                       (1e-3, 1)]
    assert list(grid) == ["learning_rate", "seed", "validation_target_wrong", "validation_others_accuracy",
                          "validation_score"]  # no test column
    assert grid.validation_score.between(0, 1).all()
    assert grid.validation_score[0] != grid.validation_score[2]  # the rate matters
    rows = data_size_runs(settings, data, base, [10, 20], [0, 1], full_rate=1e-4)
    assert list(zip(rows.seed, rows.images, rows.way, strict=True))[:4] == [
        (0, 10, "every weight"), (0, 10, "LoRA, rank 1"), (0, 20, "every weight"), (0, 20, "LoRA, rank 1")]
    assert rows.learning_rate[:2].tolist() == [1e-4, settings.finetune_lr]
    assert rows.others_accuracy.between(0, 1).all() and (rows.target_wrong >= 0).all()
