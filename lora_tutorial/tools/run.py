"""Run the whole tutorial headless: `python -m lora_tutorial.tools.run`.

Executes the six notebooks in order with papermill, each into an executed copy under --out,
all with the same parameters, then prints a short summary of the results. With --check it
also fails unless the post's trends hold (see TRENDS). `--only 07_rank_sweep 08_why_low_rank
09_forgetting 10_peft_and_many_adapters` runs the four notebooks that go beyond the post.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..pipeline import describe_target
from ..settings import (
    ACCEPTED_EVERYWHERE,
    Settings,
    SettingsError,
    ShortError,
    assigned_names,
    project_root,
    shown_path,
)
from ..train import text_progress_bars

STEPS = ("01_data", "02_pretrain", "03_parametrize", "04_freeze", "05_finetune", "06_compare")
# beyond the post: run them with --only
BEYOND = ("07_rank_sweep", "08_why_low_rank", "09_forgetting", "10_peft_and_many_adapters", "11_explorer")
# The bar for the pre-trained accuracy: the post's 0.95 less a margin for other hardware; a network
# pre-trained on the offline sample's 4,000 images gets a lower bar (it reaches about 0.90).
ACCURACY_BAR = {"mnist": 0.94, "sample": 0.85}
TRENDS = (
    "pre-trained accuracy >= 0.94 (0.85 on the offline sample)",
    "wrong answers on the target digit fall by >= 70 %",
    "LoRA off reproduces the pre-trained results exactly",
)


def parse_value(text: str) -> Any:
    """'4' -> 4, '0.5' -> 0.5, 'None' -> None, 'cpu' -> 'cpu' (like papermill's -p)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebooks_dir() -> Path:
    folder = project_root() / "notebooks"
    if not folder.is_dir():
        raise SystemExit(f"No notebooks/ folder in {project_root()}: run this from a clone of the "
                         "project, installed with `pip install -e .`.")
    return folder


def notebook_parameters(path: Path) -> list[str]:
    """The names a notebook's `parameters` cell declares: the only ones it takes."""
    cells = json.loads(Path(path).read_text()).get("cells", [])
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell["source"]
            return assigned_names(source if isinstance(source, str) else "".join(source))
    return []


def split_parameters(parameters: dict[str, Any], steps: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each notebook's share of the parameters: the names its parameters cell declares, and the
    settings every notebook takes (ACCEPTED_EVERYWHERE). A name that none of them takes is refused
    (a misspelling, or a notebook left out of --only)."""
    taken = {step: [*notebook_parameters(notebooks_dir() / f"{step}.ipynb"), *ACCEPTED_EVERYWHERE]
             for step in steps}
    every = sorted({name for names in taken.values() for name in names})
    unknown = sorted(set(parameters) - set(every))
    if unknown:
        raise SettingsError(f"No notebook run here takes {unknown}: check the spelling. The notebooks "
                            f"run ({', '.join(steps)}) take {every}.")
    return {step: {k: v for k, v in parameters.items() if k in names} for step, names in taken.items()}


def check_trends(results: dict) -> list[str]:
    """The post's trends that these results break (empty when all hold)."""
    failed = []
    bar = ACCURACY_BAR["sample" if results.get("data", {}).get("source") == "sample" else "mnist"]
    if results["pretrained"]["accuracy"] < bar:
        failed.append(f"pre-trained accuracy >= {bar}: got {results['pretrained']['accuracy']:.4f}")
    before, after = results["target_wrong_before"], results["target_wrong_after"]
    if before == 0 or after > 0.3 * before:
        failed.append(f"{TRENDS[1]}: {before} -> {after}")
    if not results["lora_off_equals_pretrained"]:
        failed.append(TRENDS[2])
    return failed


def summary(results: dict) -> str:
    pre, on = results["pretrained"], results["lora_on"]
    digit = results["target_digit"]
    before, after = results["target_wrong_before"], results["target_wrong_after"]
    return "\n".join([
        f"Data: {results['data']['location']} ({results['data']['train_images']:,} training, "
        f"{results['data']['test_images']:,} test images)",
        f"Target digit:                {describe_target(digit, results.get('target_rule'))}",
        f"Pre-trained accuracy:        {pre['accuracy']:.4f}",
        f"With LoRA (rank {results['settings']['rank']}):          {on['accuracy']:.4f}",
        f"Wrong answers on digit {digit}:    {before} -> {after}",
        f"Other digits, mean accuracy: {results['other_digits_accuracy_before']:.4f} -> "
        f"{results['other_digits_accuracy_after']:.4f}",
        f"LoRA off == pre-trained:     {results['lora_off_equals_pretrained']}",
        f"Trained parameters:          {results['lora_parameters']:,} of "
        f"{results['base_parameters']:,} ({results['lora_share_percent']:.3f} %)",
    ])


PRETRAINING_TAG = "pretraining"  # the cell of 02_pretrain that pre-trains (or loads) the network


def _tidy(path: Path) -> tuple[float, float]:
    """Keep papermill's recorded paths relative to the project (no machine paths in shared
    notebooks), drop the widget state, and merge each progress bar's updates into its final line,
    as Jupyter shows them; return the seconds the notebook's cells took (start-up excluded) and,
    of those, the seconds of the cell tagged 'pretraining'."""
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    from ..checkpoints import atomic_write

    nb = nbformat.read(path, as_version=4)
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    # papermill stores the widgets' state too (11's panel: its figure twice over); JupyterLab does
    # not restore it by default, and the panel's output carries its own text and figure instead
    nb.metadata.pop("widgets", None)
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            meta[key] = shown_path(Path(meta[key]))
    atomic_write(path, lambda tmp: nbformat.write(nb, str(tmp)))

    def seconds(cell) -> float:
        return cell.metadata.get("papermill", {}).get("duration") or 0.0

    return (sum(map(seconds, nb.cells)),
            sum(seconds(c) for c in nb.cells if PRETRAINING_TAG in c.metadata.get("tags", [])))


def _peak_kernel_mib() -> float | None:
    """The largest resident memory any finished child process (a kernel) reached, in MiB."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
# Run by a kernel as it starts, outside the notebook (no name bound, no history, no cell number).
WARM_UP = "--IPKernelApp.exec_lines=__import__('lora_tutorial');"


def _start_kernel(cwd: Path):
    """A kernel for the next notebook, started at once: it imports the package (PyTorch is the
    slow part, seconds) while the current notebook still runs, on another core."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    kernel = AsyncKernelManager(kernel_name="python3")
    run_sync(kernel.start_kernel)(cwd=str(cwd), extra_arguments=[*KERNEL_ARGUMENTS, WARM_UP])
    return kernel


def _stop_kernel(kernel) -> None:
    from jupyter_core.utils import run_sync

    run_sync(kernel.shutdown_kernel)(now=True)


PATH_PARAMETERS = ("data_dir", "output_dir", "checkpoint_dir")


def absolute_paths(parameters: dict[str, Any]) -> dict[str, Any]:
    """Folder parameters made absolute, relative to where the command runs: the kernels run in
    notebooks/, where `-p output_dir outputs/x` would otherwise name another folder."""
    return {name: str(Path(value).expanduser().resolve())
            if name in PATH_PARAMETERS and isinstance(value, str) and value.strip() else value
            for name, value in parameters.items()}


def run(out: Path, parameters: dict[str, Any], steps: tuple[str, ...] = STEPS) -> dict | None:
    """Execute the notebooks into `out`; return the results JSON of 06_compare when it ran."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from ..pipeline import preflight

    parameters = absolute_paths(parameters)
    shares = split_parameters(parameters, steps)  # a name no notebook takes fails here
    known = {f for f in Settings.__dataclass_fields__ if f != "target_rule"}
    # bad values fail here, before any notebook (a notebook's own extras are checked by it)
    settings = Settings.from_mapping({k: v for k, v in parameters.items() if k in known})
    preflight(settings)  # and so do a missing GPU, an unwritable folder, an empty data folder
    source = notebooks_dir()
    out.mkdir(parents=True, exist_ok=True)
    results_path = settings.output_path / "results.json"
    started_all, started_at = time.perf_counter(), time.time()
    pretraining = 0.0
    with text_progress_bars():  # plain-text bars in the executed copies (kernels inherit it)
        upcoming = _start_kernel(source)
        try:
            for index, step in enumerate(steps):
                kernel, upcoming = upcoming, (_start_kernel(source) if index + 1 < len(steps) else None)
                target = out / f"{step}.ipynb"
                print(f"Running {step} ...", end=" ", flush=True)
                started = time.perf_counter()
                try:
                    papermill.execute_notebook(str(source / f"{step}.ipynb"), str(target), km=kernel,
                                               parameters=shares[step], cwd=str(source),
                                               kernel_name="python3",
                                               progress_bar=False, extra_arguments=KERNEL_ARGUMENTS)
                except PapermillExecutionError as err:
                    print("failed.")
                    raise SystemExit(f"{step} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                                     f"The executed copy, with the error, is {shown_path(target)}.") from None
                finally:
                    _stop_kernel(kernel)
                cells, tagged = _tidy(target)
                pretraining += tagged
                print(f"done in {time.perf_counter() - started:.1f} s (cells {cells:.1f} s)")
        finally:
            if upcoming is not None:  # a notebook failed, or Ctrl-C: the kernel started for the next one
                _stop_kernel(upcoming)
    total = time.perf_counter() - started_all
    split = (f": the pre-training cell {pretraining:.1f} s, everything else {total - pretraining:.1f} s "
             "(starting kernels, imports, data, the other cells)" if "02_pretrain" in steps else "")
    print(f"All {len(steps)} notebooks ran in {total:.1f} s{split}. "
          f"Executed copies are in {shown_path(out)}.")
    peak = _peak_kernel_mib()
    if peak:
        print(f"Peak memory of a notebook kernel: {peak:,.0f} MiB.")
    if "06_compare" not in steps:
        return None
    if not results_path.is_file() or results_path.stat().st_mtime < started_at:  # never an old file
        raise SystemExit(f"06_compare ran but wrote no results to {shown_path(results_path)}; "
                         f"its executed copy, {shown_path(out / '06_compare.ipynb')}, shows what it did.")
    return json.loads(results_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.tools.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=project_root() / "outputs" / "run",
                        help="folder for the executed notebooks (default: outputs/run)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="a notebook parameter, e.g. -p rank 4")
    parser.add_argument("--only", nargs="+", choices=STEPS + BEYOND,
                        help="run only these notebooks (07-10 run only when named here)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the post's trends hold: " + "; ".join(TRENDS).replace("%", "%%"))
    args = parser.parse_args(argv)
    if args.check and args.only and "06_compare" not in args.only:
        parser.error("--check reads the results of 06_compare: name it in --only too, or leave --only out")
    parameters = {name: parse_value(value) for name, value in args.parameter}
    try:
        results = run(args.out, parameters, tuple(args.only) if args.only else STEPS)
    except ShortError as err:  # a bad parameter or folder: one clear sentence, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results is None:
        return 0
    print("\n" + summary(results))
    if args.check:
        failed = check_trends(results)
        for line in failed:
            print(f"TREND FAILED: {line}", file=sys.stderr)
        if failed:
            return 1
        print("All of the post's trends hold: " + "; ".join(TRENDS) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
