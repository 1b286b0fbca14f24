"""Several seeds, one summary: the mean and the spread, and when two results are a tie.

Every comparison in notebooks 07-09 runs a few fine-tuning seeds (LoRA's random A and the batch
order) and reports the mean with the range (min to max) over them. Two configurations whose
ranges overlap are called a tie: the seeds alone move each of them that far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """The mean of a few runs and their range."""

    mean: float
    low: float
    high: float
    count: int

    def overlaps(self, other: Spread) -> bool:
        """True when the two ranges share a value: the difference is inside the seeds' spread."""
        return self.low <= other.high and other.low <= self.high

    def text(self, digits: int = 1, scale: float = 1.0) -> str:
        """'12.3 (10.0-14.0)': the mean and the range, each multiplied by `scale`."""
        f = f"{{:.{digits}f}}"
        mean, low, high = (f.format(v * scale) for v in (self.mean, self.low, self.high))
        return f"{mean} ({low}-{high})" if self.count > 1 else mean


def spread(values: Sequence[float]) -> Spread:
    """The mean and the min-max range of `values` (one per seed)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread() needs at least one value.")
    return Spread(sum(values) / len(values), min(values), max(values), len(values))


def check_seeds(values: object, at_least: int = 1) -> list[int]:
    """A notebook's list of fine-tuning seeds: distinct whole numbers >= 0, checked before any work."""
    from .settings import SettingsError

    ok = isinstance(values, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    if not ok or len(set(values)) != len(values) or len(values) < at_least:
        raise SettingsError(f"seeds={values!r} is not valid: expected a list of at least {at_least} "
                            "distinct whole numbers >= 0, e.g. [0, 1, 2].")
    return list(values)
