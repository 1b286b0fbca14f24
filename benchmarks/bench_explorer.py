"""How long one press of 11's explorer takes, against a plain fine-tuning run, in one process.

    python benchmarks/bench_explorer.py --json outputs/bench_explorer.json
    python benchmarks/bench_explorer.py --train-samples 2000 --presses 3   # a quick look

The explorer promises an update in at most 3 seconds at the post's settings (rank 1, 100 steps
of 10 images) on a 2-core CPU. This builds the panel on the pre-trained network (loaded from the
tutorial's checkpoint folder, or pre-trained first), then takes turns: one press of the button
(fine-tune, judge on the validation images, draw) and one plain fine-tuning run of the same
settings (05's `train_on_target`, nothing else), each with the next fine-tuning seed. It reports
the median and range of each, the parts of a press, and the ratio press / plain run, which says
what judging and drawing add, measured side by side. Wall-clock seconds of this run: compare the
ratio rather than seconds across machines.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

BUDGET_S = 3.0


def positive(name: str, value: str) -> int:
    number = int(value) if value.lstrip("-").isdigit() else None
    if number is None or number < 1:
        raise argparse.ArgumentTypeError(f"--{name}={value}: expected an integer >= 1")
    return number


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "runs": values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presses", type=lambda v: positive("presses", v), default=7,
                        help="presses of the button, each followed by a plain run (default 7)")
    parser.add_argument("--train-samples", type=lambda v: positive("train-samples", v), default=None,
                        help="use only the first N training images (default: all)")
    parser.add_argument("--steps", type=lambda v: positive("steps", v), default=100,
                        help="fine-tuning steps per run (default 100, the post's)")
    parser.add_argument("--output-dir", default=None,
                        help="the tutorial's output folder, where the pre-trained network is found or saved "
                             "(default: outputs/)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    # imported once the options are checked: a bad one is refused at once, not after seconds of imports
    import torch

    from lora_tutorial import Settings, choose_target, lora_model, pretrained_model, setup
    from lora_tutorial.checkpoints import write_json
    from lora_tutorial.lora import separate_path
    from lora_tutorial.pipeline import train_on_target
    from lora_tutorial.studies.explore import Explorer

    settings = Settings(train_samples=args.train_samples, finetune_steps=args.steps,
                        output_dir=args.output_dir)
    device, data = setup(settings, verbose=False)
    pre = pretrained_model(settings, data, device, verbose=False)
    settings = choose_target(settings, pre, verbose=False)
    started = time.perf_counter()
    explorer = Explorer(settings, data, pre.model)
    build_s = time.perf_counter() - started

    presses, parts, plain = [], {"fine-tuning": [], "judging": [], "drawing": []}, []
    for seed in range(args.presses):
        explorer.seed.value = seed
        if explorer.fine_tune() is None:
            print(f"The press failed: {explorer.message.value}", file=sys.stderr)
            return 1
        presses.append(explorer.seconds["update"])
        for part in parts:
            parts[part].append(explorer.seconds[part])
        run = replace(settings, finetune_seed=seed)
        model = lora_model(run, pre.model)
        started = time.perf_counter()
        train_on_target(run, data, separate_path(model), verbose=False)
        plain.append(time.perf_counter() - started)

    result = {
        "meta": {"python": platform.python_version(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.machine(),
                 "train_images": len(data.train_labels),
                 "validation_images": explorer.before.total, "steps": args.steps, "presses": args.presses,
                 "data": data.source},
        "build_s": build_s,
        "press": summary(presses),
        "parts": {part: summary(values) for part, values in parts.items()},
        "plain_finetune": summary(plain),
        "ratio_press_to_plain": statistics.median(presses) / statistics.median(plain),
        "budget_s": BUDGET_S,
    }
    print(f"Building the panel (judging the pre-trained network once, warming up): {build_s:.2f} s")
    print(f"{'':<26}{'median':>8}{'min':>8}{'max':>8}   ({args.presses} runs, seconds)")
    rows = [("one press", result["press"]), *((f"  {p}", result["parts"][p]) for p in parts),
            (f"plain fine-tune, {args.steps} steps", result["plain_finetune"])]
    for name, s in rows:
        print(f"{name:<26}{s['median_s']:>8.2f}{s['min_s']:>8.2f}{s['max_s']:>8.2f}")
    within = "within" if result["press"]["max_s"] <= BUDGET_S else "NOT within"
    print(f"A press takes {result['ratio_press_to_plain']:.1f}x a plain fine-tuning run; the slowest press "
          f"is {within} the {BUDGET_S:g} s budget.")
    if args.json:
        write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
