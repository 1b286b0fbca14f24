"""Sweep LoRA's rank (and alpha, digit, seed, steps): one papermill run of 06_compare per configuration under
--out, all from one pre-training, into sweep.csv, sweep.json and plots. Run it again: only the rest runs."""

import argparse
import itertools
import json
import shlex
import sys
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import yaml

from ..checkpoints import atomic_write, write_json
from ..data import load_mnist
from ..evaluate import from_confusion
from ..pipeline import preflight, pretrained_path
from ..plots import plot_sweep
from ..settings import WORST, Settings, SettingsError, ShortError, project_root, shown_path
from ..train import progress_bar
from .engines import LocalEngine, Place, RayEngine, Where, run_process
from .run import absolute_paths, notebook_takes, notebooks_dir, parse_value

NOTEBOOK = "06_compare"
RESULTS = ["lora_parameters", "lora_share_percent", "target_wrong_before", "target_wrong_after",
           "other_digits_accuracy_before", "other_digits_accuracy_after"]  # copied from results.json
WHERE = list(Where.__dataclass_fields__)
COLUMNS = ["name", "rank", "alpha", "seed", "target_digit", "finetune_steps", *RESULTS[:2],
           "accuracy_lora_on", "accuracy_lora_off", *RESULTS[2:4], "target_accuracy_before",
           "target_accuracy_after", *RESULTS[4:], "finetune_seconds", *WHERE, "status", "error"]
RESERVED = {"rank", "alpha", "target_digit", "finetune_seed", "finetune_steps", "output_dir"}  # its options
# Settings a folder's name does not record that do not change results: a finished run is re-used across them.
NOT_DECIDING = RESERVED | {"target_rule", "checkpoint_dir", "data_dir", "device", "download"}

@dataclass(frozen=True)
class Config:
    rank: int
    alpha: float
    target_digit: int | str  # a digit, or "worst" (each run decides it on its training images)
    seed: int  # the fine-tuning seed: every configuration shares one pre-trained network
    finetune_steps: int

    @property
    def name(self) -> str:
        return (f"rank{self.rank}_alpha{self.alpha:g}_digit{self.target_digit}_seed{self.seed}"
                f"_steps{self.finetune_steps}")

    def parameters(self, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, "rank": self.rank, "alpha": self.alpha, "target_digit": self.target_digit,
                "finetune_seed": self.seed, "finetune_steps": self.finetune_steps,
                "output_dir": str(out / self.name), "checkpoint_dir": checkpoint_dir(out, extra)}

def row(config: Config, results: dict | None = None, where: Where | None = None, error: str = "") -> dict:
    """The table's row (a record of COLUMNS): done with results, else failed with `error`."""
    record = {**dict.fromkeys(COLUMNS), **asdict(config), "name": config.name, "status": "failed",
              "error": error, **(asdict(where) if where else {})}
    if results:
        digit = results["target_digit"]  # the digit itself, when the configuration asked for "worst"
        accuracy = [from_confusion(results[k]["confusion"]).per_digit_accuracy()[digit]
                    for k in ("pretrained", "lora_on")]
        record.update({k: results[k] for k in RESULTS}, status="done", target_digit=digit,
                      accuracy_lora_on=results["lora_on"]["accuracy"], target_accuracy_before=accuracy[0],
                      accuracy_lora_off=results["lora_off"]["accuracy"], target_accuracy_after=accuracy[1],
                      finetune_seconds=results.get("finetune_seconds"))
    return record

def checkpoint_dir(out: Path, extra: dict[str, Any]) -> str:  # one checkpoint folder for all
    return str(extra.get("checkpoint_dir") or out / "checkpoints")

def pretrain_parameters(out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in extra.items() if k in notebook_takes("02_pretrain")}, "output_dir": str(out),
            "checkpoint_dir": checkpoint_dir(out, extra)}

def configurations(ranks: list[int], alphas: list[float] | None, alpha_equals_rank: bool,
                   digits: list[int | str], seeds: list[int], steps: list[int],
                   extra: dict[str, Any]) -> list[Config]:
    """Every combination, each checked by Settings; alpha stays 1 while the rank varies (the paper's)."""
    configs = list(dict.fromkeys(Config(rank, float(alpha), digit, seed, step) for rank, digit, seed, step
                                 in itertools.product(ranks, digits, seeds, steps)
                                 for alpha in ([rank] if alpha_equals_rank else alphas or [1.0])))
    for config in configs:
        Settings.from_mapping(config.parameters(Path("."), extra))
    return configs

def command(notebook: str, folder: Path, parameters: dict[str, Any]) -> list[str]:
    """papermill with YAML parameters: floats stay floats (JSON's 1e+20 reads back as text), lists lists."""
    text = yaml.safe_dump(parameters, default_flow_style=True, width=float("inf")).strip()
    return [sys.executable, "-m", "papermill", str(notebooks_dir() / f"{notebook}.ipynb"),
            str(folder / f"{notebook}.ipynb"), "--cwd", str(notebooks_dir()), "-k", "python3",
            "--no-progress-bar", "-y", text]

def read_json(path: Path) -> Any:
    """None when the file is missing or cut off mid-write."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

def finished(config: Config, out: Path) -> dict | None:
    """The configuration's results, if a complete run of this very configuration left them."""
    results = read_json(out / config.name / "results.json") or {}
    s = results.get("settings", {})
    digit = WORST if s.get("target_rule") == WORST else s.get("target_digit")  # as asked, not as decided
    seed = s.get("seed") if s.get("finetune_seed") is None else s.get("finetune_seed")
    same = Config(s.get("rank"), s.get("alpha"), digit, seed, s.get("finetune_steps")) == config
    return results if same else None

def check_same_parameters(configs: list[Config], out: Path, extra: dict[str, Any]) -> None:
    """Refuse a folder holding runs made with other -p parameters: they would be re-used or overwritten."""
    for config in configs:
        recorded = (read_json(out / config.name / "results.json") or {}).get("settings", {})
        wanted = json.loads(json.dumps(Settings.from_mapping(config.parameters(out, extra)).as_dict()))
        if differ := [f"{k}={recorded[k]!r} there, {v!r} now" for k, v in wanted.items()
                      if k not in NOT_DECIDING and k in recorded and recorded[k] != v]:  # old files lack some
            raise SettingsError(f"{shown_path(out / config.name)} holds a run made with other parameters "
                                f"({'; '.join(differ)}): give the sweep its own --out, or delete the folder.")

def notebook_error(path: Path) -> str:
    """'cell N: Name: message' from the first error output of an executed notebook."""
    if (nb := read_json(path)) is None:
        return "the notebook did not run (see the command's output above)"
    errors = [f"cell {i}: {o['ename']}: {o['evalue']}" for i, cell in enumerate(nb.get("cells", []))
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    return errors[0] if errors else "papermill failed before any cell raised"

def run_one(config: Config, out: Path, extra: dict[str, Any], place: Place) -> dict:
    """Run one configuration where the engine put it; return its row."""
    (folder := out / config.name).mkdir(parents=True, exist_ok=True)
    for name in ("error.json", "results.json", "ran.json"):  # a stale or foreign file must not be trusted
        (folder / name).unlink(missing_ok=True)
    done, where = run_process(command(NOTEBOOK, folder, config.parameters(out, extra)), place)
    if done.returncode == 0 and (results := finished(config, out)):
        write_json(folder / "ran.json", asdict(where))
        return row(config, results, where)
    error = ("the notebook ran but wrote no matching results.json" if done.returncode == 0
             else notebook_error(folder / f"{NOTEBOOK}.ipynb"))
    write_json(folder / "error.json",
               {"error": error, "where": asdict(where), "stderr_tail": done.stderr[-2000:]})
    return row(config, where=where, error=error)

def prepare(out: Path, extra: dict[str, Any], place: Place) -> Where | None:
    """Run 02_pretrain once, where the engine runs work, unless the sweep's network is saved already."""
    if pretrained_exists(out, extra):
        return None
    done, where = run_process(command("02_pretrain", out, pretrain_parameters(out, extra)), place)
    if done.returncode != 0:
        raise ShortError(f"the sweep's pre-training failed ({notebook_error(out / '02_pretrain.ipynb')}); "
                         f"its executed notebook is in {shown_path(out)}. Nothing else ran.")
    return where

def pretrained_exists(out: Path, extra: dict[str, Any]) -> bool:
    """Whether the sweep's pre-trained network is saved (then no kernel starts just to load it)."""
    settings = Settings.from_mapping(pretrain_parameters(out, extra))
    data = load_mnist(settings.data_dir, download=settings.download, verbose=False)
    return pretrained_path(settings, data if settings.train_samples is None
                           else data.limit(settings.train_samples)).is_file()

def sweep(configs: list[Config], out: Path, extra: dict[str, Any] | None = None, jobs: int = 1,
          progress: bool = True, engine: LocalEngine | RayEngine | None = None) -> pd.DataFrame:
    """Run what is not finished (by default here, `jobs` at a time); write and return the table and plots."""
    extra, out, engine = dict(extra or {}), out.resolve(), engine or LocalEngine(jobs)
    check_same_parameters(configs, out, extra)
    out.mkdir(parents=True, exist_ok=True)
    rows = {c: row(c, r, Where(**ran) if (ran := read_json(out / c.name / "ran.json")) else None)
            for c in configs if (r := finished(c, out))}  # older sweeps did not record where it ran
    if todo := [c for c in configs if c not in rows]:
        engine.check_folder(out)  # on a cluster: can every node read and write it?
        try:
            if progress:
                print("The shared pre-trained network (02_pretrain): loading it, or training it once ...")
            if err := (pretraining := engine.submit(prepare, out, extra)).exception():
                raise ShortError(engine.failure(err)) from None
            if progress and (where := pretraining.result()):
                print(f"Pre-trained it in {where.seconds:.0f} s on {where.host} ({where.node[:8]}).")
            futures = {engine.submit(run_one, c, out, extra, slot=i): c for i, c in enumerate(todo)}
            with progress_bar(len(todo), "Sweep", progress) as bar:
                for future in as_completed(futures):
                    config, err = futures[future], future.exception()
                    rows[config] = row(config, error=engine.failure(err)) if err else future.result()
                    bar.update(1)
        except BaseException as err:  # Ctrl-C: start nothing new; what finished stays finished
            engine.cancel()
            if isinstance(err, KeyboardInterrupt):
                print(f"\nSweep interrupted: the finished configurations are kept in {shown_path(out)}; "
                      "run the same command again to do the rest.", file=sys.stderr)
            raise
    elif progress:
        print(f"All {len(configs)} configuration(s) had finished already: nothing to run.")
    table = pd.DataFrame(records := [rows[c] for c in configs], columns=COLUMNS)
    atomic_write(out / "sweep.csv", lambda tmp: table.convert_dtypes().to_csv(tmp, index=False))
    write_json(out / "sweep.json", records)
    if (table.status == "done").any():
        for name, fig in plot_sweep(records).items():
            atomic_write(out / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
            plt.close(fig)  # saved, not shown: a notebook that calls sweep() shows its own
    return table

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.tools.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--ranks", type=int, nargs="+", default=[1, 2, 4, 8], help="default 1 2 4 8")
    alpha = parser.add_mutually_exclusive_group().add_argument
    alpha("--alphas", type=float, nargs="+", help="alphas, each at every rank (default 1, as in the paper)")
    alpha("--alpha-equals-rank", action="store_true", help="alpha = rank instead (alpha / r stays 1)")
    add("--digits", nargs="+", default=[WORST], type=lambda t: WORST if t.strip().lower() == WORST
        else parse_value(t), help="digits to fine-tune on, or 'worst' (the default)")
    add("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (pre-training's: -p seed)")
    add("--iterations", type=int, nargs="+", default=[100], help="fine-tuning batches")
    add("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="another parameter of 06_compare for every configuration (-p train_samples 5000)")
    add("--out", type=Path, default=project_root() / "outputs" / "sweep")
    add("--jobs", type=int, help="configurations run at once on this machine (default 1)")
    add("--dry-run", action="store_true", help="print one papermill command per configuration")
    ray = parser.add_argument_group("on a Ray cluster (docs/sweeps.md)").add_argument
    ray("--engine", choices=["local", "ray"], default="local", help="ray: one task per configuration")
    ray("--address", help="the cluster's HOST:PORT (default: $RAY_ADDRESS)")
    ray("--gpus-per-config", type=float, help="default 1 when the cluster has GPUs, else 0")
    ray("--cpus-per-config", type=float, help="default 1")
    args = parser.parse_args(argv)
    on_ray, jobs = args.engine == "ray", 1 if args.jobs is None else args.jobs
    given = [f"--{n.replace('_', '-')}" for n in ("address", "gpus_per_config", "cpus_per_config")
             if getattr(args, n) is not None]
    extra = absolute_paths({name: parse_value(value) for name, value in args.parameter})
    takes = set(notebook_takes(NOTEBOOK))
    for wrong, message in [
        (on_ray and args.jobs is not None, "--jobs is for --engine local; on Ray: --gpus/cpus-per-config"),
        (on_ray and args.dry_run, "--dry-run prints commands for a scheduler: leave out --engine ray"),
        (not on_ray and given, f"{' '.join(given)}: only with --engine ray"),
        (jobs < 1, f"--jobs={jobs}: expected an integer >= 1"),
        (RESERVED & set(extra), f"-p {sorted(RESERVED & set(extra))}: set these with the sweep's options"),
        (set(extra) - takes, f"-p {sorted(set(extra) - takes)}: {NOTEBOOK} takes no such parameter; it takes "
         f"{sorted(takes - RESERVED)}")]:
        if wrong:
            parser.error(message)
    out = args.out.resolve()
    engine = RayEngine(args.address, args.gpus_per_config, args.cpus_per_config or 1.0) if on_ray \
        else LocalEngine(jobs)
    try:
        configs = configurations(args.ranks, args.alphas, args.alpha_equals_rank, args.digits, args.seeds,
                                 args.iterations, extra)
        check_same_parameters(configs, out, extra)  # before --dry-run's folders, and before any work
        preflight(  # GPU (when it runs here), folders, data
            Settings.from_mapping(pretrain_parameters(out, extra)), check_device=not on_ray)
        if args.dry_run:  # the folders papermill writes into must exist before the commands run
            print("# pre-train first, then the rest in any order; rerun without --dry-run to collect them")
            print(shlex.join(command("02_pretrain", out, pretrain_parameters(out, extra))))
            for config in configs:
                (out / config.name).mkdir(parents=True, exist_ok=True)
                print(shlex.join(command(NOTEBOOK, out / config.name, config.parameters(out, extra))))
            return 0
        if on_ray:
            print(f"Sweep {engine.connect()}.")
        table = sweep(configs, out, extra, jobs, engine=engine)
    except ShortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # the sweep has said what it kept
    finally:
        engine.close()
    shown = [c for c in COLUMNS if c not in ("name", "finetune_steps", "lora_share_percent", *WHERE)]
    print("\n" + table[shown].to_string(index=False, na_rep=""))
    if on_ray:
        nodes = (table.host + "/" + table.node.str[:8]).dropna().value_counts(sort=False)
        print(f"\nThe configurations ran on {len(nodes)} node(s): "
              + ", ".join(f"{k} x{v}" for k, v in nodes.items()) + ".")
    print(f"\nTable: {shown_path(out / 'sweep.csv')} (and sweep.json), with sweep_*.png plots beside it")
    if failed := list(table.name[table.status != "done"]):
        print(f"{len(failed)} configuration(s) failed: {', '.join(failed)}. Their error.json and executed "
              "notebook say why; run the same command again to retry them.", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
