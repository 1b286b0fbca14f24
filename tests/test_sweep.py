"""The rank sweep: table values, resume, failures, dry-run commands that papermill accepts."""

import csv
import json
import shlex
import subprocess

import pytest

from lora_tutorial import OversizedMLP, linear_layers
from lora_tutorial import sweep as sweep_module
from lora_tutorial.sweep import COLUMNS, Config, configurations, finished, main, sweep

SMALL = {"train_samples": 2000}
LAYERS = [(m.in_features, m.out_features) for m in linear_layers(OversizedMLP()).values()]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    configs = configurations([1, 4], None, False, [9], [0], [10], SMALL)
    rows = sweep(configs, out, SMALL, jobs=2, progress=False)
    return out, configs, rows


@pytest.mark.slow
def test_table_columns_and_values(swept):
    out, configs, rows = swept
    with (out / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and json.loads((out / "sweep.json").read_text()) == rows
    for r, rank in zip(rows, (1, 4), strict=True):
        assert r["status"] == "done" and r["rank"] == rank and r["alpha"] == 1.0  # fixed while r varies
        assert r["lora_parameters"] == rank * sum(i + o for i, o in LAYERS)
        assert r["lora_share_percent"] == pytest.approx(100 * r["lora_parameters"] / 2_807_010)
        assert r["accuracy_lora_off"] < 1 and r["target_wrong_after"] < r["target_wrong_before"]
        assert 0 <= r["target_accuracy_after"] <= 1 and r["finetune_seconds"] > 0
    assert rows[0]["accuracy_lora_off"] == rows[1]["accuracy_lora_off"]  # one shared pre-training
    assert len(list((out / "checkpoints").glob("pretrained-*.pt"))) == 1
    assert (out / "sweep_rank.png").stat().st_size > 10_000 and (out / "sweep_tradeoff.png").is_file()


@pytest.mark.slow
def test_a_second_run_reruns_nothing(swept, monkeypatch):
    out, configs, rows = swept
    monkeypatch.setattr(sweep_module, "run_one", lambda *a: pytest.fail("finished work was run again"))
    monkeypatch.setattr(sweep_module, "pretrain_once", lambda *a: pytest.fail("pre-trained again"))
    assert sweep(configs, out, SMALL, progress=False) == rows


@pytest.mark.slow
def test_the_shared_pretraining_is_not_run_again_once_saved(swept, monkeypatch):
    out, _, _ = swept
    assert sweep_module.pretrained_exists(out, SMALL)
    assert not sweep_module.pretrained_exists(out, {"train_samples": 1999})  # other settings, other network


def test_half_written_or_foreign_results_are_not_trusted(tmp_path):
    config = Config(2, 2.0, 9, 0, 10)
    folder = tmp_path / config.name
    folder.mkdir()
    (folder / "results.json").write_text('{"settings": {"rank": 2, "alp')  # cut off mid-write
    assert finished(config, tmp_path) is None
    (folder / "results.json").write_text(json.dumps({"settings": {
        "rank": 8, "alpha": 2.0, "target_digit": 9, "seed": 0, "finetune_steps": 10}}))
    assert finished(config, tmp_path) is None


@pytest.mark.slow
def test_a_failing_configuration_is_recorded_and_the_others_still_count(swept, capsys):
    out, _, _ = swept
    # alpha = 1e20 passes the settings check, then the loss becomes NaN while fine-tuning
    args = ["--ranks", "1", "--alphas", "1", "1e20", "--digits", "9", "--iterations", "10",
            "-p", "train_samples", "2000", "--out", str(out)]
    code = main(args)
    assert code == 1
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert "FloatingPointError: The loss became nan at step" in rows[1]["error"]
    assert "cell " in rows[1]["error"]
    assert not list((out / rows[1]["name"]).glob("**/*.safetensors")), "no adapter from a diverged run"
    err = capsys.readouterr().err
    assert "1 configuration(s) failed: rank1_alpha1e+20_digit9_seed0_steps10" in err


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_what_finished_and_resumes_the_rest(swept, monkeypatch, capsys):
    out, _, _ = swept
    configs = configurations([1, 2, 3], None, False, [9], [0], [10], SMALL)  # rank 1 is already done
    real_run_one = sweep_module.run_one
    ran = []

    def interrupted_at_rank_3(config, *args):
        ran.append(config.rank)
        if config.rank == 3:
            raise KeyboardInterrupt  # Ctrl-C while rank 3 runs
        return real_run_one(config, *args)

    monkeypatch.setattr(sweep_module, "run_one", interrupted_at_rank_3)
    before = (out / configs[0].name / "results.json").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        sweep(configs, out, SMALL, jobs=1, progress=False)
    assert ran == [2, 3]
    assert "Sweep interrupted: the finished configurations are kept" in capsys.readouterr().err
    assert finished(configs[1], out) and not finished(configs[2], out)

    ran.clear()
    monkeypatch.setattr(sweep_module, "run_one", lambda config, *a: ran.append(config.rank) or {
        "status": "failed", "error": "not run in this test"})
    rows = sweep(configs, out, SMALL, jobs=1, progress=False)
    assert ran == [3], "only the interrupted configuration runs again"
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert (out / configs[0].name / "results.json").read_bytes() == before


@pytest.mark.slow
def test_dry_run_prints_commands_that_papermill_runs(swept, capsys, monkeypatch):
    out, _, _ = swept
    assert main(["--ranks", "2", "--iterations", "10", "-p", "train_samples", "2000", "--out", str(out),
                 "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 and "02_pretrain.ipynb" in lines[0] and "06_compare.ipynb" in lines[1]
    done = subprocess.run(shlex.split(lines[1]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = Config(2, 1.0, "worst", 0, 10)  # the sweep's defaults: alpha 1 at every rank, the worst digit
    results = finished(config, out)
    assert results["lora_parameters"] == 2 * sum(i + o for i, o in LAYERS)
    # 'worst' is decided in the run, on the training images; the table holds the digit it chose
    assert results["target_rule"] == "worst" and results["target_digit"] in range(10)
    monkeypatch.setattr(sweep_module, "run_one", lambda *a: pytest.fail("the scheduler's result was rerun"))
    rows = sweep([config], out, SMALL, progress=False)  # collecting only
    assert rows[0]["status"] == "done" and rows[0]["target_digit"] == results["target_digit"]


def test_bad_values_are_refused_before_anything_runs(tmp_path, capsys):
    assert main(["--ranks", "0", "--out", str(tmp_path)]) == 2
    assert "rank=0 is not valid" in capsys.readouterr().err
    assert main(["--ranks", "1", "16", "--out", str(tmp_path)]) == 2
    assert "error: rank=16 is too large for layer linear3" in capsys.readouterr().err
    assert main(["--ranks", "1", "-p", "device", "nonsense", "--out", str(tmp_path)]) == 2
    assert "error: device='nonsense' is not valid" in capsys.readouterr().err
    assert main(["--ranks", "1", "-p", "data_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "nowhere (data_dir) does not exist" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["--ranks", "1", "-p", "rank", "3", "--out", str(tmp_path)])
