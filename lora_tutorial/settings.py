"""One validated settings object for every step of the tutorial.

Notebooks, the headless runner and the tests all build a `Settings`; it checks every value
before any work starts, and its fingerprints name the checkpoints that a run writes, so
weights trained under other settings are never picked up by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# Part of every checkpoint's fingerprint: raise it when a change to the code would train
# different weights from the same settings, so that older checkpoints are not reused.
TRAINING_CODE_VERSION = 1


def project_root() -> Path:
    """The checkout the package lives in (editable install), else the current folder."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def shown_path(path: Path) -> str:
    """Paths inside the project are shown relative to it, so outputs carry no machine paths."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(project_root())))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Settings:
    """Every knob of the tutorial, with the blog post's values as defaults."""

    seed: int = 0
    rank: int = 1
    alpha: float = 1.0
    target_digit: int = 9
    pretrain_epochs: int = 1
    finetune_steps: int = 100
    batch_size: int = 10
    learning_rate: float = 1e-3
    train_samples: int | None = None  # None: every training image; a number for quick runs
    device: str = "auto"
    data_dir: str | None = None  # None: $LORA_TUTORIAL_DATA, then ./data, then download
    download: bool = True  # may MNIST be downloaded when no local copy is found?
    output_dir: str | None = None  # None: <project root>/outputs
    checkpoint_dir: str | None = None  # None: <output_dir>/checkpoints (a sweep shares one)

    def __post_init__(self) -> None:
        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and value >= low and (high is None or value <= high)
            if not ok:
                span = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ValueError(f"{name}={value!r} is not valid: expected an integer {span}.")

        integer("seed", 0)
        integer("rank", 1)
        integer("target_digit", 0, 9)
        integer("pretrain_epochs", 1)
        integer("finetune_steps", 1)
        integer("batch_size", 1)
        if self.train_samples is not None:
            integer("train_samples", 1)
        for name in ("alpha", "learning_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} is not valid: expected a number > 0.")
        if not isinstance(self.device, str):
            raise ValueError(f"device={self.device!r} is not valid: expected a string such as 'auto'.")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Settings:
        """Build settings from a notebook's parameters, refusing names we do not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown setting(s) {unknown}: the valid names are {sorted(known)}."
            )
        return cls(**values)

    @classmethod
    def from_globals(cls, namespace: dict[str, Any]) -> Settings:
        """Collect a notebook's parameters by name (the variables of its `parameters` cell)."""
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})

    # Where things live -------------------------------------------------------------------

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir) if self.output_dir else project_root() / "outputs"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.output_path / "checkpoints"

    # Fingerprints ------------------------------------------------------------------------

    def pretrain_key(self) -> dict[str, Any]:
        """The settings that decide the pre-trained weights (not the device: see README)."""
        return {
            "code": TRAINING_CODE_VERSION,
            "seed": self.seed,
            "pretrain_epochs": self.pretrain_epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "train_samples": self.train_samples,
        }

    def finetune_key(self) -> dict[str, Any]:
        """The settings that decide a LoRA adapter, pre-training included."""
        return {
            **self.pretrain_key(),
            "rank": self.rank,
            "alpha": float(self.alpha),
            "target_digit": self.target_digit,
            "finetune_steps": self.finetune_steps,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(key: dict[str, Any], data_id: str) -> str:
    """A short, stable hash of settings plus the identity of the data they ran on."""
    text = json.dumps({**key, "data": data_id}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
