"""Sweep LoRA's rank (and alpha, digit, seed, steps) with papermill: `python -m lora_tutorial.tools.sweep`.

Each configuration runs 06_compare (which fine-tunes the adapter it needs) through papermill
into `--out/<name>/`, all sharing one pre-trained checkpoint in `--out/checkpoints/`. Results
are collected into `sweep.csv` and `sweep.json` with plots beside them. The command can be run
again at any time: finished configurations (a valid `results.json`, written atomically) are
skipped, failed or interrupted ones are run again. `--dry-run` prints one papermill command per
configuration for a scheduler; running the sweep afterwards only collects their results.
`--engine ray` runs each configuration as a Ray task on an existing cluster (`engines.py`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import atomic_write, write_json
from ..evaluate import from_confusion
from ..settings import (
    ACCEPTED_EVERYWHERE,
    WORST,
    Settings,
    SettingsError,
    ShortError,
    project_root,
    shown_path,
)
from ..train import progress_bar
from .engines import LocalEngine, Place, RayEngine, engine_summary, run_process
from .run import absolute_paths, notebook_parameters, notebooks_dir, parse_value

NOTEBOOK = "06_compare"
COLUMNS = ["name", "rank", "alpha", "seed", "target_digit", "finetune_steps", "lora_parameters",
           "lora_share_percent", "accuracy_lora_on", "accuracy_lora_off", "target_wrong_before",
           "target_wrong_after", "target_accuracy_before", "target_accuracy_after",
           "other_digits_accuracy_before", "other_digits_accuracy_after", "finetune_seconds",
           "host", "node", "pid", "devices", "seconds", "status", "error"]
WHERE = ["host", "node", "pid", "devices", "seconds"]  # where and how long the configuration ran


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
    taken = [*notebook_parameters(notebooks_dir() / "02_pretrain.ipynb"), *ACCEPTED_EVERYWHERE]
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
    return notebook_command(NOTEBOOK, out / config.name / f"{NOTEBOOK}.ipynb", config.parameters(out, extra))


def pretrain_command(out: Path, extra: dict[str, Any]) -> list[str]:
    """The papermill command line of the sweep's one shared pre-training."""
    return notebook_command("02_pretrain", out / "02_pretrain.ipynb", pretrain_parameters(out, extra))


def notebook_command(notebook: str, output: Path, parameters: dict[str, Any]) -> list[str]:
    """Built from this interpreter (on a Ray node: the node's own) and this install's notebooks."""
    return [sys.executable, "-m", "papermill", str(notebooks_dir() / f"{notebook}.ipynb"), str(output),
            "--cwd", str(notebooks_dir()), "-k", "python3", "--no-progress-bar",
            "-y", yaml_parameters(parameters)]


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


# Settings a configuration's folder name does not record (its rank, alpha, digit, seed and steps
# are in the name) and that do not change its results, so a finished run is re-used across them.
NOT_DECIDING = {"rank", "alpha", "target_digit", "target_rule", "finetune_seed", "finetune_steps",
                "output_dir", "checkpoint_dir", "data_dir", "device", "download"}


def check_same_parameters(configs: list[Config], out: Path, extra: dict[str, Any]) -> None:
    """Refuse, before anything runs, a sweep into a folder that holds runs made with other `-p`
    parameters (replay_share, target_modules, ...): their results would be re-used as this sweep's
    under the same folder names, or overwritten."""
    for config in configs:
        try:
            recorded = json.loads((out / config.name / "results.json").read_text()).get("settings", {})
        except (OSError, ValueError):
            continue
        wanted = json.loads(json.dumps(Settings.from_mapping(config.parameters(out, extra)).as_dict()))
        differ = [f"{k}={recorded[k]!r} there, {v!r} now" for k, v in wanted.items()
                  if k not in NOT_DECIDING and k in recorded and recorded[k] != v]  # older files lack some
        if differ:
            raise SettingsError(f"{shown_path(out / config.name)} holds a run made with other parameters "
                                f"({'; '.join(differ)}): this sweep would mix or overwrite its results. "
                                "Give this sweep its own --out, or delete that folder to run it again.")


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


def run_one(config: Config, out: Path, extra: dict[str, Any], place: Place) -> dict:
    """Run one configuration where the engine put it; return its results and where it ran."""
    folder = out / config.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("error.json", "results.json", "ran.json"):  # a stale or foreign file must not be trusted
        (folder / name).unlink(missing_ok=True)
    start = time.monotonic()
    done = run_process(papermill_command(config, out, extra), place)
    where = place.where(time.monotonic() - start)
    if done.returncode == 0 and (results := finished(config, out)):
        write_json(folder / "ran.json", where)
        return {"status": "done", "results": results, "where": where}
    error = notebook_error(folder / f"{NOTEBOOK}.ipynb")
    if done.returncode == 0:
        error = "the notebook ran but wrote no matching results.json"
    write_json(folder / "error.json", {"error": error, "where": where, "stderr_tail": done.stderr[-2000:]})
    return {"status": "failed", "error": error, "where": where}


def ran(config: Config, out: Path) -> dict:
    """Where a finished configuration ran, from its folder (older sweeps did not record it)."""
    try:
        return json.loads((out / config.name / "ran.json").read_text())
    except (OSError, ValueError):
        return {}


def _digit_accuracy(evaluation: dict, digit: int) -> float:
    return from_confusion(evaluation["confusion"]).per_digit_accuracy()[digit]


def row(config: Config, outcome: dict) -> dict[str, Any]:
    base = {"name": config.name, "rank": config.rank, "alpha": config.alpha, "seed": config.seed,
            "target_digit": config.target_digit, "finetune_steps": config.finetune_steps,
            "status": outcome["status"], "error": outcome.get("error", ""),
            **{k: outcome.get("where", {}).get(k, "") for k in WHERE}}
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


def prepare(out: Path, extra: dict[str, Any], place: Place) -> dict | None:
    """Pre-train once, where the engine runs work, unless the sweep's network is saved already;
    return where it ran (None when it was saved)."""
    if pretrained_exists(out, extra):
        return None
    start = time.monotonic()
    pretrain_once(out, extra, place)
    return place.where(time.monotonic() - start)


def pretrain_once(out: Path, extra: dict[str, Any], place: Place) -> None:
    """Run 02_pretrain once, so every configuration loads the same checkpoint."""
    done = run_process(pretrain_command(out, extra), place)
    if done.returncode != 0:
        executed = out / "02_pretrain.ipynb"
        raise ShortError(f"the sweep's pre-training failed ({notebook_error(executed)}); its executed "
                         f"notebook is {shown_path(executed)}. Nothing else ran.")


def pretrained_exists(out: Path, extra: dict[str, Any]) -> bool:
    """Whether the sweep's pre-trained network is saved already: then no kernel is started just to
    load it (each configuration loads it itself)."""
    from ..data import load_mnist
    from ..pipeline import pretrained_path

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
          progress: bool = True, engine: LocalEngine | RayEngine | None = None) -> list[dict]:
    """Run what is not finished yet (on `engine`: this machine, `jobs` at a time, by default),
    collect every configuration into the table; return its rows."""
    extra = dict(extra or {})
    out = out.resolve()
    check_same_parameters(configs, out, extra)
    engine = engine or LocalEngine(jobs)
    out.mkdir(parents=True, exist_ok=True)
    outcomes: dict[Config, dict] = {}
    todo = []
    for config in configs:
        results = finished(config, out)
        if results:
            outcomes[config] = {"status": "done", "results": results, "where": ran(config, out)}
        else:
            todo.append(config)
    if todo:
        engine.check_folder(out)  # on a cluster: can every node read and write it?
        bar = None
        try:
            if progress:
                print("The shared pre-trained network (02_pretrain): loading it, or training it once ...",
                      flush=True)
            where = engine.call(prepare, out, extra)
            if progress and where:
                print(f"Pre-trained it in {where['seconds']:.0f} s on {where['host']} ({where['node'][:8]}).")
            bar = progress_bar(len(todo), "Sweep", progress)
            for config, outcome, error in engine.map(run_one, todo, out, extra):
                outcomes[config] = outcome if error is None else {"status": "failed", "error": error}
                bar.update(1)
        except BaseException as err:  # Ctrl-C: start nothing new; what finished stays finished
            engine.cancel()
            if isinstance(err, KeyboardInterrupt):
                print(f"\nSweep interrupted: the finished configurations are kept in {shown_path(out)}; "
                      "run the same command again to do the rest.", file=sys.stderr)
            raise
        finally:
            if bar is not None:
                bar.close()
    elif progress:
        print(f"All {len(configs)} configuration(s) had finished already: nothing to run.")
    rows = [row(c, outcomes[c]) for c in configs]
    write_table(rows, out)
    if any(r["status"] == "done" for r in rows):
        import matplotlib.pyplot as plt

        from ..plots import plot_sweep

        for name, fig in plot_sweep(rows).items():
            atomic_write(out / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
            plt.close(fig)  # saved, not shown: a notebook that calls sweep() shows its own
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.tools.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="ranks to try (default 1 2 4 8; the last layer has 10 outputs, so at most 10)")
    parser.add_argument("--alphas", type=float, nargs="+",
                        help="alphas to try, each at every rank (default: 1, fixed while the rank varies, as "
                             "in the LoRA paper and the post)")
    parser.add_argument("--alpha-equals-rank", action="store_true",
                        help="alpha = rank instead: the scale alpha / r stays 1 (07_rank_sweep compares the "
                             "scaling rules, each at its own tuned learning rate)")
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
    parser.add_argument("--jobs", type=int, help="configurations run at once on this machine (default 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print one papermill command per configuration")
    cluster = parser.add_argument_group("on a Ray cluster (docs/sweeps.md)")
    cluster.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local: this machine (the default); ray: one Ray task per configuration on "
                              "an existing cluster")
    cluster.add_argument("--address", help="the cluster's HOST:PORT (default: $RAY_ADDRESS)")
    cluster.add_argument("--gpus-per-config", type=float,
                         help="GPUs per configuration (default 1 when the cluster has GPUs, else 0)")
    cluster.add_argument("--cpus-per-config", type=float, help="CPUs per configuration (default 1)")
    args = parser.parse_args(argv)
    if args.engine == "ray":
        if args.jobs is not None:
            parser.error("--jobs is for --engine local: on Ray, the cluster's free GPUs and CPUs decide how "
                         "many configurations run at once (see --gpus-per-config, --cpus-per-config)")
        if args.dry_run:
            parser.error("--dry-run prints commands for a scheduler of your own: leave out --engine ray")
    else:
        given = [f"--{n.replace('_', '-')}" for n in ("address", "gpus_per_config", "cpus_per_config")
                 if getattr(args, n) is not None]
        if given:
            parser.error(f"{' '.join(given)}: only with --engine ray")
    jobs = 1 if args.jobs is None else args.jobs
    # folders relative to where the command runs (the notebooks run in notebooks/; on Ray, the path
    # must be the same on every node: a shared file system)
    extra = absolute_paths({name: parse_value(value) for name, value in args.parameter})
    reserved = {"rank", "alpha", "target_digit", "finetune_seed", "finetune_steps", "output_dir"}
    if reserved & set(extra):
        parser.error(f"-p {sorted(reserved & set(extra))}: set these with the sweep's own options")
    # its parameters cell, and what every notebook takes without listing it (train_samples, device, ...)
    taken = [*notebook_parameters(notebooks_dir() / f"{NOTEBOOK}.ipynb"), *ACCEPTED_EVERYWHERE]
    if set(extra) - set(taken):
        parser.error(f"-p {sorted(set(extra) - set(taken))}: {NOTEBOOK} takes no such parameter; it takes "
                     f"{sorted(set(taken) - reserved)}")
    if jobs < 1:
        parser.error(f"--jobs={jobs}: expected an integer >= 1")
    out = args.out.resolve()
    try:
        if args.alphas and args.alpha_equals_rank:
            parser.error("--alphas and --alpha-equals-rank: give one or the other")
        configs = configurations(args.ranks, args.alphas, args.alpha_equals_rank, args.digits, args.seeds,
                                 args.iterations, extra)
        check_same_parameters(configs, out, extra)  # before --dry-run's folders, and before any work
        from ..pipeline import preflight

        # GPU (here, when it runs here), folders, data
        preflight(Settings.from_mapping(pretrain_parameters(out, extra)), check_device=args.engine == "local")
    except ShortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:  # the folders papermill writes into must exist before the commands run
        for config in configs:
            (out / config.name).mkdir(parents=True, exist_ok=True)
        print(f"# pre-train once first (shared checkpoint), then run the lines below in any order;\n"
              f"# afterwards the same sweep command without --dry-run collects them into {shown_path(out)}.")
        print(shlex.join(pretrain_command(out, extra)))
        for config in configs:
            print(shlex.join(papermill_command(config, out, extra)))
        return 0
    engine: LocalEngine | RayEngine = LocalEngine(jobs)
    try:
        if args.engine == "ray":
            engine = RayEngine(args.address, args.gpus_per_config, args.cpus_per_config or 1.0)
            engine.connect()
            print(f"Sweep {engine.describe()}.")
        rows = sweep(configs, out, extra, jobs, engine=engine)
    except ShortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # the sweep has said what it kept
    finally:
        engine.close()
    print()
    print_summary(rows)
    if args.engine == "ray":
        print(f"\nThe configurations {engine_summary(rows)}.")
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
