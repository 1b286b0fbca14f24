"""The benchmark script runs and writes the table it promises (no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_tutorial.data import DATA_ENV

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tutorial.py"


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
