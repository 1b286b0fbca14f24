"""The benchmark script runs and writes the table it promises (no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_tutorial.data import DATA_ENV

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tutorial.py"
EXPLORER = SCRIPT.with_name("bench_explorer.py")
GRAPHED = SCRIPT.with_name("bench_graphed.py")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(DATA_ENV), reason="the post's loop needs MNIST's files")
def test_benchmark_on_a_subset_writes_each_phase(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--json", str(out), "--train-samples", "200",
               "--eval-images", "300", "--finetune-steps", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["phases"]) == ["pre-train epoch", "fine-tune 5 batches", "evaluate 300 images"]
    for phase in result["phases"].values():
        assert phase["baseline_s"] > 0 and phase["project_s"] > 0
        assert phase["ratio"] == pytest.approx(phase["baseline_s"] / phase["project_s"])
        assert phase["baseline_peak_mib"] > 0 and phase["project_peak_mib"] > 0
    assert result["phases"]["pre-train epoch"]["steps"] == 20
    assert result["meta"]["train_images"] == 200 and result["meta"]["test_images"] == 300
    assert "pre-train epoch" in done.stdout and "Pre-trained accuracy: post's procedure" in done.stdout


def test_benchmark_refuses_bad_options(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--train-samples", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--train-samples=0: expected an integer >= 1" in done.stderr
    if not torch.cuda.is_available():  # the GPU comparison, asked for where there is none
        done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and "--device cuda: PyTorch" in done.stderr and "no GPU" in done.stderr


@pytest.mark.slow
def test_explorer_benchmark_takes_turns_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(EXPLORER), "--json", str(out), "--train-samples", "1000", "--presses", "2",
               "--steps", "10", "--output-dir", str(tmp_path / "outputs")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["press"]["runs"]) == 2 and len(result["plain_finetune"]["runs"]) == 2
    assert set(result["parts"]) == {"fine-tuning", "judging", "drawing"}
    assert result["ratio_press_to_plain"] == pytest.approx(
        result["press"]["median_s"] / result["plain_finetune"]["median_s"])
    for part, values in result["parts"].items():  # the parts of each press add up to less than it
        assert all(v < press for v, press in zip(values["runs"], result["press"]["runs"], strict=True)), part
    assert result["meta"]["steps"] == 10 and result["meta"]["train_images"] == 1000
    assert "one press" in done.stdout and "the 3 s budget" in done.stdout


def test_explorer_benchmark_refuses_bad_options():
    done = subprocess.run([sys.executable, str(EXPLORER), "--presses", "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--presses=0: expected an integer >= 1" in done.stderr


@pytest.mark.slow
def test_graphed_benchmark_times_both_loops_and_finds_no_gap_on_a_cpu(tmp_path):
    """On a CPU the graphed loop runs its step eagerly: the script must find the two runs' weights equal."""
    out = tmp_path / "graphed.json"
    done = subprocess.run([sys.executable, str(GRAPHED), "--device", "cpu", "--train-samples", "150",
                           "--finetune-steps", "5", "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["phases"]) == ["pre-train epoch", "fine-tune 5 batches"]
    assert [p["steps"] for p in result["phases"].values()] == [15, 5]
    for phase in result["phases"].values():
        assert phase["largest_weight_gap"] == 0.0 and phase["ratio"] == pytest.approx(
            phase["plain_s"] / phase["graphed_s"])
    assert result["accuracy"]["plain"] == result["accuracy"]["graphed"]
    refused = subprocess.run([sys.executable, str(GRAPHED), "--device", "tpu"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "device='tpu'" in refused.stderr and "'cpu'" in refused.stderr

