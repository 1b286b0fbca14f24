"""The mechanism cells that 03, 04 and 05 write out for the reader, run here without a kernel.

Each cell is found by its tag, executed in a small namespace (a freshly initialised network,
random images: no MNIST, no checkpoint) and compared with the package the later notebooks use.
A reader who edits one of these cells, or a change to the package, that breaks the agreement
the notebooks claim is caught here in a few seconds.
"""

import ast
import contextlib
import copy
import io
from dataclasses import fields
from pathlib import Path

import matplotlib
import nbformat
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lora_tutorial import (
    LoRAParametrization,
    OversizedMLP,
    Settings,
    add_lora,
    lora_modules,
    mark_only_lora_as_trainable,
    set_adapter_enabled,
)
from lora_tutorial.settings import ACCEPTED_EVERYWHERE

matplotlib.use("Agg")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LAYERS = ("linear1", "linear2", "linear3")


def tagged_source(notebook: str, tag: str) -> str:
    """The source of the one code cell of `notebook` tagged `tag`."""
    nb = nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    found = [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"{notebook}: expected one code cell tagged {tag!r}, found {len(found)}"
    return found[0]


def run_cell(source: str, **names) -> tuple[dict, str]:
    """Execute a cell's source with `names` defined; return its namespace and what it printed."""
    namespace = {"__name__": "notebook_cell", **names}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace, printed.getvalue()


def network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return OversizedMLP()


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return network()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(16, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def notebook_lora() -> type:
    """The LoRA class of 03's `lora-class` cell, defined with nothing but torch and nn."""
    namespace, _ = run_cell(tagged_source("03_parametrize", "lora-class"), torch=torch, nn=nn)
    cls = namespace.get("LoRAParametrization")
    assert isinstance(cls, type) and issubclass(cls, nn.Module), "the cell defines LoRAParametrization"
    assert cls is not LoRAParametrization, "the notebook's class is its own, not the package's"
    return cls


def test_the_notebook_lora_class_starts_as_the_paper_says(notebook_lora):
    torch.manual_seed(0)
    lora = notebook_lora(784, 1000, 4, 8.0)
    assert lora.lora_A.shape == (4, 784) and lora.lora_B.shape == (1000, 4)
    assert torch.count_nonzero(lora.lora_B) == 0, "B starts at zero"
    assert 0.9 < lora.lora_A.std().item() < 1.1 and abs(lora.lora_A.mean().item()) < 0.1, "A ~ N(0, 1)"
    assert lora.scale == 2.0 and lora.enabled is True
    assert {n for n, _ in lora.named_parameters()} == {"lora_A", "lora_B"}


@pytest.mark.parametrize(("rank", "alpha"), [(1, 1.0), (3, 5.0)])
def test_the_notebook_lora_class_computes_what_the_package_computes(notebook_lora, base, images, rank, alpha):
    """Same A and B (B non-zero) in both: the same weights and outputs, bit for bit, on and off."""
    ours, theirs = copy.deepcopy(base), add_lora(copy.deepcopy(base), rank=rank, alpha=alpha)
    for name in LAYERS:
        layer = ours.get_submodule(name)
        parametrize.register_parametrization(
            layer, "weight", notebook_lora(layer.in_features, layer.out_features, rank, alpha))
    mine = {name: ours.get_submodule(name).parametrizations.weight[0] for name in LAYERS}
    package = lora_modules(theirs)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in LAYERS:
            mine[name].lora_B.copy_(torch.randn(mine[name].lora_B.shape, generator=generator) * 0.05)
            package[name].lora_A.copy_(mine[name].lora_A)
            package[name].lora_B.copy_(mine[name].lora_B)
    for enabled in (True, False):
        for lora in mine.values():
            lora.enabled = enabled
        set_adapter_enabled(theirs, enabled)
        with torch.no_grad():
            for name in LAYERS:
                weight = ours.get_submodule(name).weight
                assert torch.equal(weight, theirs.get_submodule(name).weight), (name, enabled)
                original = base.get_submodule(name).weight
                assert torch.equal(weight, original) != enabled, "on: W + update; off: W itself"
            assert torch.equal(ours(images), theirs(images)), enabled


def test_the_freezing_loop_freezes_what_the_package_freezes():
    model = add_lora(network(), rank=2)
    packaged = copy.deepcopy(model)
    _, printed = run_cell(tagged_source("04_freeze", "freeze-loop"), model=model, torch=torch)
    frozen = mark_only_lora_as_trainable(packaged)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: p.requires_grad for n, p in packaged.named_parameters()}
    assert len(frozen) == 6 and all(name in printed for name in frozen), "it says what it froze"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 6_794


def test_the_step_by_hand_moves_b_only(images):
    torch.manual_seed(0)
    step_model = add_lora(network(), rank=1)
    mark_only_lora_as_trainable(step_model)
    before = {n: p.detach().clone() for n, p in step_model.named_parameters()}
    labels = torch.arange(len(images)) % 10
    namespace, printed = run_cell(tagged_source("05_finetune", "one-step"), step_model=step_model,
                                  torch=torch, nn=nn, batch_images=images, batch_labels=labels,
                                  settings=Settings())
    after = dict(step_model.named_parameters())
    for name, value in before.items():
        if "lora_" not in name:
            assert torch.equal(after[name], value), f"{name}: a frozen weight changed"
            assert after[name].grad is None, f"{name}: a frozen weight got a gradient"
        elif name.endswith("lora_A"):
            assert torch.equal(after[name], value), f"{name}: A cannot move while B = 0"
        else:
            assert not torch.equal(after[name], value), f"{name}: B did not move"
            assert (after[name] - value).abs().max() <= Settings().learning_rate * 1.001, "Adam's first step"
    assert isinstance(namespace.get("optimizer"), torch.optim.Adam)
    assert all(name in printed for name in before), "the table lists every parameter"


def parameter_names(notebook: str) -> set[str]:
    tree = ast.parse(tagged_source(notebook, "parameters"))
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}


LESSON_KNOBS = {
    "03_parametrize": {"rank", "alpha"},
    "05_finetune": {"rank", "alpha", "target_digit", "finetune_steps", "finetune_learning_rate",
                    "finetune_seed"},
}


@pytest.mark.parametrize("notebook", sorted(LESSON_KNOBS))
def test_each_parameters_cell_holds_the_lessons_knobs_only(notebook):
    """Where files go, the device and 02's recipe are taken from papermill without being listed."""
    declared = parameter_names(notebook)
    assert declared == LESSON_KNOBS[notebook]
    assert declared <= {f.name for f in fields(Settings)}, "every parameter is a setting"
    assert not declared & set(ACCEPTED_EVERYWHERE), "plumbing is not a lesson knob"


def test_the_lora_diagram_is_a_labelled_drawing():
    from lora_tutorial.diagrams import lora_diagram
    from lora_tutorial.plots import BACKGROUND

    symbolic, sized = lora_diagram(), lora_diagram(2000, 1000, 4)
    try:
        for fig in (symbolic, sized):
            (ax,) = fig.axes
            assert not ax.axison, "a diagram has no data axes"
            assert ax.get_title()
            assert matplotlib.colors.to_hex(fig.get_facecolor()) == matplotlib.colors.to_hex(BACKGROUND)
            assert fig.get_facecolor()[3] == 1.0, "opaque, for JupyterLab's dark theme"
        text = " ".join(t.get_text() for t in sized.axes[0].texts)
        for label in ("W", "A", "B", "2,000 × 1,000 = 2,000,000", "4 × 1,000 = 4,000", "2,000 × 4 = 8,000"):
            assert label in text, label
        assert "out × in" in " ".join(t.get_text() for t in symbolic.axes[0].texts)
        with pytest.raises(ValueError) as refused:
            lora_diagram(10, 2000, 11)
        assert "rank=11" in str(refused.value) and "= 10" in str(refused.value)  # the value and the limit
        with pytest.raises(ValueError, match="rank=None"):  # all three sizes, or none
            lora_diagram(10, 2000)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
