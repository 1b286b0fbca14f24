"""One settings object, checked before any work; its fingerprints name the checkpoints it writes."""

import ast
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .model import layer_shapes

TRAINING_CODE_VERSION = 2  # in every fingerprint; 2: training on a CPU runs on one thread (train.py)
WORST = "worst"  # target_digit: the digit the pre-trained network gets wrong most (on its training images)
# Whole-number settings: name -> (lowest, highest, the fix said after what was expected).
WHOLE = {"seed": (0, None, "any whole number, e.g. 0"), "finetune_seed": (0, None, "or None to use seed"),
         "rank": (1, None, "the post uses 1"), "pretrain_epochs": (1, None, "the post uses 1"),
         "target_digit": (0, 9, "or 'worst', the default: the digit the pre-trained network gets wrong most"),
         "finetune_steps": (1, None, "the post uses 100"), "batch_size": (1, None, "the post uses 10"),
         "train_samples": (1, None, "or None for all 60,000 training images")}
REPLAY_FIX = "0, as in the post, replays nothing; 0.3 puts 3 other-digit images in each batch of 10"
POSITIVE = {"alpha": "the post uses 1.0", "learning_rate": "the post uses 0.001",  # numbers > 0
            "finetune_learning_rate": "the post uses 0.001; or None for learning_rate"}
OPTIONAL = ("finetune_seed", "train_samples", "finetune_learning_rate")  # None allowed
# Taken from papermill by any notebook: where to run, the folders, the recipe that finds 02's network.
ACCEPTED_EVERYWHERE = ("device", "data_dir", "output_dir", "checkpoint_dir", "download", "train_samples",
                       "seed", "pretrain_epochs", "batch_size", "learning_rate", "pretrain_loop")

def project_root() -> Path:
    """The checkout the package lives in (editable install), else the current folder."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else Path.cwd()

def shown_path(path: Path) -> str:
    """A path inside the project relative to it, so outputs carry no machine paths."""
    full, root = Path(os.path.abspath(path)), Path(os.path.abspath(project_root()))
    return str(full.relative_to(root) if full.is_relative_to(root) else path)

class ShortError(Exception):
    """A mistake in what the user gave: Jupyter and papermill show only its message, which names the fix."""

    def _render_traceback_(self) -> list[str]:  # IPython's hook for how an error is displayed
        return [f"{type(self).__name__}: {self}"]

class SettingsError(ShortError, ValueError):
    """A setting has a value the tutorial cannot use."""

def _invalid(name: str, value: Any, expected: str, hint: str | None = None) -> SettingsError:
    return SettingsError(f"{name}={value!r} is not valid: {expected}{f' ({hint})' if hint else ''}.")

def is_number(value: Any, whole: bool = False) -> bool:
    return isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)

def parse_device(name: Any) -> str:
    """Check a device name's spelling (whether it is here: `device.pick_device`)."""
    text = name.strip().lower() if isinstance(name, str) else ""
    kind, colon, index = text.partition(":")
    if not (text == "auto" or (kind in ("cpu", "cuda", "mps") and (not colon or index.isdigit()))):
        raise _invalid("device", name, "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return text

def replay_count(share: Any, batch_size: int) -> int:
    """How many images of each batch replay other digits: share x batch size, rounded half up; refused
    unless 0 (none) or from 1 to batch_size - 1 (`Settings` and `train` both check here)."""
    if not (is_number(share) and 0 <= share < 1):
        raise _invalid("replay_share", share, "expected a number from 0 up to, not including, 1", REPLAY_FIX)
    if share > 0 and not 1 <= (extra := math.floor(share * batch_size + 0.5)) < batch_size:
        raise SettingsError(f"replay_share={share!r} puts {extra} of every {batch_size} images from other "
                            f"digits (batch_size={batch_size}): choose a share that gives between 1 and "
                            f"{batch_size - 1}, or 0 for none.")
    return extra if share > 0 else 0

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
    target_rule: str | None = None  # "worst" once `choose_target` decided the digit; not a user's
    finetune_seed: int | None = None  # LoRA's random A and the batch order; None: `seed`
    pretrain_loop: str = "fast"  # "post": the post's own loop, slower; "graphed": train(graphed=True), GPUs
    finetune_learning_rate: float | None = None  # None: `learning_rate` (05's knob; no re-pre-training)

    def __post_init__(self) -> None:
        """Check every value on its own terms; nothing here looks at the machine (see `preflight`)."""
        if isinstance(self.target_digit, str) and self.target_digit.strip().lower() == WORST:
            object.__setattr__(self, "target_digit", WORST)
        for name, (low, high, fix) in WHOLE.items():
            value = getattr(self, name)
            if (value is None and name in OPTIONAL) or (name == "target_digit" and value == WORST):
                continue
            if not (is_number(value, whole=True) and low <= value and (high is None or value <= high)):
                span = f"between {low} and {high}" if high is not None else f">= {low}"
                raise _invalid(name, value, f"expected an integer {span}", fix)
        for name, fix in POSITIVE.items():
            value = getattr(self, name)
            if not (value is None and name in OPTIONAL) and not (is_number(value) and 0 < value < math.inf):
                raise _invalid(name, value, "expected a number > 0", fix)
        if self.pretrain_loop not in ("fast", "post", "graphed"):
            raise _invalid("pretrain_loop", self.pretrain_loop, "expected 'fast', 'post' (the post's loop) "
                           "or 'graphed' (each step one captured graph on a GPU)")
        if self.target_rule not in (None, WORST) or (self.target_rule and self.target_digit == WORST):
            raise _invalid("target_rule", self.target_rule, "it is set by choose_target; leave it out")
        replay_count(self.replay_share, self.batch_size)
        parse_device(self.device)
        if not isinstance(self.download, bool):
            raise _invalid("download", self.download, "expected True or False")
        for name in ("data_dir", "output_dir", "checkpoint_dir"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value).strip()):
                raise _invalid(name, value, "expected a folder path, or None for the default")
        given, shapes = self.target_modules, layer_shapes()  # `-p target_modules linear3`: one name
        names = [given] if isinstance(given, str) else list(given) if isinstance(given, (list, tuple)) else []
        unknown = [name for name in names if name not in shapes]
        if given is not None and (not names or unknown or len(set(names)) < len(names)):
            why = f"no layer called {', '.join(unknown)}; " if unknown else ""
            raise _invalid("target_modules", given, f"{why}expected a list of distinct layer names "
                           f"from {list(shapes)}, or None for all")
        targets = None if given is None else tuple(names)
        for name in targets or shapes:
            if self.rank > min(shapes[name]):
                others = [n for n in targets or shapes if n != name]
                instead = f" or leave {name} out (target_modules={others})" if others else ""
                raise SettingsError(f"rank={self.rank} is too large for layer {name} ({shapes[name][0]} x "
                                    f"{shapes[name][1]} weight): a rank can be at most min(out, in) = "
                                    f"{min(shapes[name])}. Use rank <= {min(shapes[name])}{instead}.")
        object.__setattr__(self, "target_modules", targets)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], extra: tuple[str, ...] = ()) -> "Settings":
        """Settings from a notebook's parameters; `extra` names its other knobs (07's sweep ranks)."""
        known = [f.name for f in fields(cls) if f.name != "target_rule"]  # the tutorial sets that one
        if unknown := sorted(set(values) - set(known) - set(extra)):
            raise SettingsError(f"Unknown setting(s) {unknown}: the valid names are "
                                f"{sorted([*known, *extra])}; check the spelling.")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_globals(cls, namespace: dict[str, Any], extra: tuple[str, ...] = ()) -> "Settings":
        """A notebook's settings from its variables; refuses what papermill injected but it does not take."""
        cells = ["", *(namespace.get("In") or [])]  # papermill's cell, the notebook's parameters before it
        at = max([i for i, c in enumerate(cells) if c.split("\n", 1)[0].strip() == "# Parameters"], default=0)
        injected, declared = assigned_names(cells[at]), assigned_names(cells[at - 1]) if at > 1 else None
        taken = {*ACCEPTED_EVERYWHERE, *extra, *(injected if declared is None else declared)}
        if stray := [name for name in injected if name not in taken]:
            own = f"its parameters are {declared}, besides" if declared else "it takes only"
            raise SettingsError(f"This notebook does not take {stray}: {own} {list(ACCEPTED_EVERYWHERE)}. "
                                "Check the spelling, or leave the name out for this notebook.")
        names = [*injected, *(f.name for f in fields(cls) if f.name != "target_rule")]
        try:
            return cls.from_mapping({name: namespace[name] for name in names if name in namespace}, extra)
        except SettingsError as err:  # a rank fix that names target_modules, which this notebook lacks
            if "target_modules" in (*namespace, *extra) or " out (target_modules=" not in str(err):
                raise
            raise SettingsError(str(err).split(" or leave ")[0] + ".") from None

    @property
    def finetune_lr(self) -> float:
        return self.learning_rate if self.finetune_learning_rate is None else self.finetune_learning_rate

    @property
    def lora_seed(self) -> int:
        return self.seed if self.finetune_seed is None else self.finetune_seed

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir) if self.output_dir else project_root() / "outputs"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.output_path / "checkpoints"

    def pretrain_key(self) -> dict[str, Any]:
        """The settings that decide the pre-trained weights (not the device: docs/reproducibility.md)."""
        names = ("seed", "pretrain_epochs", "batch_size", "learning_rate", "train_samples")
        loop = {"loop": self.pretrain_loop} if self.pretrain_loop != "fast" else {}
        return {"code": TRAINING_CODE_VERSION, **{name: getattr(self, name) for name in names}, **loop}

    def finetune_key(self) -> dict[str, Any]:
        """The values that decide an adapter, however given ('worst' that turned out 9 and 9 are one)."""
        if self.target_digit == WORST:
            raise ValueError("target_digit='worst' is not decided yet: call "
                             "lora_tutorial.choose_target(settings, pretrained) first.")
        # replay_share only when used, so adapters made before replay existed keep their names
        replay = {"replay_share": float(self.replay_share)} if self.replay_share else {}
        return {**self.pretrain_key(), "rank": self.rank, "alpha": float(self.alpha),
                "target_digit": self.target_digit, "finetune_steps": self.finetune_steps,
                "target_modules": self.target_list(), "finetune_code": 2,  # 2: no validation images
                "finetune_seed": self.lora_seed, "finetune_lr": self.finetune_lr, **replay}

    def target_list(self) -> list[str] | None:
        return list(self.target_modules) if self.target_modules is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": self.target_list()}

def check_whole_numbers(name: str, values: Any, example: str) -> list[int]:
    """A notebook's list of whole numbers >= 1 (ranks, batch sizes), checked before any work."""
    if not (isinstance(values, (list, tuple)) and values and all(is_number(v, 1) and v > 0 for v in values)):
        hint = (f" (papermill's -p passes text: give a list with -y '{{{name}: [1, 4]}}')"
                if isinstance(values, str) else "")
        raise _invalid(name, values, f"expected a list of whole numbers >= 1, e.g. {example}{hint}")
    return list(values)

def assigned_names(source: str) -> list[str]:
    """The names a cell assigns at its top level (`rank = 1` -> ['rank']), in order."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return []
    return [t.id for n in body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in getattr(n, "targets", [getattr(n, "target", None)]) if isinstance(t, ast.Name)]

def check_writable(name: str, folder: Path) -> None:
    """Refuse a folder (created or not) that files cannot be written in; creates nothing."""
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    why = (f"{existing} is a file, not a folder" if not existing.is_dir() else
           f"no permission to write in {existing}" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if why:
        raise SettingsError(f"{name}={str(folder)!r} cannot be written to ({why}): give {name} a "
                            "folder you can write to.")

def fingerprint(key: dict[str, Any], data_id: str) -> str:
    """A short, stable hash of settings plus the identity of the data they ran on."""
    return hashlib.sha256(json.dumps({**key, "data": data_id}, sort_keys=True).encode()).hexdigest()[:12]
