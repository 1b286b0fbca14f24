"""Sweep LoRA's rank (and alpha, digit, seed, steps) with papermill: `python -m lora_tutorial.sweep`.

Each configuration runs 06_compare (which fine-tunes the adapter it needs) through papermill
into `--out/<name>/`, all sharing one pre-trained checkpoint in `--out/checkpoints/`. Results
are collected into `sweep.csv` and `sweep.json` with plots beside them. The command can be run
again at any time: finished configurations (a valid `results.json`, written atomically) are
skipped, failed or interrupted ones are run again. `--dry-run` prints one papermill command per
configuration for a scheduler; running the sweep afterwards only collects their results.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write, write_json
from .evaluate import from_confusion
from .run import notebook_parameters, notebooks_dir, parse_value
from .settings import WORST, Settings, ShortError, project_root, shown_path
from .train import PROGRESS_ENV, progress_bar, text_progress_bars

NOTEBOOK = "06_compare"
COLUMNS = ["name", "rank", "alpha", "seed", "target_digit", "finetune_steps", "lora_parameters",
           "lora_share_percent", "accuracy_lora_on", "accuracy_lora_off", "target_wrong_before",
           "target_wrong_after", "target_accuracy_before", "target_accuracy_after",
           "other_digits_accuracy_before", "other_digits_accuracy_after", "finetune_seconds",
           "status", "error"]


@dataclass(frozen=True)
class Config:
    rank: int
    alpha: float
    target_digit: int | str  # a digit, or "worst" (each run decides it on its training images)
    seed: int
    finetune_steps: int

    @property
    def name(self) -> str:
        return (f"rank{self.rank}_alpha{self.alpha:g}_digit{self.target_digit}_seed{self.seed}"
                f"_steps{self.finetune_steps}")

    def parameters(self, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
        """06_compare's parameters. `seed` is the fine-tuning seed: every configuration shares the
        one pre-trained network (pre-trained with -p seed, default 0)."""
        return {**extra, "rank": self.rank, "alpha": self.alpha, "target_digit": self.target_digit,
                "finetune_seed": self.seed, "finetune_steps": self.finetune_steps,
                "output_dir": str(out / self.name), "checkpoint_dir": checkpoint_dir(out, extra)}


def target_digit(text: str) -> int | str:
    """--digits: 'worst' or a whole number (Settings checks its range)."""
    if text.strip().lower() == WORST:
        return WORST
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a digit: give 0-9 or 'worst'") from None


def checkpoint_dir(out: Path, extra: dict[str, Any]) -> str:
    """One pre-trained checkpoint folder for the whole sweep: -p checkpoint_dir, else out/checkpoints."""
    return str(extra.get("checkpoint_dir") or out / "checkpoints")


def pretrain_parameters(out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """02_pretrain's parameters for the sweep's one shared pre-training (only those it takes)."""
    taken = notebook_parameters(notebooks_dir() / "02_pretrain.ipynb")
    return {**{k: v for k, v in extra.items() if k in taken}, "output_dir": str(out),
            "checkpoint_dir": checkpoint_dir(out, extra)}


def configurations(ranks: list[int], alphas: list[float] | None, alpha_equals_rank: bool,
                   digits: list[int | str], seeds: list[int], steps: list[int],
                   extra: dict[str, Any]) -> list[Config]:
    """Every combination, each validated (with the other parameters) before anything runs."""
    configs = []
    for rank, digit, seed, step in itertools.product(ranks, digits, seeds, steps):
        # alpha fixed while the rank varies (the paper's protocol), unless asked otherwise
        for alpha in ([float(rank)] if alpha_equals_rank else alphas or [1.0]):
            config = Config(rank, float(alpha), digit, seed, step)
            Settings.from_mapping(config.parameters(Path("."), extra))
            if config not in configs:
                configs.append(config)
    return configs


def papermill_command(config: Config, out: Path, extra: dict[str, Any]) -> list[str]:
    """One plain papermill command line that runs this configuration."""
    command = [sys.executable, "-m", "papermill", str(notebooks_dir() / f"{NOTEBOOK}.ipynb"),
               str(out / config.name / f"{NOTEBOOK}.ipynb"), "--cwd", str(notebooks_dir()),
               "-k", "python3", "--no-progress-bar"]
    return command + ["-y", yaml_parameters(config.parameters(out, extra))]


def yaml_parameters(parameters: dict[str, Any]) -> str:
    """papermill's -y text for these parameters, on one line.

    PyYAML's own writer keeps every float a float (1.0, and 1.0e+20: JSON's 1e+20 would come
    back from YAML as a string) and lists as lists (`-p` would turn them into strings).
    """
    import yaml

    return yaml.safe_dump(parameters, default_flow_style=True, width=float("inf")).strip()


def finished(config: Config, out: Path) -> dict | None:
    """The configuration's results, if a complete run left them; None otherwise."""
    path = out / config.name / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    s = results.get("settings", {})
    digit = WORST if s.get("target_rule") == WORST else s.get("target_digit")  # as asked, not as decided
    seed = s.get("seed") if s.get("finetune_seed") is None else s.get("finetune_seed")
    same = (s.get("rank"), s.get("alpha"), digit, seed, s.get("finetune_steps")) == (
        config.rank, config.alpha, config.target_digit, config.seed, config.finetune_steps)
    return results if same else None


def notebook_error(path: Path) -> str:
    """'cell N: Name: message' from the first error output of an executed notebook."""
    try:
        import nbformat

        nb = nbformat.read(path, as_version=4)
    except Exception:
        return "the notebook did not run (see the command's output above)"
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index}: {output['ename']}: {output['evalue']}"
    return "papermill failed before any cell raised"


def run_one(config: Config, out: Path, extra: dict[str, Any], env: dict[str, str]) -> dict:
    folder = out / config.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.json").unlink(missing_ok=True)
    (folder / "results.json").unlink(missing_ok=True)  # a stale or foreign file must not be trusted
    done = subprocess.run(papermill_command(config, out, extra), env=env, capture_output=True, text=True)
    if done.returncode == 0 and (results := finished(config, out)):
        return {"status": "done", "results": results}
    error = notebook_error(folder / f"{NOTEBOOK}.ipynb")
    if done.returncode == 0:
        error = "the notebook ran but wrote no matching results.json"
    write_json(folder / "error.json", {"error": error, "stderr_tail": done.stderr[-2000:]})
    return {"status": "failed", "error": error}


def job_environment(slot: int, jobs: int) -> dict[str, str]:
    """Threads divided between jobs on a CPU; one GPU per job where several are visible."""
    env = dict(os.environ, **{PROGRESS_ENV: "text"})
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    gpus = _visible_gpus()
    if gpus > 1 and jobs > 1:
        key = "HIP_VISIBLE_DEVICES" if _is_rocm() else "CUDA_VISIBLE_DEVICES"
        env[key] = str(slot % gpus)
    return env


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _is_rocm() -> bool:
    import torch

    return bool(torch.version.hip)


def _digit_accuracy(evaluation: dict, digit: int) -> float:
    return from_confusion(evaluation["confusion"]).per_digit_accuracy()[digit]


def row(config: Config, outcome: dict) -> dict[str, Any]:
    base = {"name": config.name, "rank": config.rank, "alpha": config.alpha, "seed": config.seed,
            "target_digit": config.target_digit, "finetune_steps": config.finetune_steps,
            "status": outcome["status"], "error": outcome.get("error", "")}
    r = outcome.get("results")
    if not r:
        return {**{c: "" for c in COLUMNS}, **base}
    digit = r["target_digit"]  # the digit itself, when the configuration asked for "worst"
    return {**base, "target_digit": digit, "lora_parameters": r["lora_parameters"],
            "lora_share_percent": r["lora_share_percent"],
            "accuracy_lora_on": r["lora_on"]["accuracy"], "accuracy_lora_off": r["lora_off"]["accuracy"],
            "target_wrong_before": r["target_wrong_before"], "target_wrong_after": r["target_wrong_after"],
            "target_accuracy_before": _digit_accuracy(r["pretrained"], digit),
            "target_accuracy_after": _digit_accuracy(r["lora_on"], digit),
            "other_digits_accuracy_before": r["other_digits_accuracy_before"],
            "other_digits_accuracy_after": r["other_digits_accuracy_after"],
            "finetune_seconds": r.get("finetune_seconds")}


def write_table(rows: list[dict], out: Path) -> None:
    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "sweep.csv", write_csv)
    write_json(out / "sweep.json", rows)


def pretrain_once(out: Path, extra: dict[str, Any]) -> None:
    """Run 02_pretrain once, so every configuration loads the same checkpoint."""
    import papermill

    papermill.execute_notebook(str(notebooks_dir() / "02_pretrain.ipynb"), str(out / "02_pretrain.ipynb"),
                               parameters=pretrain_parameters(out, extra), cwd=str(notebooks_dir()),
                               kernel_name="python3",
                               progress_bar=False, extra_arguments=["--IPKernelApp.log_level=ERROR"])


def pretrained_exists(out: Path, extra: dict[str, Any]) -> bool:
    """Whether the sweep's pre-trained network is saved already: then no kernel is started just to
    load it (each configuration loads it itself)."""
    from .data import load_mnist
    from .pipeline import pretrained_path

    settings = Settings.from_mapping(pretrain_parameters(out, extra))
    data = load_mnist(settings.data_dir, download=settings.download, verbose=False)
    if settings.train_samples is not None:
        data = data.limit(settings.train_samples)
    return pretrained_path(settings, data).is_file()


def print_summary(rows: list[dict]) -> None:
    header = f"{'rank':>5} {'alpha':>6} {'seed':>4} {'digit':>5} {'LoRA params':>11} {'acc on':>7} " \
             f"{'wrong before->after':>20} {'others before->after':>21} {'status':>7}"
    print(header)
    for r in rows:
        if r["status"] != "done":
            print(f"{r['rank']:>5} {r['alpha']:>6g} {r['seed']:>4} {r['target_digit']:>5} {'':>11} {'':>7} "
                  f"{'':>20} {'':>21} {r['status']:>7}  {r['error']}")
            continue
        wrong = f"{r['target_wrong_before']} -> {r['target_wrong_after']}"
        others = f"{r['other_digits_accuracy_before']:.3f} -> {r['other_digits_accuracy_after']:.3f}"
        print(f"{r['rank']:>5} {r['alpha']:>6g} {r['seed']:>4} {r['target_digit']:>5} "
              f"{r['lora_parameters']:>11,} {r['accuracy_lora_on']:>7.4f} {wrong:>20} {others:>21} "
              f"{r['status']:>7}")


def sweep(configs: list[Config], out: Path, extra: dict[str, Any] | None = None, jobs: int = 1,
          progress: bool = True) -> list[dict]:
    """Run what is not finished yet, collect every configuration into the table; return its rows."""
    extra = dict(extra or {})
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    outcomes: dict[Config, dict] = {}
    todo = []
    for config in configs:
        results = finished(config, out)
        if results:
            outcomes[config] = {"status": "done", "results": results}
        else:
            todo.append(config)
    if todo:
        if not pretrained_exists(out, extra):
            with text_progress_bars():
                pretrain_once(out, extra)
        bar = progress_bar(len(todo), "Sweep", progress)
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            futures = {pool.submit(run_one, c, out, extra, job_environment(i % jobs, jobs)): c
                       for i, c in enumerate(todo)}
            for future in futures:
                outcomes[futures[future]] = future.result()
                bar.update(1)
        except BaseException:  # Ctrl-C: start nothing new; what finished stays finished
            pool.shutdown(wait=False, cancel_futures=True)
            print(f"\nSweep interrupted: the finished configurations are kept in {shown_path(out)}; "
                  "run the same command again to do the rest.", file=sys.stderr)
            raise
        finally:
            bar.close()
        pool.shutdown()
    rows = [row(c, outcomes[c]) for c in configs]
    write_table(rows, out)
    if any(r["status"] == "done" for r in rows):
        import matplotlib.pyplot as plt

        from .plots import plot_sweep

        for name, fig in plot_sweep(rows).items():
            atomic_write(out / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
            plt.close(fig)  # saved, not shown: a notebook that calls sweep() shows its own
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="ranks to try (default 1 2 4 8; the last layer has 10 outputs, so at most 10)")
    parser.add_argument("--alphas", type=float, nargs="+",
                        help="alphas to try, each at every rank (default: 1, fixed while the rank varies, as "
                             "in the LoRA paper and the post)")
    parser.add_argument("--alpha-equals-rank", action="store_true",
                        help="alpha = rank instead: the scale alpha / r stays 1, but the update still grows "
                             "with the rank (07_rank_sweep measures it)")
    parser.add_argument("--digits", type=target_digit, nargs="+", default=[WORST],
                        help="digits to fine-tune on, or 'worst' (the default: the digit the pre-trained "
                             "network gets wrong most on its training images)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="fine-tuning seeds (LoRA's random A and the batch order); every configuration "
                             "shares one pre-trained network, whose seed is -p seed (default 0)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[100], help="fine-tuning batches")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"),
                        help="another notebook parameter for every configuration (-p train_samples 5000)")
    parser.add_argument("--out", type=Path, default=project_root() / "outputs" / "sweep")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once")
    parser.add_argument("--dry-run", action="store_true",
                        help="print one papermill command per configuration")
    args = parser.parse_args(argv)
    extra = {name: parse_value(value) for name, value in args.parameter}
    reserved = {"rank", "alpha", "target_digit", "finetune_seed", "finetune_steps", "output_dir"}
    if reserved & set(extra):
        parser.error(f"-p {sorted(reserved & set(extra))}: set these with the sweep's own options")
    taken = notebook_parameters(notebooks_dir() / f"{NOTEBOOK}.ipynb")
    if set(extra) - set(taken):
        parser.error(f"-p {sorted(set(extra) - set(taken))}: {NOTEBOOK} takes no such parameter; it takes "
                     f"{sorted(set(taken) - reserved)}")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: expected an integer >= 1")
    out = args.out.resolve()
    try:
        if args.alphas and args.alpha_equals_rank:
            parser.error("--alphas and --alpha-equals-rank: give one or the other")
        configs = configurations(args.ranks, args.alphas, args.alpha_equals_rank, args.digits, args.seeds,
                                 args.iterations, extra)
        from .pipeline import preflight

        preflight(Settings.from_mapping(pretrain_parameters(out, extra)))  # GPU, folders, data
    except ShortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:  # the folders papermill writes into must exist before the commands run
        for config in configs:
            (out / config.name).mkdir(parents=True, exist_ok=True)
        print(f"# pre-train once first (shared checkpoint), then run the lines below in any order;\n"
              f"# afterwards the same sweep command without --dry-run collects them into {shown_path(out)}.")
        print(shlex.join([sys.executable, "-m", "papermill", str(notebooks_dir() / "02_pretrain.ipynb"),
                          str(out / "02_pretrain.ipynb"), "--cwd", str(notebooks_dir()), "-k", "python3",
                          "-y", yaml_parameters(pretrain_parameters(out, extra))]))
        for config in configs:
            print(shlex.join(papermill_command(config, out, extra)))
        return 0
    rows = sweep(configs, out, extra, args.jobs)
    print()
    print_summary(rows)
    print(f"\nTable: {shown_path(out / 'sweep.csv')} (and sweep.json); "
          "plots: sweep_rank.png, sweep_tradeoff.png")
    failed = [r["name"] for r in rows if r["status"] != "done"]
    if failed:
        print(f"{len(failed)} configuration(s) failed: {', '.join(failed)}. Their error.json and executed "
              "notebook say why; run the same command again to retry them.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
