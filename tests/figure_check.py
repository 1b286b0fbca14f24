"""Notebooks run with every figure held to the figure rules (figure_rules.py), as `plt.show()` or the end
of a cell shows it: `execute` runs one through papermill; `install` is what its kernel runs first."""

import os
from pathlib import Path

from figure_rules import figure_problems

PROBLEMS = "FIGURE_PROBLEMS"  # the file the kernel writes each problem to


def execute(source: Path, target: Path, parameters: dict, cwd: Path) -> None:
    """papermill, as docs/papermill.md runs it, in a kernel that checks each figure; fails on a problem."""
    import papermill
    import pytest

    problems, here = target.with_suffix(".figure-problems.txt"), str(Path(__file__).parent)
    first = f"import sys; sys.path.insert(0, {here!r}); __import__('figure_check').install()"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROBLEMS, str(problems))
        papermill.execute_notebook(str(source), str(target), parameters=parameters, cwd=str(cwd),
                                   kernel_name="python3", progress_bar=False,
                                   extra_arguments=[f"--IPKernelApp.exec_lines={first}"])
    assert not problems.exists(), f"{source.name}'s figures break the figure rules:\n{problems.read_text()}"


def check_open_figures() -> None:
    import matplotlib.pyplot as plt

    problems = [problem for fig in map(plt.figure, plt.get_fignums()) for problem in figure_problems(fig)]
    if problems:
        with open(os.environ[PROBLEMS], "a") as f:
            f.write("".join(f"{p}\n" for p in problems))


def install() -> None:
    """In the kernel, before the inline backend shows and closes figures: in plt.show, first after a cell."""
    import matplotlib.pyplot as plt

    shown = plt.show

    def show(*args, **kwargs):
        check_open_figures()
        return shown(*args, **kwargs)

    plt.show = show
    get_ipython().events.callbacks["post_execute"].insert(0, check_open_figures)  # noqa: F821 (IPython's)
