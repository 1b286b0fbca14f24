"""`train` against `train(graphed=True)` on one device, from the same weights, seed and batches.

    python benchmarks/bench_graphed.py --device cuda --json outputs/bench-graphed.json   # on a GPU
    python benchmarks/bench_graphed.py --train-samples 2000 --finetune-steps 20          # a quick look

Two phases, each run both ways: one pre-training epoch at batch 10, then LoRA (rank 1) fine-tuned
through the separate path on digit 9's fit images. For each: seconds and steps a second (the
graphed time includes capturing its graphs), their ratio, and the largest difference between the
two runs' trained weights. On a CPU both run the same kernels without a graph: the difference must
be 0. On a GPU it is the graphed optimizer's rounding, which this script exists to measure.
MNIST: --data-dir, $LORA_TUTORIAL_DATA or ./data, else the offline sample (the output says which).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lora_tutorial import OversizedMLP, Settings, evaluate, fit_subset, load_mnist, lora_model, pick_device
from lora_tutorial.checkpoints import write_json
from lora_tutorial.lora import separate_path
from lora_tutorial.settings import SettingsError
from lora_tutorial.train import train

LOOPS = {"plain": {"graphed": False}, "graphed": {"graphed": True}}  # train's arguments, each way


def timed(loop, model, images, labels, **kwargs) -> tuple[float, list[float]]:
    started = time.perf_counter()
    losses = train(model, images, labels, progress=False, **LOOPS[loop], **kwargs)  # the device is done
    return time.perf_counter() - started, losses


def largest_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                             strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw/ (default: $LORA_TUTORIAL_DATA, ./data)")
    parser.add_argument("--train-samples", type=int, help="pre-train on the first N images only")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    for name in ("train_samples", "finetune_steps"):
        if (value := getattr(args, name)) is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: expected an integer >= 1")
    try:
        device = pick_device(args.device)
    except SettingsError as err:  # a misspelt device, or none here: the fix, no traceback
        parser.error(str(err))
    data = load_mnist(args.data_dir, verbose=False)
    data = (data.limit(args.train_samples) if args.train_samples else data).to(device)
    settings = replace(Settings(target_digit=9), finetune_steps=args.finetune_steps)
    for loop in LOOPS:  # first-use costs (imports, kernels' set-up) paid before timing
        timed(loop, OversizedMLP().to(device), data.train_images[:40], data.train_labels[:40])
    phases, models = {}, {}
    for loop in LOOPS:  # pre-training: the same initial weights, the same batches
        torch.manual_seed(settings.seed)
        models[loop] = OversizedMLP().to(device)
        phases.setdefault("pre-train epoch", {})[loop] = timed(
            loop, models[loop], data.train_images, data.train_labels, seed=settings.seed)
    pretrain_gap = largest_gap(models["plain"], models["graphed"])
    nines, adapters = fit_subset(data, 9), {}
    for loop in LOOPS:  # LoRA on the plain loop's network, both ways
        adapters[loop] = lora_model(settings, models["plain"])
        phases.setdefault(f"fine-tune {settings.finetune_steps} batches", {})[loop] = timed(
            loop, separate_path(adapters[loop]), *nines, max_steps=settings.finetune_steps, seed=0)
    gaps = [pretrain_gap, largest_gap(adapters["plain"], adapters["graphed"])]
    rows = {}
    print(f"{'phase':26s} {'steps':>6s} {'plain s':>8s} {'graphed s':>9s} {'plain it/s':>10s} "
          f"{'graphed it/s':>12s} {'ratio':>6s} {'largest weight gap':>18s}")
    for (phase, runs), gap in zip(phases.items(), gaps, strict=True):
        (plain_s, losses), (graphed_s, _) = runs["plain"], runs["graphed"]
        rows[phase] = {"steps": len(losses), "plain_s": plain_s, "graphed_s": graphed_s,
                       "plain_it_s": len(losses) / plain_s, "graphed_it_s": len(losses) / graphed_s,
                       "ratio": plain_s / graphed_s, "largest_weight_gap": gap}
        r = rows[phase]
        print(f"{phase:26s} {r['steps']:6d} {plain_s:8.2f} {graphed_s:9.2f} {r['plain_it_s']:10.1f} "
              f"{r['graphed_it_s']:12.1f} {r['ratio']:5.2f}x {gap:18.3g}")
    accuracy = {loop: evaluate(model, data.test_images, data.test_labels).accuracy
                for loop, model in models.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"\nPre-trained accuracy: plain {accuracy['plain']:.4f}, graphed {accuracy['graphed']:.4f}. "
          f"{name}, PyTorch {torch.__version__}, {data.describe()}")
    if args.json:
        write_json(args.json, {"device": name, "torch": torch.__version__, "data": data.identity,
                               "accuracy": accuracy, "phases": rows})
        print(f"Results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
