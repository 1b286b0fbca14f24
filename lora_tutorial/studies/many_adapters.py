"""One frozen base, many adapters (10): one LoRA per weak digit, switched, combined, or trained together."""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from torch import nn

from ..checkpoints import load_adapter, save_adapter
from ..data import Mnist, fit_subset
from ..evaluate import Evaluation
from ..lora import separate_path
from ..pipeline import adapter_path, finetune_key, finetuned_model, lora_copy
from ..plots import finish, new_figure, seed_column
from ..settings import Settings, SettingsError, fingerprint, is_number
from ..train import train
from .forgetting import share_answering
from .stats import spread


def check_adapter_digits(value: object) -> int | list[int]:
    """How many weakest digits get an adapter (2 to 9: one is left to measure the cost), or a list."""
    if is_number(value, whole=True) and 2 <= value <= 9:
        return value
    if (isinstance(value, (list, tuple)) and 2 <= len(value) <= 9 and len(set(value)) == len(value)
            and all(is_number(d, whole=True) and 0 <= d <= 9 for d in value)):
        return list(value)
    raise SettingsError(f"adapter_digits={value!r} is not valid: expected how many of the weakest digits get "
                        "an adapter (2 to 9, e.g. 3; the others measure what the adapters cost), or a list "
                        "of 2 to 9 different digits, e.g. [9, 3, 2].")

def weakest_digits(training: Evaluation, count: int) -> list[int]:
    """The `count` digits most often wrong on the training images, worst first ('worst's rule)."""
    return sorted(range(10), key=lambda d: (-training.wrong_counts[d], d))[:count]

def adapter_seed(seed: int, index: int) -> int:
    """seed, seed + 1000, ...: adapters sharing A would sum to nearly rank r; the first is 05's run."""
    return seed + 1000 * index

def union_settings(settings: Settings, count: int) -> Settings:
    """Rank, alpha, batch size times `count`: the single adapters' parameters, scale, images together."""
    try:
        return dataclasses.replace(settings, rank=count * settings.rank, alpha=count * settings.alpha,
                                   batch_size=count * settings.batch_size)
    except SettingsError as err:
        raise SettingsError(f"The adapter trained on all {count} digits together has rank {count} x "
                            f"{settings.rank}: {err} Choose fewer adapter_digits, a smaller rank, or "
                            "target_modules without that layer.") from None

def union_adapter(settings: Settings, data: Mnist, base: nn.Module, digits: Sequence[int]) -> nn.Module:
    """A LoRA trained on the fit images of all `digits` together (`union_settings`); saved, reused."""
    union = union_settings(settings, len(digits))
    key = {**finetune_key(union, data), "target_digit": list(digits)}  # all of them, not the settings' one
    path = union.output_path / "adapters" / f"union-{fingerprint(key, data.identity)}.safetensors"
    model = lora_copy(base, union.lora_seed, rank=union.rank, alpha=union.alpha,
                      target_modules=union.target_modules)
    if path.exists():
        return load_adapter(model, path, key)
    train(separate_path(model), *fit_subset(data, digits), max_steps=union.finetune_steps,
          batch_size=union.batch_size, lr=union.learning_rate, seed=union.lora_seed, progress=False)
    save_adapter(model, path, key)
    return model

def digit_adapter(settings: Settings, data: Mnist, base: nn.Module, digit: int) -> tuple[nn.Module, Path]:
    """The tutorial's fine-tuning run with `digit` as the target (loaded when saved), and its file."""
    run = dataclasses.replace(settings, target_digit=digit)
    return finetuned_model(run, data, base, verbose=False), adapter_path(run, data)

def figures(evaluation: Evaluation, digits: Sequence[int]) -> dict:
    """Wrong answers per digit, others' and all accuracy; per digit, the share of others' errors it takes."""
    return {"wrong": {str(d): evaluation.wrong_counts[d] for d in digits},
            "others_accuracy": evaluation.mean_accuracy_except(digits), "accuracy": evaluation.accuracy,
            "answered": {str(d): share_answering(evaluation, d) for d in digits}}

def summarize(rows: Sequence[dict], digits: Sequence[int]) -> pd.DataFrame:
    """Per configuration (rows' order): 'wrong on d', 'others %', 'all %', a `Spread` over seeds."""
    return pd.DataFrame([{"name": r["name"], **{f"wrong on {d}": r["wrong"][str(d)] for d in digits},
                          "others %": 100 * r["others_accuracy"], "all %": 100 * r["accuracy"]} for r in rows]
                        ).groupby("name", sort=False).agg(spread)

def verdicts(summaries: pd.DataFrame, digits: Sequence[int], comparisons: Sequence[tuple[str, str | None]]
             ) -> pd.DataFrame:
    """`Spread.versus` per (name, against, measure); a reference of None: each digit's own adapter."""
    if missing := sorted({n for pair in comparisons for n in pair if n is not None} - set(summaries.index)):
        raise ValueError(f"verdicts: no summary named {missing}; the summaries are {list(summaries.index)}.")
    pairs = []
    for name, reference in comparisons:
        pairs += [(name, reference, reference or f"digit {d} alone", f"wrong on {d}") for d in digits]
        pairs += [(name, reference, other, "others %")
                  for other in ([reference] if reference else [f"digit {d} alone" for d in digits])]
    frame = pd.DataFrame(pairs, columns=["name", "reference", "against", "measure"])
    return frame.assign(verdict=[summaries.loc[n, m].versus(summaries.loc[a, m], m == "others %")
                                 for n, _, a, m in pairs])

def plot_combinations(rows: Sequence[dict], before: dict, digits: Sequence[int], labels: dict[str, str],
                      title: str = ""):
    """Per adapter (`labels`: name -> tick), a point per seed: wrong answers (symlog), others' accuracy."""
    names = list(labels)
    if missing := [n for n in names if not any(r["name"] == n for r in rows)]:
        raise ValueError(f"plot_combinations: no rows named {missing}.")
    fig, (left, right) = new_figure(1, 2, figsize=(12, 5.2))
    width = 0.26 if len(digits) > 1 else 0
    for k, d in enumerate(digits):
        color, offset = f"C{k + k // 7}", (k - (len(digits) - 1) / 2) * width  # tab10 without its gray
        for i, name in enumerate(names):
            seed_column(left, i + offset, [r["wrong"][str(d)] for r in rows if r["name"] == name], color,
                        0.035, 0.1, size=18, label=f"digit {d}, one point per seed" if i == 0 else None)
        left.axhline(before["wrong"][str(d)], color=color, ls="--", lw=1, label=f"pre-trained, digit {d}")
    left.set_yscale("symlog", linthresh=10)
    top = max([float(v) for r in rows for v in r["wrong"].values()] + list(before["wrong"].values()))
    ticks = [t for t in (0, 3, 10, 30, 100, 300, 1000, 3000, 10000) if t <= 1.5 * top]
    left.set_yticks(ticks, [str(t) for t in ticks])
    left.set(title="Wrong answers on the chosen digits", ylabel="wrong answers (log scale above 10)",
             ylim=(0, 1.6 * top))
    for i, name in enumerate(names):
        seed_column(right, i, [100 * r["others_accuracy"] for r in rows if r["name"] == name], "tab:gray",
                    0.035, 0.1, size=18, label="one point per seed" if i == 0 else None)
    right.axhline(100 * before["others_accuracy"], color="black", ls="--", lw=1, label="pre-trained")
    right.set(title=f"The other {10 - len(digits)} digits' mean accuracy", ylabel="accuracy (%)")
    for ax in (left, right):
        ax.set(xticks=range(len(names)), xticklabels=[labels[n] for n in names], xlabel="adapter")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3 if ax is left else 2)
    return finish(fig, title)
