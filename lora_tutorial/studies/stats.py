"""A few fine-tuning seeds, one summary: the mean and the range; overlapping ranges are a tie."""

import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..settings import SettingsError, is_number

K, T = TypeVar("K", bound=Hashable), TypeVar("T")

@dataclass(frozen=True)
class Spread:
    """The mean of a few runs and their range."""
    mean: float
    low: float
    high: float
    count: int

    def overlaps(self, other: "Spread") -> bool:
        return self.low <= other.high and other.low <= self.high

    def versus(self, other: "Spread", higher_is_better: bool) -> str:
        """'tie' when the ranges overlap (the seeds alone move a result that far), else 'better'/'worse'."""
        if self.overlaps(other):
            return "tie"
        return "better" if (self.mean > other.mean) == higher_is_better else "worse"

    def text(self, digits: int = 1, scale: float = 1.0) -> str:
        """'12.3 (10.0-14.0)', times `scale`; '-1.7 (-2.9 to -0.8)' when a bound is negative; no '-0.0'."""
        def number(value: float) -> str:
            text = f"{value * scale:.{digits}f}"
            return text[1:] if text.startswith("-") and float(text) == 0 else text
        if self.count == 1:
            return number(self.mean)
        low, high = number(self.low), number(self.high)
        between = " to " if "-" in low + high else "-"
        return f"{number(self.mean)} ({low}{between}{high})"

def spread(values: Sequence[float]) -> Spread:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread() needs at least one value.")
    return Spread(sum(values) / len(values), min(values), max(values), len(values))

def best_and_ties(spreads: dict[K, Spread], higher_is_better: bool) -> tuple[K, list[K]]:
    """The studies' one choice rule: the best mean (first on a tie), and the keys whose range overlaps it."""
    if not spreads:
        raise ValueError("best_and_ties needs at least one result.")
    best = max(spreads, key=lambda k: spreads[k].mean if higher_is_better else -spreads[k].mean)
    return best, [k for k in spreads if k != best and spreads[k].overlaps(spreads[best])]

def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                        ) -> dict[str, Spread]:
    """Seconds per call, the functions taking turns so the machine's ups and downs hit them alike;
    `mean` holds the median. A call that runs on a GPU must wait for it."""
    check_repeats(repeats, "repeats")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            seconds = timed(call)[1]
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: Spread(statistics.median(v), min(v), max(v), len(v)) for name, v in times.items()}

def timed(fn: Callable[..., T], *args, **kwargs) -> tuple[T, float]:
    """What fn(*args, **kwargs) returns, and the seconds it took."""
    started = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - started

def check_repeats(value: object, name: str = "switch_repeats") -> int:
    if not (is_number(value, whole=True) and value >= 1):
        raise SettingsError(f"{name}={value!r} is not valid: expected a whole number >= 1, e.g. 5.")
    return value

def check_seeds(values: object, at_least: int = 1, name: str = "seeds") -> list[int]:
    """A notebook's list of fine-tuning seeds: distinct whole numbers >= 0, checked before any work."""
    ok = isinstance(values, (list, tuple)) and all(is_number(v, whole=True) and v >= 0 for v in values)
    if not ok or len(set(values)) != len(values) or len(values) < at_least:
        raise SettingsError(f"{name}={values!r} is not valid: expected a list of at least {at_least} "
                            f"distinct whole numbers >= 0, e.g. {list(range(max(at_least, 3)))}.")
    return list(values)

def check_rates(name: str, values: object, at_least: int = 1) -> list[float]:
    """A grid of learning rates: numbers between 0 and 1, `at_least` of them different; sorted, unique."""
    ok = isinstance(values, (list, tuple)) and all(is_number(v) and 0 < v < 1 for v in values)
    if not ok or len(set(values)) < max(1, at_least):
        several = f" ({at_least} different at least)" if at_least > 1 else ""
        raise SettingsError(f"{name}={values!r} is not valid: expected a list of learning rates between 0 "
                            f"and 1{several}, e.g. [3e-4, 1e-3, 3e-3].")
    return sorted({float(v) for v in values})
