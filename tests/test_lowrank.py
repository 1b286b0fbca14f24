"""Why low rank: decompositions, energy shares, random baselines, verdicts, runs and measured costs."""

import math
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_tutorial import OversizedMLP, Settings, SettingsError, add_lora, lora_modules  # noqa: E402
from lora_tutorial.data import Mnist  # noqa: E402
from lora_tutorial.pipeline import finetune_key, pretrained_model, setup  # noqa: E402
from lora_tutorial.studies.lowrank import (  # noqa: E402
    CHANCE,
    TENSORS,
    adam_state_bytes,
    agreement_table,
    as_good,
    bias_deltas,
    both,
    chance_of_abs_cosine,
    check_image_counts,
    check_lora_ranks,
    check_ranks,
    check_rates,
    check_replay_share,
    compare,
    cut_rows,
    cut_verdicts,
    data_size_runs,
    data_size_table,
    decompose,
    decompose_lora,
    describe_data_sizes,
    direction_agreement,
    energy_shares,
    energy_table,
    full_runs,
    fully_trainable,
    image_subset,
    lora_ahead,
    lora_at_rank,
    lora_runs,
    measure_costs,
    plain_rows,
    plot_data_sizes,
    plot_energy,
    plot_rates,
    plot_seeds,
    random_abs_cosine,
    random_matrix_values,
    rate_grid,
    saved_bytes,
    seed_table,
    singular_values,
    step_times,
    summarize,
    top_direction_cosines,
    tune_rate,
    usable_counts,
    verdict,
    versus,
    weight_deltas,
    with_deltas,
)
from lora_tutorial.studies.stats import spread  # noqa: E402

PARAMETERS = 2_807_010


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# Decompositions -----------------------------------------------------------------------------

def test_energy_shares_grow_with_the_rank_and_reach_one_at_full_rank():
    torch.manual_seed(0)
    delta = torch.randn(40, 12) @ torch.diag(torch.linspace(3, 0.1, 12)) @ torch.randn(12, 30)
    values = singular_values(delta)
    assert len(values) == 30 and torch.all(values[:-1] >= values[1:])
    assert torch.allclose(values, torch.linalg.svdvals(delta.double()), atol=1e-6)
    shares = energy_shares(values, [1, 2, 4, 8, 12, 30, 64])
    assert all(a < b for a, b in zip(shares[:4], shares[1:5], strict=True))
    assert 0 < shares[0] < 1
    assert shares[4] == pytest.approx(1, abs=1e-9)  # a rank-12 product: only float rounding beyond 12
    assert shares[5:] == [1.0, 1.0]  # at full rank (30) and beyond it, exactly all
    assert sum(values ** 2) == pytest.approx(torch.linalg.matrix_norm(delta.double()) ** 2)
    assert energy_shares(torch.zeros(5), [1, 3]) == [1.0, 1.0]  # a zero update: nothing is left out
    with pytest.raises(ValueError, match=r"ranks=\[0\]"):
        energy_shares(values, [0])


@pytest.mark.parametrize("shape", [(50, 20), (20, 50)])  # tall and wide: either Gram matrix
def test_decompose_agrees_with_an_svd_and_its_cut_is_the_best_of_its_rank(shape):
    torch.manual_seed(1)
    delta = torch.randn(shape)
    piece = decompose(delta, keep=5)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    assert torch.allclose(piece.values, s, atol=1e-9)
    assert piece.u.shape == (shape[0], 5) and piece.v.shape == (shape[1], 5)
    for i in range(5):  # the same directions, each up to its sign
        assert abs(float(piece.u[:, i] @ u[:, i])) == pytest.approx(1, abs=1e-6)
        assert abs(float(piece.v[:, i] @ vh[i])) == pytest.approx(1, abs=1e-6)
    for rank in (1, 2, 5):
        cut = piece.truncated(rank)
        assert cut.shape == delta.shape and cut.dtype == torch.float32
        assert torch.linalg.matrix_rank(cut) <= rank
        # Eckart-Young: what is left out is exactly the energy of the singular values dropped
        left = torch.linalg.matrix_norm((delta - cut).double()) ** 2
        assert float(left) == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-4)
    with pytest.raises(ValueError, match="only the top 5 directions were kept"):
        piece.truncated(6)
    whole = decompose(delta, keep=20)
    assert torch.allclose(whole.truncated(64), delta, atol=1e-5)  # beyond its rank: the whole matrix


def test_a_zero_update_decomposes_without_dividing_by_zero():
    piece = decompose(torch.zeros(6, 4), keep=2)
    assert torch.count_nonzero(piece.values) == 0 and torch.isfinite(piece.u).all()
    assert torch.count_nonzero(piece.truncated(2)) == 0


def test_a_lora_update_decomposes_from_its_factors_alone():
    torch.manual_seed(2)
    model = OversizedMLP()
    add_lora(model, rank=3, alpha=2.0)
    for lora in lora_modules(model).values():
        torch.nn.init.normal_(lora.lora_B)
    for lora in lora_modules(model).values():
        mine, reference = decompose_lora(lora), decompose(lora.delta_weight().detach(), keep=3)
        assert len(mine.values) == 3
        assert torch.allclose(mine.values, reference.values[:3], rtol=1e-5)
        assert top_direction_cosines(mine, reference) == pytest.approx((1.0, 1.0), abs=1e-5)
        assert torch.allclose(mine.truncated(3), lora.delta_weight().detach(), atol=1e-4)


def test_top_direction_cosines_see_the_same_and_orthogonal_directions():
    u, v = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    big = 5 * torch.outer(u, v) + 0.1 * torch.outer(torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0, 0]))
    same = decompose(-2 * torch.outer(u, v), keep=1)
    assert top_direction_cosines(decompose(big, 1), same) == pytest.approx((1.0, 1.0))
    other_input = decompose(torch.outer(u, torch.tensor([0, 0, 0, 1.0])), keep=1)
    assert top_direction_cosines(decompose(big, 1), other_input) == pytest.approx((1.0, 0.0))


# Random yardsticks --------------------------------------------------------------------------

def random_unit_vectors(count, d, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, d, generator=generator, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("d", [10, 1000])
def test_the_random_cosine_level_matches_a_simulation_in_its_own_dimension(d):
    a, b = random_unit_vectors(4000, d, 0), random_unit_vectors(4000, d, 1)
    simulated = float((a * b).sum(dim=1).abs().mean())
    assert random_abs_cosine(d) == pytest.approx(simulated, rel=0.2)
    assert random_abs_cosine(d) == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=0.03)
    assert random_abs_cosine(10) > 10 * random_abs_cosine(2000)  # linear3's two sides differ tenfold
    assert random_abs_cosine(1) == pytest.approx(1.0)


@pytest.mark.parametrize("d, c", [(10, 0.5), (10, 0.9), (1000, 0.05), (2, 0.5)])
def test_the_chance_of_a_random_match_agrees_with_a_simulation(d, c):
    count = 40_000 if d <= 10 else 10_000
    a, b = random_unit_vectors(count, d, 2), random_unit_vectors(count, d, 3)
    simulated = float(((a * b).sum(dim=1).abs() >= c).double().mean())
    error = math.sqrt(simulated * (1 - simulated) / count)  # the simulation's own standard error
    assert chance_of_abs_cosine(c, d) == pytest.approx(simulated, abs=5 * error + 1e-3)
    assert chance_of_abs_cosine(0.0, d) == pytest.approx(1.0)
    assert chance_of_abs_cosine(1.0, d) == pytest.approx(0.0, abs=1e-9)
    assert chance_of_abs_cosine(0.3, 1) == 1.0


def test_a_random_matrix_spreads_its_energy_and_is_the_same_for_a_seed():
    values = random_matrix_values((10, 2000), seed=0)
    assert torch.equal(values, random_matrix_values((10, 2000), seed=0))
    top = energy_shares(values, [1])[0]
    assert 0.1 < top < 0.13  # about 11 % in the first of 10 directions, not "under 1 %"
    assert energy_shares(random_matrix_values((200, 100)), [1])[0] < 0.05


# Several seeds, one verdict -----------------------------------------------------------------

def test_verdicts_call_overlapping_ranges_a_tie_and_know_which_way_is_better():
    low, high, middle = spread([1, 2, 3]), spread([5, 6, 7]), spread([3, 5])
    assert verdict(low, high, higher_is_better=True) == "worse"
    assert verdict(low, high, higher_is_better=False) == "better"
    assert verdict(middle, low, True) == verdict(middle, high, True) == "tie"
    rows = [{"target_wrong": w, "others_accuracy": a, "cuts": [{"rank": 1, "target_wrong": w + 5,
                                                               "others_accuracy": a + 0.2}]}
            for w, a in ((10, 0.5), (12, 0.6))]
    assert compare(rows, rows) == {"target_wrong": "tie", "others_accuracy": "tie"}
    assert cut_verdicts(rows, 1) == {"target_wrong": "worse", "others_accuracy": "better"}
    assert not as_good(cut_verdicts(rows, 1)) and as_good({"a": "tie", "b": "better"})
    cuts = [row["cuts"][0] for row in rows]
    assert versus(rows, rows, "target_wrong", ("a", "b")) == "no difference detected at 2 seeds"
    assert both(rows, rows, ("a", "b"), 9) == "no difference detected at 2 seeds on either measure"
    assert versus(cuts, rows, "target_wrong", ("the cut", "the whole")) == (
        "the cut more wrong answers than the whole on every seed")
    assert versus(rows, cuts, "others_accuracy", ("the whole", "the cut")) == (
        "the cut higher accuracy than the whole on every seed")
    assert both(cuts, rows, ("the cut", "the whole"), 9) == (
        "digit 9: the cut more wrong answers than the whole on every seed; "
        "other digits: the cut higher accuracy than the whole on every seed")


# Checking the notebook's parameters ---------------------------------------------------------

def test_the_notebooks_ranks_and_replay_share_are_checked_with_the_fix():
    assert check_ranks("ranks", [8, 1, 2, 1]) == [1, 2, 8]
    for bad in ([], [0], [1.5], "1, 2", [True]):
        with pytest.raises(SettingsError, match=r"ranks=.* is not valid: expected a list of whole numbers"):
            check_ranks("ranks", bad)
    with pytest.raises(SettingsError, match=r"give a list with -y '\{ranks: \[1, 4\]\}'"):
        check_ranks("ranks", "[0, 2]")
    assert check_lora_ranks("lora_ranks", [4, 1, 10]) == [1, 4, 10]
    with pytest.raises(SettingsError, match=r"lora_ranks=\[1, 16\] is not valid: .*linear3 .* from 1 to 10"):
        check_lora_ranks("lora_ranks", [1, 16])
    settings = Settings()
    assert check_replay_share(settings, 0.3) == 0.3
    with pytest.raises(SettingsError, match=r"^full_replay_share=1.5 is not valid"):
        check_replay_share(settings, 1.5)
    with pytest.raises(SettingsError, match=r"full_replay_share=0 is not valid: .*e.g. 0.3"):
        check_replay_share(settings, 0)


# The models and what they cost --------------------------------------------------------------

def test_lora_at_a_rank_keeps_alpha_fixed_and_draws_a_from_the_fine_tuning_seed():
    base = OversizedMLP()
    settings = Settings(alpha=1.0, target_digit=9)
    model = lora_at_rank(settings, base, 4)
    assert {n: (m.rank, m.scale) for n, m in lora_modules(model).items()} == {
        "linear1": (4, 0.25), "linear2": (4, 0.25), "linear3": (4, 0.25)}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    again = lora_at_rank(settings, base, 4)
    other = lora_at_rank(replace(settings, finetune_seed=1), base, 4)
    a = lora_modules(model)["linear1"].lora_A
    assert torch.equal(a, lora_modules(again)["linear1"].lora_A)
    assert not torch.equal(a, lora_modules(other)["linear1"].lora_A)


def test_deltas_of_a_lora_model_are_its_low_rank_update_and_go_back_on_exactly():
    torch.manual_seed(0)
    base = OversizedMLP()
    tuned = lora_at_rank(Settings(target_digit=9), base, 3)
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


def test_measured_costs_follow_what_trains():
    base = OversizedMLP()
    full = fully_trainable(base)
    lora = OversizedMLP()
    add_lora(lora)
    for name, p in lora.named_parameters():
        p.requires_grad_("lora_" in name)
    # Adam: two float32 running averages per trained number, plus a small step count per tensor
    for model, trained in ((full, PARAMETERS), (lora, 6_794)):
        assert 8 * trained <= adam_state_bytes(model) <= 8 * trained + 64 * 6
    assert 4 * PARAMETERS < saved_bytes(full) < 4 * PARAMETERS + 4096
    assert 4 * 6_794 < saved_bytes(lora) < 4 * 6_794 + 4096
    record = {"what": "the settings 05 records", "rank": 1}
    assert saved_bytes(lora, record) > saved_bytes(lora)  # the record is part of the file
    assert all(p.requires_grad for p in full.parameters())


def test_step_times_split_each_step_and_leave_the_models_as_they_were():
    torch.manual_seed(0)
    base = OversizedMLP()
    full = fully_trainable(base)
    lora = lora_at_rank(Settings(target_digit=9), base, 1)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    images, labels = torch.randn(30, 28, 28), torch.randint(0, 10, (30,))
    times = step_times({"full": full, "lora": lora}, images, labels, batch_size=10, lr=1e-3, steps=3,
                       warmup=1)
    assert set(times) == {"full", "lora"}
    assert all(set(t) == {"forward_backward", "adam"} and min(t.values()) > 0 for t in times.values())
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in before.items())
    assert torch.count_nonzero(lora_modules(lora)["linear1"].lora_B) == 0  # still untrained


# Real runs, tiny ----------------------------------------------------------------------------

def test_full_and_lora_runs_on_small_settings(small_settings):
    device, data = setup(small_settings, verbose=False)
    base = pretrained_model(small_settings, data, device, verbose=False).model
    data = replace(data, test_images=data.test_images[:2000], test_labels=data.test_labels[:2000])  # quick
    settings = replace(small_settings, finetune_steps=10)
    full = full_runs(settings, data, base, [0, 1], [1, 4])
    assert [row["seed"] for row in full] == [0, 1] and all(row["seconds"] > 0 for row in full)
    assert [cut["rank"] for cut in full[0]["cuts"]] == [1, 4]
    assert full[0]["pieces"]["linear1"].u.shape == (1000, 4)  # the top max(ranks) directions kept
    assert not torch.equal(full[0]["pieces"]["linear2"].values, full[1]["pieces"]["linear2"].values)
    for row in full:
        assert row["learning_rate"] == settings.finetune_lr
        assert set(row["biases"]) == {"linear1", "linear2", "linear3"}
        assert float(row["biases"]["linear3"].abs().sum()) > 0  # every weight trains, the biases too
        for cut in row["cuts"]:
            assert set(cut) == {"rank", "target_wrong", "others_accuracy", "accuracy"}
            assert 0 <= cut["others_accuracy"] <= 1
    lora = lora_runs(settings, data, base, 1, [0, 1])
    assert [len(row["pieces"]["linear2"].values) for row in lora] == [1, 1]
    assert all(0 < row["a_moved"]["linear1"] < 1 for row in lora)  # A moves, a little
    for row in lora:  # A before and after, as 08 draws them; the moved share is theirs
        start, end = row["a_start"]["linear1"], row["a_end"]["linear1"]
        assert start.shape == end.shape == (1, 784)
        assert float((end - start).norm() / start.norm()) == pytest.approx(row["a_moved"]["linear1"])
        assert row["predictions"].shape == data.test_labels.shape and row["predictions"].dtype == torch.int64
    assert all(not set(TENSORS) & set(row) for row in plain_rows(lora))  # the JSON holds no tensors
    agreement = direction_agreement(lora, full)
    assert agreement["linear3"]["output"]["dimensions"] == 10
    assert agreement["linear3"]["input"]["dimensions"] == 2000
    assert agreement["linear3"]["output"]["random"] == pytest.approx(random_abs_cosine(10))
    assert all(0 <= c <= 1 for c in agreement["linear1"]["output"]["cosines"])
    for row in agreement.values():  # a count of seeds above chance, one chance per seed
        for side in ("output", "input"):
            assert len(row[side]["chances"]) == 2
            assert row[side]["above_chance"] == sum(p < CHANCE for p in row[side]["chances"])
    costs = measure_costs(settings, data, {"every weight": fully_trainable(base),
                                           "LoRA, rank 1": lora_at_rank(settings, base, 1)}, steps=2)
    assert [row["trainable"] for row in costs] == [PARAMETERS, 6_794]
    assert costs[1]["file_bytes"] == saved_bytes(lora_at_rank(settings, base, 1),
                                                 finetune_key(replace(settings, rank=1), data))
    random = {name: random_matrix_values((piece.u.shape[0], piece.v.shape[0]))
              for name, piece in full[0]["pieces"].items()}
    sizes = [{"way": way, "images": 10, "seed": seed, "target_wrong": w, "others_accuracy": a}
             for way, w, a in (("every weight", 3, 0.9), ("LoRA, rank 1", 9, 0.95)) for seed in (0, 1)]
    table = energy_table({"plain": full}, random, [1, 4, 16]).splitlines()
    linear3 = table[table.index("linear3 (10 x 2,000)") + 1:]
    assert linear3[0].split()[-1] == "—" and linear3[1].split()[-1] == "—"  # r = 16 > 10: trivially all
    assert "—" not in "\n".join(table[:table.index("linear3 (10 x 2,000)")])
    summary = summarize({"plain": full}, random, {1: lora}, agreement, costs, sizes, 9)
    assert summary.count("\n- ") == 5
    assert ("**Is rank 1 enough** to do the whole update's job? Its cut (rank-1 delta W plus delta b) "
            "against the whole update, plain: ") in summary
    assert "times the optimizer state" in summary and "bare trained weights" in summary
    assert ("Seeds on which LoRA's top direction matches the plain update's above chance: output side "
            "linear1 ") in summary
    assert summary.endswith("Fewer images, LoRA, rank 1 against every weight. 10 images: digit 9: LoRA "
                            "more wrong answers than every weight on every seed; other digits: LoRA higher "
                            "accuracy than every weight on every seed. LoRA is ahead at 10 images.")


def test_the_agreement_table_counts_the_seeds_above_chance():
    side = {"cosines": [0.9, 0.8, 0.01], "dimensions": 10, "random": 0.26, "chances": [0.0, 0.0, 0.9],
            "above_chance": 2}
    table = agreement_table({"linear3": {"output": side, "input": side, "a_moved": [0.01, 0.02, 0.03]}})
    assert "above chance" in table.splitlines()[0]
    assert table.splitlines()[2].count("2 of 3") == 2  # one seed's bad luck does not hide the other two


# Figures ------------------------------------------------------------------------------------

def tiny_pair(seed=0):
    """A tiny 784 -> 8 -> 10 network and a copy whose weights and biases all moved."""
    torch.manual_seed(seed)
    before = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.ReLU(),
                                 torch.nn.Linear(8, 10))
    after = fully_trainable(before)
    with torch.no_grad():
        for p in after.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return before, after


def tiny_data(count=200):
    images, labels = torch.randn(count, 28, 28), torch.arange(count) % 10
    return Mnist(images, labels, images.clone(), labels.clone(), "sample", "tiny")


def test_the_cut_is_rank_r_delta_w_plus_the_whole_delta_b():
    before, after = tiny_pair()
    deltas, biases = weight_deltas(before, after), bias_deltas(before, after)
    assert list(biases) == ["1", "3"] and biases["3"].shape == (10,)
    pieces = {name: decompose(delta, keep=8) for name, delta in deltas.items()}
    images = torch.randn(16, 28, 28)
    whole = with_deltas(before, {n: p.truncated(8) for n, p in pieces.items()}, biases)
    assert torch.allclose(whole(images), after(images), atol=1e-4)  # full rank + delta b: the whole update
    cut = with_deltas(before, {n: p.truncated(1) for n, p in pieces.items()}, biases)
    for name, layer in cut.named_children():
        if isinstance(layer, torch.nn.Linear):
            assert torch.equal(layer.bias, dict(after.named_children())[name].bias)  # the fine-tuned biases
            moved = layer.weight - dict(before.named_children())[name].weight
            assert torch.linalg.matrix_rank(moved) == 1
    unbiased = with_deltas(before, {n: p.truncated(8) for n, p in pieces.items()})
    assert torch.equal(unbiased[3].bias, before[3].bias)  # without `biases` the pre-trained ones stay
    assert not torch.allclose(unbiased(images), after(images), atol=1e-3)
    # cut_rows tests the cut with delta b: at full rank it answers as the fine-tuned network does
    with torch.no_grad():
        after[3].bias[3] += 100.0  # a bias change alone that makes every answer a 3
    biases = bias_deltas(before, after)
    data, settings = tiny_data(), Settings(target_digit=3)
    rows = cut_rows(settings, before, pieces, data, [1, 8], biases)
    assert [row["rank"] for row in rows] == [1, 8]
    assert all(row["target_wrong"] == 0 and row["others_accuracy"] == 0 for row in rows)
    without = cut_rows(settings, before, pieces, data, [8])
    assert without[0]["others_accuracy"] > 0


# Tuning the full fine-tune and fewer images -------------------------------------------------

def test_rates_and_image_counts_are_checked_with_the_fix():
    assert check_rates("full_learning_rates", [1e-3, 1e-4, 1e-4]) == [1e-4, 1e-3]
    for bad in ([], [0], [-1e-3], [float("nan")], "1e-3", [True]):
        with pytest.raises(SettingsError, match=r"full_learning_rates=.* is not valid: .*e.g. \[3e-5"):
            check_rates("full_learning_rates", bad)
    assert check_image_counts("image_counts", [500, 10, 50]) == [10, 50, 500]
    with pytest.raises(SettingsError, match=r"image_counts=\[0\] is not valid"):
        check_image_counts("image_counts", [0])


def test_tune_rate_takes_the_best_mean_validation_score_and_flags_an_edge():
    rows = [{"learning_rate": lr, "seed": s, "validation_score": score + 0.01 * s}
            for lr, score in ((1e-4, 0.90), (3e-4, 0.95), (1e-3, 0.80)) for s in range(3)]
    tuned = tune_rate(rows)
    assert tuned.learning_rate == 3e-4 and not tuned.at_edge
    assert tuned.means[1e-3] == pytest.approx(0.81)
    assert tune_rate([r for r in rows if r["learning_rate"] != 3e-4]).at_edge
    assert "test_score" not in str(rows)  # nothing but validation columns is read
    with pytest.raises(ValueError, match="at least one run"):
        tune_rate([])


def test_image_subsets_are_fixed_per_seed_and_nested():
    images, labels = torch.arange(100).float().reshape(100, 1), torch.arange(100)
    ten, _ = image_subset(images, labels, 10, seed=3)
    fifty, fifty_labels = image_subset(images, labels, 50, seed=3)
    assert torch.equal(ten, fifty[:10]) and len(set(fifty_labels.tolist())) == 50  # nested, no repeats
    assert torch.equal(ten, image_subset(images, labels, 10, seed=3)[0])  # fixed for a seed
    assert not torch.equal(ten, image_subset(images, labels, 10, seed=4)[0])
    with pytest.raises(ValueError, match="count=101: expected from 1 to the 100 images"):
        image_subset(images, labels, 101, seed=0)


def test_rate_grid_and_data_sizes_on_small_settings(small_settings):
    device, data = setup(small_settings, verbose=False)
    base = pretrained_model(small_settings, data, device, verbose=False).model
    data = replace(data, test_images=data.test_images[:1000], test_labels=data.test_labels[:1000])
    settings = replace(small_settings, finetune_steps=5)
    grid = rate_grid(settings, data, base, [1e-5, 1e-3], [0, 1])
    assert [(r["learning_rate"], r["seed"]) for r in grid] == [(1e-5, 0), (1e-5, 1), (1e-3, 0), (1e-3, 1)]
    assert all(0 < r["validation_score"] <= 1 and "target_wrong" not in r for r in grid)  # no test column
    assert grid[0]["validation_score"] != grid[2]["validation_score"]  # the rate matters
    kept, dropped = usable_counts([10, 50, 100_000], data, 9)
    assert kept == [10, 50] and dropped == [100_000]
    rows = data_size_runs(settings, data, base, [10, 20], [0, 1], full_rate=1e-4)
    assert [(r["seed"], r["images"], r["way"]) for r in rows][:4] == [
        (0, 10, "every weight"), (0, 10, "LoRA, rank 1"), (0, 20, "every weight"), (0, 20, "LoRA, rank 1")]
    assert [r["learning_rate"] for r in rows[:2]] == [1e-4, settings.finetune_lr]
    assert all(0 <= r["others_accuracy"] <= 1 and r["target_wrong"] >= 0 for r in rows)
    table = data_size_table(rows, 9)
    assert list(table.index) == ["10 images, every weight", "10 images, LoRA, rank 1",
                                 "20 images, every weight", "20 images, LoRA, rank 1"]
    assert set(table["seeds"]) == {2}


# Figures ------------------------------------------------------------------------------------

def test_the_seed_figures_show_one_point_per_seed_and_follow_the_rules():
    from test_figure_rules import figure_problems  # the rules every figure follows

    before = {"target_wrong": 97, "others_accuracy": 0.96}
    groups = {"whole": [{"target_wrong": w, "others_accuracy": 0.9} for w in (1, 2, 3, 4, 5)],
              "cut": [{"target_wrong": w, "others_accuracy": 0.95} for w in (2, 3, 4, 5, 6)]}
    fig = plot_seeds(groups, before, 9, "A title")
    left = fig.axes[0]
    assert sum(len(c.get_offsets()) for c in left.collections if c.get_offsets().ndim == 2
               and len(c.get_offsets()) == 5) == 10  # five points for each of the two groups
    assert figure_problems(fig) == []
    table = seed_table(groups, 9)
    assert table.loc["cut", "digit 9 wrong"] == "4.0 (2.0-6.0)"
    assert table.loc["whole", "other digits %"] == "90.0 (90.0-90.0)"
    grid = [{"learning_rate": lr, "seed": s, "validation_score": 0.9 + 0.01 * s} for lr in (1e-4, 1e-3)
            for s in range(5)]
    assert figure_problems(plot_rates({"plain": grid}, {"plain": tune_rate(grid)})) == []
    sizes = [{"way": way, "images": n, "seed": s, "target_wrong": s, "others_accuracy": 0.9}
             for n in (10, 50) for way in ("every weight", "LoRA, rank 1") for s in range(5)]
    assert figure_problems(plot_data_sizes(sizes, before, 9)) == []


def test_the_energy_figure_draws_a_curve_per_seed():
    from test_figure_rules import figure_problems  # the rules every figure follows

    class Piece:
        def __init__(self, values):
            self.values = values

    torch.manual_seed(0)
    runs = {"plain": [{"pieces": {"a": Piece(torch.rand(20).sort(descending=True).values)}}
                      for _ in range(5)]}
    fig = plot_energy(runs, {"a": random_matrix_values((30, 20))})
    assert len(fig.axes[0].get_lines()) == 6  # five seeds and the random matrix
    assert fig.axes[0].get_lines()[0].get_ydata()[-1] == pytest.approx(1.0)
    assert figure_problems(fig) == []


def test_lora_is_ahead_only_where_its_seeds_beat_every_seed_of_every_weight():
    def rows(way, count, wrong, others):
        return [{"way": way, "images": count, "seed": s, "target_wrong": w, "others_accuracy": others}
                for s, w in enumerate(wrong)]

    sizes = (rows("every weight", 10, [30, 35], 0.95) + rows("LoRA, rank 1", 10, [50, 60], 0.93)
             + rows("every weight", 50, [30, 35], 0.95) + rows("LoRA, rank 1", 50, [10, 20], 0.90)
             + rows("every weight", 500, [30, 35], 0.95) + rows("LoRA, rank 1", 500, [32, 40], 0.95))
    assert lora_ahead(sizes) == [50]
    text = describe_data_sizes(sizes, 9)
    assert "500 images: no difference detected at 2 seeds on either measure" in text
    assert text.endswith("LoRA is ahead at 50 images.")
    behind = [r for r in sizes if r["images"] != 50]
    assert describe_data_sizes(behind, 9).endswith("LoRA is ahead at no count, so these runs do not support "
                                                   "the claim that it needs fewer data.")
