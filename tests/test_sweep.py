"""The rank sweep: table values, resume, failures, dry-run commands that papermill accepts; the
same sweep on a real Ray cluster."""

import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from raycluster import LocalRayCluster, free_port

from lora_tutorial import OversizedMLP, linear_layers
from lora_tutorial.settings import Settings, SettingsError
from lora_tutorial.tools import sweep as sweep_module
from lora_tutorial.tools.engines import GRACE_SECONDS, Place, run_process
from lora_tutorial.tools.sweep import COLUMNS, Config, configurations, finished, main, sweep

SMALL = {"train_samples": 2000}
LAYERS = [(m.in_features, m.out_features) for m in linear_layers(OversizedMLP()).values()]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    configs = configurations([1, 4], None, False, [9], [0], [10], SMALL)
    table = sweep(configs, out, SMALL, jobs=2, progress=False)
    return out, configs, table


# -- the Ray engine ------------------------------------------------------------------------------
# A real cluster in other processes (raycluster.py): a head that runs nothing and two worker nodes
# with one CPU and one (logical) GPU each. The sweep runs as a process of its own, as a user runs it.

@pytest.fixture(scope="class")
def ray_cluster():
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("Ray is not installed: CI installs it from requirements.txt")
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    cluster = LocalRayCluster(workers=2)
    try:
        cluster.ready()
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes(), "processes of the test cluster outlived it"


def ray_sweep(address: str, out, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """The small sweep of `swept` (ranks 1 and 4, digit 9, 10 steps) on Ray; returns the driver's pid too."""
    command = [sys.executable, "-m", "lora_tutorial.tools.sweep", "--engine", "ray", "--address", address,
               "--ranks", "1", "4", "--digits", "9", "--iterations", "10", "-p", "train_samples", "2000",
               "--out", str(out), *args]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = driver.communicate(timeout=600)
    return subprocess.CompletedProcess(command, driver.returncode, stdout, stderr), driver.pid


def files(out) -> dict[str, int]:
    """Every file the configurations and the pre-training wrote, with its modification time."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and not p.name.startswith("sweep")}


@pytest.mark.slow
class TestOnARayCluster:
    """First in this file, so that the cluster boots while the machine is least busy, and is
    stopped before the local sweep's tests."""

    def test_each_configuration_runs_on_a_worker_node_and_gives_the_local_table(self, ray_cluster, swept,
                                                                                 tmp_path):
        out = tmp_path / "ray"
        done, driver_pid = ray_sweep(ray_cluster.address, out)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = json.loads((out / "sweep.json").read_text())
        assert [r["status"] for r in rows] == ["done", "done"]
        # where each ran: two different worker nodes, in Ray's worker processes, each given its device
        assert len({r["node"] for r in rows}) == 2 and "local" not in {r["node"] for r in rows}
        assert driver_pid not in {r["pid"] for r in rows} and len({r["pid"] for r in rows}) == 2
        assert all(r["devices"] in ("CUDA_VISIBLE_DEVICES=0", "HIP_VISIBLE_DEVICES=0") for r in rows)
        # the shared pre-training ran first, as a task on a worker node
        pretrained = re.search(r"Pre-trained it in \d+ s on .+ \((\w{8})\)", done.stdout)
        assert pretrained and pretrained[1] in {r["node"][:8] for r in rows}
        # the same numbers as the local engine for the same configurations (CPU runs are deterministic)
        local_rows = swept[2].to_dict("records")
        ignore = {*sweep_module.WHERE, "finetune_seconds"}
        assert [{k: v for k, v in r.items() if k not in ignore} for r in rows] == [
            {k: v for k, v in r.items() if k not in ignore} for r in local_rows]

        before = files(out)
        again, _ = ray_sweep(ray_cluster.address, out)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "All 2 configuration(s) had finished already" in again.stdout
        assert files(out) == before, "a second run re-ran finished work"
        assert json.loads((out / "sweep.json").read_text()) == rows

    def test_a_closed_address_and_too_many_gpus_are_refused_before_anything_runs(self, ray_cluster, tmp_path):
        before = ray_cluster.other_clusters()
        start = time.monotonic()
        closed, _ = ray_sweep(f"127.0.0.1:{free_port()}", tmp_path / "closed")
        assert closed.returncode == 2 and time.monotonic() - start < 30
        assert "no Ray cluster answers there" in closed.stderr and "never starts a cluster" in closed.stderr
        assert closed.stderr.count("\n") == 1, closed.stderr  # one sentence, no traceback
        assert ray_cluster.other_clusters() <= before, "the sweep started a Ray cluster of its own"

        greedy, _ = ray_sweep(ray_cluster.address, tmp_path / "greedy", "--gpus-per-config", "2")
        assert greedy.returncode == 2
        assert "--gpus-per-config=2: no node of the cluster" in greedy.stderr
        assert "the most on one node is 1" in greedy.stderr
        assert not (tmp_path / "greedy").exists() or not any((tmp_path / "greedy").iterdir())


@pytest.mark.slow
def test_table_columns_and_values(swept):
    out, configs, table = swept
    rows = table.to_dict("records")
    with (out / "sweep.csv").open() as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == COLUMNS and json.loads((out / "sweep.json").read_text()) == rows
    assert int(written[0]["lora_parameters"]) == rows[0]["lora_parameters"]  # whole numbers stay whole
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
    out, configs, table = swept
    monkeypatch.setattr(sweep_module, "run_one", lambda *a: pytest.fail("finished work was run again"))
    monkeypatch.setattr(sweep_module, "prepare", lambda *a: pytest.fail("pre-trained again"))
    assert sweep(configs, out, SMALL, progress=False).equals(table)


@pytest.fixture
def recorded(tmp_path):
    """A folder as `swept` leaves it, as far as the refusal reads it: each run's results.json settings (a
    quick test; `test_a_second_run_reruns_nothing` checks that real runs' files pass the same check)."""
    configs = configurations([1, 4], None, False, [9], [0], [10], SMALL)
    for config in configs:
        (folder := tmp_path / config.name).mkdir()
        settings = Settings.from_mapping(config.parameters(tmp_path, SMALL)).as_dict()
        (folder / "results.json").write_text(json.dumps({"settings": settings}))
    return tmp_path, configs


def test_a_folder_of_runs_with_other_parameters_is_refused_before_anything_runs(recorded, monkeypatch,
                                                                                capsys):
    out, configs = recorded
    before = {c.name: (out / c.name / "results.json").read_bytes() for c in configs}
    monkeypatch.setattr(sweep_module, "run_one", lambda *a: pytest.fail("a configuration was run"))
    monkeypatch.setattr(sweep_module, "prepare", lambda *a: pytest.fail("pre-trained"))
    other = r"holds a run made with other parameters \(replay_share=0.0 there, 0.3 now\)"
    with pytest.raises(SettingsError, match=other):
        sweep(configs, out, {**SMALL, "replay_share": 0.3}, progress=False)
    assert main(["--ranks", "1", "--digits", "9", "--seeds", "0", "--iterations", "10", "--out", str(out),
                 "-p", "train_samples", "2000", "-p", "target_modules", "['linear3']", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "target_modules=None there, ['linear3'] now" in error and "its own --out" in error
    assert {c.name: (out / c.name / "results.json").read_bytes() for c in configs} == before  # untouched


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
    assert main(args) == 1
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in rows] == ["done", "failed"]
    diverged = "FloatingPointError: Fine-tuning diverged (the loss became nan): nothing was saved"
    assert diverged in rows[1]["error"]
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
    monkeypatch.setattr(sweep_module, "run_one", lambda config, *a: ran.append(config.rank) or
                        sweep_module.row(config, error="not run in this test"))
    table = sweep(configs, out, SMALL, jobs=1, progress=False)
    assert ran == [3], "only the interrupted configuration runs again"
    assert list(table.status) == ["done", "done", "failed"]
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
    table = sweep([config], out, SMALL, progress=False)  # collecting only
    assert table.status[0] == "done" and table.target_digit[0] == results["target_digit"]


def test_bad_values_are_refused_before_anything_runs(tmp_path, capsys):
    """Settings' own refusals (asserted in full in test_settings*) reach the command line, before any work."""
    for args, bad in [(["--ranks", "0"], "rank=0"), (["--ranks", "1", "16"], "rank=16"),
                      (["--ranks", "1", "--digits", "nine"], "target_digit='nine'"),
                      (["--ranks", "1", "-p", "device", "nonsense"], "device='nonsense'"),
                      (["--ranks", "1", "-p", "data_dir", str(tmp_path / "nowhere")], "nowhere")]:
        assert main([*args, "--out", str(tmp_path)]) == 2
        assert bad in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["--ranks", "1", "-p", "rank", "3", "--out", str(tmp_path)])


def test_ray_options_are_refused_where_they_do_not_belong(tmp_path, capsys, monkeypatch):
    for args, message in [
        (["--engine", "ray", "--jobs", "2"], "--jobs is for --engine local"),
        (["--engine", "ray", "--dry-run"], "--dry-run prints commands for a scheduler"),
        (["--address", "127.0.0.1:6379"], "--address: only with --engine ray"),
        (["--gpus-per-config", "1"], "--gpus-per-config: only with --engine ray"),
        (["--alphas", "2", "--alpha-equals-rank"], "--alpha-equals-rank: not allowed with argument --alphas"),
    ]:
        with pytest.raises(SystemExit):
            main(["--ranks", "1", "--out", str(tmp_path), *args])
        assert message in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--engine", "ray", "--ranks", "1", "--out", str(tmp_path)]) == 2
    assert "--engine ray needs the cluster's address" in capsys.readouterr().err
    assert main(["--engine", "ray", "--address", "nohost", "--ranks", "1", "--out", str(tmp_path)]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    args = ["--engine", "ray", "--address", "127.0.0.1:6379", "--ranks", "1", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_cancelled_run_stops_its_whole_process_group(monkeypatch):
    """What Ray's cancel does to a running task: a KeyboardInterrupt in its thread, which lands
    between two of run_process's short waits. papermill's whole process group is stopped."""
    marker = f"{time.time_ns() % 1000}{os.getpid()}"
    place = Place(dict(os.environ), own_session=True, node="test")
    real_communicate = subprocess.Popen.communicate
    start = time.monotonic()

    def cancelled_after_a_second(self, *args, **kwargs):
        if time.monotonic() - start > 1:
            raise KeyboardInterrupt  # as Ray's cancel raises it
        return real_communicate(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "communicate", cancelled_after_a_second)
    with pytest.raises(KeyboardInterrupt):
        run_process(["sh", "-c", f"sleep 60.{marker} & sleep 61.{marker}"], place)
    assert time.monotonic() - start < 2 + GRACE_SECONDS
    time.sleep(0.2)
    monkeypatch.undo()  # Popen.communicate as it was, for pgrep
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert not left, f"a child of the cancelled command is still running: pid {left}"


def test_rocm_nodes_are_told_how_to_get_past_rays_device_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "0,1")  # as Slurm sets it on an AMD node
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    args = ["--engine", "ray", "--address", "127.0.0.1:6379", "--ranks", "1", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ROCR_VISIBLE_DEVICES=0,1 is set" in err
    assert "export HIP_VISIBLE_DEVICES=$ROCR_VISIBLE_DEVICES; unset ROCR_VISIBLE_DEVICES" in err


def test_each_place_says_which_devices_it_was_given():
    for given in ("CUDA_VISIBLE_DEVICES=0", "HIP_VISIBLE_DEVICES=3"):  # as Ray sets them
        name, value = given.split("=")
        assert Place({name: value}, own_session=True, node="n").where(0).devices == given
    hidden = {"HIP_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": ""}  # a Ray task that asked for no GPU
    assert Place(hidden, own_session=True, node="n").where(0).devices == "none"
    assert Place({}, own_session=False, node="local").where(0).devices == ""
    where = Place({}, own_session=False, node="local").where(1.23)
    assert where.pid == os.getpid() and where.seconds == 1.2 and where.node == "local"


def test_relative_folders_are_where_the_command_runs(tmp_path, monkeypatch, capsys):
    """The notebooks run in notebooks/: `-p checkpoint_dir outputs/x` must still name ./outputs/x."""
    monkeypatch.chdir(tmp_path)
    args = ["--ranks", "1", "-p", "checkpoint_dir", "shared/checkpoints", "--out", "sweep", "--dry-run"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert all(f"checkpoint_dir: {tmp_path / 'shared' / 'checkpoints'}" in line for line in lines), lines
    assert all(f"output_dir: {tmp_path / 'sweep'}" in line for line in lines), lines
