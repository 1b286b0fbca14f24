"""The six notebooks, executed end to end by papermill through the headless runner."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from figure_check import execute as execute_checking_figures

from lora_tutorial.data import DATA_ENV
from lora_tutorial.tools.run import STEPS, check_trends, main, run, summary

# The small settings run on the offline sample (2,000 of its training images, its 1,000 test images):
# on full MNIST, evaluating 10,000 test images after every run was most of these tests' time. The
# committed notebooks run on full MNIST under nbval. No download is tried.
SMALL = {"train_samples": 2000, "download": False}


@pytest.fixture(scope="module", autouse=True)
def sample_only():
    """Kernels started in this module see no MNIST folder ($LORA_TUTORIAL_DATA unset)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(DATA_ENV, raising=False)
        yield


def errors_in(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


def text_of(path):
    nb = nbformat.read(path, as_version=4)
    return "\n".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """All six notebooks on 2,000 training images and 30 fine-tuning steps."""
    root = tmp_path_factory.mktemp("run")
    parameters = {**SMALL, "finetune_steps": 30, "output_dir": str(root / "out")}
    results = run(root / "executed", parameters)
    return root, results


@pytest.mark.slow
def test_all_six_notebooks_run_without_errors(quick_run):
    root, _ = quick_run
    for step in STEPS:
        path = root / "executed" / f"{step}.ipynb"
        assert path.is_file() and errors_in(path) == [], step
        meta = nbformat.read(path, as_version=4).metadata.papermill
        assert meta.input_path == f"notebooks/{step}.ipynb"  # no machine paths in shared notebooks


@pytest.mark.slow
def test_later_notebooks_load_what_02s_and_05s_loops_trained(quick_run):
    """The loops run in 02's and 05's kernels; 03-06 read them from the notebook files. The code's
    fingerprint must come out the same both ways, or every notebook would train again."""
    root, _ = quick_run
    for step in STEPS[2:]:
        assert "Loaded the pre-trained weights" in text_of(root / "executed" / f"{step}.ipynb"), step
    assert "Saved the LoRA adapter" in text_of(root / "executed" / "05_finetune.ipynb")
    assert "Loaded the LoRA adapter" in text_of(root / "executed" / "06_compare.ipynb")


@pytest.mark.slow
def test_the_results_they_report(quick_run):
    root, results = quick_run
    assert results == json.loads((root / "out" / "results.json").read_text())
    assert results["settings"]["train_samples"] == 2000 and results["settings"]["finetune_steps"] == 30
    assert results["lora_parameters"] == 6_794 and results["base_parameters"] == 2_807_010
    assert results["lora_off_equals_pretrained"] is True
    assert results["lora_off"] == results["pretrained"]
    assert results["target_wrong_after"] < results["target_wrong_before"]
    assert results["pretrained"]["total"] == results["data"]["test_images"]
    assert sum(results["pretrained"]["wrong_counts"]) == (
        results["pretrained"]["total"] - results["pretrained"]["correct"])
    digit = results["target_digit"]
    assert results["target_rule"] == "worst" and results["settings"]["target_digit"] == digit
    # "worst" is decided on the training images, which the pre-trained checkpoint's run evaluated
    assert f"Target digit:                {digit} (the worst)" in summary(results)
    assert f"Wrong answers on digit {digit}:    {results['target_wrong_before']} ->" in summary(results)


@pytest.mark.slow
def test_the_notebooks_print_what_they_check(quick_run):
    root, results = quick_run
    executed = root / "executed"
    assert "one image: (28, 28) torch.float32" in text_of(executed / "01_data.ipynb")
    assert "Total number of parameters: 2,807,010" in text_of(executed / "02_pretrain.ipynb")
    assert "Parameters LoRA adds:               6,794 (0.242 %)" in text_of(executed / "03_parametrize.ipynb")
    assert "trainable params: 6,794 || all params: 2,813,804" in text_of(executed / "04_freeze.ipynb")
    finetune = text_of(executed / "05_finetune.ipynb")
    assert "Frozen weights unchanged; W' = W + (alpha / r) B @ A; LoRA off gives W. All exact." in finetune
    assert f"{results['target_wrong_after']} after fine-tuning LoRA" in finetune
    compare = text_of(executed / "06_compare.ipynb")
    assert "LoRA off is identical to the pre-trained network" in compare
    assert "Loaded onto the pre-trained network: the same 10,000 predictions" in compare
    assert "Loaded onto another network: refused." in compare
    assert "was trained on other base weights" in compare
    size = re.search(r"Adapter: +([\d.]+) KiB \(rank 1, alpha 1,", compare)
    assert size and 26.5 < float(size.group(1)) < 29, "rank 1: 6,794 float32 numbers and a small header"
    nb = nbformat.read(executed / "06_compare.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), "no plot"


@pytest.mark.slow
def test_later_notebooks_alone_with_other_parameters(quick_run, tmp_path):
    """05 and 06 run without the earlier notebooks (pre-training is reused) and follow the rank."""
    root, first = quick_run
    parameters = {**SMALL, "finetune_steps": 30, "output_dir": str(root / "out"), "rank": 3}
    results = run(tmp_path, parameters, ("05_finetune", "06_compare"))
    assert results["lora_parameters"] == 3 * 6_794
    assert results["pretrained"] == first["pretrained"]  # the same checkpoint, loaded
    assert "Loaded the pre-trained weights" in text_of(tmp_path / "05_finetune.ipynb")


def test_trend_check():
    good = {"pretrained": {"accuracy": 0.95}, "target_wrong_before": 100, "target_wrong_after": 20,
            "lora_off_equals_pretrained": True}
    assert check_trends(good) == []
    bad = {**good, "pretrained": {"accuracy": 0.9}, "target_wrong_after": 31,
           "lora_off_equals_pretrained": False}
    assert len(check_trends(bad)) == 3
    # on the offline sample's 4,000 images the network reaches about 0.90: its bar is 0.85
    sample = {**good, "pretrained": {"accuracy": 0.9}, "data": {"source": "sample"}}
    assert check_trends(sample) == []
    assert check_trends({**sample, "pretrained": {"accuracy": 0.84}}) == [
        "pre-trained accuracy >= 0.85: got 0.8400"]


def test_a_bad_parameter_stops_the_runner_before_any_notebook(tmp_path, capsys):
    """`python -m lora_tutorial.tools.run -p rank 0` (its main, in this process): exit 2, one sentence."""
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    assert main(["--out", str(out), "-p", "rank", "0"]) == 2
    bad_rank = capsys.readouterr()
    assert main(["--out", str(out), "-p", "data_dir", str(empty)]) == 2
    no_data = capsys.readouterr()
    assert bad_rank.err == "error: rank=0 is not valid: expected an integer >= 1 (the post uses 1).\n"
    assert f"error: The MNIST folder {empty} (data_dir) holds no MNIST files" in no_data.err
    assert "Running" not in bad_rank.out + no_data.out and not out.exists()


def test_folder_parameters_are_taken_from_where_the_command_runs(tmp_path, monkeypatch):
    from lora_tutorial.tools.run import absolute_paths

    monkeypatch.chdir(tmp_path)
    given = {"output_dir": "outs/a", "checkpoint_dir": "~/ck", "data_dir": None, "rank": 2, "device": "cpu"}
    assert absolute_paths(given) == {"output_dir": str(tmp_path / "outs" / "a"),
                                     "checkpoint_dir": str(Path("~/ck").expanduser().resolve()),
                                     "data_dir": None, "rank": 2, "device": "cpu"}


def test_check_without_06_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "out"), "--only", "01_data", "--check"])
    assert stopped.value.code == 2 and "--check reads the results of 06_compare" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def parameters_cell(source="output_dir = None"):
    """A stand-in notebook's parameters cell: the runner passes a notebook only what it declares."""
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


def test_each_kernel_is_started_ahead_and_none_outlives_a_failed_run(tmp_path, monkeypatch):
    """The runner starts the next notebook's kernel while one runs; when a notebook fails, both
    that kernel and the one started ahead are shut down, and the error names the cell."""
    from jupyter_core.utils import run_sync

    import lora_tutorial.tools.run as run_module

    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name, source in (("01_data", "import sys\nassert 'lora_tutorial' in sys.modules  # warmed up"),
                         ("02_pretrain", "raise ValueError('stop here')"), ("03_parametrize", "pass")):
        nb = nbformat.v4.new_notebook(cells=[parameters_cell(), nbformat.v4.new_code_cell(source)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    monkeypatch.setattr(run_module, "notebooks_dir", lambda: folder)
    started = []
    real_start = run_module._start_kernel
    monkeypatch.setattr(run_module, "_start_kernel",
                        lambda cwd: started.append(real_start(cwd)) or started[-1])
    steps = ("01_data", "02_pretrain", "03_parametrize")
    with pytest.raises(SystemExit, match=r"02_pretrain failed in cell 3: ValueError: stop here"):
        run(tmp_path / "out", {"output_dir": str(tmp_path / "results")}, steps)
    assert len(started) == 3  # 01's, 02's (started while 01 ran) and 03's (while 02 ran)
    assert not any(run_sync(kernel.is_alive)() for kernel in started)
    first = nbformat.read(tmp_path / "out" / "01_data.ipynb", as_version=4)
    counts = [c.execution_count for c in first.cells]
    assert counts == [1, 2, 3]  # the parameters, papermill's, then ours: the warm-up takes no number


@pytest.mark.slow
def test_an_old_results_file_is_never_reported_as_this_runs(tmp_path, monkeypatch):
    """06 ran but wrote nothing (here: a stand-in that does nothing); the results.json left by an
    earlier run must not be read as this run's."""
    import lora_tutorial.tools.run as run_module

    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(cells=[parameters_cell(), nbformat.v4.new_code_cell("pass")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "06_compare.ipynb")
    monkeypatch.setattr(run_module, "notebooks_dir", lambda: folder)
    old = tmp_path / "results" / "results.json"
    old.parent.mkdir()
    old.write_text('{"target_digit": 9}')
    os.utime(old, (0, 0))  # written long ago
    with pytest.raises(SystemExit, match=r"06_compare ran but wrote no results to .*results.json"):
        run(tmp_path / "out", {"output_dir": str(tmp_path / "results")}, ("06_compare",))
    assert old.read_text() == '{"target_digit": 9}'  # and it is left as it was


def execute(name, out, parameters):
    """One notebook through papermill, its figures checked (figure_check.py); returns the output copy."""
    from lora_tutorial.tools.run import notebooks_dir

    target = out / f"{name}.ipynb"
    execute_checking_figures(notebooks_dir() / f"{name}.ipynb", target, parameters, notebooks_dir())
    assert errors_in(target) == []
    return target


@pytest.mark.slow
def test_why_low_rank_in_small_settings(quick_run, tmp_path):
    """08 on 2,000 images and 30 steps, the five seeds it demands, one learning rate, one image count,
    cuts at ranks 1 and 16, LoRA at rank 1: what it computes, read from its results."""
    root, results = quick_run
    parameters = {**SMALL, "finetune_steps": 30, "output_dir": str(root / "out"),
                  "seeds": [0, 1, 2, 3, 4], "full_learning_rates": [1e-3], "image_counts": [10],
                  "ranks": [1, 16], "lora_ranks": [1]}
    executed = execute("08_why_low_rank", tmp_path, parameters)
    report = json.loads((root / "out" / "why_low_rank.json").read_text())
    assert report["seeds"] == [0, 1, 2, 3, 4] and report["ranks"] == [1, 16]
    assert report["full_replay_share"] == 0.3
    # the rate is tried with the tuning seeds only; the chosen rate then runs with every seed
    assert report["tuning_seeds"] == [0, 1]
    assert {name: [row["seed"] for row in rows] for name, rows in report["rate_grid"].items()} == {
        "plain": [0, 1], "replay 0.3": [0, 1]}
    assert list(report["full"]) == ["plain", "replay 0.3"]  # the non-degenerate run beside the plain one
    for rows in report["full"].values():
        assert [row["seed"] for row in rows] == [0, 1, 2, 3, 4]
        assert [[cut["rank"] for cut in row["cuts"]] for row in rows] == [[1, 16]] * 5
    mean = {name: sum(row["others_accuracy"] for row in rows) / 5 for name, rows in report["full"].items()}
    assert mean["replay 0.3"] > mean["plain"]  # replay keeps the other digits better
    for name, layers in report["energy_shares"].items():
        for layer, per_seed in layers.items():
            assert len(per_seed) == 5
            for shares in per_seed:  # at ranks 1, 4, 16, 64
                assert 0 < shares[0] < shares[1] <= shares[2] <= shares[3] <= 1, (name, layer)
                assert report["random_energy_shares"][layer][0] < shares[0]  # far above a random matrix
        assert [s[2] for s in layers["linear3"]] == [1.0] * 5  # 16 >= 10: all of linear3's update
    assert 0.1 < report["random_energy_shares"]["linear3"][0] < 0.13  # 11 % of 10 directions, not 1 %
    assert set(report["enough"]) == {"rank", "plain", "replay 0.3"} and report["enough"]["rank"] == 1
    linear3 = [r for r in report["agreement"] if r["layer"] == "linear3" and r["side"] == "output"]
    assert [r["seed"] for r in linear3] == [0, 1, 2, 3, 4]
    assert linear3[0]["random"] == pytest.approx(0.2585, abs=1e-3)  # d = 10
    costs = {r["name"]: r for r in report["costs"]}
    assert list(costs) == ["every weight", "LoRA, rank 1"]
    assert [costs[n]["trainable"] for n in costs] == [2_807_010, 6_794]
    # the adapter's size is that of the file 05 saved for these settings: one figure, one value
    saved = [f.stat().st_size for f in (root / "out" / "adapters").glob("lora-*.safetensors")]
    assert costs["LoRA, rank 1"]["file_bytes"] in saved
    # LoRA at rank 1, seed 0, alpha 1 is the tutorial's own run: the same wrong answers as 06 reported
    assert report["lora"]["1"][0]["target_wrong"] == results["target_wrong_after"]
    text = text_of(executed)
    assert "a random matrix" in text and "fwd + bwd" in text and "above chance" in text
    nb = nbformat.read(executed, as_version=4)
    markdown = "\n".join(o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code"
                         for o in c.get("outputs", []) if "text/markdown" in o.get("data", {}))
    assert "**Is rank 1 enough?**" in markdown and "times the optimizer state" in markdown
    assert re.search(r"\b[0-5] of 5\b", markdown)  # seeds above chance, counted over the five seeds


@pytest.mark.slow
def test_forgetting_in_small_settings(quick_run, tmp_path):
    """09 with two remedies over five seeds and a short timing: per-seed rows on both splits, the
    choice read off the validation summaries, replay at share 0 the plain run, merged and cached exact."""
    from lora_tutorial.studies.forgetting import SPLITS, choose_setting, summarize

    root, results = quick_run
    parameters = {**SMALL, "finetune_steps": 10, "output_dir": str(root / "out"),
                  "remedies": {"replay 0": {"replay_share": 0.0}, "replay 0.3": {"replay_share": 0.3}},
                  "seeds": [0, 1, 2, 3, 4], "latency_batches": [500, 100], "latency_repeats": 1}
    executed = execute("09_forgetting", tmp_path, parameters)
    report = json.loads((root / "out" / "forgetting.json").read_text())
    names = ["plain", "replay 0", "replay 0.3"]
    assert [(r["name"], r["seed"]) for r in report["rows"]] == [(n, s) for n in names for s in range(5)]
    digit = results["target_digit"]
    for row in report["rows"]:
        for split in SPLITS:
            evaluation = row["evaluations"][split]
            assert row[split]["target_wrong"] == evaluation["wrong_counts"][digit]
        assert row["evaluations"]["validation"]["total"] == results["data"]["validation_images"]
        assert row["evaluations"]["test"]["total"] == results["data"]["test_images"]
    plain, zero = report["rows"][0:5], report["rows"][5:10]
    assert [z["evaluations"] for z in zero] == [p["evaluations"] for p in plain]  # share 0: the plain run
    assert len({json.dumps(p["evaluations"]["test"]) for p in plain}) > 1  # the seeds give other runs
    assert list(report["summaries"]) == names
    assert all(e[s][m]["count"] == 5 for e in report["summaries"].values() for s in SPLITS for m in e[s])
    assert report["chosen"] in names and report["choice"]["name"] == report["chosen"]
    # the choice is the rule applied to the validation summaries, whatever the test images say
    limit = report["max_forgetting_points"]
    summaries = summarize(report["rows"], report["before"])
    assert choose_setting(summaries, limit, split="validation").name == report["chosen"]
    changes = report["per_digit_change_points"]["runs"]
    assert len(changes) == 5 and report["others_lose_points"]["count"] == 5
    assert report["others_lose_points"]["mean"] == pytest.approx(
        sum(-sum(c for d, c in enumerate(run) if d != digit) / 9 for run in changes) / 5)
    assert set(report["latency_seconds"]["100"]) == {"parametrized", "cached", "separate path", "merged"}
    rebuilds = {name: p["rebuilds"] for name, p in report["profiles"]["100"].items()}
    # 500 images in 5 calls of 100: 3 layers rebuilt at every call, or once per pass when cached
    assert rebuilds == {"parametrized": 15, "cached": 3, "separate path": 0, "merged": 0}
    text = text_of(executed)
    assert "Merged == parametrized: the same logits, bit for bit" in text
    assert "cached == parametrized too, in calls of 100" in text


@pytest.mark.slow
def test_peft_and_many_adapters_in_small_settings(quick_run, tmp_path):
    """10 on 2,000 images and 30 steps: PEFT and the tutorial agree where the notebook says they do,
    every adapter and combination is evaluated once per seed, and the table has its columns."""
    root, results = quick_run
    parameters = {**SMALL, "finetune_steps": 30, "output_dir": str(root / "out"),
                  "switch_repeats": 2}
    executed = execute("10_peft_and_many_adapters", tmp_path, parameters)
    report = json.loads((root / "out" / "many_adapters.json").read_text())
    peft = report["peft"]
    assert peft["adapter_gap"] <= 1e-6 and peft["merge_gap"] <= 1e-6 and peft["sum_gap"] <= 1e-6
    assert peft["gap_to_05"] <= 1e-4 and peft["disagree"] <= 5  # rounding flips at most a few predictions
    wrong = report["training_wrong"]  # the pre-trained network's errors on its training images
    digits = report["digits"]
    assert digits == sorted(range(10), key=lambda d: (-wrong[d], d))[:3]
    assert digits[0] == results["target_digit"]
    assert report["before"]["wrong"] == {str(d): results["pretrained"]["wrong_counts"][d] for d in digits}
    names = [f"digit {d} alone" for d in digits] + ["sum of the 3", "mean of the 3",
                                                    f"one adapter, {', '.join(map(str, digits))} together"]
    assert [(r["name"], r["seed"]) for r in report["rows"]] == [(n, s) for n in names for s in range(5)]
    assert list(report["summaries"]) == names
    assert all(list(e) == [*(f"wrong on {d}" for d in digits), "others %", "all %"]
               for e in report["summaries"].values())
    # digit 9 alone with seed 0 is 05's run (its seed is the pre-training seed, 0): 06's wrong answers
    first = report["rows"][0]
    assert first["wrong"][str(digits[0])] == results["target_wrong_after"]
    assert len(report["seconds"]) == 5 and "load a network file" in report["seconds"]  # the baseline
    assert 25_000 < report["bytes"]["adapter (the tutorial's file)"] < 30_000
    assert report["bytes"]["fine-tuned network"] > 11_000_000  # 2,807,010 float32 numbers
    text = text_of(executed)
    images = results["data"]["test_images"]  # 10,000, or the offline sample's 1,000
    assert f"Before training (B = 0): the same logits, bit for bit, for all {images:,} test images." in text
    assert "Onto another network: refused (other base weights)." in text
    assert "weight is parametrized: {'linear1': True, 'linear2': True, 'linear3': True}" in text
    nb = nbformat.read(executed, as_version=4)
    tables = "".join(o["data"]["text/html"] for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []) if "text/html" in o.get("data", {}))
    assert all(f"wrong on {d}" in tables for d in digits) and "other 7 digits %" in tables
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) == 1  # the comparison, one point per seed
    verdicts = "".join(o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code"
                       for o in c.get("outputs", []) if "text/markdown" in o.get("data", {}))
    summed = [line for line in verdicts.splitlines() if line.startswith("- **sum of the 3** against each")]
    assert len(summed) == 1 and "wrong answers" in summed[0] and "digits' accuracy" in summed[0]


@pytest.mark.slow
def test_explorer_in_small_settings(quick_run, tmp_path):
    """11 headless, as papermill and nbval run it: the panel is built and pressed once, and the
    committed output keeps its text and figure beside the widget; the first press is 05's run."""
    root, results = quick_run
    parameters = {**SMALL, "finetune_steps": 30, "output_dir": str(root / "out"),
                  "seeds": [0, 1, 2, 3, 4]}
    executed = execute("11_explorer", tmp_path, parameters)
    nb = nbformat.read(executed, as_version=4)
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(shown) == 1, "one panel"
    digit = results["target_digit"]
    assert shown[0]["data"]["text/plain"].startswith(f"rank 1, alpha 1 (alpha fixed), all layers; 30 steps "
                                                     f"on digit {digit}, seed 0")
    assert shown[0]["data"]["image/png"] and "Updated in " in shown[0]["data"]["text/plain"]
    text = text_of(executed)
    assert "Same knobs, 5 seeds: wrong on" in text and "Seed 0 is the press above" in text
    assert re.search(r"The first press gave 05's adapter: 6 tensors of A and B, within \S+ of it\.", text)


@pytest.mark.slow
def test_lora_family_in_small_settings(quick_run, tmp_path):
    """12 on 2,000 images and 30 steps, one tuning seed and one coarse rate: every variant agrees with
    PEFT's to float rounding, every method gets the same tuning budget, and the tables have their rows."""
    root, results = quick_run
    parameters = {**SMALL, "finetune_steps": 30, "output_dir": str(root / "out"),
                  "tuning_seeds": [0], "coarse_rates": [1e-3], "vera_rank": 8, "curve_ranks": [1, 2],
                  "curve_steps": 5, "peft_steps": 5}
    executed = execute("12_lora_family", tmp_path, parameters)
    report = json.loads((root / "out" / "lora_family.json").read_text())
    methods = ["every weight", "LoRA", "LoRA+", "DoRA", "PiSSA", "VeRA"]
    assert report["methods"] == methods
    trained = report["trained"]
    assert list(trained) == methods and trained["LoRA"] == results["lora_parameters"] == trained["LoRA+"]
    assert trained["DoRA"] == trained["LoRA"] + 3_010  # one length per output row: 1,000 + 2,000 + 10
    assert trained["VeRA"] == 3 * 8 + 3_010 and trained["every weight"] == 2_807_010
    checked = {row["method"]: row for row in report["peft_check"]}
    assert list(checked) == methods[1:]
    for method, row in checked.items():
        assert row["trained (ours)"] == row["trained (PEFT)"], method
        for key in ("logit gap at step 0", "logit gap after 5 steps"):
            assert row[key] <= 1e-5 * row["largest logit"], (method, key, row)  # float rounding only
    tried = report["tried"]
    budget = {m: sorted((r["learning_rate"], r["seed"]) for r in tried if r["method"] == m) for m in methods}
    assert all(len(b) == 3 for b in budget.values())  # the coarse rate and its two neighbours, seed 0
    for method, rate in report["chosen_rates"].items():
        scores = {r["learning_rate"]: r["validation_score"] for r in tried if r["method"] == method}
        assert scores[rate] == max(scores.values())  # chosen on the validation images
    for table in ("tuned", "naive"):
        rows = [(r["method"], r["seed"]) for r in report[table]]
        assert rows == [(m, s) for m in methods for s in range(5)]
    assert {r["learning_rate"] for r in report["naive"]} == {1e-3}
    assert [r["learning_rate"] for r in report["tuned"][::5]] == [report["chosen_rates"][m] for m in methods]
    best = report["chosen_rates"]  # one tuning seed: its best rates are the chosen ones
    assert report["rate_ratio_per_seed"] == [pytest.approx(best["LoRA"] / best["every weight"])]
    nb = nbformat.read(executed, as_version=4)
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # the comparison, and the loss curves


@pytest.mark.slow
def test_memory_and_qlora_in_small_settings(quick_run, tmp_path):
    """13 on 2,000 images with the five seeds it demands, two small batches, one rank: the ledger's
    parts add up to the peak PyTorch's profiler measures (within 2 %), each part is what the
    arithmetic says, and the NF4 round trip keeps its bound."""
    root, results = quick_run
    parameters = {**SMALL, "finetune_steps": 10, "output_dir": str(root / "out"), "seeds": [0, 1, 2, 3, 4],
                  "ledger_batches": [10, 100], "ledger_ranks": [1], "time_repeats": 1, "recover_steps": 10}
    executed = execute("13_memory_and_qlora", tmp_path, parameters)
    report = json.loads((root / "out" / "memory_and_qlora.json").read_text())
    methods = ["full fine-tuning", "LoRA r=1, parametrized", "LoRA r=1, separate"]
    ledger = {(row["batch"], row["method"]): row for row in report["ledger"]}
    assert list(ledger) == [(b, m) for b in (10, 100) for m in methods]
    network, lora = 4 * 2_807_010, 4 * results["lora_parameters"]
    for (batch, method), row in ledger.items():
        assert abs(row["measured peak"] / row["predicted peak"] - 1) <= 0.02, (batch, method, row)
        assert row["gradients"] == (network if method == "full fine-tuning" else lora)
        assert row["optimizer state"] == 2 * row["gradients"]  # Adam's two averages
        assert row["weights"] == network + (0 if method == "full fine-tuning" else lora)
        assert row["saved for backward"] >= 4 * batch * (784 + 1_000 + 2_000)  # the input and both ReLUs
    for batch in (10, 100):  # the parametrized form also keeps W + (alpha / r) B A of layers 2 and 3
        parametrized, separate = (ledger[batch, m]["saved for backward"] for m in methods[1:])
        assert parametrized - separate == pytest.approx(4 * (2_000 * 1_000 + 10 * 2_000), rel=1e-3)
    assert report["nf4_published_gap"] <= 1e-6
    assert report["round_trip_worst"] <= report["round_trip_bound"] * (1 + 1e-6)
    assert report["round_trip_bound"] == pytest.approx((1 - 0.6961928) / 2, abs=1e-6)  # the widest gap
    bits = {row["format"]: row["bits per weight"] for row in report["formats"]}
    assert bits["NF4 (scales in float32)"] == pytest.approx(4 + 32 / 64, abs=0.01)  # codes + scales
    assert [row["base"] for row in report["quantized"]] == ["float32", "bfloat16", "NF4"]
    runs = [(row["run"], row["seed"]) for row in report["runs"]]
    kinds = [f"{base} + LoRA, {task}" for base in ("float32", "NF4") for task in ("all digits", "digit")]
    assert sorted(runs) == sorted((k, s) for k in kinds for s in range(5))
    assert report["readme"].startswith("| batch | full fine-tuning MB |")
    nb = nbformat.read(executed, as_version=4)
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # the ledger's bars, and the accuracies
