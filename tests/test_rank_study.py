"""07's rank study: the scaling rules, the summaries over seeds, choices (the rank, each rule's learning
rate) made on the validation images only, fine-tuning that never sees the validation or test images,
the per-seed plots, and the notebook in small settings."""

import json
import math

import nbformat
import pandas as pd
import pytest
import torch

from lora_tutorial import LoRAParametrization, OversizedMLP, Settings, lora_modules, pipeline, predict
from lora_tutorial.data import Mnist
from lora_tutorial.pipeline import lora_copy
from lora_tutorial.settings import SettingsError
from lora_tutorial.studies import rank_study as study
from lora_tutorial.studies.stats import check_rates, check_seeds


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_the_three_scaling_rules_give_the_factor_they_are_named_for(rank, alpha):
    written = {"alpha fixed": alpha / rank, "alpha = r": alpha, "rsLoRA": alpha / math.sqrt(rank)}
    assert list(study.SCALINGS) == list(written)
    for rule, expected in written.items():
        built = LoRAParametrization(784, 1000, **study.lora_arguments(rule, rank, alpha))  # what LoRA uses
        assert built.rank == rank
        assert built.scale == pytest.approx(expected)
        assert study.scale_of(rule, rank, alpha) == pytest.approx(expected)
    if alpha == 1.0:  # the post's alpha: "alpha = r" is literally alpha = r, scale 1
        assert study.lora_arguments("alpha = r", rank)["alpha"] == rank
    if rank == 1:  # one and the same run under every rule
        assert study.lora_arguments("alpha fixed", 1, alpha) == study.lora_arguments("alpha = r", 1, alpha)
        assert {study.Config(r, 1).run_as() for r in study.SCALINGS} == {study.Config("alpha fixed", 1)}


def fake_row(config, seed, validation, test, norm=1.0, learning_rate=1e-3):
    """A run's row as `run_study` writes it: (target wrong, other digits' accuracy) per split, with
    1,000 images of the target digit."""
    row = {"scaling": config.scaling, "rank": config.rank, "init": config.init, "seed": seed,
           "learning_rate": config.learning_rate or learning_rate,
           "scale": study.scale_of(config.scaling, config.rank), "trainable": 6_794 * config.rank}
    for split, (wrong, others) in (("validation", validation), ("test", test)):
        row.update({f"{split}_target_wrong": wrong, f"{split}_target_error_rate": wrong / 1000,
                    f"{split}_others_accuracy": others, f"{split}_accuracy": others,
                    f"{split}_score": (1 - wrong / 1000 + others) / 2})
    return {**row, **{f"delta_norm_{n}": norm for n in ("linear1", "linear2", "linear3")}}


SEEDS = range(5)


def test_the_summary_has_every_seed_and_the_spread_of_each_column():
    configs = [study.Config(rule, r) for rule in study.SCALINGS for r in (1, 2)]
    runs = pd.DataFrame([fake_row(c, seed, (10 + seed + c.rank, 0.90), (20 - seed, 0.89), norm=seed + 1.0)
                         for c in {c.run_as() for c in configs} for seed in SEEDS])
    table = study.summary(runs, configs).set_index(["name", "measure"])
    assert list(table.index.unique("name")) == [c.name for c in configs]
    assert (table.seeds == 5).all()
    for c in configs:
        low = 10 + c.rank
        assert table.loc[(c.name, "validation_target_wrong"), ["mean", "low", "high"]].tolist() == [
            low + 2, low, low + 4]
        assert table.loc[(c.name, "test_target_wrong"), ["mean", "low", "high"]].tolist() == [18, 16, 20]
        assert table.loc[(c.name, "delta_norm_linear2"), ["mean", "low", "high"]].tolist() == [3, 1, 5]
    rank1 = [table.loc[c.name] for c in configs if c.rank == 1]
    assert len(rank1) == 3 and all(r.equals(rank1[0]) for r in rank1)  # the one shared rank-1 run


def test_runs_at_several_learning_rates_are_kept_apart():
    config = study.Config("rsLoRA", 2)
    runs = pd.DataFrame([fake_row(config, seed, (5, 0.9), (5, 0.9), learning_rate=lr)
                         for lr in (1e-3, 3e-3) for seed in SEEDS])
    fast = study.runs_of(runs, study.Config("rsLoRA", 2, learning_rate=3e-3))
    assert list(fast.seed) == list(SEEDS) and set(fast.learning_rate) == {3e-3}
    with pytest.raises(ValueError, match="several learning rates"):
        study.runs_of(runs, config)  # which rate is meant is ambiguous: refused, not mixed
    with pytest.raises(ValueError, match="No runs of rsLoRA, rank 2, lr 0.01"):
        study.runs_of(runs, study.Config("rsLoRA", 2, learning_rate=1e-2))


def rank_runs(table: dict) -> pd.DataFrame:
    """Per-seed runs of "alpha fixed" ranks from {rank: (validation per seed, test per seed)}, each a
    list of (target wrong, other digits' accuracy)."""
    return pd.DataFrame([fake_row(study.Config("alpha fixed", rank), seed, v, t)
                         for rank, (validation, test) in table.items()
                         for seed, (v, t) in enumerate(zip(validation, test, strict=True))])


def strip_test(runs):
    return runs.drop(columns=[c for c in runs if c.startswith("test_")])


def rank_configs(ranks):
    return [study.Config("alpha fixed", r, "normal", 1e-3) for r in ranks]


def test_the_rank_is_chosen_on_the_validation_images_alone():
    # validation: rank 2 clearly best (fewest errors, same other digits); test: rank 4 would be
    table = {1: ([(30, 0.93)] * 5, [(30, 0.93)] * 5),
             2: ([(5, 0.93), (6, 0.93), (7, 0.93), (6, 0.93), (5, 0.93)], [(40, 0.90)] * 5),
             4: ([(20, 0.93)] * 5, [(1, 0.95)] * 5)}
    runs, configs = rank_runs(table), rank_configs([1, 2, 4])
    choice = study.choose_rank(runs, configs)
    assert (choice.rank, choice.best) == (2, 2)
    assert choice.scores[2].mean == pytest.approx(100 * (1 - 0.0058 + 0.93) / 2)
    assert study.choose_rank(strip_test(runs), configs) == choice  # the test columns are never read


def test_a_smaller_rank_whose_scores_overlap_the_best_is_kept():
    table = {1: ([(40, 0.93)] * 5, [(0, 0)] * 5),  # clearly worse
             2: ([(9, 0.93), (10, 0.92), (11, 0.94), (10, 0.93), (10, 0.93)], [(0, 0)] * 5),
             4: ([(8, 0.93), (9, 0.935), (10, 0.94), (9, 0.93), (9, 0.93)], [(0, 0)] * 5),  # best mean
             8: ([(1, 0.80)] * 5, [(0, 0)] * 5)}  # fixes the digit, forgets far more: a low score
    choice = study.choose_rank(rank_runs(table), rank_configs([8, 4, 2, 1]))  # any order
    assert (choice.rank, choice.best, choice.wins, choice.shared) == (2, 4, 5, 5)


def test_the_learning_rate_is_tuned_on_the_validation_score_alone():
    config = study.Config("alpha = r", 4)
    # validation: 3e-4 best; test: 1e-3 would be
    per_rate = {1e-4: ((30, 0.95), (30, 0.95)), 3e-4: ((5, 0.95), (20, 0.95)), 1e-3: ((5, 0.80), (0, 0.99))}
    runs = pd.DataFrame([fake_row(config, seed, (v[0] + seed, v[1]), t, learning_rate=lr)
                         for lr, (v, t) in per_rate.items() for seed in SEEDS])
    tuned = study.tune_learning_rate(runs, "alpha = r", 4, [1e-3, 1e-4, 3e-4])
    assert tuned.learning_rate == 3e-4 and list(tuned.means) == [1e-4, 3e-4, 1e-3]
    assert tuned.means[3e-4] == pytest.approx(100 * (1 - 0.007 + 0.95) / 2)  # mean of 5-9 wrong: 7
    assert tuned.config == study.Config("alpha = r", 4, "normal", 3e-4)
    assert study.tune_learning_rate(strip_test(runs), "alpha = r", 4, [1e-4, 3e-4, 1e-3]) == tuned
    with pytest.raises(ValueError, match="No runs of alpha = r, rank 4, lr 0.003"):
        study.tune_learning_rate(runs, "alpha = r", 4, [1e-3, 3e-3])


def test_seeds_are_paired_when_one_configuration_is_higher_on():
    runs = rank_runs({1: ([(10, 0.9), (10, 0.9), (10, 0.9)], [(0, 0)] * 3),
                      2: ([(9, 0.9), (11, 0.9), (8, 0.9)], [(0, 0)] * 3)})
    assert study.higher_on(runs, *rank_configs([2, 1])) == (2, 3)  # seeds 0 and 2
    assert study.higher_on(runs, *rank_configs([1, 2])) == (1, 3)


def test_the_notebooks_figures_show_every_seed_and_follow_the_figure_rules():
    """07's figure and table helpers (one cell of the notebook), run on sample runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection
    from test_figure_rules import figure_problems

    from lora_tutorial.tools.run import notebooks_dir

    cell = next(c.source for c in nbformat.read(notebooks_dir() / "07_rank_sweep.ipynb", as_version=4).cells
                if "def plot_seeds" in c.source)
    runs = rank_runs({1: ([(9 + s, 0.9) for s in SEEDS], [(8 + s, 0.9) for s in SEEDS]),
                      2: ([(5 + s, 0.9) for s in SEEDS], [(4 + s, 0.9) for s in SEEDS])})
    before = pd.Series({f"{s}_{m}": 0.5 for s in ("validation", "test")
                        for m in ("score", "target_wrong", "others_accuracy")})
    space = {"digit": 9, "before": before, "study": study}
    exec(cell, space)
    groups = {f"rank {r}": study.runs_of(runs, c) for r, c in zip((1, 2), rank_configs([1, 2]), strict=True)}
    fig = space["plot_seeds"](groups, "t", "rank")
    assert figure_problems(fig) == []
    points = [len(c.get_offsets()) for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert points == [5, 5, 5, 5]  # two splits x two ranks, one point per seed
    grid = pd.DataFrame([fake_row(study.Config(rule, 4), s, (5 + s, 0.9), (0, 0), learning_rate=lr)
                         for rule in study.SCALINGS for lr in (1e-3, 3e-3) for s in SEEDS])
    tuned = [study.tune_learning_rate(grid, rule, 4, [1e-3, 3e-3]) for rule in study.SCALINGS]
    fig = space["plot_learning_rates"](grid, tuned, "t")
    assert figure_problems(fig) == []
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 3 * 2 * 5 + 3  # seeds, rings
    plt.close("all")
    table = space["seed_table"]({"rank 2": groups["rank 2"]})
    assert table.loc["rank 2", "digit 9 wrong"] == "6.0 (4.0-8.0)"  # mean (min-max), test images
    assert table.loc["rank 2", "scale"] == "0.5" and table.loc["rank 2", "seeds"] == 5


def id_coded_mnist(count: int = 600) -> Mnist:
    """Images whose first pixel is their index (training) or 10,000 + index (test): where every image
    that reaches training or evaluation came from can be read off it."""
    train = torch.zeros(count, 28, 28)
    train[:, 0, 0] = torch.arange(count, dtype=torch.float32)
    test = torch.zeros(100, 28, 28)
    test[:, 0, 0] = 10_000 + torch.arange(100, dtype=torch.float32)
    labels = torch.arange(count) % 10
    return Mnist(train, labels, test, torch.arange(100) % 10, "sample", "id-coded images")


def test_fine_tuning_never_sees_the_validation_or_test_images(monkeypatch):
    data = id_coded_mnist()
    trained, judged = [], {}
    real_train, real_judge = pipeline.train, study.Judge.__init__

    def spy_train(model, images, labels, **kwargs):
        trained.append(images[:, 0, 0].long().tolist())
        return real_train(model, images, labels, **kwargs)

    def spy_judge(self, base, images):
        judged.update({split: x[:, 0, 0].long().tolist() for split, (x, _) in images.items()})
        real_judge(self, base, images)

    monkeypatch.setattr(pipeline, "train", spy_train)
    monkeypatch.setattr(study.Judge, "__init__", spy_judge)
    settings = Settings(target_digit=9, finetune_steps=3, download=False)
    torch.manual_seed(0)
    runs = study.run_study(settings, data, OversizedMLP(), [study.Config("rsLoRA", 2)], [1], progress=False)
    row = runs.iloc[0]
    validation = set(data.validation.nonzero().flatten().tolist())
    fit = set(range(len(data.train_labels))) - validation
    nines = {i for i in range(len(data.train_labels)) if i % 10 == 9}
    assert len(validation) == 100 and len(trained) == 1  # one in six
    assert set(trained[0]) == fit & nines  # every fit image of the target digit, and nothing else
    assert not set(trained[0]) & validation
    assert list(judged) == ["validation", "test"]
    assert sorted(judged["validation"]) == sorted(validation)  # judged on exactly the validation images...
    assert judged["test"] == list(range(10_000, 10_100))  # ... and on the test images
    assert len(runs) == 1 and row["seed"] == 1 and row["scale"] == pytest.approx(1 / math.sqrt(2))
    assert row["learning_rate"] == settings.learning_rate
    for split in ("validation", "test"):
        assert row[f"{split}_score"] == pytest.approx(
            (1 - row[f"{split}_target_error_rate"] + row[f"{split}_others_accuracy"]) / 2)
    assert 0 <= row["validation_target_wrong"] <= 10 and 0 <= row["test_target_wrong"] <= 10


@pytest.mark.parametrize("targets", [None, ["linear2", "linear3"]])
def test_the_judge_predicts_what_evaluate_predicts(targets):
    """The judge adds the first layer's low-rank term to a product computed once; same answers."""
    torch.manual_seed(0)
    base = OversizedMLP()
    images = {"validation": (torch.randn(300, 28, 28), torch.arange(300) % 10),
              "test": (torch.randn(200, 28, 28), torch.arange(200) % 10)}
    model = lora_copy(base, 1, rank=2, alpha=4.0, target_modules=targets, use_rslora=True)
    for lora in lora_modules(model).values():
        torch.nn.init.normal_(lora.lora_B, std=0.05)  # an update as large as training makes
    judge = study.Judge(base, images)
    changed = 0
    for split, (x, _) in images.items():
        assert torch.equal(judge.predict(model, split), predict(model, x))
        changed += int((predict(model, x) != predict(base, x)).sum())
    assert changed > 50  # the adapter does change the answers: the test would see a judge that ignored it
    assert judge.measure(model, 9) == study.measure(model, 9, images).to_dict()


def refusal(check, *args, **kwargs) -> str:
    with pytest.raises(SettingsError) as refused:
        check(*args, **kwargs)
    return str(refused.value)


def test_ranks_are_checked_before_any_work():
    assert study.check_ranks(Settings(), [8, 1, 2, 2]) == [1, 2, 8]
    msg = refusal(study.check_ranks, Settings(), [1, 16])  # the settings' own check, per rank
    assert "ranks=[1, 16]" in msg and "rank=16" in msg and "<= 10" in msg and "target_modules=" in msg
    assert study.check_ranks(Settings(target_modules=["linear1", "linear2"]), [1, 16]) == [1, 16]
    assert "ranks='1 2'" in refusal(study.check_ranks, Settings(), "1 2")
    msg = refusal(study.check_ranks, Settings(), [4, 4])
    assert "ranks=[4, 4]" in msg and "2 different ranks" in msg and "[1, 8]" in msg


def test_a_grid_of_learning_rates_is_checked_once_for_every_notebook():
    """07 (two rates at least), 08 and 12 (one) share `check_rates`: numbers between 0 and 1."""
    assert check_rates("learning_rates", [1e-3, 3e-4, 1e-3], at_least=2) == [3e-4, 1e-3]
    assert check_rates("coarse_rates", [1e-2]) == [1e-2]
    for bad in ([], [0], [-1e-3], [float("nan")], [1e-3, 1.0], [1e-3, "3e-3"], "1e-3 3e-3", [True]):
        msg = refusal(check_rates, "full_learning_rates", bad)
        assert f"full_learning_rates={bad!r}" in msg and "between 0 and 1" in msg and "[3e-4, 1e-3" in msg
    msg = refusal(check_rates, "learning_rates", [1e-3, 1e-3], at_least=2)
    assert "learning_rates=[0.001, 0.001]" in msg and "2 different at least" in msg


def test_seeds_are_checked_under_the_name_the_reader_gave():
    """07, 08 and 12 check `seeds` and `tuning_seeds` alike; the message names the one that is wrong."""
    assert check_seeds([0, 1, 2, 3, 4], at_least=5) == [0, 1, 2, 3, 4]
    for bad in ([], [0, 0], [-1], [0.5], "0 1"):
        msg = refusal(check_seeds, bad, name="tuning_seeds")
        assert msg.startswith(f"tuning_seeds={bad!r} is not valid") and "[0, 1, 2]" in msg
    msg = refusal(check_seeds, [0, 1], at_least=5)
    assert msg.startswith("seeds=[0, 1] is not valid: expected a list of at least 5")


def test_a_scaling_rule_is_one_of_three():
    msg = refusal(study.check_scaling, "alpha / r")
    assert "scaling='alpha / r'" in msg and "'rsLoRA'" in msg
    with pytest.raises(SettingsError, match="scaling=None"):
        study.lora_arguments(None, 2)  # every use of a rule checks it


def test_run_study_reuses_what_it_has_and_runs_each_learning_rate(monkeypatch):
    data = id_coded_mnist()
    settings = Settings(target_digit=9, finetune_steps=2, download=False)
    torch.manual_seed(0)
    base = OversizedMLP()
    configs = [study.Config(rule, r, "normal", lr) for rule in study.SCALINGS for r in (1, 2)
               for lr in (1e-3, 3e-3)]
    runs = study.run_study(settings, data, base, configs, [0, 1], progress=False)
    # rank 1 once per rate, rank 2 under three rules per rate; two seeds each
    assert len(runs) == 2 * (1 + 3) * 2
    assert set(runs.learning_rate) == {1e-3, 3e-3} and runs.validation_target_wrong.dtype.kind == "i"
    monkeypatch.setattr(study, "fine_tune", lambda *a: pytest.fail("re-ran a run"))
    again = study.run_study(settings, data, base, configs, [0, 1], done=runs, progress=False)
    pd.testing.assert_frame_equal(again, runs)
    with pytest.raises(pytest.fail.Exception):  # a seed not yet run is run
        study.run_study(settings, data, base, configs, [0, 1, 2], done=runs, progress=False)


@pytest.mark.slow
def test_the_notebook_in_small_settings(tmp_path, shared_checkpoints, monkeypatch):
    """07 on 2,000 of the offline sample's training images (its 1,000 test images: evaluating full
    MNIST's 10,000 was most of the time), 10 steps, ranks 1 and 2, five seeds, two learning rates:
    it runs and writes its JSON. nbval runs the committed 07 on full MNIST."""
    from figure_check import execute

    from lora_tutorial.data import DATA_ENV
    from lora_tutorial.tools.run import notebooks_dir

    monkeypatch.delenv(DATA_ENV, raising=False)  # the kernel finds no MNIST folder
    out = tmp_path / "out"
    parameters = {"train_samples": 2000, "download": False, "finetune_steps": 10, "ranks": [1, 2],
                  "seeds": [0, 1, 2, 3, 4], "learning_rates": [1e-3, 3e-3], "output_dir": str(out),
                  "checkpoint_dir": shared_checkpoints}
    executed = tmp_path / "07_rank_sweep.ipynb"
    execute(notebooks_dir() / "07_rank_sweep.ipynb", executed, parameters, notebooks_dir())  # figures checked
    nb = nbformat.read(executed, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    report = json.loads((out / "rank_study.json").read_text())
    assert report["ranks"] == [1, 2] and report["seeds"] == [0, 1, 2, 3, 4]
    assert report["learning_rates"] == [1e-3, 3e-3]
    runs = {(r["scaling"], r["rank"], r["init"], r["learning_rate"]) for r in report["runs"]}
    chosen = report["choice"]["rank"]
    assert runs == {("alpha fixed", 1, "normal", 1e-3), ("alpha fixed", chosen, "kaiming", 1e-3),
                    *{(rule, 2, "normal", lr) for rule in study.SCALINGS for lr in (1e-3, 3e-3)}}
    assert {t["scaling"]: t["learning_rate"] in (1e-3, 3e-3) for t in report["tuned"]} == dict.fromkeys(
        study.SCALINGS, True)
    # the grid runs with the tuning seeds (0 and 1 by default); what is reported, with all five: the
    # main sweep (the post's rate), each rule at the post's rate and at its tuned rate, and Kaiming's A
    tuned = {t["scaling"]: t["learning_rate"] for t in report["tuned"]}
    key = lambda r: (r["scaling"], r["rank"], r["init"], r["learning_rate"])  # noqa: E731
    seeds_of = {k: sorted(r["seed"] for r in report["runs"] if key(r) == k) for k in runs}
    for (rule, rank, init, lr), seeds in seeds_of.items():
        every = rank == 1 or init == "kaiming" or lr in (1e-3, tuned[rule])
        assert seeds == ([0, 1, 2, 3, 4] if every else [0, 1]), (rule, rank, init, lr)
    for row in report["runs"]:
        assert {"validation_score", "test_score", "delta_norm_linear1", "seconds"} <= set(row)
    for entry in report["summary"]["main"] + report["summary"]["scaling"] + report["summary"]["init"]:
        assert entry["seeds"] == 5  # the mean within the range, up to float rounding (equal seeds):
        assert entry["low"] - 1e-12 <= entry["mean"] <= entry["high"] + 1e-12
    assert {e["measure"] for e in report["summary"]["init"]} >= {"validation_score", "test_target_wrong"}
    assert chosen in (1, 2)
    # one in six of each digit's images among the 2,000 training images; the test set whole (the
    # offline sample's has 1,000 images, MNIST's 10,000)
    assert 2_000 // 6 - 10 <= report["data"]["validation_images"] <= 2_000 // 6
    assert report["data"]["test_images"] in (1_000, 10_000)


@pytest.mark.slow
def test_tuning_seeds_outside_the_reported_seeds_are_refused_before_any_work(tmp_path):
    """A tuning seed's runs join the reported ones in 07, so it must be one of `seeds`: said in one
    sentence from the parameters cell, before any data is loaded or anything is written."""
    import subprocess
    import sys

    from lora_tutorial.tools.run import notebooks_dir

    out = tmp_path / "07.ipynb"
    done = subprocess.run([sys.executable, "-m", "papermill", str(notebooks_dir() / "07_rank_sweep.ipynb"),
                           str(out), "--cwd", str(notebooks_dir()), "-k", "python3", "--no-progress-bar",
                           "-p", "output_dir", str(tmp_path / "outputs"), "-y", "tuning_seeds: [0, 7]"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "SettingsError: tuning_seeds=[0, 7]: each must also be in seeds=[0, 1, 2, 3, 4], e.g. [0, 1].")
    assert not (tmp_path / "outputs").exists()  # no pre-training, no runs, no results file
    ran = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" and c.execution_count]
    assert len(ran) == 3  # the knobs, papermill's parameters, the cell that checks them
