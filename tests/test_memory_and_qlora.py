"""13's NF4 against an independent implementation (bitsandbytes), and its refusals.

The notebook's small-settings run, which checks the ledger against the measured peaks, is in
test_notebooks.py beside the other studies'."""

import math
import subprocess
import sys

import nbformat
import pytest
import torch
from torch.nn import functional as F

from lora_tutorial.lesson import lesson_source
from lora_tutorial.tools.run import notebooks_dir

bitsandbytes = pytest.importorskip("bitsandbytes", reason="pip install -e '.[test]' brings bitsandbytes")
from bitsandbytes import functional as bnb  # noqa: E402


def nf4_cell(block_size=64):
    """The names 13's cell tagged 'nf4' defines, run as the notebook runs it."""
    namespace = {"torch": torch, "F": F, "math": math, "block_size": block_size}
    exec(compile(lesson_source("13_memory_and_qlora", "nf4"), "<13, nf4>", "exec"), namespace)
    return namespace


def test_the_nf4_levels_are_bitsandbytes_and_the_papers():
    cell = nf4_cell()
    theirs = bnb.get_4bit_type("nf4", device="cpu")
    assert torch.allclose(cell["LEVELS"], theirs, rtol=0, atol=1e-6)  # the quantiles, to float32 rounding
    assert torch.allclose(cell["LEVELS"], cell["PUBLISHED_NF4"], rtol=0, atol=1e-6)
    assert cell["LEVELS"][7] == 0 and cell["LEVELS"][0] == -1 and cell["LEVELS"][-1] == 1


@pytest.mark.parametrize("shape", [(1000, 784), (10, 2000), (7, 90)])  # the last: a partial block
def test_codes_scales_and_round_trip_match_bitsandbytes_and_keep_the_bound(shape):
    cell = nf4_cell()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, absmax = cell["quantize_nf4"](weight)
    theirs, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    n = math.prod(shape)
    assert torch.equal(packed[:n // 2], theirs.flatten())  # the same 4-bit codes, two to a byte
    assert torch.equal(absmax, state.absmax)  # one scale per block, the last one partial
    back = cell["dequantize_nf4"](packed, absmax, weight.shape)
    # their round trip, on the weights flattened: bitsandbytes 0.50.2's CPU dequantize_4bit gives
    # level x scale for 1-D inputs, and other values for 2-D ones such as (1000, 784)
    flat = bnb.dequantize_4bit(*bnb.quantize_4bit(weight.flatten(), blocksize=64, quant_type="nf4"))
    assert torch.allclose(back.flatten(), flat, rtol=0, atol=1e-7)
    half_gap = float(cell["LEVELS"].diff().max() / 2)
    scales = absmax.repeat_interleave(64)[:n].view(shape)
    assert ((back - weight).abs() <= half_gap * scales * (1 + 1e-6)).all()
    assert (back - weight).abs().max() > 0.5 * half_gap * absmax.min()  # a real rounding, not a copy


@pytest.mark.slow
@pytest.mark.parametrize("given, said", [
    ("ledger_batches: [10, 0]", "ledger_batches=[10, 0] is not valid: expected a list of whole numbers >= 1, "
                                "e.g. [10, 1000, 10000]."),
    ("block_size: 63", "block_size=63 is not valid: expected an even whole number >= 2, e.g. 64."),
])  # an odd block size: two 4-bit codes share a byte
def test_a_bad_knob_is_refused_before_any_work(tmp_path, given, said):
    out = tmp_path / "13.ipynb"
    notebook = notebooks_dir() / "13_memory_and_qlora.ipynb"
    done = subprocess.run([sys.executable, "-m", "papermill", str(notebook), str(out), "--cwd",
                           str(notebooks_dir()), "-k", "python3", "--no-progress-bar",
                           "-p", "output_dir", str(tmp_path / "outputs"), "-y", given],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f"SettingsError: {said}"
    assert not (tmp_path / "outputs").exists()  # no network loaded or trained, nothing written
    ran = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" and c.execution_count]
    assert len(ran) == 3  # the knobs, papermill's parameters, the cell that checks them
