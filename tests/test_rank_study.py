"""07's rank study: the scaling rules, the summaries over seeds, a choice made on the validation images
only, fine-tuning that never sees the validation or test images, and the notebook in small settings."""

import json
import math

import nbformat
import pytest
import torch

from lora_tutorial import LoRAParametrization, OversizedMLP, Settings
from lora_tutorial import rank_study as study
from lora_tutorial.data import Mnist
from lora_tutorial.settings import SettingsError


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


def fake_row(config, seed, validation, test, norm=1.0):
    """A run's row as `run_one` writes it: (target wrong, other digits' accuracy) per split."""
    row = {"scaling": config.scaling, "rank": config.rank, "init": config.init, "seed": seed,
           "scale": study.scale_of(config.scaling, config.rank), "trainable": 6_794 * config.rank}
    for split, (wrong, others) in (("validation", validation), ("test", test)):
        row.update({f"{split}_target_wrong": wrong, f"{split}_target_error_rate": wrong / 1000,
                    f"{split}_others_accuracy": others, f"{split}_accuracy": others})
    return {**row, **{f"delta_norm_{n}": norm for n in ("linear1", "linear2", "linear3")}}


def test_the_summary_has_every_seed_and_the_spread_of_each_column():
    configs = study.configurations([1, 2], study.SCALINGS)
    rows = [fake_row(c, seed, (10 + seed + c.rank, 0.90), (20 - seed, 0.89), norm=seed + 1.0)
            for c in {c.run_as() for c in configs} for seed in (0, 1, 2)]
    entries = study.summary(rows, configs)
    assert [e["name"] for e in entries] == [c.name for c in configs]
    for e in entries:
        assert e["seeds"] == [0, 1, 2]  # three seeds per configuration
        low = 10 + e["rank"]
        assert e["validation_target_wrong"] == {"mean": low + 1, "low": low, "high": low + 2}
        assert e["test_target_wrong"] == {"mean": 19, "low": 18, "high": 20}
        assert e["delta_norm_linear2"] == {"mean": 2.0, "low": 1.0, "high": 3.0}
    rank1 = [e for e in entries if e["rank"] == 1]
    assert len(rank1) == 3 and all(e["validation_target_wrong"] == rank1[0]["validation_target_wrong"]
                                   for e in rank1)  # the shared rank-1 run
    assert len(study.distinct(entries)) == 4  # rank 1 once, rank 2 under each of the three rules
    table = study.markdown_table(entries, ["validation_target_wrong", "test_others_accuracy"], 9)
    assert "| validation: digit 9 wrong | test: other digits % |" in table
    assert "12.0 (11.0-13.0)" in table and "89.0 (89.0-89.0)" in table  # mean (min-max)


def entries_for(table: dict) -> list[dict]:
    """Summaries of "alpha fixed" ranks from {rank: (validation per seed, test per seed)}, each a list
    of (target wrong, other digits' accuracy)."""
    rows = [fake_row(study.Config("alpha fixed", rank), seed, v, t)
            for rank, (validation, test) in table.items()
            for seed, (v, t) in enumerate(zip(validation, test, strict=True))]
    return study.summary(rows, study.configurations(sorted(table)))


BEFORE = {"validation_others_accuracy": 0.96, "test_others_accuracy": 0.96}


def test_the_rank_is_chosen_on_the_validation_images_alone():
    # validation: rank 2 is clearly best; test: rank 4 would be
    table = {1: ([(30, 0.93)] * 3, [(30, 0.93)] * 3),
             2: ([(5, 0.93), (6, 0.93), (7, 0.93)], [(40, 0.93)] * 3),
             4: ([(20, 0.93)] * 3, [(1, 0.95)] * 3)}
    entries = entries_for(table)
    choice = study.choose_rank(entries, BEFORE, max_forgetting_points=5)
    assert choice.rank == 2 and choice.best == 2 and choice.allowed == [1, 2, 4]
    for e in entries:  # the test columns are never read: without them, the same choice
        for key in [k for k in e if k.startswith("test_")]:
            del e[key]
    assert study.choose_rank(entries, BEFORE, max_forgetting_points=5) == choice


def test_the_choice_rule_budget_and_ties():
    table = {1: ([(9, 0.93), (10, 0.92), (11, 0.94)], [(0, 0)] * 3),  # loses 3 points
             2: ([(8, 0.93), (9, 0.935), (10, 0.94)], [(0, 0)] * 3),  # tied with 8 on both counts
             4: ([(1, 0.80)] * 3, [(0, 0)] * 3),  # fewest errors, but loses 16 points
             8: ([(7, 0.935), (8, 0.94), (9, 0.945)], [(0, 0)] * 3)}  # best within the budget
    entries = entries_for(table)
    choice = study.choose_rank(entries, BEFORE, max_forgetting_points=5)
    assert choice.allowed == [1, 2, 8] and choice.best == 8
    assert choice.rank == 1 and "a tie goes to the smaller rank" in choice.reason
    # a tighter budget allows fewer ranks; when it allows none, the rank that forgot least is kept
    tight = study.choose_rank(entries, BEFORE, max_forgetting_points=2.2)
    assert tight.allowed == [8] and tight.rank == 8
    nothing = study.choose_rank(entries, BEFORE, max_forgetting_points=1)
    assert nothing.rank == 8 and nothing.allowed == [] and "lost the least" in nothing.reason


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
    import lora_tutorial.pipeline as pipeline

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
    row = study.run_one(settings, data, OversizedMLP(), study.Config("rsLoRA", 2), seed=1)
    validation = set(data.validation.nonzero().flatten().tolist())
    fit = set(range(len(data.train_labels))) - validation
    nines = {i for i in range(len(data.train_labels)) if i % 10 == 9}
    assert len(validation) == 100 and len(trained) == 1  # one in six
    assert set(trained[0]) == fit & nines  # every fit image of the target digit, and nothing else
    assert not set(trained[0]) & validation
    assert list(judged) == ["validation", "test"]
    assert sorted(judged["validation"]) == sorted(validation)  # judged on exactly the validation images...
    assert judged["test"] == list(range(10_000, 10_100))  # ... and on the test images
    assert row["seed"] == 1 and row["use_rslora"] and row["scale"] == pytest.approx(1 / math.sqrt(2))
    assert 0 <= row["validation_target_wrong"] <= 10 and 0 <= row["test_target_wrong"] <= 10


@pytest.mark.parametrize("targets", [None, ["linear2", "linear3"]])
def test_the_judge_predicts_what_evaluate_predicts(targets):
    """The judge adds the first layer's low-rank term to a product computed once; same answers."""
    from lora_tutorial.evaluate import predict
    from lora_tutorial.lora import lora_modules
    from lora_tutorial.pipeline import lora_copy

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
    assert judge.measure(model, 9) == study.measure(model, 9, images)


def test_ranks_are_checked_before_any_work():
    assert study.check_ranks(Settings(), [8, 1, 2, 2]) == [1, 2, 8]
    with pytest.raises(SettingsError, match=r"rank=16 is too large for layer linear3 \(10 x 2000 weight\)"):
        study.check_ranks(Settings(), [1, 16])
    assert study.check_ranks(Settings(target_modules=["linear1", "linear2"]), [16]) == [16]
    with pytest.raises(SettingsError, match="ranks="):
        study.check_ranks(Settings(), "1 2")
    with pytest.raises(SettingsError, match="max_forgetting_points"):
        study.check_max_forgetting(-1)


@pytest.mark.slow
def test_the_notebook_in_small_settings(tmp_path, shared_checkpoints):
    """07 on 2,000 training images, 10 steps, ranks 1 and 2, three seeds: it runs and writes its JSON."""
    import papermill

    from lora_tutorial.run import notebooks_dir

    out = tmp_path / "out"
    parameters = {"train_samples": 2000, "finetune_steps": 10, "ranks": [1, 2], "seeds": [0, 1, 2],
                  "output_dir": str(out), "checkpoint_dir": shared_checkpoints}
    executed = tmp_path / "07_rank_sweep.ipynb"
    papermill.execute_notebook(str(notebooks_dir() / "07_rank_sweep.ipynb"), str(executed),
                               parameters=parameters, cwd=str(notebooks_dir()), kernel_name="python3",
                               progress_bar=False)
    nb = nbformat.read(executed, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    report = json.loads((out / "rank_study.json").read_text())
    assert report["ranks"] == [1, 2] and report["seeds"] == [0, 1, 2]
    runs = {(r["scaling"], r["rank"], r["init"]) for r in report["rows"]}
    assert runs == {("alpha fixed", 1, "normal"), ("alpha fixed", 2, "normal"), ("alpha = r", 2, "normal"),
                    ("rsLoRA", 2, "normal"), ("alpha fixed", report["choice"]["rank"], "kaiming")}
    assert len(report["rows"]) == 3 * len(runs)
    columns = {"scaling", "rank", "init", "seed", "alpha", "use_rslora", "scale", "trainable", "seconds",
               "validation_target_wrong", "validation_target_error_rate", "validation_others_accuracy",
               "validation_accuracy", "delta_norm_linear1", "delta_norm_linear2", "delta_norm_linear3"}
    tested = {f"test_{m}" for m in ("target_wrong", "target_error_rate", "others_accuracy", "accuracy")}
    for row in report["rows"]:
        main = row["scaling"] == "alpha fixed" and row["init"] == "normal"
        assert set(row) == columns | (tested if main else set())  # test images: the main sweep only
    for entry in report["summary"]["main"] + report["summary"]["scaling"] + report["summary"]["init"]:
        assert entry["seeds"] == [0, 1, 2]
        assert {"mean", "low", "high"} == set(entry["validation_target_wrong"])
    assert report["choice"]["rank"] in (1, 2) and set(report["choice"]["test"]) >= {"test_target_wrong"}
    # one in six of each digit's images among the 2,000 training images; the test set whole (the
    # offline sample's has 1,000 images, MNIST's 10,000)
    assert 2_000 // 6 - 10 <= report["data"]["validation_images"] <= 2_000 // 6
    assert report["data"]["test_images"] in (1_000, 10_000)
