"""The post's procedure against the tutorial's default path, in one process, on the same data.

    python benchmarks/bench_tutorial.py --json outputs/bench.json
    python benchmarks/bench_tutorial.py --train-samples 5000 --eval-images 2000   # a quick look
    python benchmarks/bench_tutorial.py --device cuda --json outputs/bench-gpu.json  # on a GPU (ROCm too)

Three phases, each run both ways from the same starting weights and the same batch order:
- pre-train: one epoch. The post: torchvision's MNIST with ToTensor + Normalize applied to every
  image at every step through a DataLoader, the default Adam, the loss read back every step.
  Ours: `lora_tutorial.train` (tensors normalised once, indexed batches, fused Adam, denormals
  flushed on the CPU); with --device cuda, `train(graphed=True)` (each step one captured graph).
- fine-tune: 100 batches of LoRA (rank 1) on digit 9 from the same pre-trained weights. The
  post: through the parametrization with its DataLoader loop. Ours: `finetune`'s separate
  low-rank path (graphed too on a GPU).
- evaluate: the 10,000 test images. The post: batches of 10, then one image at a time in
  Python. Ours: `evaluate`, one batch under inference_mode.

Reads MNIST's files from --data-dir, $LORA_TUTORIAL_DATA or ./data (the post's loop needs the
real files). Timings are wall-clock seconds of this run; compare the ratios, which are measured
side by side, rather than seconds across machines or runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision import datasets, transforms

from lora_tutorial import Evaluation, OversizedMLP, Settings, evaluate, load_mnist, lora_model
from lora_tutorial.checkpoints import write_json
from lora_tutorial.data import DATA_ENV, MEAN, STD, check_raw_files
from lora_tutorial.evaluate import from_confusion
from lora_tutorial.lora import separate_path
from lora_tutorial.settings import project_root
from lora_tutorial.train import train, train_with_dataloader


def evaluate_like_the_post(model: torch.nn.Module, dataset: torch.utils.data.Dataset,
                           batch_size: int = 10) -> Evaluation:
    """The post's test loop (a DataLoader, then one image at a time), to show `evaluate` agrees."""
    device, confusion = next(model.parameters()).device, [[0] * 10 for _ in range(10)]
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            for row, label in zip(model(x.to(device).view(-1, 28 * 28)), y, strict=True):
                confusion[int(label)][int(torch.argmax(row))] += 1
    return from_confusion(confusion)


class PeakMemory:
    """Samples this process's resident memory every 5 ms; `peak_mib` is the highest seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the process's high-water mark
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def timed(fn):
    """Run fn(); return (its result, seconds, peak resident MiB while it ran)."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
    return result, seconds, memory.peak_mib


def find_root(data_dir: str | None) -> Path:
    chosen = data_dir or os.environ.get(DATA_ENV)
    root = Path(chosen) if chosen else project_root() / "data"
    check_raw_files(root)  # a clear error, naming the file, if MNIST is not there
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here (JSON)")
    parser.add_argument("--data-dir", help=f"folder holding MNIST/raw/ (default: ${DATA_ENV}, then ./data)")
    parser.add_argument("--train-samples", type=int, help="pre-train on the first N images only")
    parser.add_argument("--eval-images", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: both procedures on the GPU (an AMD GPU is cuda too), ours graphed")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: PyTorch {torch.__version__} sees no GPU here; leave --device out")
    device = torch.device(args.device)
    ours = functools.partial(train, graphed=device.type == "cuda")  # one launch a step: launches dominate
    for name in ("train_samples", "eval_images", "finetune_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: expected an integer >= 1")
    if args.json and args.json.exists() and not os.access(args.json, os.W_OK):
        parser.error(f"--json {args.json}: the file is not writable")

    root = find_root(args.data_dir)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    settings = Settings(seed=args.seed, finetune_steps=args.finetune_steps, train_samples=args.train_samples,
                        target_digit=9)  # the post's digit, for both procedures alike
    rows: dict[str, dict] = {}

    def record(phase: str, steps: int, baseline: tuple, project: tuple, **extra) -> None:
        (_, b_s, b_mib), (_, p_s, p_mib) = baseline, project
        rows[phase] = {"steps": steps, "baseline_s": b_s, "project_s": p_s, "ratio": b_s / p_s,
                       "baseline_it_s": steps / b_s, "project_it_s": steps / p_s,
                       "baseline_peak_mib": b_mib, "project_peak_mib": p_mib, **extra}

    # 1. Pre-training: each side loads its data inside the timed phase.
    def post_pretrain():
        train_set = datasets.MNIST(str(root), train=True, download=False, transform=transform)
        if args.train_samples:
            train_set = Subset(train_set, range(min(args.train_samples, len(train_set))))
        torch.manual_seed(args.seed)
        model = OversizedMLP().to(device)
        train_with_dataloader(model, train_set, seed=None, desc="Pre-training (post)")
        return model

    def our_pretrain():
        data = load_mnist(root, verbose=False)
        if args.train_samples:
            data = data.limit(args.train_samples)
        torch.manual_seed(args.seed)
        model, data = OversizedMLP().to(device), data.to(device)
        ours(model, data.train_images, data.train_labels, seed=None, desc="Pre-training (ours)")
        return model, data

    baseline = timed(post_pretrain)
    project = timed(our_pretrain)
    post_model, (our_model, data) = baseline[0], project[0]
    test_images, test_labels = data.test_images, data.test_labels
    if args.eval_images:
        test_images, test_labels = test_images[:args.eval_images], test_labels[:args.eval_images]
    steps = -(-len(data.train_labels) // settings.batch_size)
    record("pre-train epoch", steps, baseline, project,
           baseline_accuracy=evaluate(post_model, test_images, test_labels).accuracy,
           project_accuracy=evaluate(our_model, test_images, test_labels).accuracy)

    # 2. Fine-tuning LoRA on digit 9, both from our pre-trained weights.
    digit = settings.target_digit
    full_train = datasets.MNIST(str(root), train=True, download=False, transform=transform)
    nines = Subset(full_train, torch.nonzero(full_train.targets == digit).flatten().tolist())
    post_lora, our_lora = lora_model(settings, our_model), lora_model(settings, our_model)
    baseline = timed(lambda: train_with_dataloader(post_lora, nines, max_steps=settings.finetune_steps,
                                                   seed=args.seed, desc="Fine-tuning (post)"))
    mine = data.train_labels == digit  # all its training images, as the post's Subset takes them
    images, labels = data.train_images[mine], data.train_labels[mine]
    project = timed(lambda: ours(separate_path(our_lora), images, labels, max_steps=settings.finetune_steps,
                                 seed=args.seed, desc="Fine-tuning (ours)"))
    record(f"fine-tune {settings.finetune_steps} batches", settings.finetune_steps, baseline, project,
           baseline_target_wrong=evaluate(post_lora, test_images, test_labels).wrong_counts[digit],
           project_target_wrong=evaluate(our_lora, test_images, test_labels).wrong_counts[digit])

    # 3. Evaluation of the test images, the same model both ways.
    test_set = datasets.MNIST(str(root), train=False, download=False, transform=transform)
    if args.eval_images:
        test_set = Subset(test_set, range(args.eval_images))
    baseline = timed(lambda: evaluate_like_the_post(our_model, test_set))
    project = timed(lambda: evaluate(our_model, test_images, test_labels))
    assert baseline[0] == project[0], "both evaluations must give the same answers"
    record(f"evaluate {len(test_labels):,} images", len(test_labels), baseline, project,
           accuracy=project[0].accuracy)

    header = f"{'phase':28s} {'post s':>8s} {'ours s':>8s} {'post it/s':>10s} {'ours it/s':>10s} " \
             f"{'ratio':>6s} {'post MiB':>9s} {'ours MiB':>9s}"
    print("\n" + header + "\n" + "-" * len(header))
    for phase, r in rows.items():
        print(f"{phase:28s} {r['baseline_s']:8.2f} {r['project_s']:8.2f} {r['baseline_it_s']:10.1f} "
              f"{r['project_it_s']:10.1f} {r['ratio']:5.1f}x {r['baseline_peak_mib']:9.0f} "
              f"{r['project_peak_mib']:9.0f}")
    pre = rows["pre-train epoch"]
    print(f"\nPre-trained accuracy: post's procedure {pre['baseline_accuracy']:.4f}, "
          f"ours {pre['project_accuracy']:.4f}")
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": args.device,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "train_images": len(data.train_labels), "test_images": len(test_labels)}
    print(f"({meta['threads']} threads, PyTorch {meta['torch']}, {meta['train_images']:,} training images)")
    if args.json:
        write_json(args.json, {"meta": meta, "phases": rows})
        print(f"Results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
