"""Run the post's notebooks (01-06) with papermill into --out, then a summary; --check: do the TRENDS hold?"""

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from jupyter_core.utils import run_sync

from ..checkpoints import atomic_write
from ..lesson import lesson_source, notebooks_folder
from ..pipeline import preflight
from ..settings import (
    ACCEPTED_EVERYWHERE,
    WORST,
    Settings,
    SettingsError,
    ShortError,
    assigned_names,
    project_root,
    shown_path,
)
from ..train import PROGRESS_ENV

STEPS = ("01_data", "02_pretrain", "03_parametrize", "04_freeze", "05_finetune", "06_compare")
BEYOND = ("07_rank_sweep", "08_why_low_rank", "09_forgetting", "10_peft_and_many_adapters", "11_explorer",
          "12_lora_family", "13_memory_and_qlora")
ACCURACY_BAR = {"mnist": 0.94, "sample": 0.85}  # the post's 0.95 less a margin; the sample reaches 0.90
TRENDS = ("pre-trained accuracy >= 0.94 (0.85 on the offline sample)",
          "wrong answers on the target digit fall by >= 70 %",
          "LoRA off reproduces the pre-trained results exactly")
PATH_PARAMETERS = ("data_dir", "output_dir", "checkpoint_dir")
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
# Run by a kernel as it starts, outside the notebook (no name bound, no history, no cell number).
WARM_UP = "--IPKernelApp.exec_lines=__import__('lora_tutorial');"

def parse_value(text: str) -> Any:
    """A -p value: '4' -> 4, 'None' -> None, "['a']" -> ['a'], 'cpu' -> 'cpu'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text

def notebooks_dir() -> Path:
    if not (folder := notebooks_folder()).is_dir():
        raise SystemExit(f"No notebooks/ folder in {project_root()}: run from a clone (pip install -e .).")
    return folder

def notebook_parameters(path: Path) -> list[str]:
    """Its parameters cell's names (papermill.inspect_notebook skips a line holding two '=', as 11's)."""
    return assigned_names(lesson_source(path.stem, "parameters", path.parent))

def notebook_takes(step: str) -> list[str]:
    return [*notebook_parameters(notebooks_dir() / f"{step}.ipynb"), *ACCEPTED_EVERYWHERE]

def split_parameters(parameters: dict[str, Any], steps: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each notebook's share; a name none takes is refused (a misspelling, or a notebook not in --only)."""
    taken = {step: notebook_takes(step) for step in steps}
    every = sorted({name for names in taken.values() for name in names})
    if unknown := sorted(set(parameters) - set(every)):
        raise SettingsError(f"No notebook run here takes {unknown}: check the spelling. The notebooks "
                            f"run ({', '.join(steps)}) take {every}.")
    return {step: {k: v for k, v in parameters.items() if k in names} for step, names in taken.items()}

def check_trends(results: dict) -> list[str]:
    """The post's trends that these results break (empty when all hold)."""
    r, bar = results, ACCURACY_BAR["sample" if results.get("data", {}).get("source") == "sample" else "mnist"]
    pre, before, after = r["pretrained"]["accuracy"], r["target_wrong_before"], r["target_wrong_after"]
    checks = [(pre >= bar, f"pre-trained accuracy >= {bar}: got {pre:.4f}"),
              (0 < before and after <= 0.3 * before, f"{TRENDS[1]}: {before} -> {after}"),
              (r["lora_off_equals_pretrained"], TRENDS[2])]
    return [message for held, message in checks if not held]

def summary(results: dict) -> str:
    """The runner's summary of 06_compare's results (the docs show it for the committed run)."""
    r, digit, data = results, results["target_digit"], results["data"]
    return "\n".join([
        f"Data: {data['location']} ({data['train_images']:,} training, {data['test_images']:,} test images)",
        f"Target digit:                {digit} ({'the worst' if r.get('target_rule') == WORST else 'given'})",
        f"Pre-trained accuracy:        {r['pretrained']['accuracy']:.4f}",
        f"With LoRA (rank {r['settings']['rank']}):          {r['lora_on']['accuracy']:.4f}",
        f"Wrong answers on digit {digit}:    {r['target_wrong_before']} -> {r['target_wrong_after']}",
        f"Other digits, mean accuracy: {r['other_digits_accuracy_before']:.4f} -> "
        f"{r['other_digits_accuracy_after']:.4f}",
        f"LoRA off == pre-trained:     {r['lora_off_equals_pretrained']}",
        f"Trained parameters:          {r['lora_parameters']:,} of {r['base_parameters']:,} "
        f"({r['lora_share_percent']:.3f} %)"])

def _tidy(path: Path) -> tuple[float, float]:
    """Project-relative paths, no widgets, bars merged as Jupyter shows them; seconds (all, pretraining)."""
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    nb, _ = CoalesceStreamsPreprocessor().preprocess(nbformat.read(path, as_version=4), {})
    nb.metadata.pop("widgets", None)
    meta = nb.metadata.get("papermill", {})
    meta.update({k: shown_path(Path(meta[k])) for k in ("input_path", "output_path") if meta.get(k)})
    atomic_write(path, lambda tmp: nbformat.write(nb, str(tmp)))
    seconds = [(c.metadata.get("papermill", {}).get("duration") or 0.0, c.metadata.get("tags", []))
               for c in nb.cells]
    return sum(s for s, _ in seconds), sum(s for s, tags in seconds if "pretraining" in tags)

def _start_kernel(cwd: Path):
    """A kernel started ahead (it imports the package while the current notebook runs); text bars."""
    from jupyter_client.manager import AsyncKernelManager

    kernel = AsyncKernelManager(kernel_name="python3")
    run_sync(kernel.start_kernel)(cwd=str(cwd), extra_arguments=[*KERNEL_ARGUMENTS, WARM_UP],
                                  env={**os.environ, PROGRESS_ENV: "text"})
    return kernel

def absolute_paths(parameters: dict[str, Any]) -> dict[str, Any]:
    """Folder parameters made absolute where the command runs (the kernels run in notebooks/)."""
    return {name: str(Path(value).expanduser().resolve())
            if name in PATH_PARAMETERS and isinstance(value, str) and value.strip() else value
            for name, value in parameters.items()}

def run(out: Path, parameters: dict[str, Any], steps: tuple[str, ...] = STEPS) -> dict | None:
    """Execute the notebooks into `out`; return the results JSON of 06_compare when it ran."""
    import papermill

    shares = split_parameters(parameters := absolute_paths(parameters), steps)  # a name none takes fails here
    # bad values, a missing GPU, an unwritable or empty folder fail before any notebook (extras: in it)
    preflight(settings := Settings.from_mapping({k: parameters[k] for k in parameters
                                                 if k in Settings.__dataclass_fields__}))
    source, results_path = notebooks_dir(), settings.output_path / "results.json"
    out.mkdir(parents=True, exist_ok=True)
    started_all, started_at, pretraining = time.perf_counter(), time.time(), 0.0
    upcoming = _start_kernel(source)
    try:
        for index, step in enumerate(steps):
            kernel, upcoming = upcoming, (_start_kernel(source) if index + 1 < len(steps) else None)
            target, started = out / f"{step}.ipynb", time.perf_counter()
            print(f"Running {step} ...", end=" ", flush=True)
            try:
                papermill.execute_notebook(str(source / f"{step}.ipynb"), str(target), km=kernel,
                                           parameters=shares[step], cwd=str(source), progress_bar=False,
                                           kernel_name="python3", extra_arguments=KERNEL_ARGUMENTS)
            except papermill.PapermillExecutionError as err:
                print("failed.")
                raise SystemExit(f"{step} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                                 f"The executed copy, with the error, is {shown_path(target)}.") from None
            finally:
                run_sync(kernel.shutdown_kernel)(now=True)
            cells, tagged = _tidy(target)
            pretraining += tagged
            print(f"done in {time.perf_counter() - started:.1f} s (cells {cells:.1f} s)")
    finally:
        if upcoming is not None:  # a notebook failed, or Ctrl-C: the kernel started for the next one
            run_sync(upcoming.shutdown_kernel)(now=True)
    total = time.perf_counter() - started_all
    split = (f": the pre-training cell {pretraining:.1f} s, everything else {total - pretraining:.1f} s "
             "(starting kernels, imports, data, the other cells)" if "02_pretrain" in steps else "")
    print(f"All {len(steps)} notebooks ran in {total:.1f} s{split}. Executed copies: {shown_path(out)}.")
    if sys.platform != "win32":  # the largest resident memory a finished kernel reached (KiB; macOS: bytes)
        from resource import RUSAGE_CHILDREN, getrusage

        peak = getrusage(RUSAGE_CHILDREN).ru_maxrss / 2**(20 if sys.platform == "darwin" else 10)
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
    add = parser.add_argument
    add("--out", type=Path, default=project_root() / "outputs" / "run", help="default: outputs/run")
    add("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="a notebook parameter, e.g. -p rank 4")
    add("--only", nargs="+", choices=STEPS + BEYOND, help="these notebooks only (07-12 run only if named)")
    add("--check", action="store_true", help="exit 1 unless: " + "; ".join(TRENDS).replace("%", "%%"))
    args = parser.parse_args(argv)
    if args.check and args.only and "06_compare" not in args.only:
        parser.error("--check reads the results of 06_compare: name it in --only too, or leave --only out")
    try:
        results = run(args.out, {name: parse_value(value) for name, value in args.parameter},
                      tuple(args.only or STEPS))
    except ShortError as err:  # a bad parameter or folder: one clear sentence, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results is None:
        return 0
    print("\n" + summary(results))
    failed = check_trends(results) if args.check else []
    for line in failed:
        print(f"TREND FAILED: {line}", file=sys.stderr)
    if args.check and not failed:
        print("All of the post's trends hold: " + "; ".join(TRENDS) + ".")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
