"""One validated settings object for every step of the tutorial.

Notebooks, the headless runner and the tests all build a `Settings`; it checks every value
before any work starts, and its fingerprints name the checkpoints that a run writes, so
weights trained under other settings are never picked up by mistake.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .model import layer_shapes

PACKAGE_DIR = Path(__file__).resolve().parent
# Part of every checkpoint's fingerprint: raise it when a change to the code would train
# different weights from the same settings, so that older checkpoints are not reused.
TRAINING_CODE_VERSION = 2  # 2: training on a CPU runs on one thread (train.py)


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


class ShortError(Exception):
    """An error in what the user gave (a value, a file), whose message names it and the fix.

    Jupyter and papermill show it as that message alone: a traceback through the package would
    only bury the one line a reader needs.
    """

    def _render_traceback_(self) -> list[str]:  # IPython's hook for how an error is displayed
        return [f"{type(self).__name__}: {self}"]


class SettingsError(ShortError, ValueError):
    """A setting has a value the tutorial cannot use."""


DEVICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
WORST = "worst"  # target_digit: the digit the pre-trained network gets wrong most (on its training images)
# What to do about a bad value, per setting (said after what was expected).
HINTS = {
    "seed": "any whole number, e.g. 0",
    "rank": "the post uses 1",
    "target_digit": "or 'worst', the default: the digit the pre-trained network gets wrong most",
    "pretrain_epochs": "the post uses 1",
    "finetune_steps": "the post uses 100",
    "batch_size": "the post uses 10",
    "train_samples": "or None for all 60,000 training images",
    "alpha": "the post uses 1.0",
    "learning_rate": "the post uses 0.001",
    "finetune_learning_rate": "the post uses 0.001; or None for learning_rate",
    "replay_share": "0, as in the post, replays nothing; 0.3 puts 3 other-digit images in each batch of 10",
    "finetune_seed": "or None to use seed",
}
# Settings any notebook takes from papermill without its parameters cell listing them: where to
# run, where the files are, and the recipe that finds 02's pre-trained network.
ACCEPTED_EVERYWHERE = ("device", "data_dir", "output_dir", "checkpoint_dir", "download", "train_samples",
                       "seed", "pretrain_epochs", "batch_size", "learning_rate", "pretrain_loop")
PRETRAIN_LOOPS = ("fast", "post")  # the tutorial's training loop, or the post's own (DataLoader, plain Adam)


def parse_device(name: Any) -> str:
    """Check a device name's spelling (not whether the device is here: see `device.pick_device`)."""
    text = str(name).strip().lower() if isinstance(name, str) else None
    kind, colon, index = (text or "").partition(":")
    ok = text == "auto" or (kind in ("cpu", "cuda", "mps") and (not colon or index.isdigit()))
    if not ok:
        raise SettingsError(f"device={name!r} is not valid: expected {DEVICES}.")
    return text


def replay_count(share: float, batch_size: int) -> int:
    """How many images of each batch replay other digits: share x batch size, rounded half up."""
    return math.floor(share * batch_size + 0.5)


@dataclass(frozen=True)
class Settings:
    """Every knob of the tutorial, with the blog post's values as defaults."""

    seed: int = 0
    rank: int = 1
    alpha: float = 1.0
    target_digit: int | str = "worst"  # a digit, or "worst": see `pipeline.choose_target`
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
    target_modules: tuple[str, ...] | None = None  # layers LoRA adapts; None: every Linear layer
    replay_share: float = 0.0  # share of each fine-tuning batch drawn from the other digits
    # How target_digit was decided: None when given as a number, "worst" once `choose_target`
    # turned "worst" into the digit. Set by the tutorial, not by a user.
    target_rule: str | None = None
    # LoRA's random A and the order of the fine-tuning batches; None: `seed`. Another value gives
    # another fine-tuning run from the same pre-trained network (07-09 run several).
    finetune_seed: int | None = None
    pretrain_loop: str = "fast"  # "post": the post's own loop, slower, for a bit-for-bit comparison
    # Adam's learning rate for fine-tuning; None: `learning_rate`, pre-training's (the post uses one
    # for both). 05's knob: changing it does not re-train the pre-trained network.
    finetune_learning_rate: float | None = None

    def __post_init__(self) -> None:
        """Check every value on its own terms; nothing here looks at the machine (see `preflight`)."""

        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and value >= low and (high is None or value <= high)
            if not ok:
                span = f"between {low} and {high}" if high is not None else f">= {low}"
                raise SettingsError(f"{name}={value!r} is not valid: expected an integer {span} "
                                    f"({HINTS[name]}).")

        integer("seed", 0)
        if self.finetune_seed is not None:
            integer("finetune_seed", 0)
        if self.pretrain_loop not in PRETRAIN_LOOPS:
            raise SettingsError(f"pretrain_loop={self.pretrain_loop!r} is not valid: expected 'fast' (the "
                                "tutorial's loop) or 'post' (the post's own loop, for comparison).")
        integer("rank", 1)
        if isinstance(self.target_digit, str) and self.target_digit.strip().lower() == WORST:
            object.__setattr__(self, "target_digit", WORST)
        else:
            integer("target_digit", 0, 9)
        if self.target_rule not in (None, WORST) or (self.target_rule and self.target_digit == WORST):
            raise SettingsError(f"target_rule={self.target_rule!r} is not valid: it is set by choose_target "
                                "once the target digit is known; leave it out.")
        integer("pretrain_epochs", 1)
        integer("finetune_steps", 1)
        integer("batch_size", 1)
        if self.train_samples is not None:
            integer("train_samples", 1)
        for name in ("alpha", "learning_rate", "finetune_learning_rate"):
            value = getattr(self, name)
            if name == "finetune_learning_rate" and value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 < value < float("inf"):
                raise SettingsError(f"{name}={value!r} is not valid: expected a number > 0 "
                                    f"({HINTS[name]}).")
        share = self.replay_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise SettingsError(f"replay_share={share!r} is not valid: expected a number from 0 up to, "
                                f"not including, 1 ({HINTS['replay_share']}).")
        extra = replay_count(share, self.batch_size)
        if share > 0 and not 1 <= extra < self.batch_size:
            raise SettingsError(f"replay_share={share!r} puts {extra} of every {self.batch_size} images "
                                f"from other digits (batch_size={self.batch_size}): choose a share "
                                f"that gives between 1 and {self.batch_size - 1}, or 0 for none.")
        parse_device(self.device)
        if not isinstance(self.download, bool):
            raise SettingsError(f"download={self.download!r} is not valid: expected True or False.")
        for name in ("data_dir", "output_dir", "checkpoint_dir"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value).strip()):
                raise SettingsError(f"{name}={value!r} is not valid: expected a folder path, or None "
                                    "for the default.")
        object.__setattr__(self, "target_modules", self._check_targets())

    def _check_targets(self) -> tuple[str, ...] | None:
        """Normalise target_modules to a tuple and check each name, and the rank against each layer."""
        targets = self.target_modules
        if isinstance(targets, str):  # `-p target_modules linear3`: one name
            targets = (targets,)
        shapes = layer_shapes()
        valid = list(shapes)
        if targets is not None:
            names = list(targets) if isinstance(targets, (list, tuple)) else None
            unknown = [t for t in names or [] if t not in valid]
            if not names or unknown or len(set(names)) != len(names):
                why = f"no layer called {', '.join(unknown)}; " if unknown else ""
                raise SettingsError(f"target_modules={self.target_modules!r} is not valid: {why}expected "
                                    f"a list of distinct layer names from {valid}, or None for all.")
            targets = tuple(names)
        for name in targets or valid:
            out_features, in_features = shapes[name]
            limit = min(out_features, in_features)
            if self.rank > limit:
                others = [n for n in targets or valid if n != name]
                instead = (f" or leave {name} out (target_modules={others})" if others else "")
                raise SettingsError(
                    f"rank={self.rank} is too large for layer {name} ({out_features} x {in_features} "
                    f"weight): a rank can be at most min(out, in) = {limit}. Use rank <= {limit}"
                    f"{instead}.")
        return targets

    @classmethod
    def from_mapping(cls, values: dict[str, Any], extra: tuple[str, ...] = ()) -> Settings:
        """Build settings from a notebook's parameters, refusing names we do not know.

        `extra` names parameters that a notebook takes besides the settings (07's sweep ranks).
        """
        known = [f.name for f in fields(cls) if f.name != "target_rule"]  # the tutorial sets that one
        unknown = sorted(set(values) - set(known) - set(extra))
        if unknown:
            raise SettingsError(f"Unknown setting(s) {unknown}: the valid names are "
                                f"{sorted([*known, *extra])}; check the spelling.")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_globals(cls, namespace: dict[str, Any], extra: tuple[str, ...] = ()) -> Settings:
        """Collect a notebook's parameters by name (the variables of its `parameters` cell).

        A parameters cell lists only the lesson's knobs. papermill may also pass the settings
        every notebook shares (ACCEPTED_EVERYWHERE: the device, the folders, the pre-training
        recipe that finds 02's network) without the cell listing them. Any other name papermill
        injected is an error, where papermill would only warn and ignore it: a misspelling, or a
        knob of another notebook. It is read off the cell papermill injected into this kernel.
        """
        injected, declared = papermill_parameters(namespace), notebook_declared(namespace)
        taken = set(declared or ()) | set(ACCEPTED_EVERYWHERE) | set(extra)
        stray = [name for name in injected if declared is not None and name not in taken]
        if stray:
            own = f"its parameters are {declared}, besides" if declared else "it takes only"
            raise SettingsError(f"This notebook does not take {stray}: {own} {list(ACCEPTED_EVERYWHERE)}. "
                                "Check the spelling, or leave the name out for this notebook.")
        values = {name: namespace[name] for name in injected if name in namespace}
        values.update({f.name: namespace[f.name] for f in fields(cls)
                       if f.name in namespace and f.name != "target_rule"})
        return cls.from_mapping(values, extra)

    @property
    def finetune_lr(self) -> float:
        """Adam's learning rate for fine-tuning."""
        return self.learning_rate if self.finetune_learning_rate is None else self.finetune_learning_rate

    @property
    def lora_seed(self) -> int:
        """The seed of LoRA's random A and of the fine-tuning batch order."""
        return self.seed if self.finetune_seed is None else self.finetune_seed

    # Where things live -------------------------------------------------------------------

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir) if self.output_dir else project_root() / "outputs"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.output_path / "checkpoints"

    # Fingerprints ------------------------------------------------------------------------

    def pretrain_key(self) -> dict[str, Any]:
        """The settings that decide the pre-trained weights (not the device: see docs/reproducibility.md)."""
        return {
            "code": TRAINING_CODE_VERSION,
            "seed": self.seed,
            "pretrain_epochs": self.pretrain_epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "train_samples": self.train_samples,
            **({"loop": "post"} if self.pretrain_loop == "post" else {}),
        }

    def finetune_key(self) -> dict[str, Any]:
        """The settings that decide a LoRA adapter, pre-training included. The target digit is the
        digit itself, however it was chosen: 'worst' that turned out 9 and 9 give the same adapter."""
        if self.target_digit == WORST:
            raise ValueError("target_digit='worst' is not decided yet: call "
                             "lora_tutorial.choose_target(settings, pretrained) first.")
        return {
            **self.pretrain_key(),
            "rank": self.rank,
            "alpha": float(self.alpha),
            "target_digit": self.target_digit,
            "finetune_steps": self.finetune_steps,
            "target_modules": self.target_list(),
            # 2: fine-tuning draws from the fit images only, never the validation split (data.py)
            "finetune_code": 2,
            # the values that decide, however given: finetune_seed None and seed 0 give one adapter
            "finetune_seed": self.lora_seed,
            "finetune_lr": self.finetune_lr,
            # only when used, so adapters made before replay existed keep their names
            **({"replay_share": float(self.replay_share)} if self.replay_share else {}),
        }

    def target_list(self) -> list[str] | None:
        return list(self.target_modules) if self.target_modules is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": self.target_list()}


def check_whole_numbers(name: str, values: Any, example: str) -> list[int]:
    """A notebook's list of whole numbers >= 1 (ranks, batch sizes), checked before any work."""
    ok = isinstance(values, (list, tuple)) and len(values) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok:
        hint = (f" (papermill's -p passes text: give a list with -y '{{{name}: [1, 4]}}')"
                if isinstance(values, str) else "")
        raise SettingsError(f"{name}={values!r} is not valid: expected a list of whole numbers >= 1, "
                            f"e.g. {example}{hint}.")
    return list(values)


def assigned_names(source: str) -> list[str]:
    """The names a cell assigns at its top level (`rank = 1` -> ['rank']), in order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)]


def _injected_index(history: list[str]) -> int | None:
    for index in range(len(history) - 1, -1, -1):
        lines = history[index].splitlines()
        if lines and lines[0].strip() == "# Parameters":  # how papermill heads the cell it injects
            return index
    return None


def papermill_parameters(namespace: dict[str, Any]) -> list[str]:
    """The names assigned by papermill's injected cell, found in this kernel's input history."""
    history = list(namespace.get("In") or [])
    index = _injected_index(history)
    return [] if index is None else assigned_names(history[index])


def notebook_declared(namespace: dict[str, Any]) -> list[str] | None:
    """The names the notebook's own parameters cell declares: papermill runs that cell just before
    the one it injects. None when papermill injected nothing (a notebook run by hand)."""
    history = list(namespace.get("In") or [])
    index = _injected_index(history)
    return assigned_names(history[index - 1]) if index else None


def check_writable(name: str, folder: Path) -> None:
    """Say which setting to change when files cannot be written in `folder` (created or not).

    Nothing is created: the check looks at the nearest part of the path that exists.
    """
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = None
    if not existing.is_dir():
        why = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"no permission to write in {existing}"
    if why:
        raise SettingsError(f"{name}={str(folder)!r} cannot be written to ({why}): give {name} a "
                            "folder you can write to.")


def fingerprint(key: dict[str, Any], data_id: str) -> str:
    """A short, stable hash of settings plus the identity of the data they ran on."""
    text = json.dumps({**key, "data": data_id}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
